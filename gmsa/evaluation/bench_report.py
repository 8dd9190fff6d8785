"""What ``gmsa bench`` results say: the targets checked, tables, markdown and plots (a results JSON in)."""

from __future__ import annotations

import json
from pathlib import Path

from .render import markdown_table, pyplot, save_figure
from .timing import CLOCKS, PHASES


def target_checks(rows: list[dict], length: int = 2048) -> list[dict]:
    """The targets, on the measured rows at ``length`` tokens (and rate-4 fresh at 8192), per clock, against
    the uncompressed prompt at its fastest dtype."""
    checks = []

    def add(name: str, row: dict, clock: str, value: float, threshold: float, about: bool = False) -> None:
        met = abs(value - threshold) <= 0.1 * threshold if about else value >= threshold
        checks.append(
            {"target": name, "arm": row["arm"], "clock": clock, "measured": value, "threshold": threshold, "met": met}
        )

    for row in rows:
        if row["length"] == 8192 and row["status"] == "ok" and row["rate"] == 4 and row["mode"] == "fresh":
            for clock in CLOCKS:
                if "speedup_e2e" in row[clock]:
                    add("e2e speed-up >= 5x at 8192 tokens (rate 4, fresh)", row, clock, _e2e(row, clock), 5.0)
        if row["length"] != length or row["status"] != "ok" or "kv_cache_ratio" not in row:
            continue
        rate, mode = row["rate"], row["mode"]
        for clock in CLOCKS:
            e2e, prefill = row[clock]["speedup_e2e"]["ratio_of_medians"], row[clock]["speedup_prefill"]
            if rate == 4 and mode == "fresh":
                add("e2e speed-up >= 3x (rate 4, fresh)", row, clock, e2e, 3.0)
            if mode == "stored":
                add(f"prefill speed-up >= 0.8 x rate {rate}", row, clock, prefill["ratio_of_medians"], 0.8 * rate)
            if rate == 4 and mode == "stored":
                add("e2e speed-up >= 3.5x (rate 4, stored)", row, clock, e2e, 3.5)
        if mode == "stored":
            add(f"KV-cache bytes ~ 1/rate {rate} (+-10%)", row, "-", row["kv_cache_ratio"], 1 / rate, about=True)
    return checks


def _e2e(row: dict, clock: str) -> float:
    return row[clock]["speedup_e2e"]["ratio_of_medians"]


def format_table(results: dict) -> str:
    """A plain-text table of the rows, with ratios against the uncompressed prompt (wall and CPU clocks)."""
    env = results["environment"]
    lines = [
        f"gmsa bench: {env['model']}; {env['device']} ({env['torch_threads']} threads); "
        f"{env['new_tokens']} new tokens; {env['repeats']} repeats; seconds: median [min-max]",
        _machine(env),
        f"{'length':>6} {'arm':<31} {'wall e2e s':>22} {'cpu e2e s':>9} {'x e2e':>11} {'x prefill':>13} "
        f"{'compress':>8} {'decode':>6} {'KV MiB':>7} {'peak MiB':>8} {'=fp32':>6}",
        f"{'':>6} {'':<31} {'':>22} {'':>9} {'wall/cpu':>11} {'wall/cpu':>13} {'tok/s':>8} {'tok/s':>6}",
    ]
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['length']:>6} {row['arm']:<31} skipped: {row['reason']}")
            continue
        wall, cpu = row["wall"], row["cpu"]
        e2e = wall["e2e_s"]
        speed = "/".join(_fmt(c.get("speedup_e2e", {}).get("ratio_of_medians"), 5) for c in (wall, cpu))
        prefill = "/".join(_fmt(c.get("speedup_prefill", {}).get("ratio_of_medians"), 6) for c in (wall, cpu))
        flag = "  beyond trained window" if row["beyond_trained_window"] else ""
        lines.append(
            f"{row['length']:>6} {row['arm']:<31} {e2e['median']:8.2f} [{e2e['min']:6.2f}-{e2e['max']:6.2f}] "
            f"{cpu['e2e_s']['median']:9.2f} {speed:>11} {prefill:>13} {_fmt(wall['compress_tokens_per_s'], 8, 0)} "
            f"{_fmt(wall['decode_tokens_per_s'], 6, 1)} {row['kv_cache_bytes'] / 2**20:7.1f} "
            f"{row['peak_memory_bytes'] / 2**20:8.0f} {_agreement(row):>6}{flag}"
        )
    lines += llamacpp_lines(results["rows"])
    for check in results["targets_2k"]:
        verdict = "met" if check["met"] else "NOT met"
        lines.append(
            f"target {check['target']} [{check['clock']}]: {check['measured']:.3g} vs {check['threshold']:.3g}"
            f" -> {verdict}"
        )
    return "\n".join(lines)


