"""The ``gmsa`` command line: compress, answer, reconstruct, export-decoder, train, data, demo.

Every argument is checked (files read, options compared) before torch or the model is loaded;
see :mod:`gmsa.cli_checks`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from . import extras
from .cli_checks import (
    UsageError,
    check_command,
    int_at_least,
    positive_float,
    warn_few_soft_tokens,
)
from .cli_options import describe
from .engine_args import add_engine_args
from .version import __version__

# sub-commands registered by other modules (imported only when needed: some import torch)
REGISTERED = {
    "data": "gmsa.data.cli",
    "bench": "gmsa.evaluation.bench",
    "eval": "gmsa.evaluation.cli",
    "serve": "gmsa.serving.server",
}
OWN = ("compress", "answer", "reconstruct", "export-decoder", "train", "demo")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help unless the default is empty, the option is a switch
    (it takes no value), or the help names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)


class TrainHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's one-key-a-line layout."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows defaults and may build its epilog when shown."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.lazy_epilog = None
        self.commands = None  # the sub-commands (build_parser sets them)

    def add_argument(self, *args, **kwargs):
        """An option given without help still shows its default in ``--help``."""
        if "help" not in kwargs and args and args[0].startswith("-") and kwargs.get("default") not in (None, False):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def format_help(self) -> str:
        if self.lazy_epilog is not None:
            self.epilog = self.lazy_epilog()
        return super().format_help()


def _quiet_libraries(verbose: bool) -> None:
    """Hide transformers' weight-loading bars and advisory warnings unless ``-v``."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _load(args: argparse.Namespace):
    from .api import GMSA

    return GMSA.from_pretrained(args.model, backbone=args.backbone, dtype=getattr(args, "dtype", "auto"))


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False, indent=2) if args.json else text)


def _compressed_input(args: argparse.Namespace, gmsa):
    """The ``--context`` file (read by the checks) or the text files compressed now."""
    if args.compressed is not None:
        return args.compressed
    names, texts = zip(*args.texts)
    if args.max_total_tokens is not None:
        gmsa.config.max_total_tokens = args.max_total_tokens
    compressed = gmsa.compress(
        list(texts), rate=args.rate, window=args.window, overlap=args.overlap, progress=not args.json
    )
    warn_few_soft_tokens(compressed, list(names))
    return compressed


def _streaming(args: argparse.Namespace, gmsa) -> bool:
    return not (args.json or args.no_stream) and (gmsa.engine is None or getattr(gmsa.engine, "streams", False))


def _streamer(tokenizer):
    """A ``transformers.TextStreamer`` that prints each text on its own line, without its leading space."""
    from transformers import TextStreamer

    class LineStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            if stream_end:
                self.started = False
            super().on_finalized_text(text, stream_end)

    return LineStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)


def cmd_compress(args: argparse.Namespace) -> int:
    gmsa = _load(args)
    compressed = _compressed_input(args, gmsa)
    compressed.save(args.out)
    payload = {
        "out": args.out,
        "n_tokens": compressed.n_tokens,
        "n_soft_tokens": compressed.n_soft_tokens,
        "compression_ratio": round(compressed.compression_ratio, 2),
    }
    _emit(
        args, payload, f"{sum(compressed.n_tokens)} tokens -> {sum(compressed.n_soft_tokens)} soft tokens: {args.out}"
    )
    return 0


def _engine_name(gmsa) -> str:
    """Where the decoder ran (``--engine auto`` picks one: the JSON output says which)."""
    return getattr(gmsa.engine, "name", "hf")


def _with_engine(args: argparse.Namespace, gmsa):
    from .engines import engine_from_args

    gmsa.engine = engine_from_args(args, gmsa)
    return gmsa


