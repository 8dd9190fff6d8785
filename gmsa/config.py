"""Configuration of a GMSA compressor: what is built on top of the backbone."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .chunking import check_window

AE_PROMPT = "Restate the aforementioned Text."
COPY_INSTRUCTION = "Repeat the text above exactly, word for word."
SOFT_MARK = "\u2063SOFT\u2063"  # stands where the soft tokens go when a chat template is rendered
CONFIG_NAME = "gmsa_config.json"
DTYPE_CHOICES = ("auto", "float32", "bfloat16")  # compute dtypes (gmsa.precision); here so the CLI needs no torch
MERGE_CHOICES = ("mean", "memory")  # the strategies of gmsa.merge.MERGERS; here so the config needs no torch


@dataclass
class GMSAConfig:
    """Architecture of the compressor around a frozen causal LM; the defaults are the shipped recipe's.

    Attributes:
        backbone: local path of the HF causal LM, or ``"default"`` for the embedded
            SmolLM2-135M-Instruct.
        backbone_fingerprint: checksum of the backbone weights the trained parts belong to
            (filled in when a model is built; checked when a checkpoint is loaded).
        k_enc: number of the backbone's first layers copied into the encoder.
        k_lsa: number of the decoder's first layers copied into the LSA blocks.
        lsa_init: ``"decoder"`` (the method), ``"random"`` or ``"linear"`` (ablations).
        merge: ``"mean"`` (group merging, the method) or ``"memory"`` (ablation: ICAE-style
            learned memory tokens appended to the encoder input); see ``gmsa.merge``.
        lsa_match_embedding_scale: scale the LSA's final-norm weight at initialisation so soft
            tokens start at the RMS of the decoder's token embeddings (the decoder's final norm
            makes them ~16x larger on SmolLM2, which swamps the residual stream).
        lora_r, lora_alpha, lora_dropout: encoder LoRA (on every linear projection).
        max_context_tokens: encoder window: the most tokens the encoder reads at once.
        window_tokens: tokens per window when a longer context is split (``None``: the whole
            encoder window). Windows are compressed one by one and their soft tokens concatenated.
        window_overlap: tokens a window re-reads from the previous one (left context for the
            encoder); their soft tokens are dropped, so it must be a multiple of the rate.
        max_total_tokens: hard cap on one context's length; longer texts are refused.
        default_rate: compression rate used when none is given.
        ae_prompt: instruction that asks the decoder to restate the compressed text.
        decoder_tuning: what KEFT changed in the decoder: ``"none"``, ``"qkv"``,
            ``"full"`` or ``"lora"`` (then ``decoder_lora_r`` is its rank).
        ae_decoder_lora_r: rank of a decoder LoRA (adapter ``"ae"``) trained with the encoder in the
            AE stage and kept on for restatement and answers; 0 = the paper's frozen decoder.
        lsa_output_gain: a learnable scalar (log-parameterised) on the soft tokens, so their scale
            can move away from the final norm's (~16x the token embeddings on SmolLM2).
    """

    backbone: str = "default"
    backbone_fingerprint: str = ""
    k_enc: int = 4
    k_lsa: int = 1
    lsa_init: str = "decoder"
    merge: str = "mean"
    lsa_match_embedding_scale: bool = False
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_context_tokens: int = 2048
    window_tokens: int | None = None
    window_overlap: int = 0
    max_total_tokens: int = 65536
    default_rate: int = 4
    ae_prompt: str = AE_PROMPT
    decoder_tuning: str = "none"
    decoder_lora_r: int = 8
    ae_decoder_lora_r: int = 16
    lsa_output_gain: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k_enc < 1 or self.k_lsa < 0:
            raise ValueError(f"k_enc must be >= 1 and k_lsa >= 0, got {self.k_enc}, {self.k_lsa}")
        if self.lsa_init not in {"decoder", "random", "linear"}:
            raise ValueError(f"lsa_init must be decoder, random or linear, got {self.lsa_init!r}")
        if self.merge not in MERGE_CHOICES:
            raise ValueError(f"merge must be {' or '.join(MERGE_CHOICES)}, got {self.merge!r}")
        if self.decoder_tuning not in {"none", "qkv", "full", "lora"}:
            raise ValueError(f"decoder_tuning must be none, qkv, full or lora, got {self.decoder_tuning!r}")
        check_window(
            self.window, self.window_overlap, self.max_context_tokens, names=("window_tokens", "window_overlap")
        )
        if self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")

    @property
    def window(self) -> int:
        """Tokens per encoder window when a context is split."""
        return self.max_context_tokens if self.window_tokens is None else self.window_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GMSAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown GMSA config keys: {sorted(unknown)}")
        return cls(**values)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> GMSAConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a GMSA checkpoint")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"corrupt {path}: {err}") from err
        return cls.from_dict(values)


def ae_prompt_text(style: str, tokenizer) -> str:
    """The text the decoder reads after the soft tokens when asked to restate them.

    ``"paper"``: the paper's prompt. ``"chat-copy"``: the backbone's chat template around an explicit
    verbatim-copy instruction, from just after the soft tokens to the start of the assistant's turn
    (small decoders copy far better this way; see docs/method.md). Anything else is used as given.
    """
    if style == "paper":
        return AE_PROMPT
    if style != "chat-copy":
        return style
    if not getattr(tokenizer, "chat_template", None):
        return f"\n{COPY_INSTRUCTION}\n"
    messages = [{"role": "user", "content": f"{SOFT_MARK}\n{COPY_INSTRUCTION}"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return rendered.split(SOFT_MARK, 1)[1]
