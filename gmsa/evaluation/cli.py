"""``gmsa eval reconstruct|qa``: several models and the baselines side by side, in one run.

Examples::

    gmsa eval reconstruct --model runs/ae/model --data data/ae/test.jsonl --rates 4 8 16 --limit 50
    gmsa eval qa --model default --model runs/keft/model --rates 4 8 --limit 100
    gmsa eval qa --model untrained:k_enc=4 --limit 5 --baselines closed-book truncate-head
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

BASELINE_NAMES = ("uncompressed", "closed-book", "truncate-head", "truncate-tail", "llmlingua")
REPORTED_PACKAGES = ("torch", "transformers", "sacrebleu", "rouge-score", "sentence-transformers", "llmlingua")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common_args(parser: argparse.ArgumentParser, data: str, rates: list[int]) -> None:
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="repeatable: a checkpoint dir, 'default' (the shipped one) or 'untrained[:key=value,...]' "
        "(a seeded untrained GMSA, k_enc=4 unless given); prefix LABEL= to name it",
    )
    parser.add_argument("--backbone", default=None, help="load the backbone from this local directory instead")
    parser.add_argument("--data", default=data, help=f"JSONL file (default: {data})")
    parser.add_argument("--rates", type=positive_int, nargs="+", default=rates, help="compression rates")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate a seeded sample of N examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of untrained models")
    parser.add_argument(
        "--max-tokens", type=positive_int, default=None, help="keep only contexts of at most N backbone tokens"
    )
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device for every model, e.g. cuda (default: cpu)")
    parser.add_argument("--out", default=None, help="report directory (default: reports/eval/<task>-<time>)")
    parser.add_argument("--cache-dir", default=None, help="per-example cache (default: $GMSA_CACHE/eval)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval reconstruct`` and ``eval qa`` to the ``gmsa`` command line."""
    parser = subparsers.add_parser("eval", help="evaluate models and baselines: reconstruct or qa")
    tasks = parser.add_subparsers(dest="eval_task", required=True)

    p = tasks.add_parser("reconstruct", help="restate passages from soft tokens; BLEU, prefix EM, ROUGE, semantic")
    _common_args(p, "data/ae/test.jsonl", [4, 8, 16])
    p.add_argument("--no-semantic", action="store_true", help="skip the embedding-model similarity column")
    p.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip the ceiling arm (each model's decoder restating the uncompressed text with the same prompt)",
    )
    p.set_defaults(func=cmd_reconstruct)

    p = tasks.add_parser("qa", help="answer questions from compressed contexts; EM, F1, contains, with baselines")
    _common_args(p, "data/qa/test.jsonl", [4, 8])
    p.add_argument(
        "--baselines", nargs="*", choices=BASELINE_NAMES, default=list(BASELINE_NAMES), help="(default: all)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=100)
    p.add_argument("--repetition-penalty", type=float, default=1.3)
    p.add_argument("--llmlingua-iterative-size", type=positive_int, default=32)
    p.set_defaults(func=cmd_qa)


def _load_models(args: argparse.Namespace) -> list[tuple[str, str, object]]:
    """``(label, source, GMSA)`` for every ``--model``; they must share one backbone."""
    import torch

    from .common import ModelSpec, load_model, unique_labels

    if args.threads:
        torch.set_num_threads(args.threads)
    if len(set(args.rates)) != len(args.rates):
        raise ValueError(f"--rates has duplicates: {args.rates}")
    specs = [ModelSpec.parse(text) for text in args.model]
    labels = unique_labels([spec.label for spec in specs])
    models = [(label, spec.source, load_model(spec, args.backbone, args.seed)) for label, spec in zip(labels, specs)]
    for _, _, gmsa in models:
        gmsa.model.to(args.device)
    fingerprints = {gmsa.config.backbone_fingerprint for _, _, gmsa in models}
    if len(fingerprints) > 1:
        raise ValueError(f"the models were trained on different backbones ({sorted(fingerprints)}): evaluate apart")
    return models


def _load_sample(args: argparse.Namespace, task: str, models: list) -> tuple[list, list[str]]:
    """The seeded sample of examples that fit every model's encoder window, and notes on what was left out."""
    import torch

    from .common import load_examples, select_examples

    examples, skipped = load_examples(args.data, task, models[0][2].tokenizer)
    window = min(gmsa.config.max_context_tokens for _, _, gmsa in models)
    longest = min(window, args.max_tokens or window)
    fitting = [e for e in examples if e.n_tokens <= longest]
    if not fitting:
        raise ValueError(f"no context of {args.data} has at most {longest} tokens (encoder window {window})")
    notes = [f"skipped {len(skipped)} unusable rows, e.g. {skipped[0]}"] if skipped else []
    if len(fitting) < len(examples):
        notes.append(f"{len(examples) - len(fitting)} of {len(examples)} contexts exceed {longest} tokens")
    group = (lambda e: e.bucket) if task == "reconstruct" else (lambda e: e.source)
    torch.manual_seed(args.seed)
    return select_examples(fitting, args.limit, args.seed, group), notes


def _payload(args: argparse.Namespace, task: str, models, examples, results, notes, started: float) -> dict:
    import torch

    from ..version import __version__

    packages = {}
    for name in REPORTED_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "task": task,
        "data": str(args.data),
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "n_examples": len(examples),
        "rates": list(args.rates),
        "models": [
            {"label": label, "source": source, "checkpoint_id": gmsa.checkpoint_id, "config": gmsa.config.to_dict()}
            for label, source, gmsa in models
        ],
        "generation": {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}
        if task == "qa"
        else None,
        "results": results,
        "notes": notes,
        "wall_seconds": time.time() - started,
        "compute_seconds": sum(r["metrics"]["seconds_per_example"] * r["metrics"]["n"] for r in results),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "gmsa_version": __version__,
        "packages": packages,
    }


