"""Reports of an evaluation run: ``results.json``, ``results.md``, ``predictions.jsonl`` and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .qa import PRIMARY_METRIC
from .reconstruct import BUCKET_ORDER
from .render import cell, markdown_table, pyplot, save_figure

# (metric key, column title, format); the QA scores are percentages, the reconstruction ones 0-1.
PERCENT, SCORE, MEAN = "{:.1f}", "{:.3f}", "{:.1f}"
COST_COLUMNS = [("original_tokens", "original tokens", MEAN), ("seconds_per_example", "s / example", "{:.2f}")]
QA_COLUMNS = [
    (PRIMARY_METRIC, f"{PRIMARY_METRIC} % (primary) ± s.e.", PERCENT),
    (f"{PRIMARY_METRIC}_open", f"{PRIMARY_METRIC} % on open questions ± s.e.", PERCENT),
    ("n_open", "open questions", "{:.0f}"),
    ("yes_no_outputs", "bare yes/no outputs %", PERCENT),
    ("em", "EM %", PERCENT),
    ("f1", "F1 %", PERCENT),
    ("context_tokens", "context tokens read", MEAN),
    *COST_COLUMNS,
]
RECONSTRUCT_SCORES = {
    "bleu": "BLEU",
    "prefix_em": "prefix EM",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "semantic": "semantic",
}
RECONSTRUCT_COLUMNS = [
    *((key, title, SCORE) for key, title in RECONSTRUCT_SCORES.items()),
    ("context_tokens", "soft tokens", MEAN),
    *COST_COLUMNS,
]


def _rate_label(rate: int | None) -> str:
    return f"{rate}x" if rate else "—"


def _buckets(results: list[dict]) -> list[str]:
    """The length buckets any result has, shortest first."""
    return [b for b in BUCKET_ORDER if any(b in r["by_bucket"] for r in results)]


def _metric_cell(metrics: dict, key: str, fmt: str) -> str:
    text = cell(metrics.get(key), fmt)
    if f"{key}_se" in metrics:
        text += " ± " + cell(metrics[f"{key}_se"], fmt)
    return text


def _results_table(results: list[dict], columns: list[tuple[str, str, str]]) -> str:
    header = ["method", "rate", "n"] + [title for _, title, _ in columns]
    rows = [
        [r["method"], _rate_label(r["rate"]), r["metrics"]["n"]]
        + [_metric_cell(r["metrics"], key, fmt) for key, _, fmt in columns]
        for r in results
    ]
    return markdown_table(header, rows)


def _bucket_table(results: list[dict], metric: str) -> str:
    buckets = _buckets(results)
    header = ["method", "rate"] + [f"{b} tokens" for b in buckets]
    rows = []
    for r in results:
        cells = []
        for bucket in buckets:
            stats = r["by_bucket"].get(bucket)
            cells.append(f"{stats[metric]:.3f} (n={stats['n']})" if stats and metric in stats else "—")
        rows.append([r["method"], _rate_label(r["rate"])] + cells)
    return markdown_table(header, rows)


def render_markdown(payload: dict) -> str:
    """The run's report as markdown: settings, the results table(s), timing and notes."""
    task = payload["task"]
    models = ", ".join(f"`{m['label']}` ({m['source']})" for m in payload["models"])
    lines = [
        f"# gmsa eval {task}",
        "",
        f"- data: `{payload['data']}`, {payload['n_examples']} examples (seed {payload['seed']}"
        + (f", limit {payload['limit']}" if payload["limit"] else "")
        + ")",
        f"- models: {models}",
        f"- rates: {', '.join(f'{r}x' for r in payload['rates'])}",
        f"- time: {payload['wall_seconds']:.0f} s wall for this run; {payload['compute_seconds']:.0f} s of "
        f"compression + generation over all rows, cached ones included ({payload['device']}, "
        f"{payload['threads']} threads)",
    ]
    if task == "qa":
        gen = payload["generation"]
        lines += [
            f"- decoding: greedy, max {gen['max_new_tokens']} new tokens, repetition penalty "
            f"{gen['repetition_penalty']}; input = [context part ; question], no chat template",
            "- primary metric: **contains** = a SQuAD-normalised gold answer occurs as whole words in the "
            "normalised output (the paper's NQ setting); EM and token F1 are SQuAD's",
            "",
            _results_table(payload["results"], QA_COLUMNS),
        ]
    else:
        lines += [
            "- decoding: greedy, AE prompt, no repetition penalty; BLEU = corpus BLEU (sacrebleu 13a), "
            "prefix EM in words, ROUGE F1 (rouge-score), semantic = cosine of all-MiniLM-L6-v2 embeddings",
            "",
            _results_table(payload["results"], RECONSTRUCT_COLUMNS),
            "",
            "## BLEU by passage length (backbone tokens)",
            "",
            _bucket_table(payload["results"], "bleu"),
        ]
    if payload.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in payload["notes"]]
    return "\n".join(lines) + "\n"


