"""The configuration of a training run: the run's own knobs plus the compressor it trains (``model``).

``configs/*.toml`` set the run's knobs at the top level and the compressor's in a ``[model]`` table
(the fields of :class:`gmsa.config.GMSAConfig`, whose defaults are the shipped recipe's). Model keys
are also read beside the training ones (``gmsa train ae k_enc=4``, and the flat ``config`` that
``resume.json`` holds for runs started before the table existed), as are two older names of
``GMSAConfig`` fields (``MODEL_ALIASES``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field

from ..cli_options import parse_overrides
from ..config import GMSAConfig

STAGES = ("warmup", "ae", "keft")
PARALLEL = ("ddp", "fsdp")
# names the training config used for two GMSAConfig fields before the [model] table
MODEL_ALIASES = {"ae_decoder_lora": "ae_decoder_lora_r", "keft_lora_r": "decoder_lora_r"}
MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(GMSAConfig))


@dataclass
class TrainConfig:
    """Every knob of a training run; ``configs/*.toml`` override these defaults."""

    stage: str = "ae"
    data: str | list[str] = "data/ae/train.jsonl"  # a list reads several files in order (source_fractions apply to all)
    val_data: str = "data/ae/val.jsonl"
    out_dir: str = "runs/ae"
    resume_from: str = ""  # a resume point (model/ + resume.json) to continue when out_dir has no state of its own
    rewarm_steps: int = 20  # after a resume without optimizer moments, ramp the lr up over this many steps
    init: str = ""  # GMSA checkpoint to start from (KEFT starts from the AE one); "" = fresh
    gain_lr: float = 1e-2  # learning rate of the soft tokens' learnable scale (model.lsa_output_gain)
    rates: list[int] = field(default_factory=lambda: [4, 8])
    min_tokens: int = 16
    max_tokens: int = 256
    source_fractions: dict[str, float] = field(default_factory=dict)  # training rows kept: {"boolq": 0.25}
    curriculum: dict[str, int] = field(default_factory=dict)  # {"step": max_tokens}, e.g. {"0": 64, "500": 128}
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    lsa_lr: float = 0.0  # 0 = same as lr
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    max_steps: int = 2000
    weight_decay: float = 0.0
    clip: float = 2.0
    dtype: str = "auto"  # "auto" = bf16 where a start-up matmul measures it faster (gmsa.precision), else fp32
    grad_checkpointing: bool = False
    eval_every: int = 100
    eval_examples: int = 16
    eval_max_tokens: int = 128
    save_every_min: float = 10.0
    keep_every: int = 0  # also keep the trained weights every this many steps in snapshots/step-N; 0 = no
    max_minutes: float = 0.0  # stop (and save) after this much wall time; 0 = no limit
    stop_at_step: int = 0  # stop (and save) at this step, keeping the schedule of max_steps; 0 = no
    seed: int = 0
    threads: int = 0
    device: str = "auto"  # auto = this rank's GPU if there is one, else cpu
    parallel: str = "ddp"  # under torchrun: "ddp" (a full copy per rank) or "fsdp" (params, grads, Adam sharded)
    # The compressor (the [model] table). decoder_tuning is what the keft stage tunes (the other stages build
    # the model with none); ae_prompt may also be "paper" (the paper's prompt) or "chat-copy" (the backbone's
    # chat template around a verbatim-copy instruction, gmsa.config.ae_prompt_text).
    model: GMSAConfig = field(default_factory=GMSAConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.stage == "keft" and self.model.decoder_tuning == "none":
            raise ValueError(
                "stage keft tunes the decoder: set decoder_tuning in the [model] table to qkv, full or lora "
                "(configs/keft.toml: lora)"
            )

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from its nested form (``{"model": {...}}``, what ``dataclasses.asdict`` gives) or a flat one."""
        values = nested(values)
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(values) - known:
            raise ValueError(f"unknown training options: {sorted(unknown)}")
        return cls(**(values | {"model": GMSAConfig.from_dict(values.get("model", {}))}))

    @classmethod
    def from_sources(cls, files: list[str] = (), overrides: list[str] = ()) -> TrainConfig:
        """Defaults, then TOML files in order, then ``key=value`` overrides (values parsed as TOML)."""
        values: dict = {}
        for path in files:
            with open(path, "rb") as handle:
                values = merged(values, nested(tomllib.load(handle)))
        return cls.from_dict(merged(values, nested(parse_overrides(overrides))))

    def model_config(self) -> GMSAConfig:
        """The compressor a fresh run builds: decoder tuning (and its LoRA rank) only in the keft stage, a window
        of max_tokens or more."""
        window = max(self.model.max_context_tokens, self.max_tokens)
        if self.stage == "keft":
            return dataclasses.replace(self.model, max_context_tokens=window)
        untuned = GMSAConfig.decoder_lora_r  # the dataclass default: the rank means nothing without tuning
        return dataclasses.replace(self.model, decoder_tuning="none", decoder_lora_r=untuned, max_context_tokens=window)

    def max_tokens_at(self, step: int) -> int:
        caps = sorted((int(k), v) for k, v in self.curriculum.items())
        current = self.max_tokens
        for start, cap in caps:
            if step >= start:
                current = cap
        return current


def nested(values: dict) -> dict:
    """``values`` with the model keys given beside the training ones (or by an alias) moved into ``model``."""
    model = values.get("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"model must be a table of GMSAConfig fields, got {model!r}")
    model = dict(model)
    rest = {}
    for key, value in values.items():
        name = MODEL_ALIASES.get(key, key)
        if name in MODEL_KEYS:
            model[name] = value
        elif key != "model":
            rest[key] = value
    return rest | ({"model": model} if model else {})


def merged(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, the ``model`` tables key by key."""
    model = base.get("model", {}) | update.get("model", {})
    return base | update | ({"model": model} if model else {})
