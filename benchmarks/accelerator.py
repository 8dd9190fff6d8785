"""The accelerator run itself: version checks, AE then KEFT under a time budget, evaluation, parts under $OUT.

Called by benchmarks/accelerator.sh once the payload is open (docs/accelerator.md)::

    python3 benchmarks/accelerator.py check [--dry-run]
    python3 benchmarks/accelerator.py train --payload P --work W --out $OUT [--minutes 8] [--dry-run]

The recipe is configs/ae.toml and configs/keft.toml; only what the machine changes is overridden
here (paths, bf16, batch size, step count from a measured step time, evaluation cadence). Outputs:
``$OUT/checkpoint.part-NN`` + ``$OUT/checkpoint.json`` (``python -m gmsa.training.transport unpack`` turns them
into ``ae/``, ``keft/`` and ``eval/``; ``keft/model`` loads with ``GMSA.from_pretrained``) and
``$OUT/results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTED = float(os.environ.get("GMSA_ACCEL_T0") or time.time())  # accelerator.sh's start: setup counts too
# what gmsa needs on the image; minimums are the oldest versions this code is known to run with
NEEDED = {"torch": "2.4", "transformers": "5.0", "peft": "0.13", "safetensors": "0.4", "tokenizers": "0.20"}
NEEDED |= {"sacrebleu": "2.0", "tqdm": "4.0", "numpy": "1.24", "gguf": "0.10", "rouge-score": "0.1", "nltk": "3.8"}
PART_MIB = 15.0
MAX_PARTS = 5  # $OUT takes 8 files; results.json, log.txt and the manifest use three
CALIBRATION_STEPS = 12
FROM_PAYLOAD = {"gguf", "rouge-score", "nltk"}  # the payload's wheels install these (accelerator_payload.WHEELS)


def log(message: str) -> None:
    print(f"accelerator [{time.time() - STARTED:6.1f} s] {message}", flush=True)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check(dry_run: bool, early: bool = False) -> dict:
    """Fail fast, one clear line, when a package is missing or too old, or no GPU is visible.

    ``early`` (the first calls, before the payload's wheels are installed) skips what they provide.
    """
    versions = {}
    for name, minimum in NEEDED.items():
        if early and name in FROM_PAYLOAD:
            continue
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as err:
            raise SystemExit(f"accelerator: FAIL: {name} is not installed (docs/accelerator.md: wheels)") from err
        if _version_tuple(versions[name]) < _version_tuple(minimum):
            raise SystemExit(f"accelerator: FAIL: {name} {versions[name]} < {minimum}")
    import torch

    if torch.cuda.is_available():
        versions["device"] = torch.cuda.get_device_name()
        if not torch.cuda.is_bf16_supported():
            raise SystemExit(f"accelerator: FAIL: {versions['device']} has no bf16")
    elif not dry_run:
        raise SystemExit(f"accelerator: FAIL: torch {torch.__version__} sees no CUDA device")
    else:
        versions["device"] = "cpu (dry run)"
    log("versions ok: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return versions


# ------------------------------------------------------------------------ training
def stage_config(stage: str, payload: Path, work: Path, args: argparse.Namespace):
    """The recipe's TrainConfig with only the machine-specific fields replaced."""
    from gmsa.training.config import TrainConfig

    task = "ae" if stage == "ae" else "qa"
    cfg = TrainConfig.from_sources([str(REPO / "configs" / f"{stage}.toml")], getattr(args, f"{stage}_set"))
    values = dict(
        out_dir=str(work / stage),
        data=payload_data(cfg.data, payload / "data" / task),
        val_data=str(payload / "data" / task / "val.jsonl"),
        resume_from="",
        init=str(work / "ae" / "model") if stage == "keft" else cfg.init,
        device="auto",
        threads=0,
        save_every_min=1e9,
        keep_every=0,
        max_steps=10**6,
        eval_every=0,
    )
    if args.dry_run:
        values |= dict(batch_size=2, min_tokens=1, eval_examples=2, eval_max_tokens=32, dtype="float32", threads=1)
    else:
        values |= dict(batch_size=getattr(args, f"{stage}_batch"), dtype="bfloat16")
    return dataclasses.replace(cfg, **values)


def payload_data(data: str | list[str], folder: Path) -> str | list[str]:
    """The recipe's data files as packed in the payload; extra files it lacks (cloze rows) are left out."""
    if isinstance(data, str):
        return str(folder / "train.jsonl")
    names = [Path(name).name for name in data]
    return [str(folder / name) for name in names if name == "train.jsonl" or (folder / name).is_file()]


def planned_steps(cfg, done: int, step_s: float, cap0: int, seconds: float) -> int:
    """Steps that fit in ``seconds``, a step costing ``step_s`` at cap ``cap0`` and in proportion to the cap after."""
    total, step = 0.0, done
    while True:
        cost = step_s * max(1.0, cfg.max_tokens_at(step) / cap0)
        if total + cost > seconds:
            return step
        total, step = total + cost, step + 1


def train_stage(stage: str, payload: Path, work: Path, args: argparse.Namespace, seconds: float) -> dict:
    """Calibrate the step time, size max_steps to the budget (the cosine schedule ends in time), train."""
    from gmsa.training.trainer import Trainer

    began = time.time()
    cfg = stage_config(stage, payload, work, args)
    trainer = Trainer(dataclasses.replace(cfg, stop_at_step=args.calibration_steps))
    trainer.run()
    rows = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median([r["step_s"] for r in rows if "step_s" in r][2:] or [rows[-1]["step_s"]])
    left = seconds - (time.time() - began) - args.save_reserve_s
    steps = max(trainer.step + 1, planned_steps(cfg, trainer.step, step_s, trainer.cap, 0.92 * left))
    if args.dry_run:
        steps = trainer.step + 1
    every = max(1, (steps - trainer.step) // args.validations)
    trainer.cfg = dataclasses.replace(cfg, max_steps=steps, eval_every=every, max_minutes=max(left, 1.0) / 60)
    log(f"{stage}: {step_s:.3f} s/step at cap {trainer.cap}; training to step {steps} in {left:.0f} s")
    trainer.run()
    summary = {
        "steps": trainer.step,
        "planned_steps": steps,
        "seconds": round(time.time() - began, 1),
        "step_s_calibrated": step_s,
        "tokens_seen": trainer.tokens_seen,
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
    }
    rows = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    summary["train_loss_last20"] = statistics.fmean(losses[-20:])
    summary["last_validation"] = next((r for r in reversed(rows) if any(k.startswith("val_") for k in r)), None)
    log(f"{stage}: done, {json.dumps(summary)}")
    return summary


# ---------------------------------------------------------------------- evaluation
def evaluate(task: str, models: dict[str, Path | str], payload: Path, work: Path, args) -> dict:
    """``gmsa eval`` on the test split, the new model beside the shipped one; results.json's rows."""
    out = work / "eval" / task
    data = payload / "data" / ("qa" if task == "qa" else "ae") / "test.jsonl"
    command = [sys.executable, "-m", "gmsa.cli", "eval", task, "--data", str(data)]
    command += [arg for label, source in models.items() for arg in ("--model", f"{label}={source}")]
    command += ["--rates", "4", "8", "--limit", str(args.eval_limit), "--out", str(out)]
    command += ["--cache-dir", str(work / "eval-cache")]
    command += ["--batch-size", "2", "--device", "cpu"] if args.dry_run else ["--batch-size", "32", "--device", "cuda"]
    if task == "qa":
        command += ["--baselines", "uncompressed", "closed-book", "--max-new-tokens", "8" if args.dry_run else "48"]
    else:
        command += ["--no-semantic"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    seconds = max(10.0, args.deadline_min * 60 - (time.time() - STARTED) - 10)
    try:
        done = subprocess.run(command, cwd=REPO, env=env, check=False, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"error": f"gmsa eval {task} ran past the deadline ({seconds:.0f} s)"}
    if done.returncode:
        return {"error": f"gmsa eval {task} exited {done.returncode}"}
    (out / "predictions.jsonl").unlink(missing_ok=True)  # large; the metrics are in results.json
    rows = json.loads((out / "results.json").read_text())["results"]
    return {"rows": [{k: r[k] for k in ("method", "model", "rate", "metrics")} for r in rows]}


def beats_shipped(qa: dict, reconstruct: dict) -> dict:
    """Per rate: does the new model's QA F1 / reconstruction BLEU beat the shipped checkpoint's?"""
    verdict = {}
    for name, result, key in (("qa_f1", qa, "f1"), ("reconstruct_bleu", reconstruct, "bleu")):
        scores = {(r["model"], r["rate"]): r["metrics"][key] for r in result.get("rows", []) if r["model"]}
        for rate in (4, 8):
            if ("new", rate) in scores and ("shipped", rate) in scores:
                verdict[f"{name}_x{rate}"] = scores["new", rate] > scores["shipped", rate]
    return verdict


# -------------------------------------------------------------------------- output
def collect(work: Path, results: dict) -> Path:
    """What comes back: the resume points (no exact/ state), the evaluations, results.json."""
    bundle = work / "result"
    shutil.rmtree(bundle, ignore_errors=True)
    for stage in ("ae", "keft"):
        for name in ("model", "resume.json", "metrics.jsonl"):
            source = work / stage / name
            if source.exists():
                (bundle / stage).mkdir(parents=True, exist_ok=True)
                (shutil.copytree if source.is_dir() else shutil.copyfile)(source, bundle / stage / name)
    if (work / "eval").is_dir():
        shutil.copytree(work / "eval", bundle / "eval")
    (bundle / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return bundle


def write_out(bundle: Path, out: Path) -> dict:
    from gmsa.training import transport

    manifest = transport.pack(bundle, out, "checkpoint", int(PART_MIB * transport.MIB))
    if len(manifest["parts"]) > MAX_PARTS:
        raise SystemExit(f"accelerator: FAIL: the result needs {len(manifest['parts'])} parts > {MAX_PARTS}")
    return manifest


def train(args: argparse.Namespace) -> int:
    payload, work, out = args.payload.resolve(), args.work.resolve(), args.out.resolve()
    for stale in ("ae", "keft", "eval", "result"):  # a rerun on a warm machine starts afresh
        shutil.rmtree(work / stale, ignore_errors=True)
    versions = check(args.dry_run)
    from gmsa import GMSA, CheckpointError
    from gmsa.backbone import default_backbone_dir

    log(f"backbone ready: {default_backbone_dir()}")
    try:  # the fingerprint covers the backbone's config text (its path too): a mismatch fails here, not at the end
        GMSA.from_pretrained(None)
    except CheckpointError as err:
        raise SystemExit(f"accelerator: FAIL: the shipped checkpoint does not fit this backbone: {err}") from err
    budget = min(60 * args.minutes, args.deadline_min * 60 - (time.time() - STARTED) - args.eval_reserve_s)
    results = {"versions": versions, "budget_s": round(budget, 1), "minutes": args.minutes, "dry_run": args.dry_run}
    results["ae"] = train_stage("ae", payload, work, args, budget * args.ae_share)
    results["keft"] = train_stage("keft", payload, work, args, budget - results["ae"]["seconds"])
    # the checkpoint goes to $OUT first: an evaluation that overruns the call cannot take it along
    manifest = write_out(collect(work, results | {"evaluation": "see $OUT/results.json"}), out)
    log(f"wrote {len(manifest['parts'])} parts ({manifest['bytes'] / 2**20:.1f} MiB) to {out}")
    results["qa"] = evaluate("qa", {"new": work / "keft" / "model", "shipped": "default"}, payload, work, args)
    rec_models = {"new": work / "keft" / "model", "new_ae": work / "ae" / "model", "shipped": "default"}
    results["reconstruct"] = evaluate("reconstruct", rec_models, payload, work, args)
    results["beats_shipped"] = beats_shipped(results["qa"], results["reconstruct"])
    results["wall_s"] = round(time.time() - STARTED, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"results.json written; beats shipped: {json.dumps(results['beats_shipped'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--early", action="store_true", help="before the payload's wheels are installed")
    p = sub.add_parser("train")
    p.add_argument("--payload", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget, AE + KEFT (default 8)")
    p.add_argument("--deadline-min", type=float, default=9.4, help="the whole run ends by then (call limit 10)")
    p.add_argument("--ae-share", type=float, default=0.75, help="fraction of the budget for AE")
    p.add_argument("--ae-batch", type=int, default=64)
    p.add_argument("--keft-batch", type=int, default=32)
    p.add_argument("--ae-set", action="append", default=[], help="key=value over configs/ae.toml (repeatable)")
    p.add_argument("--keft-set", action="append", default=[], help="key=value over configs/keft.toml")
    p.add_argument("--calibration-steps", type=int, default=CALIBRATION_STEPS)
    p.add_argument("--validations", type=int, default=6, help="validation rows per stage")
    p.add_argument("--eval-limit", type=int, default=100, help="test examples per evaluation")
    p.add_argument("--save-reserve-s", type=float, default=15.0, help="seconds kept per stage for its last save")
    p.add_argument("--eval-reserve-s", type=float, default=90.0, help="seconds kept for evaluation and writing $OUT")
    args = parser.parse_args(argv)
    if args.command == "check":
        check(args.dry_run, args.early)
        return 0
    if args.dry_run:
        args.calibration_steps, args.validations, args.eval_limit = 2, 1, 2
        args.deadline_min = max(args.deadline_min, 60.0)  # a slow CPU is no 10-minute call
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
