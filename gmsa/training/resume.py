"""A training run's state on disk, without pickles, split into what travels in git and what stays local.

Layout of a run directory (``out_dir``) and of a shipped resume point (``checkpoints/ae``)::

    model/                 trained weights, bf16 safetensors + config + manifest (the exported checkpoint)
    resume.json            step, elapsed time, tokens seen, curriculum cap, data position, RNG, scheduler, config
    metrics.jsonl          one row per step and per validation (a resume point keeps it as metrics.jsonl.gz)
    exact/                 local only (git-ignored): fp32 weights, AdamW moments, probe -> bit-exact resume
        state.json, trained.safetensors, optimizer.safetensors[, probe.safetensors]

``read()`` prefers ``exact/`` when it belongs to the same step as ``resume.json``; otherwise (a fresh
clone of the repository) the weights come from ``model/`` and the optimizer moments are re-warmed by
the trainer (docs/accelerator.md, "Resume"). ``publish()`` copies a run into a resume point, the only
way training output reaches a tracked directory. A legacy ``state.pt`` is read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import WEIGHTS_NAME, file_sha256
from ..model import AE_ADAPTER

FORMAT = 1
STATE_NAME = "resume.json"
EXACT_DIR = "exact"
LEGACY_NAME = "state.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class RunState:
    """What ``read()`` found: the counters always; optimizer and probe only for an exact resume."""

    counters: dict  # step, elapsed, tokens_seen, cap, position, rng, scheduler, config
    trained: dict[str, torch.Tensor]
    optimizer: dict | None = None
    probe: dict[str, torch.Tensor] | None = None
    source: str = ""

    @property
    def exact(self) -> bool:
        return self.optimizer is not None


# ----------------------------------------------------------------------------- rng
def rng_state() -> dict:
    import random

    version, internal, gauss = random.getstate()
    torch_state = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    return {"python": [version, list(internal), gauss], "torch": torch_state}


def set_rng_state(state: dict) -> None:
    import random

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    raw = state["torch"]
    if isinstance(raw, str):
        raw = torch.frombuffer(bytearray(base64.b64decode(raw)), dtype=torch.uint8)
    torch.set_rng_state(raw)


# --------------------------------------------------------------------------- write
def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, entries in state["state"].items()
        for key, value in entries.items()
    }
    return tensors, state["param_groups"]


def _nested_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    nested: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        nested.setdefault(int(index), {})[key] = value
    return {"state": nested, "param_groups": groups}


def _atomic_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


def write_exact(out: Path, counters: dict, trained: dict, optimizer: dict, probe: dict | None) -> None:
    """The local, git-ignored part: fp32 weights and AdamW moments in safetensors; counters, param groups in JSON."""
    staging = Path(tempfile.mkdtemp(prefix=".exact-", dir=out))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trained.items()}, staging / "trained.safetensors")
        moments, groups = _flat_optimizer(optimizer)
        save_file(moments, staging / "optimizer.safetensors")
        if probe is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in probe.items()}, staging / "probe.safetensors")
        _atomic_json(staging / "state.json", {"format": FORMAT, **counters, "param_groups": groups})
        target = out / EXACT_DIR
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_counters(out: Path, counters: dict) -> None:
    """``resume.json``, written last: it names the weights in ``model/`` by checksum."""
    weights = out / "model" / WEIGHTS_NAME
    _atomic_json(out / STATE_NAME, {"format": FORMAT, **counters, "model_sha256": file_sha256(weights)})


# ---------------------------------------------------------------------------- read
def has_state(directory: Path) -> bool:
    names = (STATE_NAME, LEGACY_NAME, f"{EXACT_DIR}/state.json")
    return any((Path(directory) / name).is_file() for name in names)


def source(out: Path, resume_from: str = "") -> Path | None:
    """Where a run continues from: its own ``out`` when it holds a state, else ``resume_from``, else None."""
    if has_state(Path(out)):
        return Path(out)
    if not resume_from:
        return None
    if not has_state(Path(resume_from)):
        raise FileNotFoundError(f"resume_from={resume_from!r} holds no {STATE_NAME}")
    return Path(resume_from)


def read(directory: Path) -> RunState | None:
    """The newest state in ``directory``, or None.

    ``exact/`` or a legacy ``state.pt`` (exact: fp32 weights + AdamW moments) when at or past the step of
    ``resume.json``; else ``resume.json`` with the bf16 weights of ``model/`` (the optimizer is re-warmed).
    """
    directory = Path(directory)
    exact = directory / EXACT_DIR
    counters = json.loads((directory / STATE_NAME).read_text()) if (directory / STATE_NAME).is_file() else None
    if (exact / "state.json").is_file():
        meta = json.loads((exact / "state.json").read_text())
        # exact/ is written first: at or past resume.json's step it is the newest complete state
        if counters is None or meta["step"] >= counters["step"]:
            probe = load_file(exact / "probe.safetensors") if (exact / "probe.safetensors").is_file() else None
            optimizer = _nested_optimizer(load_file(exact / "optimizer.safetensors"), meta.pop("param_groups"))
            return RunState(meta, load_file(exact / "trained.safetensors"), optimizer, probe, source=str(exact))
    if (directory / LEGACY_NAME).is_file():  # a local state.pt from before resume.json: exact, so preferred
        legacy = _read_legacy(directory / LEGACY_NAME)
        if counters is None or legacy.counters["step"] >= counters["step"]:
            return legacy
    if counters is None:
        return None
    if counters.get("format") != FORMAT:
        raise ValueError(f"{directory / STATE_NAME}: unknown format {counters.get('format')!r}")
    weights = directory / counters.get("model_dir", "model") / WEIGHTS_NAME
    if file_sha256(weights) != counters["model_sha256"]:
        raise ValueError(f"{weights} does not match {directory / STATE_NAME} (model_sha256): a partial copy?")
    trained = load_file(weights)
    if "model_dir" in counters:  # a shipped checkpoint holds the weights: keep what its stage trained
        trained = {name: tensor for name, tensor in trained.items() if trained_in_stage(name, counters["stage"])}
    return RunState(counters, trained, source=str(weights))


def trained_in_stage(name: str, stage: str) -> bool:
    """Whether a checkpoint tensor is one the ``ae`` stage trains (the encoder, LSA, memory, the "ae" adapter)."""
    if stage != "ae":
        return True
    return name.startswith(("encoder.", "lsa.", "memory.")) or f".{AE_ADAPTER}." in name


def _read_legacy(path: Path) -> RunState:
    """A ``state.pt`` from before resume.json: plain tensors and containers, so ``weights_only=True`` reads it."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    keys = ("step", "elapsed", "tokens_seen", "cap", "position", "scheduler", "config")
    counters = {key: state[key] for key in keys}
    version, internal, gauss = state["rng"]["python"]
    counters["rng"] = {"python": [version, list(internal), gauss], "torch": state["rng"]["torch"]}
    return RunState(counters, state["trained"], state["optimizer"], state.get("probe"), source=str(path))


