"""``gmsa eval`` end to end on a tiny random backbone and the three fixture examples."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gmsa import cli as gmsa_cli
from gmsa.evaluation import baselines
from gmsa.evaluation.cli import BASELINE_NAMES, main
from gmsa.evaluation.metrics import bleu, semantic_available

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _keft_checkpoint(make_gmsa, backbone_dir, root):
    """A saved tiny GMSA whose decoder W_Q was changed, as KEFT would (decoder_tuning = qkv)."""
    gmsa = make_gmsa(backbone_dir, decoder_tuning="qkv")
    with torch.no_grad():
        gmsa.model.decoder.model.layers[0].self_attn.q_proj.weight.add_(0.5)
    directory = root / "keft" / "model"
    gmsa.save_pretrained(directory)
    return directory


def _run_qa(eval_env, backbone_dir, qa_data, models, extra=()):
    argv = ["eval", "qa", "--backbone", str(backbone_dir), "--data", str(qa_data), "--rates", "2", "4"]
    argv += ["--max-new-tokens", "4", "--out", str(eval_env / "qa"), "--cache-dir", str(eval_env / "cache")]
    for model in models:
        argv += ["--model", model]
    return main(argv + list(extra))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_qa_runs_every_method_and_writes_reports(eval_env, backbone_dir, qa_data, make_gmsa):
    keft = _keft_checkpoint(make_gmsa, backbone_dir, eval_env)
    assert _run_qa(eval_env, backbone_dir, qa_data, [str(keft), "untrained:k_enc=2"]) == 0

    payload = json.loads((eval_env / "qa" / "results.json").read_text())
    found = {(r["method"], r["rate"]) for r in payload["results"]}
    expected = {("gmsa[keft]", 2), ("gmsa[keft]", 4), ("uncompressed[keft decoder]", None)}
    expected |= {("gmsa[untrained(k_enc=2)]", 2), ("gmsa[untrained(k_enc=2)]", 4)}
    expected |= {("uncompressed", None), ("closed-book", None)}
    expected |= {(name, rate) for name in ("truncate-head", "truncate-tail", "llmlingua") for rate in (2, 4)}
    assert found == expected
    assert payload["n_examples"] == 3 and all(r["metrics"]["n"] == 3 for r in payload["results"])

    predictions = _read_jsonl(eval_env / "qa" / "predictions.jsonl")
    for result in payload["results"]:
        rows = [p for p in predictions if p["method"] == result["method"] and p["rate"] == result["rate"]]
        lengths = [row["n_tokens"] for row in rows]
        read = [row["context_tokens"] for row in rows]
        for metric in ("contains", "em", "f1"):
            assert result["metrics"][metric] == pytest.approx(100 * sum(r["scores"][metric] for r in rows) / 3)
        if result["rate"] is not None and result["method"] != "llmlingua":
            assert read == [math.ceil(n / result["rate"]) for n in lengths]  # the same budget everywhere
        if result["method"] == "llmlingua":
            assert all(r <= math.ceil(n / result["rate"]) for r, n in zip(read, lengths))
        if result["method"].startswith("uncompressed"):
            assert read == lengths
        if result["method"] == "closed-book":
            assert read == [0, 0, 0]

    markdown = (eval_env / "qa" / "results.md").read_text()
    assert "contains % (primary)" in markdown and "| truncate-tail | 4x | 3 |" in markdown
    assert (eval_env / "qa" / "qa_vs_rate.png").read_bytes()[:8] == PNG_MAGIC


def test_qa_second_run_comes_from_the_cache(eval_env, backbone_dir, qa_data, monkeypatch):
    models, extra = ["untrained:k_enc=2"], ["--baselines", "closed-book", "truncate-head"]
    assert _run_qa(eval_env, backbone_dir, qa_data, models, extra) == 0
    first = (eval_env / "qa" / "predictions.jsonl").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a cached example was computed again")

    monkeypatch.setattr(baselines.GMSAMethod, "run", refuse)
    monkeypatch.setattr(baselines.TextContextMethod, "run", refuse)
    assert _run_qa(eval_env, backbone_dir, qa_data, models, extra) == 0
    assert (eval_env / "qa" / "predictions.jsonl").read_text() == first


def test_qa_limit_picks_a_seeded_sample(eval_env, backbone_dir, qa_data):
    extra = ["--baselines", "closed-book", "--limit", "2"]
    assert _run_qa(eval_env, backbone_dir, qa_data, ["untrained:k_enc=2"], extra) == 0
    payload = json.loads((eval_env / "qa" / "results.json").read_text())
    assert payload["n_examples"] == 2 and payload["limit"] == 2
    ids = {row["id"] for row in _read_jsonl(eval_env / "qa" / "predictions.jsonl")}
    assert len(ids) == 2
    sources = {row["source"] for row in _read_jsonl(eval_env / "qa" / "predictions.jsonl")}
    assert sources == {"fixture-a", "fixture-b"}  # balanced over sources


def test_reconstruct_compares_models_by_length_bucket(eval_env, backbone_dir, ae_data):
    argv = ["eval", "reconstruct", "--backbone", str(backbone_dir), "--data", str(ae_data), "--rates", "2", "4"]
    argv += ["--model", "untrained:k_enc=2", "--model", "memory=untrained:k_enc=2,merge=memory"]
    argv += ["--out", str(eval_env / "ae"), "--cache-dir", str(eval_env / "cache")]
    assert main(argv) == 0

    payload = json.loads((eval_env / "ae" / "results.json").read_text())
    assert [(r["method"], r["rate"]) for r in payload["results"]] == [
        ("gmsa[untrained(k_enc=2)]", 2),
        ("gmsa[untrained(k_enc=2)]", 4),
        ("gmsa[memory]", 2),
        ("gmsa[memory]", 4),
        ("ceiling[untrained(k_enc=2)]", None),
        ("ceiling[memory]", None),
    ]
    assert payload["models"][1]["config"]["merge"] == "memory"
    predictions = _read_jsonl(eval_env / "ae" / "predictions.jsonl")
    for result in payload["results"]:
        rows = [p for p in predictions if p["method"] == result["method"] and p["rate"] == result["rate"]]
        corpus_bleu = bleu([r["output"] for r in rows], [r["reference"] for r in rows])
        assert result["metrics"]["bleu"] == pytest.approx(corpus_bleu)
        assert set(result["by_bucket"]) == {"<=128"} and result["by_bucket"]["<=128"]["n"] == 3
        assert ("semantic" in result["metrics"]) == semantic_available()
        rate = result["rate"] or 1  # the ceiling arm reads every token
        assert [r["context_tokens"] for r in rows] == [math.ceil(r["n_tokens"] / rate) for r in rows]
    for name in ("reconstruct_vs_rate.png", "bleu_by_length.png"):
        assert (eval_env / "ae" / name).read_bytes()[:8] == PNG_MAGIC
    assert "BLEU by passage length" in (eval_env / "ae" / "results.md").read_text()


def test_max_tokens_keeps_only_short_contexts(eval_env, backbone_dir, qa_data):
    argv = ["eval", "qa", "--backbone", str(backbone_dir), "--data", str(qa_data), "--model", "untrained:k_enc=2"]
    argv += ["--baselines", "--max-new-tokens", "2", "--out", str(eval_env / "out")]
    assert main(argv) == 0
    every = json.loads((eval_env / "out" / "results.json").read_text())["n_examples"]
    tokens = sorted({row["n_tokens"] for row in _read_jsonl(eval_env / "out" / "predictions.jsonl")})
    assert len(tokens) > 1, "the fixture needs contexts of different lengths"
    assert main(argv + ["--max-tokens", str(tokens[0])]) == 0
    payload = json.loads((eval_env / "out" / "results.json").read_text())
    assert payload["max_tokens"] == tokens[0]
    assert 1 <= payload["n_examples"] < every
    assert all(row["n_tokens"] <= tokens[0] for row in _read_jsonl(eval_env / "out" / "predictions.jsonl"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", "no/such.jsonl"], "no such data file"),
        (["--model", "no/such/dir"], "no GMSA checkpoint directory"),
        (["--rates", "4", "4"], "duplicates"),
        (["--model", "untrained:k_enc"], "expected untrained:key=value"),
        (["--model", "untrained:merge=concat"], "merge must be mean or memory"),
    ],
)
def test_bad_input_exits_2_with_a_message(eval_env, backbone_dir, qa_data, capsys, argv, message):
    base = ["eval", "qa", "--backbone", str(backbone_dir), "--data", str(qa_data), "--model", "untrained:k_enc=2"]
    assert main(base + ["--baselines", "closed-book", "--out", str(eval_env / "x")] + argv) == 2
    assert message in capsys.readouterr().err


def test_unusable_rows_are_skipped_with_a_note(eval_env, backbone_dir, qa_data):
    data = eval_env / "qa.jsonl"
    unusable = json.dumps({"context": "Paris is a city.", "question": "", "answers": ["Paris"]})
    data.write_text(qa_data.read_text() + unusable + "\n")
    argv = ["eval", "qa", "--backbone", str(backbone_dir), "--data", str(data), "--model", "untrained:k_enc=2"]
    argv += ["--baselines", "--max-new-tokens", "2", "--out", str(eval_env / "out")]
    assert main(argv) == 0
    payload = json.loads((eval_env / "out" / "results.json").read_text())
    assert payload["n_examples"] == 3
    assert payload["notes"] == [f"skipped 1 unusable rows, e.g. {data}, row 4: no question or no non-empty answer"]


def test_malformed_rows_exit_2_with_file_and_row(eval_env, backbone_dir, capsys):
    bad = eval_env / "bad.jsonl"
    bad.write_text(json.dumps({"context": "Paris is a city.", "question": "Where?"}) + "\n")
    argv = ["eval", "qa", "--backbone", str(backbone_dir), "--data", str(bad), "--model", "untrained:k_enc=2"]
    assert main(argv) == 2
    assert f"{bad}, row 1: missing field 'answers'" in capsys.readouterr().err


def test_rates_must_be_positive(backbone_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "qa", "--model", "untrained", "--rates", "0"])
    assert exit_info.value.code == 2


def test_gmsa_command_line_has_eval(eval_env, backbone_dir, capsys):
    """``gmsa eval`` is wired into the main command line, with its exit code 2 for bad input."""
    argv = ["eval", "reconstruct", "--model", "untrained:k_enc=2", "--backbone", str(backbone_dir)]
    assert gmsa_cli.main(argv + ["--data", str(eval_env / "missing.jsonl")]) == 2
    assert "no such data file" in capsys.readouterr().err


def test_cli_baseline_names_match_the_registry():
    assert set(BASELINE_NAMES) == set(baselines.BASELINES)
