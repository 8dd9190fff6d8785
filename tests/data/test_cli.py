"""The ``data prepare`` sub-command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gmsa.data import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmsa")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_register_parses_prepare_args() -> None:
    args = _parser().parse_args(
        ["data", "prepare", "--out", "x", "--sources", "sotu", "brown", "--seed", "3", "--cache", "c"]
    )
    assert (args.out, args.sources, args.seed, args.cache) == ("x", ["sotu", "brown"], 3, "c")
    assert args.func is cli.run_prepare


def test_register_rejects_unknown_source() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "prepare", "--sources", "nope"])


def test_main_runs_prepare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seen = {}

    def fake_prepare(out, sources, tokenizer, **kw):
        seen.update(out=out, sources=sources, **kw)
        empty = {s: {"_all": {"rows": 0}} for s in ("train", "val", "test")}
        return {"ae": empty, "qa": empty, "seconds": 0.0}

    monkeypatch.setattr(cli, "load_default_tokenizer", lambda name: object())
    monkeypatch.setattr("gmsa.data.prepare.prepare", fake_prepare)
    assert cli.main(["data", "prepare", "--out", str(tmp_path), "--sources", "brown", "--max-mb", "1"]) == 0
    assert seen["sources"] == ["brown"] and seen["max_mb"] == 1.0
    assert '"out"' in capsys.readouterr().out
