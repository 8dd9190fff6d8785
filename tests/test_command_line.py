"""The ``gmsa`` command as a user meets it: run as a subprocess, exit codes, messages, checks before the model.

The error-path runs use a tiny wrapper that also reports whether torch was imported: argument
errors must come before torch (let alone the model) is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gmsa.cli import OWN, command_parser, main

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Paris is the capital of France and its largest city."
# runs gmsa's main() and prints, last, whether torch got imported
WRAPPER = "\n".join(
    ["import sys", "from gmsa.cli import main", "rc = main(sys.argv[1:])", "print('torch:', 'torch' in sys.modules)"]
    + ["sys.exit(rc)"]
)


def gmsa(*argv: str, cwd: Path, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv],
        cwd=cwd,
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def options_of(command: str) -> set[str]:
    return set(command_parser(command)._option_string_actions)


def assert_usage_error(result: subprocess.CompletedProcess, command: str, *names: str) -> None:
    """Exit 2, a last line naming ``names``, no traceback, torch never imported, the options it names exist."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1].startswith(f"gmsa {command}: error: "), result.stderr
    for name in names:
        assert name in lines[-1]
    assert result.stdout.strip().endswith("torch: False")
    own_words = re.sub(r"`[^`]*`", "", lines[-1])  # a quoted command line may use another command's options
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", own_words)) <= options_of(command)


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "passage.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return tmp_path


def test_a_missing_file_is_named_before_anything_loads(work):
    result = gmsa("compress", "missing.txt", "--rate", "4", "--out", "x.safetensors", cwd=work, timeout=20)
    assert_usage_error(result, "compress", "missing.txt")
    assert not (work / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("name", "says"), [("empty.txt", "is empty"), ("image.png", "looks binary"), ("latin1.txt", "not UTF-8")]
)
def test_a_file_without_text_is_named(work, name, says):
    assert_usage_error(gmsa("reconstruct", name, cwd=work), "reconstruct", name, says)


def test_empty_stdin_is_named(work):
    assert_usage_error(gmsa("answer", "-", "-q", "Who?", cwd=work, stdin=""), "answer", "stdin")


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["compress", "passage.txt", "--out", "no/such/ctx.safetensors"], ["no/such", "mkdir"]),
        (["compress", "passage.txt", "--out", "."], ["--out", "folder"]),
        (["answer", "--context", "ctx.safetensors", "passage.txt", "-q", "Who?"], ["--context", "passage.txt"]),
        (["answer", "--context", "ctx.safetensors", "-q", "Who?"], ["ctx.safetensors", "gmsa compress"]),
        (["answer", "passage.txt", "-q", " "], ["--question"]),
        (["reconstruct", "passage.txt", "--window", "8", "--overlap", "8"], ["--window/--overlap"]),
        (["reconstruct", "passage.txt", "--rate", "4", "--overlap", "2"], ["--overlap", "--rate"]),
        (["reconstruct", "passage.txt", "--engine-url", "http://h:1"], ["--engine-url", "--engine vllm"]),
        (["compress", "passage.txt", "--out", "c.safetensors", "--model", "nowhere"], ["--model nowhere"]),
        (["train", "ae", "--config", "nope.toml"], ["nope.toml"]),
    ],
)
def test_bad_arguments_are_named_before_torch_loads(work, argv, names):
    assert_usage_error(gmsa(*argv, cwd=work), argv[0], *names)


def test_a_context_with_text_options_is_a_conflict(work, tiny_gmsa):
    tiny_gmsa.compress(TEXT, rate=2).save(work / "ctx.safetensors")
    result = gmsa("answer", "--context", "ctx.safetensors", "--rate", "8", "-q", "Who?", cwd=work)
    assert result.returncode == 2 and "--rate applies to text files" in result.stderr


@pytest.mark.parametrize("argv", [["compress", "--rate", "0"], ["answer", "--max-new-tokens", "0"]])
def test_numbers_out_of_range_are_usage_errors(work, argv):
    result = gmsa(*argv, "passage.txt", "--out", "c.safetensors", "-q", "?", cwd=work)
    assert result.returncode == 2 and "must be a whole number >= 1, got 0" in result.stderr


def test_every_option_has_help_and_reconstruct_lists_max_new_tokens():
    for name in OWN:
        for action in command_parser(name)._actions:
            assert action.help, f"gmsa {name} {action.option_strings or action.dest} has no help"
    text = command_parser("reconstruct").format_help()
    assert "--max-new-tokens" in text and "--repeat-ngram" in text and "(default: 8)" in text
    assert "(default: 1.3)" in command_parser("answer").format_help()


def test_train_help_lists_every_training_option():
    from gmsa.config import GMSAConfig
    from gmsa.training.config import TrainConfig

    text = command_parser("train").format_help()
    for field in dataclasses.fields(TrainConfig) + dataclasses.fields(GMSAConfig):
        assert f"\n  {field.name}=" in text or field.name in ("model", "backbone_fingerprint")
    assert "\n  max_steps=2000\n" in text and "\n  k_enc=4\n" in text and "[model] table" in text


@pytest.fixture
def checkpoint(tiny_gmsa, work) -> Path:
    tiny_gmsa.save_pretrained(work / "ckpt")
    return work / "ckpt"


def test_compress_then_answer_and_reconstruct_as_a_user_would(work, checkpoint):
    result = gmsa("compress", "passage.txt", "--model", "ckpt", "--rate", "2", "--out", "ctx.safetensors", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("11 tokens -> 6 soft tokens: ctx.safetensors")
    assert "Loading weights" not in result.stderr and "warning" not in result.stderr
    result = gmsa("answer", "--model", "ckpt", "--context", "ctx.safetensors", "-q", "Who?", "-q", "What?", cwd=work)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3  # two answers (streamed, one a line), then the wrapper's line
    result = gmsa("reconstruct", "--model", "ckpt", "--context", "ctx.safetensors", "--json", cwd=work)
    output = json.loads(result.stdout.rsplit("torch:", 1)[0])
    restated = output["reconstructions"]
    assert result.returncode == 0 and len(restated) == 1 and restated[0].strip()
    assert output["engine"] == ("llamacpp" if importlib.util.find_spec("llama_cpp") else "hf")  # --engine auto


def test_a_rate_that_leaves_one_soft_token_warns(work, checkpoint):
    result = gmsa("compress", "passage.txt", "--model", "ckpt", "--rate", "50", "--out", "c.safetensors", cwd=work)
    assert result.returncode == 0
    assert "--rate 50 leaves 1 soft token for passage.txt (11 tokens)" in result.stderr
    assert "use --rate 5 or less" in result.stderr


def test_a_text_over_the_cap_names_an_option_that_exists(work, checkpoint):
    result = gmsa("compress", "passage.txt", "--model", "ckpt", "--max-total-tokens", "4", "--out", "c.st", cwd=work)
    assert result.returncode == 2 and "--max-total-tokens" in result.stderr
    assert "--max-total-tokens" in options_of("compress")


def test_streamed_output_is_the_printed_output(checkpoint, work, capsys):
    argv = ["reconstruct", "--model", str(checkpoint), str(work / "passage.txt"), str(work / "passage.txt")]
    for command in (argv, ["answer", *argv[1:], "-q", "Who?", "-q", "Where?", "--max-new-tokens", "6"]):
        assert main(command + ["--no-stream"]) == 0
        printed = capsys.readouterr().out
        assert main(command) == 0
        assert capsys.readouterr().out == printed
