"""A command whose optional extra is missing says which one to install; the missing import is simulated
(``sys.modules[name] = None`` makes ``import name`` raise ``ModuleNotFoundError``)."""

from __future__ import annotations

import sys

import pytest

from gmsa import cli, extras


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    ("argv", "hidden", "extra"),
    [
        (["serve", "--port", "8001"], ["fastapi"], "serve"),
        (["serve"], ["uvicorn"], "serve"),
        (["eval", "qa", "--limit", "1"], ["rouge_score"], "eval"),
        (["bench"], ["matplotlib"], "eval"),
        (["-v", "demo"], ["sacrebleu"], "eval"),
        (["train", "ae", "max_steps=1"], ["sacrebleu"], "train"),
    ],
)
def test_command_without_its_extra_names_it(monkeypatch, capsys, argv, hidden, extra):
    hide(monkeypatch, *hidden)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    command = cli.first_command(argv)
    assert err == (
        f"gmsa: error: gmsa {command} needs the '{extra}' extra ({', '.join(hidden)} not installed): "
        f"pip install 'gmsa[{extra}]'"
    )


def test_help_lists_every_command_when_an_extra_is_missing(monkeypatch, capsys):
    hide(monkeypatch, "fastapi", "sacrebleu")
    parser = cli.build_parser([])
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == set(cli.OWN) | set(cli.REGISTERED)
    text = parser.format_help()
    assert "serve" in text and "(not installed: pip install 'gmsa[serve]')" in text
    assert "(not installed: pip install 'gmsa[eval]')" in text  # eval and bench


def test_commands_with_their_extras_installed_are_not_stubs():
    """In this (all extras) environment every registered command brings its own options."""
    for name in cli.REGISTERED:
        assert extras.missing_for(name) is None
        assert not (cli.command_parser(name).description or "").startswith(f"gmsa {name} needs")


def test_module_missing_at_import_time_becomes_a_stub(monkeypatch, tmp_path, capsys):
    """A registered module that fails on an optional import the table did not foresee still gives a stub."""
    (tmp_path / "fake_serve_module.py").write_text("import prometheus_client\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hide(monkeypatch, "prometheus_client")
    monkeypatch.setattr(cli, "REGISTERED", {"serve": "fake_serve_module"})
    stub = next(a for a in cli.build_parser([])._actions if a.dest == "command").choices["serve"]
    assert stub.description == "gmsa serve needs prometheus_client, which comes with the 'serve' extra: " + (
        "pip install 'gmsa[serve]'"
    )


def test_an_unrelated_missing_module_is_not_hidden(monkeypatch, tmp_path):
    (tmp_path / "broken_module.py").write_text("import no_such_module_gmsa_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "REGISTERED", {"serve": "broken_module"})
    with pytest.raises(ModuleNotFoundError, match="no_such_module_gmsa_test"):
        cli.build_parser([])


def test_optional_module_missing_while_running(monkeypatch, capsys):
    """An import inside a command (here: the LLMLingua baseline's) that fails says which extra brings it."""

    def needs_llmlingua(args):
        raise ModuleNotFoundError("No module named 'llmlingua'", name="llmlingua")

    monkeypatch.setattr(cli, "cmd_demo", needs_llmlingua)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gmsa: error: gmsa demo needs llmlingua, which comes with the 'eval' extra: pip install 'gmsa[eval]'"
    )


def test_other_import_errors_are_bugs(monkeypatch):
    def broken(args):
        raise ModuleNotFoundError("No module named 'gmsa.nothing'", name="gmsa.nothing")

    monkeypatch.setattr(cli, "cmd_demo", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["demo"])


def test_core_commands_need_no_extra():
    for name in ("compress", "answer", "reconstruct", "export-decoder"):
        assert extras.missing_for(name) is None
    assert extras.missing_for(None) is None


def test_every_extra_named_exists_in_pyproject():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    defined = set(pyproject["project"]["optional-dependencies"])
    assert {extra for extra, _ in extras.COMMANDS.values()} <= defined
    assert set(extras.MODULES.values()) <= defined
