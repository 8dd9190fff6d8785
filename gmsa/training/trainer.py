"""Training the GMSA stages: ``ae`` (reconstruct the context) and ``keft`` (answer questions),
plus ``warmup``, a cheap token-probe objective that can precede ``ae`` (``gmsa/training/warmup.py``).

Resumable without pickles (``gmsa/training/resume.py``): ``out_dir/model/`` is the latest exported checkpoint
(bf16), ``out_dir/resume.json`` the step, data position, RNG and schedule, ``out_dir/exact/`` (local
only) the fp32 weights and AdamW moments; ``out_dir/metrics.jsonl`` gets one row per step and one per
validation. A run with no state of its own starts from ``resume_from`` (a shipped resume point such as
``checkpoints/ae``) and re-warms the optimizer; training writes only into ``out_dir``. Under ``torchrun`` it
trains data-parallel with DDP or FSDP2 (``parallel``); the format is the same for all three (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from statistics import mean

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..api import GMSA
from ..checkpoint import load_trained
from ..config import ae_prompt_text
from ..evaluation.information import soft_token_information
from ..evaluation.metrics import bleu
from ..model import base_model, enable_decoder_tuning, set_stage, trained_state_dict
from ..precision import hold_frozen_in, log_choice, resolve_dtype
from . import distributed, resume
from .config import TrainConfig
from .data import BatchStream, Example, autoencoder_examples, qa_examples, read_rows, subsample_sources
from .warmup import TokenProbe, probe_loss, probe_scores

log = logging.getLogger(__name__)


def cosine_lr(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(cfg: TrainConfig) -> GMSA:
    """A fresh GMSA on the backbone, or one loaded from ``cfg.init`` (with KEFT's decoder tuning)."""
    if not cfg.init:
        fresh = GMSA.from_backbone(cfg.model.backbone, cfg.model_config())
        fresh.config.ae_prompt = ae_prompt_text(cfg.model.ae_prompt, fresh.tokenizer)
        return fresh
    start = GMSA.from_pretrained(cfg.init)
    # the encoder window must cover the longest context this stage trains on, as for a fresh model
    start.config.max_context_tokens = max(start.config.max_context_tokens, cfg.max_tokens)
    if cfg.stage == "keft":
        start.config.decoder_lora_r = cfg.model.decoder_lora_r
        enable_decoder_tuning(start.model, cfg.model.decoder_tuning)
    return start


def load_examples(
    cfg: TrainConfig,
    path: str | list[str],
    gmsa: GMSA,
    max_tokens: int,
    source_fractions: dict[str, float] | None = None,
) -> list[Example]:
    """The examples of one data file or of several, read in order (e.g. the QA rows, then synthetic cloze ones)."""
    rows = subsample_sources(read_rows(path), source_fractions or {}, cfg.seed)
    if cfg.stage in {"warmup", "ae"}:
        return autoencoder_examples(rows, gmsa.tokenizer, gmsa.config.ae_prompt, max_tokens, cfg.min_tokens)
    return qa_examples(rows, gmsa.tokenizer, max_tokens)


class Objective(nn.Module):
    """The stage's summed loss as one module, so DDP can wrap it: GMSA's own loss or the warm-up probe's."""

    def __init__(self, model: nn.Module, probe: TokenProbe | None):
        super().__init__()
        self.model, self.probe = model, probe

    def forward(self, batch: dict[str, torch.Tensor], reduction: str = "sum") -> torch.Tensor:
        if self.probe is not None:
            return probe_loss(self.model, self.probe, batch, reduction)
        return self.model(**batch, reduction=reduction)

    def counted_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """How many tokens the summed loss adds up (the warm-up scores context tokens, the rest targets)."""
        return int((batch["context_mask"] if self.probe is not None else batch["target_mask"]).sum())


class Trainer:
    """One training run; ``run()`` resumes from ``out_dir`` (or ``resume_from``) when it holds a state."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = distributed.setup(cfg.device)
        # FSDP moves the model to the GPU itself, one shard group at a time
        self.sharded = cfg.parallel == "fsdp" and self.dist.active
        torch.manual_seed(cfg.seed)
        self.gmsa = build_model(cfg)
        self.model = self.gmsa.model if self.sharded else self.gmsa.model.to(self.dist.device)
        set_stage(self.model, "ae" if cfg.stage == "warmup" else cfg.stage)
        self.compute = resolve_dtype(cfg.dtype, self.dist.device)
        log_choice(self.compute, "training")
        self.low_precision = self.compute.dtype != torch.float32
        if self.low_precision and not self.sharded:  # FSDP2 wants one dtype per shard group: autocast only
            hold_frozen_in(self.model, self.compute.dtype)
        self.probe = TokenProbe.for_model(self.model, max(cfg.rates)) if cfg.stage == "warmup" else None
        if cfg.grad_checkpointing:
            for stack in (self.model.encoder, self.model.decoder):
                stack.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.objective = Objective(self.model, self.probe)
        self.engine = self._wrap(self.objective if self.sharded else self.objective.to(self.dist.device))
        self.examples = load_examples(cfg, cfg.data, self.gmsa, cfg.max_tokens, cfg.source_fractions)
        self.val = load_examples(cfg, cfg.val_data, self.gmsa, cfg.eval_max_tokens)[: cfg.eval_examples]
        self.optimizer = torch.optim.AdamW(self._param_groups(), weight_decay=cfg.weight_decay)
        self.rewarm_from = -1  # the step a resume without optimizer moments started at
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: self._lr_factor(s))
        self.step = 0
        self.elapsed = 0.0
        self.tokens_seen = 0
        self.cap = cfg.max_tokens_at(0)
        self.stream = self._stream(self.cap)

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        factor = cosine_lr(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        if self.rewarm_from >= 0 and cfg.rewarm_steps > 0:
            factor *= min(1.0, (step - self.rewarm_from + 1) / cfg.rewarm_steps)
        return factor

    def _wrap(self, objective: Objective) -> nn.Module:
        """DDP or FSDP2 around the objective when torchrun started several ranks; the objective itself otherwise."""
        if not self.dist.active:
            return objective
        if self.sharded:
            return distributed.fully_sharded(objective, self._shard_units(), self.dist, self.low_precision)
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # The warm-up probe's slots for the larger rates go unused in batches of small rates.
        unused = self.cfg.stage == "warmup"
        return DistributedDataParallel(
            objective, device_ids=device_ids, forward_sync_buffers=False, find_unused_parameters=unused
        )

    def _shard_units(self) -> list[nn.Module]:
        """FSDP's shard groups: every encoder and decoder layer, and the LSA blocks (the root holds the rest)."""
        lsa = [self.model.lsa.blocks] if self.model.lsa.blocks is not None else []
        return [*self.model.encoder.layers, *lsa, *base_model(self.model.decoder).layers]

    def _param_groups(self) -> list[dict]:
        gain = [p for p in [self.model.lsa.log_gain] if p is not None and p.requires_grad]
        lsa = [p for p in self.model.lsa.parameters() if p.requires_grad and all(p is not g for g in gain)]
        grouped = {id(p) for p in lsa + gain}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in grouped]
        if self.probe is not None:
            rest += list(self.probe.parameters())
        groups = [
            {"params": rest, "lr": self.cfg.lr},
            {"params": lsa, "lr": self.cfg.lsa_lr or self.cfg.lr},
            {"params": gain, "lr": self.cfg.gain_lr},
        ]
        return [g for g in groups if g["params"]]

    def _stream(self, cap: int) -> BatchStream:
        usable = [e for e in self.examples if len(e.context) <= cap]
        pad_id = self.gmsa.tokenizer.pad_token_id
        return BatchStream(
            usable,
            self.cfg.batch_size,
            tuple(self.cfg.rates),
            pad_id,
            self.cfg.seed,
            rank=self.dist.rank,
            world=self.dist.world,
        )

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """Rank 0 writes ``exact/``, ``model/`` and ``resume.json``; under FSDP every rank first helps gather."""
        if not (self.dist.is_main or self.sharded):
            return
        trained = distributed.gathered(trained_state_dict(self.model))
        optimizer = distributed.gathered(self.optimizer.state_dict())
        probe = distributed.gathered(self.probe.state_dict()) if self.probe is not None else None
        if not self.dist.is_main:
            return
        counters = {
            "stage": self.cfg.stage,
            "step": self.step,
            "elapsed": self.elapsed,
            "tokens_seen": self.tokens_seen,
            "cap": self.cap,
            "position": self.stream.position,
            "rng": resume.rng_state(),
            "scheduler": self.scheduler.state_dict(),
            "config": dataclasses.asdict(self.cfg),
            "rewarm_from": self.rewarm_from,
        }
        resume.write_exact(self.out, counters, trained, optimizer, probe)
        self.gmsa.save_pretrained(self.out / "model", weights=trained)
        resume.write_counters(self.out, counters)

    def keep_snapshot(self) -> None:
        """Write the trained weights (no optimizer) to ``snapshots/step-{step}`` for later benchmarks."""
        if not (self.dist.is_main or self.sharded):
            return
        trained = distributed.gathered(trained_state_dict(self.model))
        if self.dist.is_main:
            self.gmsa.save_pretrained(self.out / "snapshots" / f"step-{self.step}", weights=trained)

    def resume(self) -> bool:
        """Continue from ``out_dir``'s state, else from ``resume_from``; False (fresh start) when neither has one."""
        source = resume.source(self.out, self.cfg.resume_from)
        if source is None:
            return False
        state = resume.read(source)
        load_trained(self.model, state.trained, state.source, place=distributed.shard_like)
        if self.probe is not None and state.probe is not None:
            ours = self.probe.state_dict()
            self.probe.load_state_dict({k: distributed.shard_like(v, ours[k]) for k, v in state.probe.items()})
        counters = state.counters
        self.step, self.elapsed, self.tokens_seen = counters["step"], counters["elapsed"], counters["tokens_seen"]
        self.scheduler.load_state_dict(counters["scheduler"])
        self.rewarm_from = counters.get("rewarm_from", -1)
        if state.exact:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.optimizer.load_state_dict(distributed.shard_optimizer_state(state.optimizer, params))
        else:
            self._rewarm()
        self.cap = counters["cap"]
        self.stream = self._stream(self.cap)
        self.stream.seek(counters["position"])
        resume.set_rng_state(counters["rng"])
        if source != self.out and self.dist.is_main and not (self.out / resume.METRICS_NAME).exists():
            (self.out / resume.METRICS_NAME).write_text(resume.read_metrics(source))
        how = "exactly" if state.exact else f"with fresh AdamW moments, lr re-warmed over {self.cfg.rewarm_steps} steps"
        log.info("resumed %s at step %d %s", state.source, self.step, how)
        return True

    def _rewarm(self) -> None:
        """No optimizer moments (a fresh clone): start AdamW anew and ramp the lr up from this step."""
        self.rewarm_from = self.step
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self._lr_factor(self.step)

    def log_row(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.dist.device) for key, value in batch.items()}

    def train_step(self, batches: list[dict]) -> float:
        """One optimizer step over micro-batches (and ranks): the exact token mean of the global batch."""
        autocast = self.autocast()
        batches = [self._to_device(b) for b in batches]
        counted = sum(self.objective.counted_tokens(b) for b in batches)
        seen = sum(int(b["context_mask"].sum() + b["target_mask"].sum()) for b in batches)
        total, seen = self.dist.sum([counted, seen])
        self.tokens_seen += int(seen)
        # DDP averages gradients over ranks: scale by world so the result is the global sum / total.
        scale = self.dist.world / max(total, 1.0)
        summed = 0.0
        for i, batch in enumerate(batches):
            with self._gradient_sync(i == len(batches) - 1), autocast:
                loss = self.engine(batch) * scale
            loss.backward()
            summed += loss.item()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.dist.sum([summed])[0] / self.dist.world

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.dist.device.type, dtype=self.compute.dtype, enabled=self.low_precision)

    def _gradient_sync(self, last: bool):
        """Gradients are reduced over ranks only on the last micro-batch of a step."""
        if not self.dist.active:
            return nullcontext()
        if self.sharded:
            self.engine.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.engine.no_sync()

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation loss and greedy reconstruction BLEU (AE) on the fixed validation examples.

        Under FSDP every rank runs it (the parameters are sharded): the loss only, through the
        sharded model; BLEU and probe accuracy need the whole model in one process and are skipped.
        """
        self.model.eval()
        with self.autocast():
            row = self._validation_row()
        self.model.train()
        if self.sharded:
            distributed.reshard(self.engine)
        return row

    def _validation_row(self) -> dict:
        scorer = self.engine if self.sharded else self.objective
        row: dict = {"step": self.step, "elapsed_s": round(self.elapsed, 1), "tokens_seen": self.tokens_seen}
        for rate in self.cfg.rates:
            stream = BatchStream(self.val, self.cfg.batch_size, (rate,), self.gmsa.tokenizer.pad_token_id)
            batches = [next(iter(stream)) for _ in range(math.ceil(len(self.val) / self.cfg.batch_size))]
            batches = [self._to_device(b) for b in batches]
            if self.probe is not None and not self.sharded:
                losses, accuracies = zip(*(probe_scores(self.model, self.probe, b) for b in batches))
                row[f"val_loss_x{rate}"], row[f"val_probe_acc_x{rate}"] = mean(losses), mean(accuracies)
                continue
            row[f"val_loss_x{rate}"] = mean([scorer(b, reduction="mean").item() for b in batches])
            if self.sharded:
                continue
            if self.cfg.stage == "ae":
                pad_id = self.gmsa.tokenizer.pad_token_id
                information = soft_token_information(self.model, self.val, rate, pad_id, self.cfg.batch_size)
                row[f"val_info_x{rate}"] = round(information.nats_per_token, 4)
                texts = self.gmsa.tokenizer.batch_decode([e.context for e in self.val])
                compressed = self.gmsa.compress(texts, rate=rate)
                row[f"val_bleu_x{rate}"] = bleu(self.gmsa.reconstruct(compressed), texts)
        return row

    def _request_stop(self, signum, frame) -> None:
        log.warning("signal %d: saving at the end of this step, then stopping", signum)
        self.stop_requested = True

    def _check_steps(self) -> None:
        """Refuse a run with nothing to do: max_steps (or stop_at_step) at or below the resumed step."""
        cfg, step = self.cfg, self.step
        if step >= cfg.max_steps:
            raise ValueError(
                f"{cfg.stage}: {self.out} is already at step {step} >= max_steps={cfg.max_steps}: nothing to train; "
                f"raise max_steps (e.g. max_steps={step + 1000}) or choose another out_dir"
            )
        if cfg.stop_at_step and cfg.stop_at_step <= step:
            raise ValueError(f"{cfg.stage}: stop_at_step={cfg.stop_at_step} is at or below the resumed step {step}")

    def run(self) -> None:
        """Train until ``max_steps`` (or a stop condition), saving periodically; SIGTERM/SIGINT save and stop."""
        self.stop_requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._request_stop)
            signal.signal(signal.SIGINT, self._request_stop)
        self.resume()
        self._check_steps()
        if self.dist.is_main:
            tqdm.write(f"training dtype {self.compute.name}: {self.compute.reason}")
        self.model.train()
        started, last_save = time.time(), time.time()
        base_elapsed = self.elapsed
        iterator = iter(self.stream)
        bar = tqdm(
            total=self.cfg.max_steps,
            initial=self.step,
            desc=f"train {self.cfg.stage}",
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        while self.step < self.cfg.max_steps:
            if (cap := self.cfg.max_tokens_at(self.step)) != self.cap:
                self.cap, self.stream = cap, self._stream(cap)
                iterator = iter(self.stream)
            t0 = time.time()
            loss = self.train_step([next(iterator) for _ in range(self.cfg.grad_accum)])
            self.step += 1
            self.elapsed = base_elapsed + time.time() - started
            self.log_row(
                {
                    "step": self.step,
                    "loss": round(loss, 4),
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_seen": self.tokens_seen,
                    "elapsed_s": round(self.elapsed, 1),
                    "step_s": round(time.time() - t0, 2),
                    "cap": self.cap,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", cap=self.cap)
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and (self.dist.is_main or self.sharded):
                row = self.validate()
                self.log_row(row)
                if self.dist.is_main:
                    bar.write(json.dumps(row))
            if self.cfg.keep_every and self.step % self.cfg.keep_every == 0:
                self.keep_snapshot()
            out_of_time = self.cfg.max_minutes and self.elapsed - base_elapsed > 60 * self.cfg.max_minutes
            stopping = self.dist.any(out_of_time or self.step == self.cfg.stop_at_step or self.stop_requested)
            if time.time() - last_save > 60 * self.cfg.save_every_min or stopping:
                self.save()
                last_save = time.time()
            if stopping:
                break
        self.save()
        bar.close()
