"""Smoke test of ``gmsa bench`` on a tiny model: the structure of its output, never its timings."""

from __future__ import annotations

import json

import pytest
import torch

from gmsa import precision
from gmsa.cli import main
from gmsa.evaluation import bench
from gmsa.evaluation.bench import BenchSettings, run_bench

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and its largest city.",
    "Group merging averages the hidden states of consecutive tokens.",
]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The bench sets torch's thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def checkpoint(tiny_gmsa, tmp_path):
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def passages(tmp_path):
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in CORPUS))
    return path


def settings(checkpoint, passages, tmp_path, **overrides) -> BenchSettings:
    values = dict(
        model=str(checkpoint),
        lengths=[20, 150],
        rates=[4, 8],
        new_tokens=3,
        repeats=2,
        text=str(passages),
        out=str(tmp_path / "out" / "bench.json"),
        threads=1,
        dtype="float32",
        baseline_dtypes=["float32"],
    )
    return BenchSettings(**(values | overrides))


def test_rows_cover_every_length_and_arm(checkpoint, passages, tmp_path):
    results = run_bench(settings(checkpoint, passages, tmp_path), log=lambda line: None)
    rows = results["rows"]
    arms = [
        "uncompressed-float32",
        "uncompressed-gmsa-loop-float32",
        *("gmsa-fresh-r4", "gmsa-stored-r4", "gmsa-fresh-r8", "gmsa-stored-r8"),
    ]
    assert [(r["length"], r["arm"]) for r in rows] == [(n, arm) for n in (20, 150) for arm in arms]
    assert all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["kv_cache_bytes"] > 0
        for clock in ("wall", "cpu"):
            e2e = row[clock]["e2e_s"]
            assert len(e2e["runs"]) == 2 and e2e["min"] <= e2e["median"] <= e2e["max"]
            assert {"prefill", "decode", "prompt_build"} <= set(row[clock]["phases_s"])
            assert row[clock]["decode_tokens_per_s"] > 0
    fresh = next(r for r in rows if r["length"] == 150 and r["arm"] == "gmsa-fresh-r4")
    assert {"encoder", "merge_lsa", "compress_other"} <= set(fresh["wall"]["phases_s"])
    assert fresh["wall"]["compress_tokens_per_s"] > 0
    assert set(fresh["cpu"]["speedup_e2e"]) == {
        "ratio_of_medians",
        "paired_median",
        "paired_min",
        "paired_max",
        "against",
    }
    assert fresh["cpu"]["speedup_e2e"]["against"] == "uncompressed-float32"
    assert "speedup_prefill" in fresh["wall"] and "speedup_e2e" not in rows[0]["wall"]
    stored = next(r for r in rows if r["length"] == 150 and r["arm"] == "gmsa-stored-r4")
    assert "load" in stored["wall"]["phases_s"] and "encoder" not in stored["wall"]["phases_s"]


def test_compressed_prompts_are_shorter_and_hold_less_kv_cache(checkpoint, passages, tmp_path):
    rows = run_bench(settings(checkpoint, passages, tmp_path, repeats=1), log=lambda line: None)["rows"]
    at_150 = {r["arm"]: r for r in rows if r["length"] == 150}
    question = at_150["uncompressed-float32"]["prompt_tokens"] - 150
    assert at_150["gmsa-fresh-r4"]["prompt_tokens"] == 38 + question
    assert at_150["gmsa-stored-r8"]["prompt_tokens"] == 19 + question
    expected = (38 + question) / (150 + question)
    assert at_150["gmsa-fresh-r4"]["kv_cache_ratio"] == pytest.approx(expected)


def test_writes_json_and_plot(checkpoint, passages, tmp_path):
    results = run_bench(settings(checkpoint, passages, tmp_path, repeats=1), log=lambda line: None)
    out = tmp_path / "out" / "bench.json"
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    assert out.with_suffix(".png").stat().st_size > 0
    env = results["environment"]
    assert env["backbone"]["random_weights"] is False and env["new_tokens"] == 3
    assert env["text_source"] == str(passages)


