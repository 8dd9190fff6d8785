"""Dataclass fields as command-line options, ``key=value`` overrides and help lines (gmsa.cli_options)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from gmsa.cli_options import add_options, describe, from_args, option, parse_overrides


@dataclass
class Settings:
    lengths: list[int] = option(factory=lambda: [512, 2048], help="context lengths")
    dtype: str = option("auto", "compute dtype", choices=("auto", "float32"))
    window: int | None = option(None, "tokens per window")
    rate: float = 4.0
    verbose: bool = option(False, "say more")
    plot: bool = option(True, "write no plot")
    check: bool = option(True, "skip the check", flag="--no-fp32-check")


def parse(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_options(parser, Settings)
    return from_args(Settings, parser.parse_args(argv))


def test_defaults_come_from_the_fields():
    assert parse([]) == Settings()


def test_each_kind_of_field_becomes_its_option():
    argv = ["--lengths", "16", "32", "--dtype", "float32", "--window", "8", "--rate", "2.5"]
    argv += ["--verbose", "--no-plot", "--no-fp32-check"]
    assert parse(argv) == Settings([16, 32], "float32", 8, 2.5, True, False, False)


@pytest.mark.parametrize("argv", [["--dtype", "float64"], ["--window", "eight"], ["--lengths"]])
def test_bad_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert "error" in capsys.readouterr().err


def test_given_values_take_precedence_over_parsed_ones():
    parser = argparse.ArgumentParser()
    add_options(parser, Settings, skip=("window",))
    args = parser.parse_args(["--rate", "3"])
    assert not hasattr(args, "window")
    assert from_args(Settings, args, rate=5.0).rate == 5.0


def test_overrides_read_toml_values_and_dotted_tables():
    values = parse_overrides(["lr=3e-4", "--max-steps=10", "rates=[4, 8]", "name=plain text", "model.k_enc=4"])
    assert values == {"lr": 3e-4, "max_steps": 10, "rates": [4, 8], "name": "plain text", "model": {"k_enc": 4}}
    assert parse_overrides(["model.k_enc=2", "model.lora_r=8"]) == {"model": {"k_enc": 2, "lora_r": 8}}
    for bad in (["k_enc"], ["=4"], ["a=1", "a.b=2"]):
        with pytest.raises(ValueError):
            parse_overrides(bad)


def test_help_lines_show_each_default_as_json():
    assert describe(Settings, skip=("rate", "verbose", "plot", "check")) == [
        "  lengths=[512, 2048]",
        '  dtype="auto"',
        "  window=null",
    ]