def _finish(args: argparse.Namespace, task: str, payload: dict, predictions: list[dict]) -> int:
    from .report import render_markdown, write_report

    out = Path(args.out or Path("reports") / "eval" / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")
    written = write_report(out, payload, predictions)
    print(render_markdown(payload))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .baselines import GMSAMethod, UncompressedRestatement
    from .common import EvalRun, default_cache_dir
    from .reconstruct import evaluate_reconstruct

    started = time.time()
    models = _load_models(args)
    examples, notes = _load_sample(args, "reconstruct", models)
    methods = [(GMSAMethod(f"gmsa[{label}]", gmsa), label) for label, _, gmsa in models]
    if not args.no_ceiling:
        methods += [(UncompressedRestatement(f"ceiling[{label}]", gmsa), label) for label, _, gmsa in models]
    run = EvalRun(examples, args.rates, args.cache_dir or default_cache_dir(), args.batch_size)
    results, predictions, more_notes = evaluate_reconstruct(methods, run, not args.no_semantic)
    payload = _payload(args, "reconstruct", models, examples, results, notes + more_notes, started)
    return _finish(args, "reconstruct", payload, predictions)


def cmd_qa(args: argparse.Namespace) -> int:
    from ..backbone import resolve_backbone
    from .baselines import Generation
    from .common import EvalRun, default_cache_dir
    from .qa import base_decoder_model, build_qa_methods, evaluate_qa

    started = time.time()
    models = _load_models(args)
    examples, notes = _load_sample(args, "qa", models)
    generation = Generation(args.max_new_tokens, args.repetition_penalty)
    pairs = [(label, gmsa) for label, _, gmsa in models]
    base = base_decoder_model(pairs, args.backbone) if args.baselines else pairs[0][1]
    base.model.to(args.device)
    small_lm = resolve_backbone(args.backbone or base.config.backbone) if "llmlingua" in args.baselines else ""
    methods = build_qa_methods(pairs, args.baselines, generation, base, small_lm, args.llmlingua_iterative_size)
    run = EvalRun(examples, args.rates, args.cache_dir or default_cache_dir(), args.batch_size)
    results, predictions = evaluate_qa(methods, run)
    payload = _payload(args, "qa", models, examples, results, notes, started)
    return _finish(args, "qa", payload, predictions)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m gmsa.evaluation.cli eval qa ...`` (bad input: exit code 2)."""
    parser = argparse.ArgumentParser(prog="gmsa")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        print(f"gmsa: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