def test_encoder_window_option_splits_contexts(checkpoint, passages, tmp_path):
    options = settings(checkpoint, passages, tmp_path, lengths=[40], rates=[4], repeats=1, window=16)
    results = run_bench(options, log=lambda line: None)
    assert results["environment"]["encoder_window"] == 16
    compressed = [r for r in results["rows"] if r["method"] == "gmsa"]
    assert [r["prompt_tokens"] - r["length"] // 4 for r in compressed] == [results["rows"][0]["prompt_tokens"] - 40] * 2
    with pytest.raises(ValueError, match="--window 100 exceeds the encoder window 64"):
        run_bench(settings(checkpoint, passages, tmp_path, window=100), log=lambda line: None)


def test_prompt_beyond_the_trained_window_is_skipped_with_a_reason(checkpoint, passages, tmp_path):
    rows = run_bench(settings(checkpoint, passages, tmp_path, lengths=[600], repeats=1), log=lambda line: None)["rows"]
    bases, compressed = rows[:2], rows[2:]  # plain transformers and gmsa's decoding, then GMSA
    assert all(r["status"] == "skipped" and "max_position_embeddings=512" in r["reason"] for r in bases)
    assert all(r["status"] == "ok" and "speedup_e2e" not in r["wall"] for r in compressed)
    assert not any(r["beyond_trained_window"] for r in compressed)


def test_configuration_that_does_not_fit_memory_is_skipped(checkpoint, passages, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "available_bytes", lambda device: 1)
    rows = run_bench(settings(checkpoint, passages, tmp_path, repeats=1), log=lambda line: None)["rows"]
    assert all(r["status"] == "skipped" and "does not fit in memory" in r["reason"] for r in rows)


def test_cli_runs_and_rejects_bad_settings(checkpoint, passages, tmp_path, capsys):
    out = tmp_path / "cli.json"
    common = ["bench", "--model", str(checkpoint), "--text", str(passages), "--out", str(out), "--no-plot"]
    common += ["--threads", "1"]
    assert main(common + ["--lengths", "16", "--rates", "4", "--new-tokens", "2", "--repeats", "1"]) == 0
    assert "uncompressed" in capsys.readouterr().out and out.is_file()
    assert main(common + ["--rates", "0"]) == 2
    assert "--rates must be integers >= 1" in capsys.readouterr().err
    assert main(common + ["--device", "cuda:7"] if not _has_cuda() else common + ["--repeats", "0"]) == 2


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def test_from_json_rewrites_the_markdown_summary(checkpoint, passages, tmp_path, capsys):
    run_bench(settings(checkpoint, passages, tmp_path, lengths=[20], rates=[4], repeats=1), log=lambda line: None)
    out = tmp_path / "out" / "bench.json"
    summary = out.with_suffix(".md")
    assert "| context | arm |" in summary.read_text()
    summary.unlink()
    assert main(["bench", "--from-json", str(out), "--no-plot"]) == 0
    assert "gmsa-stored-r4" in summary.read_text() and "gmsa bench:" in capsys.readouterr().out
    assert main(["bench", "--from-json", str(tmp_path / "missing.json")]) == 2


def test_each_arm_at_its_dtype_against_the_fastest_uncompressed_prompt(checkpoint, passages, tmp_path):
    options = settings(
        checkpoint, passages, tmp_path, lengths=[40], rates=[4], repeats=1, dtype="bfloat16", int8_steps=True
    )
    options.baseline_dtypes = ["float32", "bfloat16"]
    results = run_bench(options, log=lambda line: None)
    rows = {row["arm"]: row for row in results["rows"]}
    assert list(rows) == [
        "uncompressed-float32",  # plain transformers generate: the reference is the faster of these two
        "uncompressed-bfloat16",
        "uncompressed-gmsa-loop-bfloat16",  # the same prompt through gmsa's decoding (int8 steps)
        "gmsa-fresh-r4",
        "gmsa-stored-r4",
    ]
    env = results["environment"]
    assert env["dtype"] == "bfloat16" and env["baseline_dtypes"] == ["float32", "bfloat16"]
    assert env["cpu_model"] and isinstance(env["cpu_native_bf16"], bool) and env["int8_step_layers"] > 0
    assert env["step_weights"] == "int8"
    for clock in ("wall", "cpu"):
        against = rows["gmsa-fresh-r4"][clock]["speedup_e2e"]["against"]
        assert against in ("uncompressed-float32", "uncompressed-bfloat16")
        assert "speedup_e2e" not in rows[against][clock]
        assert rows["uncompressed-gmsa-loop-bfloat16"][clock]["speedup_e2e"]["against"] == against
    for arm in ("uncompressed-bfloat16", "uncompressed-gmsa-loop-bfloat16", "gmsa-fresh-r4", "gmsa-stored-r4"):
        check = rows[arm]["fp32_agreement"]
        assert check["tokens"] == 3 and 0 <= check["same_prefix_tokens"] <= 3
        assert check["identical"] == (check["same_prefix_tokens"] == 3)
    assert "fp32" in (tmp_path / "out" / "bench.md").read_text()


def test_without_fast_bf16_the_same_command_runs_in_fp32_and_says_why(checkpoint, passages, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "measure_cpu_bf16_speedup", lambda: 0.2)  # a CPU that emulates bf16
    lines: list[str] = []
    options = settings(checkpoint, passages, tmp_path, lengths=[40], rates=[4], repeats=1, dtype="auto")
    options.baseline_dtypes = None
    env = run_bench(options, log=lines.append)["environment"]
    assert env["dtype"] == "float32" and env["baseline_dtypes"] == ["float32"]
    assert "0.20x the speed of fp32" in env["gmsa_dtype_reason"] and env["int8_step_layers"] == 0
    assert any(line.startswith("uncompressed prompt in float32 only: bf16 matmul at 0.20x") for line in lines)


def test_llamacpp_arms_are_timed_and_compared_with_both_references(checkpoint, passages, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("GMSA_CACHE", str(tmp_path / "cache"))  # the GGUF export of GMSA's decoder goes there
    options = settings(checkpoint, passages, tmp_path, lengths=[150], rates=[4], repeats=2, llamacpp="f16")
    results = run_bench(options, log=lambda line: None)
    rows = {row["arm"]: row for row in results["rows"]}
    loops = ("llamacpp", "torch+llamacpp")
    gmsa_arms = [f"gmsa-{mode}-r4-{loop}-f16" for loop in loops for mode in ("fresh", "stored")]
    assert {"uncompressed-llamacpp-f16", "uncompressed-torch+llamacpp-f16", *gmsa_arms} <= set(rows)
    for arm in gmsa_arms:
        row = rows[arm]
        assert row["status"] == "ok" and row["prompt_tokens"] == rows["gmsa-fresh-r4"]["prompt_tokens"]
        assert row["cpu"]["speedup_e2e"]["against"] == "uncompressed-float32"
        against = "uncompressed-torch+llamacpp-f16" if "torch+" in arm else "uncompressed-llamacpp-f16"
        assert row["cpu"]["speedup_vs_llamacpp"]["against"] == against
        assert "fp32_agreement" in row and row["cpu"]["decode_tokens_per_s"] > 0
    plain = rows["uncompressed-torch+llamacpp-f16"]  # the uncompressed prompt: torch prefill, llama.cpp steps
    assert plain["status"] == "ok" and plain["prompt_tokens"] == rows["uncompressed-float32"]["prompt_tokens"]
    assert plain["fp32_agreement"]["identical"]  # the same greedy answer as plain transformers fp32
    assert "encoder" in rows["gmsa-fresh-r4-llamacpp-f16"]["cpu"]["phases_s"]
    assert rows["gmsa-fresh-r4-torch+llamacpp-f16"]["answer"] == rows["gmsa-fresh-r4"]["answer"]  # fp32: same answer
    assert results["environment"]["llamacpp"]["weight_type"] == "f16"
    assert "against uncompressed-llamacpp-f16" in (tmp_path / "out" / "bench.md").read_text()
