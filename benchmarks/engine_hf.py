"""HF side of the engine comparison (run in gmsa's venv); see docs/serving.md.

Exports the decoder, builds the prompt embeddings of the demo (2 questions + the reconstruction
prompt), times greedy decoding of ``NEW_TOKENS`` tokens (EOS ignored) at batch 1 and 3, and
writes ``OUT/decoder``, ``OUT/embeds.pt`` and ``OUT/hf.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gmsa import GMSA
from gmsa.decoding import greedy_generate
from gmsa.engines import exported_decoder
from gmsa.model import pack

NEW_TOKENS = 32
DEMO = Path(__file__).parents[1] / "gmsa" / "assets" / "demo.json"


def greedy_ids(gmsa: GMSA, rows: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    """``NEW_TOKENS`` greedy ids per ``(n_i, H)`` prompt, ``batch_size`` prompts per call."""
    ids = []
    for start in range(0, len(rows), batch_size):
        packed = pack([[row] for row in rows[start : start + batch_size]], left_pad=True)
        output, _ = greedy_generate(gmsa.model.decoder, packed.inputs_embeds, packed.attention_mask, NEW_TOKENS)
        ids += output.tolist()
    return ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    demo = json.loads(DEMO.read_text())
    gmsa = GMSA.from_pretrained(args.model)
    exported_decoder(gmsa, args.out / "decoder")
    compressed = gmsa.compress(demo["text"], rate=4)
    rows = gmsa.prompt_embeds(compressed, [q["question"] for q in demo["questions"]] + [gmsa.config.ae_prompt])
    torch.save(rows, args.out / "embeds.pt")
    report = {"shapes": [list(r.shape) for r in rows], "n_tokens": compressed.n_tokens, "new_tokens": NEW_TOKENS}
    greedy_ids(gmsa, rows[:1], 1)  # warm-up
    for batch_size in (1, len(rows)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            ids = greedy_ids(gmsa, rows, batch_size)
            times.append(time.perf_counter() - start)
        report[f"bs{batch_size}"] = {"s": statistics.median(times), "token_ids": ids}
    (args.out / "hf.json").write_text(json.dumps(report, indent=1) + "\n")
    print({key: value["s"] for key, value in report.items() if isinstance(value, dict)})


if __name__ == "__main__":
    main()
