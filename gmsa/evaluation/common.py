"""Shared parts of the evaluation harness: examples, seeded selection, models, per-example cache."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..api import GMSA
from ..backbone import cache_root
from ..config import GMSAConfig
from ..training.data import read_jsonl
from .baselines import Output

LENGTH_BUCKETS: tuple[tuple[str, int, int], ...] = (("<=128", 0, 128), ("129-256", 129, 256), ("257-512", 257, 512))
OVER_BUCKETS = ">512"
# an untrained compressor: the paper's frozen decoder (no AE decoder LoRA), soft tokens scaled like embeddings
UNTRAINED_DEFAULTS = {"k_enc": 4, "ae_decoder_lora_r": 0, "lsa_match_embedding_scale": True}


def length_bucket(n_tokens: int) -> str:
    """Name of the length bucket of a passage of ``n_tokens`` backbone tokens."""
    for name, low, high in LENGTH_BUCKETS:
        if low <= n_tokens <= high:
            return name
    return OVER_BUCKETS


@dataclass(frozen=True)
class Example:
    """One evaluation item: a context, and for QA a question with its gold answers."""

    id: str
    context: str
    question: str = ""
    answers: tuple[str, ...] = ()
    source: str = ""
    n_tokens: int = 0

    @property
    def bucket(self) -> str:
        return length_bucket(self.n_tokens)


def _field(row: dict, key: str, where: str, kind: type) -> object:
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {type(row[key]).__name__}")
    return row[key]


def _row_example(row: object, task: str, where: str, default_id: str) -> Example | str:
    """The example of one row, or why a well-formed row is unusable (empty text, question or answers).

    A row that is not an object, lacks a field or has a field of the wrong type is a ValueError.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    context = _field(row, "text" if task == "reconstruct" else "context", where, str)
    question, answers = "", ()
    if task == "qa":
        question = _field(row, "question", where, str)
        answers = tuple(str(a) for a in _field(row, "answers", where, list) if str(a).strip())
        if not question.strip() or not answers:
            return f"{where}: no question or no non-empty answer"
    if not context.strip():
        return f"{where}: empty context"
    return Example(str(row.get("doc_id") or default_id), context, question, answers, str(row.get("source", "")))