def _rate_axis(axis, rates: list[int]) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xticks(rates)
    axis.set_xticklabels([f"{r}x" for r in rates])
    axis.set_xlabel("compression rate")
    axis.grid(alpha=0.3)


def plot_vs_rate(results: list[dict], rates: list[int], metrics: list[tuple[str, str]], path: Path) -> None:
    """One panel per metric: quality against rate, a line per method (flat dashed for rate-free ones)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in results))
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    for axis, (key, title) in zip(axes[0], metrics):
        for index, method in enumerate(methods):
            points = sorted((r for r in results if r["method"] == method), key=lambda r: r["rate"] or 0)
            color = colors[index % len(colors)]
            if points[0]["rate"] is None:
                axis.axhline(points[0]["metrics"].get(key, math.nan), linestyle="--", label=method, color=color)
                continue
            values = [r["metrics"].get(key, math.nan) for r in points]
            axis.plot([r["rate"] for r in points], values, "o-", label=method, color=color)
        _rate_axis(axis, rates)
        axis.set_ylim(bottom=min(0.0, axis.get_ylim()[0]))  # an honest baseline: scores start at 0
        axis.set_title(title)
    axes[0][0].legend(fontsize=7, loc="best")
    save_figure(figure, path)


def plot_bleu_by_length(results: list[dict], path: Path) -> None:
    """Grouped bars: reconstruction BLEU per length bucket, one bar per (model, rate)."""
    buckets = _buckets(results)
    figure, axis = pyplot().subplots(figsize=(max(6, 2.2 * len(buckets)), 4))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        heights = [r["by_bucket"].get(b, {}).get("bleu", 0.0) for b in buckets]
        axis.bar([x + i * width for x in range(len(buckets))], heights, width, label=f"{r['method']} {r['rate']}x")
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(buckets))])
    axis.set_xticklabels([f"{b} tokens" for b in buckets])
    axis.set_ylabel("BLEU")
    axis.set_title("reconstruction BLEU by passage length")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7)
    save_figure(figure, path)


def write_report(out_dir: str | Path, payload: dict, predictions: list[dict]) -> list[Path]:
    """Write results.json, results.md, predictions.jsonl and the plots; return the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md", out / "predictions.jsonl"]
    written[0].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    written[1].write_text(render_markdown(payload))
    with open(written[2], "w", encoding="utf-8") as handle:
        for row in predictions:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    results, rates = payload["results"], payload["rates"]
    if payload["task"] == "qa":
        written.append(out / "qa_vs_rate.png")
        plot_vs_rate(results, rates, [("contains", "contains % (primary)"), ("f1", "token F1 %")], written[-1])
    else:
        written.append(out / "reconstruct_vs_rate.png")
        plot_vs_rate(results, rates, [("bleu", "BLEU"), ("rougeL", "ROUGE-L")], written[-1])
        written.append(out / "bleu_by_length.png")
        plot_bleu_by_length(results, written[-1])
    return written
