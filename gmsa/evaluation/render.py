"""Markdown tables and figures for the reports of ``gmsa eval`` and ``gmsa bench``."""

from __future__ import annotations

import math
from pathlib import Path


def cell(value: object, fmt: str = "{}") -> str:
    """A table cell: ``value`` formatted, or a dash for ``None`` and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def markdown_table(header: list[str], rows: list[list[object]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter a column, ``r`` for right-aligned (numbers), else left."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header)))
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend), imported when the first figure is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int = 120) -> None:
    """Lay out, write and close ``figure``."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
