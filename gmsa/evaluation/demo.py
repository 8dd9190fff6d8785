"""``gmsa demo``: compress a real passage, answer questions from it, print quality and speed-up.

Everything printed is measured in this run: the uncompressed prompt (the same decoder
reading the passage's own tokens) is the baseline for both answers and time.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..api import GMSA
from .metrics import bleu, qa_scores

DEMO_FILE = Path(__file__).parents[1] / "assets" / "demo.json"
NEW_TOKENS = 32


def median_times(fns: list, repeats: int = 3) -> list[float]:
    """Median wall time of each function over ``repeats`` rounds, after one warm-up call of each.

    The functions take turns within a round, so a machine that slows down or speeds up (other
    processes, CPU frequency) weighs on all of them alike.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def checkpoint_status(demo: dict, model: str | None, checkpoint_id: str) -> str:
    """One line on what the loaded checkpoint is and how well it is known to work."""
    shipped = demo["shipped_status"]
    if checkpoint_id == shipped["checkpoint_id"]:
        return f"shipped checkpoint {checkpoint_id}: {shipped['line']}"
    where = model or "the shipped directory"
    return f"checkpoint {checkpoint_id} from {where}: not the one this demo describes; see its own training log"


def run_demo(model: str | None = None, rate: int = 4, as_json: bool = False, repeats: int = 3) -> int:
    demo = json.loads(DEMO_FILE.read_text())
    gmsa = GMSA.from_pretrained(model)
    questions = [q["question"] for q in demo["questions"]]

    # Timed to the first answer token (compress + prefill): both paths then do the same work,
    # whereas full answers may stop at different lengths. `gmsa bench` times whole answers.
    def gmsa_first_token() -> list[str]:
        return gmsa.generate(gmsa.compress(demo["text"], rate=rate), questions, max_new_tokens=1)

    def full_first_token() -> list[str]:
        return gmsa.generate(gmsa.uncompressed(demo["text"]), questions, max_new_tokens=1)

    compressed = gmsa.compress(demo["text"], rate=rate)
    answers = gmsa.generate(compressed, questions, max_new_tokens=NEW_TOKENS)
    baseline = gmsa.generate(gmsa.uncompressed(demo["text"]), questions, max_new_tokens=NEW_TOKENS)
    gmsa_s, full_s = median_times([gmsa_first_token, full_first_token], repeats)
    reconstruction = gmsa.reconstruct(compressed)[0]
    report = {
        "checkpoint": checkpoint_status(demo, model, gmsa.checkpoint_id),
        "source": demo["source"],
        "context_tokens": compressed.n_tokens[0],
        "soft_tokens": compressed.n_soft_tokens[0],
        "rate": rate,
        "reconstruction_bleu": round(bleu([reconstruction], [demo["text"]]), 3),
        "reconstruction": reconstruction,
        "qa": [
            {
                "question": q["question"],
                "gold": q["answers"],
                "gmsa": a,
                "uncompressed": b,
                "gmsa_f1": round(qa_scores(a, q["answers"])["f1"], 3),
                "uncompressed_f1": round(qa_scores(b, q["answers"])["f1"], 3),
            }
            for q, a, b in zip(demo["questions"], answers, baseline)
        ],
        "timed_repeats": repeats,
        "seconds_gmsa": round(gmsa_s, 3),
        "seconds_uncompressed": round(full_s, 3),
        "speedup": round(full_s / gmsa_s, 2),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else _format(report))
    return 0


def _format(r: dict) -> str:
    shown = r["reconstruction"][:400] + ("..." if len(r["reconstruction"]) > 400 else "")
    lines = [
        f"Checkpoint: {r['checkpoint']}",
        f"Passage: {r['source']}",
        f"  {r['context_tokens']} tokens -> {r['soft_tokens']} soft tokens (rate {r['rate']})",
        "",
        f"Reconstruction (BLEU {r['reconstruction_bleu']:.3f} against the passage):",
        f"  {shown or '(empty)'}",
        "",
    ]
    for qa in r["qa"]:
        lines += [
            f"Q: {qa['question']}   (gold: {' | '.join(qa['gold'])})",
            f"  GMSA ({r['rate']}x):    {qa['gmsa']!r}   F1 {qa['gmsa_f1']:.2f}",
            f"  uncompressed: {qa['uncompressed']!r}   F1 {qa['uncompressed_f1']:.2f}",
        ]
    lines += [
        "",
        f"Speed: time to the first answer token for {len(r['qa'])} questions, median of {r['timed_repeats']} "
        "alternating runs after a warm-up, this machine:",
        f"  GMSA {r['rate']}x (compress the passage + read {r['soft_tokens']} soft tokens) {r['seconds_gmsa']:.2f} s",
        f"  vs the same decoder reading all {r['context_tokens']} passage tokens {r['seconds_uncompressed']:.2f} s",
        f"  -> speed-up {r['speedup']:.2f}x  (full answers, longer contexts: gmsa bench)",
    ]
    return "\n".join(lines)
