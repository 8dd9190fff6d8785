"""Figures and tables for the data card, from a prepared output directory.

``python -m gmsa.data.report data --png reports/data/token_lengths.png --md reports/data/tables.md``
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from gmsa.data.split import SPLITS


def load_lengths(out_dir: Path, kind: str) -> dict[str, list[int]]:
    """Token lengths per source over all splits of ``kind`` ("ae" or "qa")."""
    lengths: dict[str, list[int]] = defaultdict(list)
    for split in SPLITS:
        with open(out_dir / kind / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                lengths[row["source"]].append(row["n_tokens"])
    return dict(sorted(lengths.items()))


def plot_lengths(out_dir: Path, png: Path) -> None:
    """Two stacked histograms (AE passages, QA contexts) of token lengths per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    specs = [("ae", "AE passages (all splits)", range(0, 545, 16)), ("qa", "QA contexts (all splits)", None)]
    for ax, (kind, title, bins) in zip(axes, specs):
        lengths = load_lengths(out_dir, kind)
        if bins is None:
            top = max((max(v) for v in lengths.values() if v), default=1)
            bins = range(0, min(top, 3072) + 64, 64)
        ax.hist(list(lengths.values()), bins=list(bins), stacked=True, label=list(lengths))
        total = sum(len(v) for v in lengths.values())
        ax.set_title(f"{title}: {total:,} rows")
        ax.set_xlabel("tokens (SmolLM2 tokenizer)")
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def split_table(stats: dict[str, Any], kind: str) -> str:
    """Markdown: rows (docs) per source and split, plus MB and tokens."""
    sources = sorted({s for sp in SPLITS for s in stats[kind][sp] if s != "_all"})
    head = "| source | " + " | ".join(f"{sp} rows (docs)" for sp in SPLITS) + " | MB | tokens |"
    lines = [head, "|" + "---|" * (len(SPLITS) + 3)]
    for src in sources:
        cells, mb, tok = [], 0, 0
        for sp in SPLITS:
            c = stats[kind][sp].get(src)
            cells.append(f"{c['rows']:,} ({c['docs']:,})" if c else "0")
            mb += c["bytes"] if c else 0
            tok += c["tokens"] if c else 0
        lines.append(f"| {src} | " + " | ".join(cells) + f" | {_mb(mb)} | {tok:,} |")
    totals = [f"{stats[kind][sp]['_all']['rows']:,}" for sp in SPLITS]
    all_mb = sum(c["bytes"] for sp in SPLITS for s, c in stats[kind][sp].items() if s != "_all")
    all_tok = sum(c["tokens"] for sp in SPLITS for s, c in stats[kind][sp].items() if s != "_all")
    lines.append("| **all** | " + " | ".join(totals) + f" | {_mb(all_mb)} | {all_tok:,} |")
    return "\n".join(lines)


def histogram_table(stats: dict[str, Any], kind: str) -> str:
    """Markdown: token-length histogram per split."""
    bins = sorted(stats[kind]["train"]["_all"]["histogram"], key=lambda b: int(b.lstrip(">=").split("-")[0]))
    bins = [b for b in bins if any(stats[kind][sp]["_all"]["histogram"][b] for sp in SPLITS)]
    lines = ["| tokens | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
    for b in bins:
        lines.append(f"| {b} | " + " | ".join(f"{stats[kind][sp]['_all']['histogram'][b]:,}" for sp in SPLITS) + " |")
    return "\n".join(lines)


def tables(out_dir: Path) -> str:
    """All data-card tables as one markdown string."""
    stats = json.loads((out_dir / "stats.json").read_text())
    parts = []
    for kind, name in (("ae", "AE prose"), ("qa", "QA")):
        parts += [f"### {name}: rows (documents) per split", split_table(stats, kind), ""]
        parts += [f"### {name}: token lengths", histogram_table(stats, kind), ""]
    files = "\n".join(f"| {k} | `{v}` |" for k, v in sorted(stats["files"].items()))
    parts += [f"### Output sha256 (seed {stats['seed']})", "| file | sha256 |", "|---|---|", files, ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Write the histogram PNG and/or the markdown tables for a prepared directory."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir", type=Path, nargs="?", default=Path("data"))
    ap.add_argument("--png", type=Path, default=Path("reports/data/token_lengths.png"))
    ap.add_argument("--md", type=Path, default=Path("reports/data/tables.md"))
    args = ap.parse_args(argv)
    plot_lengths(args.out_dir, args.png)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(tables(args.out_dir), encoding="utf-8")
    print(f"wrote {args.png} and {args.md}")


if __name__ == "__main__":
    main()
