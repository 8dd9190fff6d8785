"""What a resume without optimizer moments costs: re-warmed AdamW vs an exact resume, same batches.

A run trains ``--split`` steps and saves; the same state then continues to ``--steps`` four ways:
exactly (``exact/``: fp32 weights + AdamW moments), and as a fresh clone would (bf16 weights from
``model/``, fresh moments) with the lr re-warmed over 0, 5, 20 and 50 steps. Every variant sees the
same batches (data position and RNG are restored), so the loss differences are the price of the
missing moments and the bf16 rounding. Prints the mean training loss per window and the final
validation loss, each as a ratio to the exact resume of the same run::

    python benchmarks/rewarm_cost.py                      # tiny random backbone, ~1-2 min on 1 thread
    python benchmarks/rewarm_cost.py --backbone default --data data/ae/train.jsonl --steps 60 --split 30
    python benchmarks/rewarm_cost.py --from checkpoints/ae --config configs/ae.toml --data D --steps 2620
        # from an existing exact state (its exact/ or a legacy state.pt), with that run's own recipe
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gmsa.training import resume  # noqa: E402
from gmsa.training.config import TrainConfig  # noqa: E402
from gmsa.training.trainer import Trainer  # noqa: E402

REWARMS = (0, 5, 20, 50)  # --rewarms to choose


def tiny_setup(root: Path) -> tuple[str, str]:
    """The tests' tiny random llama and sentences of this repository's README as AE data."""
    from tests.conftest import tiny_backbone_dir

    backbone = tiny_backbone_dir(root)
    words = (REPO / "README.md").read_text().split()
    rows = [" ".join(words[i : i + 12]) for i in range(0, len(words) - 12, 12)]
    data = root / "ae.jsonl"
    data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return str(backbone), str(data)


def config(args, backbone: str, data: str, out: Path, **overrides) -> TrainConfig:
    """The tests' tiny recipe (:func:`tests.training.test_train.tiny_config`), longer and with larger batches."""
    from tests.training.test_train import tiny_config

    values = dict(
        lora_r=8,
        lora_dropout=0.0,
        batch_size=8,
        warmup_steps=10,
        max_steps=args.steps,
        eval_every=args.steps,
        eval_examples=16,
        save_every_min=1e9,
        max_tokens=64,
        threads=1,
        seed=args.seed,
        dtype="auto",
    )
    if backbone == "default":
        values |= dict(k_enc=4, lora_r=32, lora_alpha=32, rates=[4, 8], batch_size=4, lr=1e-3, max_tokens=128)
    return tiny_config(backbone, (data, data), out, **values | overrides)


def recipe_config(args, out: Path, **overrides) -> TrainConfig:
    """``--config`` (the run's own recipe) with the benchmark's data, output and stopping step."""
    values = [f"data={json.dumps(args.data)}", f"val_data={json.dumps(args.data)}", f"out_dir={json.dumps(str(out))}"]
    values += [f"stop_at_step={args.steps}", f"eval_every={args.steps}", "save_every_min=1e9", "threads=1"]
    values += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return TrainConfig.from_sources([args.config], values)


def losses(out: Path, start: int) -> tuple[list[float], float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    train = [r["loss"] for r in rows if "loss" in r and r["step"] > start]
    val = [r for r in rows if "val_loss_x2" in r or "val_loss_x4" in r][-1]
    return train, statistics.fmean(v for k, v in val.items() if k.startswith("val_loss"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random, fast), 'default' or a directory")
    parser.add_argument("--data", default=None, help="AE JSONL (default: README sentences)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--split", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from", dest="start", type=Path, default=None, help="an existing exact state to split at")
    parser.add_argument("--config", default="configs/ae.toml", help="with --from: the recipe of that run")
    parser.add_argument("--rewarms", type=int, nargs="+", default=list(REWARMS), help="re-warm lengths to try")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rewarm-"))
    try:
        if args.start is not None:
            state = resume.read(args.start)
            assert state is not None and state.exact, f"{args.start} holds no exact state"
            args.split, args.backbone = state.counters["step"], "recipe"
            make = lambda out, **o: recipe_config(args, out, **o)  # noqa: E731
            first = args.start
        else:
            backbone, data = tiny_setup(root) if args.backbone == "tiny" else (args.backbone, args.data)
            make = lambda out, **o: config(args, backbone, data, out, **o)  # noqa: E731
            first = root / "first"
            Trainer(make(first, stop_at_step=args.split, eval_every=0)).run()
        variants = {"exact": first}
        for rewarm in args.rewarms:
            clone = root / f"clone-{rewarm}"
            clone.mkdir()
            shutil.copytree(first / "model", clone / "model")
            shutil.copyfile(first / "resume.json", clone / "resume.json")
            variants[f"rewarm {rewarm}"] = clone
        results = {}
        for label, source in variants.items():
            out = root / f"run-{label.replace(' ', '-')}"
            Trainer(make(out, resume_from=str(source), rewarm_steps=rewarm_of(label))).run()
            results[label] = losses(out, args.split)
        report(results, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def rewarm_of(label: str) -> int:
    return int(label.split()[1]) if label.startswith("rewarm") else 0


def report(results: dict, args) -> None:
    windows = [
        (args.split, args.split + (args.steps - args.split) // 3),
        (args.split + (args.steps - args.split) // 3, args.steps),
    ]
    exact_train, exact_val = results["exact"]
    print(f"steps {args.split}->{args.steps}, backbone {args.backbone}; loss / exact-resume loss")
    header = [f"train {a + 1}-{b}" for a, b in windows] + ["final val"]
    print("| resume | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for label, (train, val) in results.items():
        cells = []
        for a, b in windows:
            ours = statistics.fmean(train[a - args.split : b - args.split])
            base = statistics.fmean(exact_train[a - args.split : b - args.split])
            cells.append(f"{ours:.4f} ({ours / base:.3f})")
        cells.append(f"{val:.4f} ({val / exact_val:.3f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