def read_metrics(directory: Path) -> str:
    """The text of ``metrics.jsonl`` (or ``metrics.jsonl.gz``) in ``directory``; "" when there is none."""
    plain, packed = directory / METRICS_NAME, directory / f"{METRICS_NAME}.gz"
    if plain.is_file():
        return plain.read_text()
    return gzip.decompress(packed.read_bytes()).decode() if packed.is_file() else ""


# ------------------------------------------------------------------------- publish
def _publish_sharing(run: Path, dest: Path, counters: dict, weights_in: Path) -> dict:
    ours = load_file(run / "model" / WEIGHTS_NAME)
    shipped = load_file(weights_in / WEIGHTS_NAME)
    differing = [k for k, v in ours.items() if k not in shipped or not torch.equal(v, shipped[k])]
    if differing:
        raise ValueError(f"{weights_in} was not built on {run}: {differing[:3]} differ")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / "model", ignore_errors=True)
    metrics = read_metrics(run)
    (dest / f"{METRICS_NAME}.gz").write_bytes(gzip.compress(metrics.encode(), mtime=0))
    (dest / METRICS_NAME).unlink(missing_ok=True)
    model_dir = os.path.relpath(weights_in, dest)
    _atomic_json(
        dest / STATE_NAME, counters | {"model_dir": model_dir, "model_sha256": file_sha256(weights_in / WEIGHTS_NAME)}
    )
    return {"dest": str(dest), "step": counters["step"], "metrics_rows": metrics.count("\n"), "weights_in": model_dir}


def publish(run: Path, dest: Path, force: bool = False, weights_in: Path | None = None) -> dict:
    """Copy a run's shippable resume point (``model/``, ``resume.json``, gzipped metrics) into ``dest``.

    No optimizer state and no fp32 weights: they stay in the run's ``exact/``. Refuses to move a
    resume point backwards (a run at an earlier step than ``dest``) unless ``force``. With
    ``weights_in`` (the shipped checkpoint built on this run) the resume point holds no weights of
    its own: ``resume.json`` names that checkpoint, whose tensors of the run's stage must equal the run's.
    """
    run, dest = Path(run), Path(dest)
    counters = json.loads((run / STATE_NAME).read_text())
    if weights_in is not None:
        return _publish_sharing(run, dest, counters, Path(weights_in))
    if (dest / STATE_NAME).is_file() and not force:
        shipped = json.loads((dest / STATE_NAME).read_text())["step"]
        if shipped > counters["step"]:
            raise ValueError(f"{dest} is at step {shipped}, ahead of {run} (step {counters['step']}); use --force")
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / "model").exists():
        shutil.rmtree(dest / "model")
    shutil.copytree(run / "model", dest / "model")
    metrics = read_metrics(run)
    (dest / f"{METRICS_NAME}.gz").write_bytes(gzip.compress(metrics.encode(), mtime=0))
    (dest / METRICS_NAME).unlink(missing_ok=True)
    shutil.copyfile(run / STATE_NAME, dest / STATE_NAME)
    return {"dest": str(dest), "step": counters["step"], "metrics_rows": metrics.count("\n")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmsa.training.resume", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="copy a run's model/ + resume.json + metrics into a (tracked) resume point")
    p.add_argument("run", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--force", action="store_true", help="allow moving the resume point to an earlier step")
    p.add_argument("--weights-in", type=Path, help="a shipped checkpoint built on this run: reference its weights")
    p = sub.add_parser("show", help="print a directory's resume counters (step, position, exact or re-warmed)")
    p.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "publish":
            print(json.dumps(publish(args.run, args.dest, args.force, args.weights_in)))
            return 0
        state = read(args.directory)
        if state is None:
            raise FileNotFoundError(f"no {STATE_NAME} or {LEGACY_NAME} in {args.directory}")
        keys = ("step", "elapsed", "tokens_seen", "cap", "position")
        print(json.dumps({k: state.counters[k] for k in keys} | {"exact": state.exact, "source": state.source}))
        return 0
    except (OSError, ValueError, KeyError) as err:
        print(f"gmsa.training.resume: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
