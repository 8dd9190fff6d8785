"""The demo passage's two questions (gmsa/assets/demo.json) answered by each model at rate 4, verbatim.

python reports/train/s8/keft-cloze/demo_answers.py K0=runs/k0/model K1=runs/k1/model > demo_answers.json
"""

import json
import sys

import torch

from gmsa.api import GMSA
from gmsa.evaluation.demo import DEMO_FILE, NEW_TOKENS

torch.set_num_threads(1)
demo = json.loads(DEMO_FILE.read_text())
questions = [q["question"] for q in demo["questions"]]
out = {}
for item in sys.argv[1:]:
    label, path = item.split("=", 1)
    gmsa = GMSA.from_pretrained(path)
    answers = gmsa.generate(gmsa.compress(demo["text"], rate=4), questions, max_new_tokens=NEW_TOKENS)
    out[label] = [
        {"question": q["question"], "gold": q["answers"], "answer": a} for q, a in zip(demo["questions"], answers)
    ]
print(json.dumps(out, indent=2, ensure_ascii=False))