def load_examples(path: str | Path, task: str, tokenizer) -> tuple[list[Example], list[str]]:
    """Examples of an AE (``{"text", ...}``) or QA (``{"context", "question", "answers", ...}``) JSONL file.

    Returns the examples (``n_tokens`` recounted with ``tokenizer``, the backbone's) and one
    line per skipped row (empty context, question or answers), naming its file and row.
    """
    if task not in {"reconstruct", "qa"}:
        raise ValueError(f"task must be reconstruct or qa, got {task!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    examples, skipped = [], []
    for number, row in enumerate(read_jsonl(path), 1):
        parsed = _row_example(row, task, f"{path}, row {number}", f"{path.stem}:{number}")
        (examples if isinstance(parsed, Example) else skipped).append(parsed)
    if not examples:
        raise ValueError(f"{path} has no usable examples" + (f" ({skipped[0]}, ...)" if skipped else ""))
    counts = [len(ids) for ids in tokenizer([e.context for e in examples], add_special_tokens=False)["input_ids"]]
    return [Example(**(asdict(e) | {"n_tokens": n})) for e, n in zip(examples, counts)], skipped


def select_examples(
    examples: list[Example], limit: int | None, seed: int, group: Callable[[Example], str]
) -> list[Example]:
    """A seeded sample of ``limit`` examples, balanced over groups (round-robin after a shuffle)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    groups: dict[str, list[Example]] = defaultdict(list)
    for example in order:
        groups[group(example)].append(example)
    queues = [groups[name] for name in sorted(groups)]
    picked: list[Example] = []
    while any(queues) and (limit is None or len(picked) < limit):
        for queue in queues:
            if queue and (limit is None or len(picked) < limit):
                picked.append(queue.pop(0))
    return picked


# ----------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """``--model`` value: ``default``, a checkpoint directory, or ``untrained[:key=value,...]``,
    optionally prefixed by ``LABEL=``."""

    label: str
    source: str
    overrides: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        label, sep, source = text.partition("=")
        if not sep or "/" in label or ":" in label:
            label, source = "", text
        if not source:
            raise ValueError(f"empty --model value {text!r}")
        overrides = {}
        if source == "untrained" or source.startswith("untrained:"):
            _, _, pairs = source.partition(":")
            for pair in filter(None, pairs.split(",")):
                key, eq, raw = pair.partition("=")
                if not eq:
                    raise ValueError(f"--model {text!r}: expected untrained:key=value,..., got {pair!r}")
                overrides[key] = _parse_scalar(raw)
            source = "untrained"
        return cls(label or _default_label(source, overrides), source, overrides)


def _parse_scalar(raw: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _default_label(source: str, overrides: dict) -> str:
    if source in {"default", "untrained"}:
        inner = ",".join(f"{key}={value}" for key, value in overrides.items())
        return f"{source}({inner})" if inner else source
    path = Path(source)
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def load_model(spec: ModelSpec, backbone: str | None, seed: int) -> GMSA:
    """Build the GMSA a spec names; an untrained one is seeded (so cached outputs stay valid)."""
    if spec.source == "untrained":
        torch.manual_seed(seed)
        config = GMSAConfig(**(UNTRAINED_DEFAULTS | spec.overrides))
        return GMSA.from_backbone(backbone or config.backbone, config)
    if spec.source == "default":
        return GMSA.from_pretrained(None, backbone=backbone)
    if not Path(spec.source).is_dir():
        raise FileNotFoundError(f"no GMSA checkpoint directory {spec.source!r} (or use 'default' / 'untrained')")
    return GMSA.from_pretrained(spec.source, backbone=backbone)


def unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = defaultdict(int)
    result = []
    for label in labels:
        seen[label] += 1
        result.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return result


# ----------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    return cache_root() / "eval"


class ResultCache:
    """Per-example results of one method, appended to a JSONL file as they are computed.

    A row is ``{"key", "text", "context_tokens", "extra", "seconds"}``; ``key`` hashes the
    task, rate, context and question, and the file name carries the method's settings hash.
    """

    def __init__(self, directory: str | Path, task: str, method_name: str, cache_id: str):
        slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in method_name)[:60]
        self.path = Path(directory) / task / f"{slug}-{cache_id}.jsonl"
        self.task = task
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            for row in read_jsonl(self.path):
                self.rows[row["key"]] = row

    def key(self, rate: int | None, example: Example) -> str:
        payload = json.dumps([self.task, rate, example.context, example.question], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict:
        return self.rows[key]

    def put_many(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.rows[row["key"]] = row


def run_cached(
    call: Callable[[list[Example]], list[Output]],
    cache: ResultCache,
    examples: list[Example],
    rate: int | None,
    batch_size: int,
    bar: tqdm,
) -> list[dict]:
    """Outputs of ``call`` for every example, computing only those not cached yet.

    Missing examples run in batches of similar length; each batch is written to the cache as
    soon as it is done, so an interrupted run resumes where it stopped.
    """
    keys = [cache.key(rate, example) for example in examples]
    todo = sorted((i for i, key in enumerate(keys) if key not in cache), key=lambda i: examples[i].n_tokens)
    bar.update(len(examples) - len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        began = time.perf_counter()
        outputs = call([examples[i] for i in batch])
        seconds = (time.perf_counter() - began) / len(batch)
        cache.put_many(
            {"key": keys[i], "text": o.text, "context_tokens": o.context_tokens, "extra": o.extra, "seconds": seconds}
            for i, o in zip(batch, outputs)
        )
        bar.update(len(batch))
    return [cache.get(key) for key in keys]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def cost_summary(rows: list[dict]) -> dict:
    """Mean tokens the decoder read, tokens of the original context, and seconds per example."""
    return {
        "context_tokens": mean([row["context_tokens"] for row in rows]),
        "original_tokens": mean([row["n_tokens"] for row in rows]),
        "seconds_per_example": mean([row["seconds"] for row in rows]),
    }


def prediction_row(method, rate: int | None, example: Example) -> dict:
    """The keys every prediction row starts with: which method, at which rate, on which example."""
    return {
        "method": method.name,
        "rate": rate,
        "id": example.id,
        "source": example.source,
        "n_tokens": example.n_tokens,
    }


@dataclass
class EvalRun:
    """What an evaluation runs on: the examples, the rates, where outputs are cached, examples per batch."""

    examples: list[Example]
    rates: list[int]
    cache_dir: str | Path
    batch_size: int = 4


def evaluate_methods(
    task: str,
    methods: list[tuple[object, str]],
    run: EvalRun,
    call: Callable[[object, list[Example], int | None], list[Output]],
    predict: Callable[[object, int | None, list[dict]], list[dict]],
    summarise: Callable[[object, str, int | None, list[dict]], dict],
) -> tuple[list[dict], list[dict]]:
    """Every ``(method, label)`` at every rate (once for a rate-independent method): results and predictions.

    ``call(method, batch, rate)`` runs one batch (see :func:`run_plan`), ``predict(method, rate, outputs)``
    makes the prediction rows, ``summarise(method, label, rate, rows)`` a method's result.
    """
    plan = [(m, label, rate) for m, label in methods for rate in (run.rates if m.rate_dependent else [None])]
    results, predictions = [], []
    for method, label, rate, outputs in run_plan(task, plan, run.examples, run.cache_dir, run.batch_size, call):
        rows = predict(method, rate, outputs)
        predictions += rows
        results.append(summarise(method, label, rate, rows))
    return results, predictions


def run_plan(
    task: str,
    plan: list[tuple],
    examples: list[Example],
    cache_dir: str | Path,
    batch_size: int,
    call: Callable[[object, list[Example], int | None], list[Output]],
) -> Iterator[tuple[object, str, int | None, list[dict]]]:
    """For each ``(method, label, rate)`` of ``plan``: its outputs on every example, cached per method.

    ``call(method, batch, rate)`` runs one batch; one progress bar covers the whole plan.
    """
    with tqdm(total=len(plan) * len(examples), desc=f"eval {task}", unit="ex", dynamic_ncols=True) as bar:
        for method, label, rate in plan:
            bar.set_postfix_str(f"{method.name} x{rate or '-'}")
            cache = ResultCache(cache_dir, task, method.name, method.cache_id)
            outputs = run_cached(
                lambda batch, m=method, r=rate: call(m, batch, r), cache, examples, rate, batch_size, bar
            )
            yield method, label, rate, outputs
