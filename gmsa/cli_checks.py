"""Checks of the ``gmsa`` command's arguments, run before torch or the model is loaded.

Each failure is a :class:`UsageError` whose one-line message names the file or option at fault
and says what to do. Text inputs are read here (so a bad file fails in a fraction of a second),
and a ``--context`` file is loaded here; the commands then use ``args.texts`` /
``args.compressed``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .chunking import check_window
from .engine_args import check_engine_args

TEXT_COMMANDS = ("compress", "answer", "reconstruct")
MODEL_COMMANDS = (*TEXT_COMMANDS, "export-decoder", "demo")
WEIGHTS_NAME = "model.safetensors"  # as gmsa.api writes it (not imported: it loads torch)


class UsageError(ValueError):
    """A command-line argument that cannot work; found before the model loads."""


def int_at_least(low: int):
    """An argparse ``type``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def read_text(source: str) -> str:
    """The UTF-8 text of file ``source`` (``'-'``: stdin); a UsageError naming it if it has none."""
    if source == "-":
        name = "stdin"
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no input: give text files, pipe text into '-', or pass --context FILE")
        data = sys.stdin.buffer.read()
    else:
        name, path = source, Path(source)
        if not path.exists():
            raise UsageError(f"{source}: no such file; check the path")
        if path.is_dir():
            raise UsageError(f"{source} is a folder; give the text files in it")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise UsageError(f"{source}: cannot read it ({err.strerror})") from err
    if b"\0" in data[:65536]:
        raise UsageError(f"{name} looks binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{name} is not UTF-8 text (byte {err.start} is {data[err.start : err.start + 1]!r}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from err
    if not text.strip():
        raise UsageError(f"{name} is empty (or only whitespace); give a file with text in it")
    return text


def check_out_file(out: str) -> None:
    """``--out`` must name a file in a folder that exists."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {path / 'context.safetensors'}")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: folder {folder} does not exist; create it (mkdir -p {folder}) or pick another")


def check_model_dirs(args: argparse.Namespace) -> None:
    """``--model`` must hold a checkpoint, ``--backbone`` a model directory."""
    model = getattr(args, "model", None)
    if model is not None and not (Path(model) / WEIGHTS_NAME).is_file():
        raise UsageError(
            f"--model {model}: no GMSA checkpoint there (no {WEIGHTS_NAME}); give a directory written by "
            "`gmsa train` or GMSA.save_pretrained, or drop --model for the shipped checkpoint"
        )
    backbone = getattr(args, "backbone", None)
    if backbone not in (None, "default") and not (Path(backbone) / "config.json").is_file():
        raise UsageError(
            f"--backbone {backbone}: not a Hugging Face model directory (no config.json); give a local one, "
            "or drop --backbone for the checkpoint's own"
        )


def load_context(path: str):
    """The ``--context`` file, loaded (a UsageError naming it if it is missing or not one)."""
    if not Path(path).is_file():
        raise UsageError(f"--context {path}: no such file; write one with `gmsa compress FILE --out {path}`")
    from .compressed import Compressed

    return Compressed.load(path)


def check_inputs(args: argparse.Namespace) -> None:
    """Read the text files (``args.texts``: ``(name, text)`` pairs) or the ``--context`` (``args.compressed``)."""
    args.texts, args.compressed = None, None
    if args.context:
        if args.files:
            raise UsageError(f"give either --context {args.context} or text files ({' '.join(args.files)}), not both")
        for option in ("rate", "window", "overlap", "max_total_tokens"):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise UsageError(f"{flag} applies to text files, and --context {args.context} is compressed already")
        args.compressed = load_context(args.context)
        return
    names = args.files or ["-"]
    if names.count("-") > 1:
        raise UsageError("'-' (stdin) can be given once")
    if args.window is not None:
        overlap = 0 if args.overlap is None else args.overlap
        try:
            check_window(args.window, overlap)
        except ValueError as err:
            raise UsageError(f"--window/--overlap: {err}") from err
    if args.overlap is not None and args.rate is not None and args.overlap % args.rate:
        raise UsageError(f"--overlap ({args.overlap}) must be a multiple of --rate ({args.rate})")
    args.texts = [(name if name != "-" else "stdin", read_text(name)) for name in names]


def check_command(args: argparse.Namespace) -> None:
    """Every check that needs no model, for the command in ``args``; UsageError on the first failure."""
    if args.command in MODEL_COMMANDS:
        check_model_dirs(args)
    if args.command in TEXT_COMMANDS:
        if args.command != "compress":
            try:
                check_engine_args(args)
            except ValueError as err:
                raise UsageError(str(err)) from err
        if args.command == "answer":
            for question in args.question:
                if not question.strip():
                    raise UsageError("-q/--question is empty; ask something")
        if getattr(args, "out", None):
            check_out_file(args.out)
        check_inputs(args)
    if args.command == "train":
        for config in args.config or []:
            if not Path(config).is_file():
                raise UsageError(f"--config {config}: no such file (the recipes are in configs/, e.g. configs/ae.toml)")


def warn_few_soft_tokens(compressed, names: list[str]) -> None:
    """Warn (stderr) about each text whose rate leaves fewer than 2 soft tokens."""
    for name, n, soft, rate in zip(names, compressed.n_tokens, compressed.n_soft_tokens, compressed.rates):
        if soft < 2:
            hint = f"use --rate {n // 2} or less" if n >= 2 else "the text is a single token"
            print(
                f"gmsa: warning: --rate {rate} leaves {soft} soft token for {name} ({n} tokens): "
                f"too few to carry it; {hint}",
                file=sys.stderr,
            )
