"""The ``gmsa`` command line: compress, answer, reconstruct, export-decoder, train, data, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .version import __version__


def _read_text(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {source}")
    return path.read_text(encoding="utf-8")


def _load(args: argparse.Namespace):
    from .api import GMSA

    return GMSA.from_pretrained(args.model, backbone=args.backbone, dtype=getattr(args, "dtype", "auto"))


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, ensure_ascii=False, indent=2) if args.json else text)


def _compressed_input(args: argparse.Namespace, gmsa):
    from .compressed import Compressed

    if args.context:
        return Compressed.load(args.context)
    return gmsa.compress(
        [_read_text(f) for f in args.files or ["-"]], rate=args.rate, window=args.window, overlap=args.overlap
    )


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


def _with_engine(args: argparse.Namespace, gmsa):
    from .engines import engine_from_args

    gmsa.engine = engine_from_args(args, gmsa)
    return gmsa


def cmd_answer(args: argparse.Namespace) -> int:
    gmsa = _load(args)
    compressed = _compressed_input(args, gmsa)
    _with_engine(args, gmsa)
    answers = gmsa.generate(
        compressed, args.question, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty
    )
    _emit(args, {"questions": args.question, "answers": answers}, "\n".join(answers))
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    gmsa = _load(args)
    compressed = _compressed_input(args, gmsa)
    texts = _with_engine(args, gmsa).reconstruct(compressed)
    _emit(args, {"reconstructions": texts}, "\n\n".join(texts))
    return 0


def cmd_export_decoder(args: argparse.Namespace) -> int:
    from .engines import export_decoder

    out = export_decoder(_load(args), args.out)
    _emit(args, {"out": str(out)}, f"decoder written to {out} (serve it with: vllm serve {out} --enable-prompt-embeds)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .train import TrainConfig, Trainer

    overrides = [f"stage={json.dumps(args.stage)}"] + list(args.overrides)
    cfg = TrainConfig.from_sources(args.config or [], overrides)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        distributed.teardown(trainer.dist)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.model, rate=args.rate, as_json=args.json)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GMSA checkpoint directory (default: the shipped one)")
    parser.add_argument("--backbone", default=None, help="load the backbone from this local directory instead")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_dtype_arg(parser)


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """``--dtype {auto,float32,bfloat16}``: the inference dtype (auto: bf16 where measured faster)."""
    from .precision import DTYPE_CHOICES

    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="inference dtype (auto: bf16 where this CPU is faster)"
    )


def _window_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, default=None, help="tokens per encoder window for long texts")
    parser.add_argument("--overlap", type=int, default=None, help="tokens a window re-reads (multiple of the rate)")


def build_parser() -> argparse.ArgumentParser:
    from .engines import add_engine_args

    parser = argparse.ArgumentParser(prog="gmsa", description="Compress long LLM contexts into soft tokens (GMSA).")
    parser.add_argument("--version", action="version", version=f"gmsa {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress text files (or stdin) to a .safetensors context")
    _model_args(p)
    p.add_argument("files", nargs="*", help="text files; '-' or none reads stdin")
    p.add_argument("--rate", type=int, default=None)
    p.add_argument("--out", required=True, help="output .safetensors file")
    _window_args(p)
    p.set_defaults(context=None)
    p.set_defaults(func=cmd_compress)

    for name, func, helptext in [
        ("answer", cmd_answer, "answer questions from a compressed context or text files"),
        ("reconstruct", cmd_reconstruct, "restate a compressed context"),
    ]:
        p = sub.add_parser(name, help=helptext)
        _model_args(p)
        p.add_argument("files", nargs="*", help="text files to compress first; '-' reads stdin")
        p.add_argument("--context", help="a compressed context written by `gmsa compress`")
        p.add_argument("--rate", type=int, default=None)
        _window_args(p)
        add_engine_args(p)
        if name == "answer":
            p.add_argument("-q", "--question", action="append", required=True, help="repeat for several")
            p.add_argument("--max-new-tokens", type=int, default=100)
            p.add_argument("--repetition-penalty", type=float, default=1.3)
        p.set_defaults(func=func)

    p = sub.add_parser("export-decoder", help="write the (KEFT-tuned) decoder as a HF model directory for vLLM")
    _model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export_decoder)

    p = sub.add_parser("train", help="train a stage: warmup (token probe), ae or keft")
    p.add_argument("stage", choices=["warmup", "ae", "keft"])
    p.add_argument("--config", action="append", help="TOML file(s) of options, applied in order")
    p.epilog = "Any key=value after the options overrides a TrainConfig field, e.g. lr=3e-4 max_steps=100."
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="compress a real passage, answer a question, print quality and speed-up")
    p.add_argument("--model", default=None)
    p.add_argument("--rate", type=int, default=4)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    from .corpora.cli import register as register_data

    register_data(sub)
    from .bench import register as register_bench

    register_bench(sub)
    from .evaluation.cli import register as register_eval

    register_eval(sub)
    from .server import register as register_serve

    register_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .engines import EngineUnavailableError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    started = time.time()
    try:
        code = args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError, EngineUnavailableError) as err:
        print(f"gmsa: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    logging.getLogger(__name__).info("done in %.1f s", time.time() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
