"""``GMSA``: the one class users touch — compress once, answer many questions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .backbone import fingerprint, load_backbone
from .compressed import Compressed
from .config import GMSAConfig
from .data import pad
from .model import GMSAModel, trained_state_dict
from .version import __version__

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
DEFAULT_CHECKPOINT = Path(__file__).parent / "pretrained" / "gmsa-smollm2-135m"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another backbone."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_text_list(texts: str | list[str], what: str) -> list[str]:
    items = [texts] if isinstance(texts, str) else texts
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(f"{what} must be a string or a non-empty list of strings, got {type(texts).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise ValueError(f"{what}[{i}] is empty or whitespace")
    return list(items)


def _check_rate(rate: object) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise TypeError(f"rate must be an integer >= 1, got {rate!r}")
    if rate < 1:
        raise ValueError(f"rate must be an integer >= 1, got {rate}")
    return rate


class GMSA:
    """A GMSA compressor: soft tokens from a context, answers from soft tokens.

    Example::

        gmsa = GMSA.from_pretrained()              # the shipped SmolLM2 checkpoint
        ctx = gmsa.compress(["long passage ..."], rate=4)
        gmsa.generate(ctx, ["What is ...?"])       # -> ["..."]
        gmsa.reconstruct(ctx)                      # -> ["long passage ..."]
    """

    def __init__(self, model: GMSAModel, tokenizer: PreTrainedTokenizerBase, checkpoint_id: str = "untrained"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.checkpoint_id = checkpoint_id
        self._prompt_cache: dict[str, list[int]] = {}

    @property
    def config(self) -> GMSAConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.decoder.parameters()).device

    # ----------------------------------------------------------------- building and loading
    @classmethod
    def from_backbone(
        cls, backbone: str | os.PathLike = "default", config: GMSAConfig | None = None, dtype=torch.float32
    ) -> GMSA:
        """An untrained GMSA (the start of training) on a local or the default backbone."""
        config = config or GMSAConfig()
        config.backbone = str(backbone)
        decoder, tokenizer = load_backbone(backbone, dtype=dtype)
        config.backbone_fingerprint = fingerprint(decoder)
        return cls(GMSAModel(decoder, config), tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        backbone: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> GMSA:
        """Load a checkpoint written by :meth:`save_pretrained` (default: the shipped one).

        ``backbone`` overrides where the backbone is loaded from (it must be the same
        weights: their fingerprint is checked).
        """
        directory = Path(path) if path is not None else DEFAULT_CHECKPOINT
        if not (directory / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"no GMSA checkpoint at {directory} (expected {WEIGHTS_NAME} and gmsa_config.json)")
        config = GMSAConfig.load(directory)
        weights = _verified_weights(directory)
        decoder, tokenizer = load_backbone(backbone or config.backbone, dtype=dtype)
        actual = fingerprint(decoder)
        if config.backbone_fingerprint and actual != config.backbone_fingerprint:
            raise CheckpointError(
                f"{directory} was trained on backbone {config.backbone!r} with fingerprint "
                f"{config.backbone_fingerprint}, but the loaded backbone has fingerprint {actual}"
            )
        model = GMSAModel(decoder, config)
        load_trained(model, weights, directory)
        return cls(model.to(device), tokenizer, checkpoint_id=_sha256(directory / WEIGHTS_NAME)[:16])

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16) -> None:
        """Save only the trained parts (encoder LoRA, LSA, tuned decoder) + config, atomically."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in trained_state_dict(self.model).items()}
            save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt", "gmsa_version": __version__})
            self.config.save(staging)
            manifest = {"gmsa_version": __version__, "sha256": {WEIGHTS_NAME: _sha256(staging / WEIGHTS_NAME)}}
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            if directory.exists():
                shutil.rmtree(directory)
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ----------------------------------------------------------------- compress
    def tokenize_contexts(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        limit = self.config.max_context_tokens
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise ValueError(
                    f"text {i} has {len(row)} tokens, more than the encoder window of {limit} "
                    "(max_context_tokens); split it or raise the limit"
                )
        return ids

    @torch.inference_mode()
    def compress(self, texts: str | list[str], rate: int | None = None, batch_size: int = 8) -> Compressed:
        """Compress each text into ``ceil(n_tokens / rate)`` soft tokens."""
        texts = _as_text_list(texts, "texts")
        rate = _check_rate(self.config.default_rate if rate is None else rate)
        ids = self.tokenize_contexts(texts)
        soft_tokens: list[torch.Tensor] = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            context_ids, context_mask = pad(chunk, self.tokenizer.pad_token_id)
            soft, soft_mask = self.model.compress(context_ids.to(self.device), context_mask.to(self.device), rate)
            soft_tokens += [soft[i][soft_mask[i].bool()].clone() for i in range(len(chunk))]
        return Compressed(
            soft_tokens,
            [rate] * len(texts),
            [len(row) for row in ids],
            self.config.backbone_fingerprint,
            self.checkpoint_id,
        )

    # ----------------------------------------------------------------- decode
    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self._prompt_cache[prompt]

    @torch.inference_mode()
    def _decode(
        self, compressed: Compressed, prompts: list[str], max_new_tokens: list[int], repetition_penalty: float
    ) -> list[str]:
        compressed.check_compatible(self.config.backbone_fingerprint, self.checkpoint_id)
        soft, soft_mask = compressed.padded(self.device)
        prompt_ids, prompt_mask = pad([self._prompt_ids(p) for p in prompts], self.tokenizer.pad_token_id)
        packed = self.model.decoder_inputs(
            soft, soft_mask, [(prompt_ids.to(self.device), prompt_mask.to(self.device))], left_pad=True
        )
        output = self.model.decoder.generate(
            inputs_embeds=packed.inputs_embeds.to(self.model.decoder.dtype),
            attention_mask=packed.attention_mask,
            max_new_tokens=max(max_new_tokens),
            do_sample=False,
            repetition_penalty=repetition_penalty,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [
            self.tokenizer.decode(row[:limit], skip_special_tokens=True).strip()
            for row, limit in zip(output, max_new_tokens)
        ]

    def generate(
        self,
        compressed: Compressed,
        questions: str | list[str],
        max_new_tokens: int = 100,
        repetition_penalty: float = 1.3,
        batch_size: int = 8,
    ) -> list[str]:
        """Answer questions from compressed contexts (greedy).

        ``questions[i]`` is asked of context ``i``; a single compressed context is shared by
        all questions (compress once, ask many).
        """
        questions = _as_text_list(questions, "questions")
        if len(compressed) == 1 and len(questions) > 1:
            compressed = Compressed(
                compressed.soft_tokens * len(questions),
                compressed.rates * len(questions),
                compressed.n_tokens * len(questions),
                compressed.backbone_fingerprint,
                compressed.checkpoint_id,
                compressed.gmsa_version,
            )
        if len(compressed) != len(questions):
            raise ValueError(f"{len(questions)} questions for {len(compressed)} compressed contexts")
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            part = slice(start, start + batch_size)
            n = len(questions[part])
            answers += self._decode(compressed[part], questions[part], [max_new_tokens] * n, repetition_penalty)
        return answers

    def reconstruct(self, compressed: Compressed, batch_size: int = 8, slack: float = 1.25) -> list[str]:
        """Ask the decoder to restate each compressed text (AE prompt, greedy, no penalty)."""
        texts: list[str] = []
        for start in range(0, len(compressed), batch_size):
            part = compressed[start : start + batch_size]
            limits = [int(n * slack) + 8 for n in part.n_tokens]
            texts += self._decode(part, [self.config.ae_prompt] * len(part), limits, 1.0)
        return texts


def _verified_weights(directory: Path) -> dict[str, torch.Tensor]:
    manifest_path = directory / MANIFEST_NAME
    try:
        expected = json.loads(manifest_path.read_text())["sha256"][WEIGHTS_NAME]
    except (OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{manifest_path} is missing or corrupt ({err})") from err
    if _sha256(directory / WEIGHTS_NAME) != expected:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} does not match its checksum: the file is corrupt")
    try:
        return load_file(directory / WEIGHTS_NAME)
    except SafetensorError as err:
        raise CheckpointError(f"cannot read {directory / WEIGHTS_NAME}: {err}") from err


def load_trained(model: GMSAModel, weights: dict[str, torch.Tensor], source: object = "checkpoint") -> None:
    """Copy trained tensors into ``model``; the key sets must match exactly."""
    expected = trained_state_dict(model)
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model config: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            if tensor.shape != weights[name].shape:
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(weights[name])