def _machine(env: dict) -> str:
    """CPU, bf16 support and the dtype of each side, in one line."""
    native = {True: "native bf16", False: "no native bf16"}.get(env.get("cpu_native_bf16"), "bf16 unknown")
    speedup = env.get("bf16_matmul_speedup")
    measured = f", bf16 matmul {speedup:.2f}x fp32" if speedup else ""
    int8 = f", int8 decoding steps ({env.get('int8_steps_reason', 'requested')})" if env.get("int8_step_layers") else ""
    return (
        f"CPU {env.get('cpu_model', '?')} ({native}{measured}); GMSA in {env['dtype']}{int8} "
        f"({env.get('gmsa_dtype_reason') or 'requested'}); uncompressed prompt in "
        f"{' and '.join(env.get('baseline_dtypes', ['?']))} (plain transformers generate), speed-ups against the "
        "fastest of these"
    )


def _agreement(row: dict) -> str:
    """``yes`` if the greedy answer equals the fp32 path's, else ``k/n`` leading tokens shared; ``-`` untested."""
    check = row.get("fp32_agreement")
    if not check:
        return "-"
    return "yes" if check["identical"] else f"{check['same_prefix_tokens']}/{check['tokens']}"


def _fmt(value: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def write_results(results: dict, out: Path, plot: bool) -> None:
    """The JSON, a markdown summary next to it, and (``plot``) the figure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_report(results))
    if plot:
        plot_results(results, out.with_suffix(".png"))


MAIN_COLUMNS = [
    ("context", "r"),
    ("arm", "l"),
    ("wall e2e s", "r"),
    ("CPU e2e s", "r"),
    ("x e2e wall", "r"),
    ("x e2e CPU", "r"),
    ("vs (CPU)", "l"),
    ("x prefill CPU", "r"),
    ("compress tok/s (CPU)", "r"),
    ("decode tok/s (CPU)", "r"),
    ("KV MiB (ratio)", "r"),
    ("peak MiB", "r"),
    ("= fp32", "l"),
]

MAIN_ALIGN = "".join(align for _, align in MAIN_COLUMNS)


def markdown_report(results: dict) -> str:
    """Markdown tables of a results JSON: all rows, the phase breakdown at 2k, the targets."""
    env = results["environment"]
    lines = [
        f"Model: {env['model']}. Device: {env['device']} ({env['device_name']}), {env['dtype']}, "
        f"{env['torch_threads']} torch thread(s), {env['new_tokens']} new tokens (greedy, repetition penalty "
        f"{env['repetition_penalty']}), {env['repeats']} interleaved repeats, encoder window {env['encoder_window']}. "
        f"Load average at start/end: {_loads(env, 'start')} / {_loads(env, 'end')}. {env['note']}",
        "",
        _machine(env) + ".",
        "",
        "Seconds are medians [min-max] over the repeats; speed-ups are uncompressed / GMSA (ratio of medians, "
        "with the range of the per-repeat paired ratios) against the uncompressed arm named in `vs` (the fastest "
        "by median); CPU = this process's CPU time. `= fp32`: whether the greedy answer equals the fp32 path's "
        "(else leading tokens shared).",
        "",
        markdown_table([name for name, _ in MAIN_COLUMNS], [_main_row(row) for row in results["rows"]], MAIN_ALIGN),
    ]
    lines += ["", *_breakdown_table(results["rows"]), "", *_targets_table(results["targets_2k"])]
    llamacpp = llamacpp_lines(results["rows"])
    if llamacpp:
        lines += ["", "GMSA in llama.cpp against the uncompressed prompt through the same engine:", "", *llamacpp]
    return "\n".join(lines) + "\n"


def llamacpp_lines(rows: list[dict]) -> list[str]:
    """GMSA's llama.cpp arms against the uncompressed prompt through the same engine (``gmsa bench --llamacpp``)."""
    lines = []
    for row in rows:
        if row["status"] == "ok" and "speedup_vs_llamacpp" in row["cpu"]:
            wall, cpu = row["wall"]["speedup_vs_llamacpp"], row["cpu"]["speedup_vs_llamacpp"]
            lines.append(
                f"{row['length']:>6} {row['arm']}: {_speedup(wall)} wall, {_speedup(cpu)} CPU against {cpu['against']}"
            )
    return lines


def _main_row(row: dict) -> list[str]:
    if row["status"] != "ok":
        return [row["length"], row["arm"], f"skipped: {row['reason']}"] + [""] * (len(MAIN_COLUMNS) - 3)
    wall, cpu = row["wall"], row["cpu"]
    ratio = f" ({row['kv_cache_ratio']:.3f})" if "kv_cache_ratio" in row else ""
    flag = " (beyond trained window)" if row["beyond_trained_window"] else ""
    return [
        row["length"],
        row["arm"] + flag,
        _spread(wall["e2e_s"]),
        _spread(cpu["e2e_s"]),
        _speedup(wall.get("speedup_e2e")),
        _speedup(cpu.get("speedup_e2e")),
        cpu.get("speedup_e2e", {}).get("against", "-"),
        _speedup(cpu.get("speedup_prefill")),
        _fmt(cpu["compress_tokens_per_s"], 0, 0),
        _fmt(cpu["decode_tokens_per_s"], 0, 1),
        f"{row['kv_cache_bytes'] / 2**20:.1f}{ratio}",
        f"{row['peak_memory_bytes'] / 2**20:.0f}",
        _agreement(row),
    ]


def _loads(env: dict, when: str) -> str:
    values = env.get(f"load_average_{when}")
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _spread(value: dict) -> str:
    return f"{value['median']:.2f} [{value['min']:.2f}-{value['max']:.2f}]"


def _speedup(value: dict | None) -> str:
    if not value:
        return "-"
    return f"{value['ratio_of_medians']:.2f}x ({value['paired_min']:.2f}-{value['paired_max']:.2f})"


def _breakdown_table(rows: list[dict], length: int = 2048) -> list[str]:
    """Median CPU seconds per phase at ``length`` tokens."""
    mine = [row for row in rows if row["length"] == length and row["status"] == "ok"]
    if not mine:
        return []
    table = []
    for row in mine:
        phases = row["cpu"]["phases_s"]
        cells = [f"{phases[name]:.2f}" if name in phases else "-" for name in PHASES]
        table.append([row["arm"], *cells, f"{sum(phases.values()):.2f}"])
    title = f"Where the time goes at {length} context tokens (median CPU seconds per phase):"
    return [title, "", markdown_table(["arm", *PHASES, "total"], table, "l" + "r" * (len(PHASES) + 1))]


def _targets_table(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    header = ["target", "arm", "clock", "measured", "threshold", "met"]
    table = [
        [
            c["target"],
            c["arm"],
            c["clock"],
            f"{c['measured']:.3f}",
            f"{c['threshold']:.3f}",
            "yes" if c["met"] else "no",
        ]
        for c in checks
    ]
    title = "Targets (2048 tokens unless named; against the uncompressed prompt at its fastest dtype):"
    return [title, "", markdown_table(header, table, "lllrrl")]


def plot_results(results: dict, path: Path) -> None:
    """Latency vs context length by clock (left, middle) and the phase breakdown at one length (right)."""
    rows = [row for row in results["rows"] if row["status"] == "ok"]
    fig, axes = pyplot().subplots(1, 3, figsize=(19, 5.5))
    for axis, clock in zip(axes, CLOCKS):
        _plot_latency(axis, rows, clock)
    _plot_breakdown(axes[2], rows, "cpu")
    env = results["environment"]
    fig.suptitle(
        f"gmsa bench - {env['model'][:90]}\n{env['device']} {env['dtype']}, {env['torch_threads']} threads, "
        f"{env['new_tokens']} new tokens, {env['repeats']} repeats. {env['note'][:110]}",
        fontsize=9,
    )
    save_figure(fig, path, dpi=110)


def _plot_latency(axis, rows: list[dict], clock: str) -> None:
    for arm in dict.fromkeys(row["arm"] for row in rows):
        mine = [row for row in rows if row["arm"] == arm]
        spreads = [row[clock]["e2e_s"] for row in mine]
        medians = [s["median"] for s in spreads]
        errors = [[m - s["min"] for m, s in zip(medians, spreads)], [s["max"] - m for m, s in zip(medians, spreads)]]
        style = "--" if "stored" in arm else "-"
        axis.errorbar([row["length"] for row in mine], medians, yerr=errors, fmt="o" + style, label=arm, capsize=3)
    axis.set(xscale="log", yscale="log", xlabel="context tokens", ylabel=f"end-to-end seconds ({clock} clock)")
    axis.set_title(f"compress + prefill + decode, {clock} time (median, min-max)", fontsize=9)
    if rows:
        axis.legend(fontsize=7)


def _plot_breakdown(axis, rows: list[dict], clock: str) -> None:
    with_base = sorted({row["length"] for row in rows if row["method"] == "uncompressed"})
    if not with_base:
        return
    length = 2048 if 2048 in with_base else with_base[-1]
    mine = [row for row in rows if row["length"] == length]
    bottom = [0.0] * len(mine)
    for phase in PHASES:
        heights = [row[clock]["phases_s"].get(phase, 0.0) for row in mine]
        if any(heights):
            axis.bar([row["arm"] for row in mine], heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
    axis.set_ylabel(f"seconds ({clock} clock, median per phase)")
    axis.set_title(f"where the time goes at {length} context tokens", fontsize=9)
    axis.tick_params(axis="x", rotation=60, labelsize=7)
    axis.legend(fontsize=7)