def cmd_answer(args: argparse.Namespace) -> int:
    gmsa = _with_engine(args, _load(args))  # first: an engine on the compiled path compiles the encoder too
    compressed = _compressed_input(args, gmsa)
    streamer = _streamer(gmsa.tokenizer) if _streaming(args, gmsa) else None
    answers = gmsa.generate(
        compressed,
        args.question,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        streamer=streamer,
    )
    if streamer is None:
        payload = {"questions": args.question, "answers": answers, "engine": _engine_name(gmsa)}
        _emit(args, payload, "\n".join(answers))
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    gmsa = _with_engine(args, _load(args))  # first: an engine on the compiled path compiles the encoder too
    compressed = _compressed_input(args, gmsa)
    options = {"max_new_tokens": args.max_new_tokens, "repeat_ngram": args.repeat_ngram}
    if not _streaming(args, gmsa):
        texts = gmsa.reconstruct(compressed, **options)
        _emit(args, {"reconstructions": texts, "engine": _engine_name(gmsa)}, "\n\n".join(texts))
        return 0
    streamer = _streamer(gmsa.tokenizer)
    for i in range(len(compressed)):
        if i:
            print()
        gmsa.reconstruct(compressed[i : i + 1], streamer=streamer, **options)
    return 0


def cmd_export_decoder(args: argparse.Namespace) -> int:
    from .engines import export_decoder

    out = export_decoder(_load(args), args.out)
    _emit(args, {"out": str(out)}, f"decoder written to {out} (serve it with: vllm serve {out} --enable-prompt-embeds)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import distributed
    from .training.config import TrainConfig
    from .training.trainer import Trainer

    overrides = [f"stage={json.dumps(args.stage)}"] + list(args.overrides)
    cfg = TrainConfig.from_sources(args.config or [], overrides)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        distributed.teardown(trainer.dist)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .evaluation.demo import run_demo

    return run_demo(args.model, rate=args.rate, as_json=args.json, repeats=args.repeats)


def train_keys_epilog() -> str:
    """The ``key=value`` names ``gmsa train`` takes: the fields of ``TrainConfig`` and its ``model``, with defaults."""
    from .config import GMSAConfig
    from .training.config import TrainConfig

    return "\n".join(
        [
            "Any key=value after the options overrides a training option (TOML values), e.g. lr=3e-4 max_steps=100.",
            "Options and their defaults (configs/*.toml set most of them):",
            *describe(TrainConfig, skip=("model",)),
            "The compressor: the [model] table of configs/*.toml, or model.KEY=value (KEY=value for short):",
            *describe(GMSAConfig, skip=("backbone_fingerprint",)),
        ]
    )


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GMSA checkpoint directory (default: the shipped one)")
    parser.add_argument("--backbone", default=None, help="load the backbone from this local directory instead")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_dtype_arg(parser)


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """``--dtype {auto,float32,bfloat16}``: the inference dtype (auto: bf16 where measured faster)."""
    from .config import DTYPE_CHOICES

    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="inference dtype (auto: bf16 where this CPU is faster)"
    )


def _text_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate", type=int_at_least(1), default=None, help="context tokens per soft token (default: the model's, 4)"
    )
    parser.add_argument("--window", type=int_at_least(1), default=None, help="tokens per encoder window for long texts")
    parser.add_argument(
        "--overlap", type=int_at_least(0), default=None, help="tokens a window re-reads (a multiple of the rate)"
    )
    parser.add_argument(
        "--max-total-tokens",
        type=int_at_least(1),
        default=None,
        help="the longest text accepted, in tokens (default: the model's, 65536)",
    )


def _decode_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--no-stream", action="store_true", help="print the output at the end, not word by word")


