"""Plot a run's training loss and validation BLEU against step (for the model card).

python -m gmsa.training.curves runs/ae/metrics.jsonl reports/train/ae_curves.png   # .jsonl.gz reads too
python -m gmsa.training.curves --compare a=runs/a/metrics.jsonl b=runs/b/metrics.jsonl [--val-key=val_info_x4] out.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .data import read_jsonl  # noqa: E402


def latest_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training and validation rows, keeping the last row of a step logged twice (after a resume)."""
    train = {r["step"]: r for r in rows if "loss" in r}
    val = {r["step"]: r for r in rows if any(k.startswith("val_") for k in r)}
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def smooth(values: list[float], window: int = 20) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_measured(axis, rows: list[dict], key: str) -> None:
    """``key`` against step over the rows that measured it (a rate may join the validation later)."""
    measured = [r for r in rows if key in r]
    axis.plot([r["step"] for r in measured], [r[key] for r in measured], marker="o", label=key)


def plot(metrics: str | Path, out: str | Path) -> None:
    """Loss (left) and, when the run measured it (AE), validation BLEU (right)."""
    train, val = latest_rows(read_jsonl(metrics))
    bleu_keys = sorted({k for r in val for k in r if k.startswith("val_bleu")})
    fig, axes = plt.subplots(1, 2 if bleu_keys else 1, figsize=(11 if bleu_keys else 6, 4), squeeze=False)
    left = axes[0][0]
    steps = [r["step"] for r in train]
    left.plot(steps, [r["loss"] for r in train], alpha=0.3, label="loss")
    left.plot(steps, smooth([r["loss"] for r in train]), label="loss (20-step mean)")
    for key in sorted({k for r in val for k in r if k.startswith("val_loss")}):
        plot_measured(left, val, key)
    left.set_xlabel("step")
    left.set_ylabel("cross entropy")
    left.legend()
    if bleu_keys:
        right = axes[0][1]
        for key in bleu_keys:
            plot_measured(right, val, key)
        right.set_xlabel("step")
        right.set_ylabel("validation reconstruction BLEU")
        right.legend()
    fig.suptitle(f"{metrics}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def compare(runs: dict[str, str | Path], out: str | Path, val_key: str = "val_loss_x4") -> None:
    """Training loss (20-step mean, left) and ``val_key`` (right) of several runs, e.g. on the same batches."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, metrics in runs.items():
        train, val = latest_rows(read_jsonl(metrics))
        left.plot([r["step"] for r in train], smooth([r["loss"] for r in train]), label=label)
        measured = [r for r in val if val_key in r]
        right.plot([r["step"] for r in measured], [r[val_key] for r in measured], marker="o", label=label)
    left.set_ylabel("training cross entropy (20-step mean)")
    right.set_ylabel(val_key)
    for axis in (left, right):
        axis.set_xlabel("step")
        axis.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--compare" and len(argv) >= 3:
        *pairs, out = argv[1:]
        keys = [p.split("=", 1)[1] for p in pairs if p.startswith("--val-key=")]
        runs = dict(p.split("=", 1) for p in pairs if not p.startswith("--val-key="))
        compare(runs, out, *keys[-1:])
    elif len(argv) == 2 and argv[0] != "--compare":
        plot(argv[0], argv[1])
    else:
        print(__doc__.strip().split("\n\n", 1)[1], file=sys.stderr)  # the usage lines
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