def _add_own_commands(sub) -> None:
    p = sub.add_parser("compress", help="compress text files (or stdin) to a .safetensors context")
    _model_args(p)
    p.add_argument("files", nargs="*", help="text files; '-' or none reads stdin")
    p.add_argument("--out", required=True, help="output .safetensors file (its folder must exist)")
    _text_args(p)
    p.set_defaults(func=cmd_compress, context=None)

    for name, func, helptext in [
        ("answer", cmd_answer, "answer questions from a compressed context or text files"),
        ("reconstruct", cmd_reconstruct, "restate a compressed context"),
    ]:
        p = sub.add_parser(name, help=helptext)
        _model_args(p)
        p.add_argument("files", nargs="*", help="text files to compress first; '-' reads stdin")
        p.add_argument("--context", help="a compressed context written by `gmsa compress` (instead of text files)")
        _text_args(p)
        _decode_args(p)
        if name == "answer":
            p.add_argument("-q", "--question", action="append", required=True, help="a question; repeat for several")
            p.add_argument("--max-new-tokens", type=int_at_least(1), default=100, help="longest answer, in tokens")
            p.add_argument(
                "--repetition-penalty", type=positive_float, default=1.3, help="CTRL penalty on repeated tokens; 1: off"
            )
        else:
            p.add_argument(
                "--max-new-tokens",
                type=int_at_least(1),
                default=None,
                help="longest restatement, in tokens (default: 1.25 x the source's token count + 8)",
            )
            p.add_argument(
                "--repeat-ngram",
                type=int_at_least(0),
                default=8,
                help="stop once the last N tokens repeat earlier ones (0: never)",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("export-decoder", help="write the (KEFT-tuned) decoder as a HF model directory for vLLM")
    _model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export_decoder)

    helptext = "train a stage: warmup (token probe), ae or keft"
    p = sub.add_parser("train", help=helptext, formatter_class=TrainHelpFormatter)
    p.add_argument("stage", choices=["warmup", "ae", "keft"], help="what to train")
    p.add_argument("--config", action="append", help="TOML file of options; repeat to apply several in order")
    p.lazy_epilog = train_keys_epilog
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="compress a real passage, answer a question, print quality and speed-up")
    p.add_argument("--model", default=None, help="GMSA checkpoint directory (default: the shipped one)")
    p.add_argument("--rate", type=int_at_least(1), default=4, help="context tokens per soft token")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed runs after a warm-up (median shown)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_demo)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``gmsa`` parser. Given ``argv`` naming one of this module's commands, the other modules'
    commands are registered as bare names (their modules import torch, which that command need not)."""
    command = first_command(argv or [])
    parser = Parser(prog="gmsa", description="Compress long LLM contexts into soft tokens (GMSA).")
    parser.add_argument("--version", action="version", version=f"gmsa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress bars and logs of the libraries")
    sub = parser.commands = parser.add_subparsers(dest="command", required=True)
    _add_own_commands(sub)
    for name, module in REGISTERED.items():
        if command in OWN:
            sub.add_parser(name)
        else:
            _register(sub, name, module)
    return parser


def _register(sub, name: str, module: str) -> None:
    """Let ``module`` add its command; if its extra is not installed, a stub that says which one is."""
    problem = extras.missing_for(name)
    if problem is None:
        try:
            importlib.import_module(module).register(sub)
            return
        except ModuleNotFoundError as err:
            problem = extras.explain(name, err)
            if problem is None:
                raise
    sub.add_parser(name, help=f"(not installed: {problem.rsplit(': ', 1)[-1]})", description=problem)


def first_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``gmsa NAME`` (its options, its ``--help``)."""
    parser = build_parser([name])
    return parser.commands.choices[name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    problem = extras.missing_for(first_command(argv))
    if problem is not None:
        print(f"gmsa: error: {problem}", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _quiet_libraries(args.verbose)
    started = time.time()
    try:
        check_command(args)
        code = args.func(args)
    except UsageError as err:
        print(f"gmsa {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as err:
        problem = extras.explain(args.command, err)
        if problem is None:
            raise
        print(f"gmsa: error: {problem}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - only the library's expected failures, below
        if not _expected(err):
            raise
        print(f"gmsa: error: {err}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("done in %.1f s", time.time() - started)
    return code


def _expected(err: Exception) -> bool:
    """Errors that are bad input or a missing resource (a one-line message), not a bug (a traceback)."""
    if isinstance(err, (ValueError, TypeError, OSError)):
        return True
    engines = sys.modules.get("gmsa.engines")
    return engines is not None and isinstance(err, engines.EngineUnavailableError)


if __name__ == "__main__":
    sys.exit(main())
