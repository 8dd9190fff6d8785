"""The GMSA network: encoder (first layers + LoRA) -> merging -> LSA -> frozen decoder.

Read top to bottom:
  * ``truncated_copy`` copies the first ``k`` layers (+ final norm) of a causal LM's base
    model into a standalone stack; the encoder and the LSA blocks are such copies, so the
    backbone is loaded once.
  * ``LayerSemanticAlignment`` maps merged encoder states into the decoder's input space.
  * ``inference_copy`` / ``MergedEncoder``: the encoder as inference runs it, each LoRA merged
    into its linear layer (``gmsa.fast_decode`` builds the decoder's copy with the same function).
  * ``GMSAModel.compress`` turns context token ids into soft tokens: encoder, then the
    configured merger (``gmsa.merge``: group merging, or the memory-token ablation), then the LSA.
  * ``GMSAModel.forward`` packs ``[soft tokens; prompt; target]`` left-aligned per sample
    (positions 0..n-1 for every sample, so mixed lengths batch exactly) and returns the
    cross entropy on target tokens only.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from .config import GMSAConfig
from .merge import build_merger, causal_states


def base_model(causal_lm: PreTrainedModel) -> nn.Module:
    """The transformer stack of a causal LM (``model.model`` for Llama, Qwen, Mistral, Gemma)."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


def linear_module_names(stack: nn.Module) -> list[str]:
    """Names of the linear projections inside the layers (q_proj, ..., down_proj)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in stack.layers.named_modules()
            if isinstance(mod, nn.Linear | BaseTunerLayer) and not any(p in name for p in ("lora_", "base_layer"))
        }
    )


def truncated_copy(causal_lm: PreTrainedModel, n_layers: int, copy_weights: bool = True) -> nn.Module:
    """A base model holding copies of the first ``n_layers`` layers and the final norm.

    Its own token embedding is a 1-row placeholder: callers pass ``inputs_embeds``.
    With ``copy_weights=False`` the layers keep their random initialisation (an ablation).
    """
    source = base_model(causal_lm)
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:n_layers]
    config.vocab_size, config.pad_token_id = 1, None
    stack = type(source)(config)
    if copy_weights:
        for target_layer, source_layer in zip(stack.layers, source.layers):
            target_layer.load_state_dict(source_layer.state_dict())
        stack.norm.load_state_dict(source.norm.state_dict())
    stack.embed_tokens.requires_grad_(False)
    return stack.to(next(source.parameters()).dtype)


def add_lora(stack: nn.Module, r: int, alpha: int, dropout: float) -> nn.Module:
    """Inject LoRA (peft) into every linear projection of ``stack``'s layers, in place."""
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=linear_module_names(stack))
    return inject_adapter_in_model(lora, stack)


class LayerSemanticAlignment(nn.Module):
    """Transformer blocks initialised from the decoder's first layers (or an ablation)."""

    def __init__(self, decoder: PreTrainedModel, config: GMSAConfig):
        super().__init__()
        hidden = decoder.config.hidden_size
        self.blocks = None
        self.linear = None
        # a learnable output scale (log-parameterised; its own lr) lets soft tokens leave the final norm's scale
        self.log_gain = nn.Parameter(torch.zeros(())) if config.lsa_output_gain else None
        if config.lsa_init == "linear":
            self.linear = nn.Linear(hidden, hidden)
            nn.init.eye_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        elif config.k_lsa > 0:
            self.blocks = truncated_copy(decoder, config.k_lsa, copy_weights=config.lsa_init == "decoder")
            if config.lsa_match_embedding_scale:
                match_embedding_scale(self.blocks.norm, decoder.get_input_embeddings().weight)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        """``(B, N, H)`` right-padded merged states -> ``(B, N, H)`` soft tokens (padding slots: unread values)."""
        soft = self.align(merged)
        return soft if self.log_gain is None else soft * self.log_gain.exp().to(soft.dtype)

    def align(self, merged: torch.Tensor) -> torch.Tensor:
        if self.linear is not None:
            return self.linear(merged)
        if self.blocks is None:
            return merged
        return causal_states(self.blocks, merged)


def rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().pow(2).mean(dim=-1).sqrt()


@torch.no_grad()
def match_embedding_scale(norm: nn.Module, embeddings: torch.Tensor) -> None:
    """Rescale a final norm's weight so its outputs have the mean RMS of the token embeddings.

    Measured on random inputs (an RMSNorm output does not depend on its input's scale).
    Gemma's norms compute ``x_hat * (1 + w)``, hence the offset.
    """
    probe = torch.randn(64, embeddings.shape[-1], dtype=norm.weight.dtype)
    scale = rms(embeddings).mean() / rms(norm(probe)).mean()
    offset = 1.0 if "gemma" in type(norm).__name__.lower() else 0.0
    norm.weight.copy_((norm.weight + offset) * scale - offset)


def merged_linear(layer: LoraLayer) -> nn.Module:
    """The plain layer that computes what ``layer`` computes now: its active adapters merged into
    a new weight (in fp32, rounded once), or its base layer itself (shared) when none is active."""
    base = layer.get_base_layer()
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if layer.disable_adapters or layer.merged or not active:
        return base
    own = copy.deepcopy(layer).float()
    own.merge(adapter_names=active)
    return own.get_base_layer().to(base.weight.dtype)


def inference_copy(stack: nn.Module, merge_lora: bool = True) -> nn.Module:
    """A copy of ``stack``'s modules in eval mode, every LoRA layer replaced by :func:`merged_linear` (``merge_lora``).

    Parameters and buffers that merging does not change (embeddings, norms, plain layers) are
    shared with ``stack``, not copied; hooks registered on ``stack`` are not carried over.
    """
    memo: dict[int, object] = {id(t): t for t in (*stack.parameters(), *stack.buffers())}
    if merge_lora:
        memo |= {id(m): merged_linear(m) for m in stack.modules() if isinstance(m, LoraLayer)}
    memo |= {
        id(value): type(value)()
        for module in stack.modules()
        for name, value in vars(module).items()
        if "hooks" in name and isinstance(value, dict)
    }
    return copy.deepcopy(stack, memo).eval()


def lora_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every LoRA tensor of ``module`` (detached), in order: what a cached merged copy depends on."""
    return [p.detach() for name, p in module.named_parameters() if "lora_" in name]


class MergedEncoder:
    """A cached :func:`inference_copy` of an encoder, rebuilt whenever a LoRA tensor changes
    (a training step, loaded weights, a move to another device or dtype).

    A plain object, not a module: the copy is no part of the model's parameters or state.
    """

    def __init__(self):
        self.copy: nn.Module | None = None
        self.lora_state: TensorsState | None = None

    def of(self, encoder: nn.Module) -> nn.Module:
        lora = lora_tensors(encoder)
        if self.copy is None or self.lora_state is None or not self.lora_state.holds(lora):
            self.copy = inference_copy(encoder)
            self.lora_state = TensorsState(lora)
        return self.copy


class TensorsState:
    """What a list of tensors holds now, to tell later whether any of them changed.

    Cheap where torch counts in-place writes: every tensor has a version, bumped by each in-place change (an
    optimizer step, ``load_state_dict``, ``add_``), so the same tensors at the same versions hold the same values.
    The tensors themselves are kept (their storage cannot be reused by another tensor meanwhile); a write through
    ``tensor.data`` escapes the counter (nothing in gmsa writes LoRA weights that way). Inference
    tensors keep no version: their values are copied and compared instead (the slow way: 12 ms for the shipped
    decoder's LoRA, against 0.15 ms)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = list(tensors)
        self.versions = versions(self.tensors)
        self.values = None if self.versions is not None else [t.clone() for t in self.tensors]

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` are the same tensors as at construction, unchanged (or, for inference tensors,
        hold equal values)."""
        if self.values is not None:
            return same_tensors(tensors, self.values)
        return versions(tensors) == self.versions


def versions(tensors: list[torch.Tensor]) -> tuple | None:
    """Each tensor's storage, layout and in-place version; ``None`` where a tensor keeps no version (inference mode)."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version) for t in tensors)  # noqa: SLF001 (torch's in-place write counter; no public accessor)


def same_tensors(these: list[torch.Tensor], those: list[torch.Tensor]) -> bool:
    """Whether two lists hold equal tensors (shape, dtype, device and values), in order."""
    return len(these) == len(those) and all(
        a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(these, those)
    )


@dataclass
class Packed:
    """Right-padded decoder inputs built from per-sample pieces."""

    inputs_embeds: torch.Tensor  # (B, T, H)
    attention_mask: torch.Tensor  # (B, T)
    lengths: torch.Tensor  # (B,)


def pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``(B, T)`` ids and mask."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def pack(pieces: list[list[torch.Tensor]], left_pad: bool = False) -> Packed:
    """Concatenate each sample's ``(n_k, H)`` pieces and pad the batch to one length."""
    rows = [torch.cat(parts, dim=0) for parts in pieces]
    lengths = torch.tensor([row.shape[0] for row in rows])
    total = int(lengths.max())
    embeds = rows[0].new_zeros(len(rows), total, rows[0].shape[-1])
    mask = torch.zeros(len(rows), total, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        span = slice(total - row.shape[0], total) if left_pad else slice(0, row.shape[0])
        embeds[i, span] = row
        mask[i, span] = 1
    return Packed(embeds, mask, lengths)


class GMSAModel(nn.Module):
    """Encoder + merger (group merging, see ``gmsa.merge``) + LSA around a decoder loaded once and kept frozen."""

    def __init__(self, decoder: PreTrainedModel, config: GMSAConfig):
        super().__init__()
        n_layers = decoder.config.num_hidden_layers
        if config.k_enc > n_layers or config.k_lsa > n_layers:
            raise ValueError(f"k_enc={config.k_enc} / k_lsa={config.k_lsa} exceed the backbone's {n_layers} layers")
        self.config = config
        self.decoder = decoder.requires_grad_(False)
        encoder = truncated_copy(decoder, config.k_enc).requires_grad_(False)
        self.encoder = add_lora(encoder, config.lora_r, config.lora_alpha, config.lora_dropout)
        self.lsa = LayerSemanticAlignment(decoder, config)
        self.merger = build_merger(decoder, config)
        self.merged_encoder = MergedEncoder()
        if config.ae_decoder_lora_r:
            add_decoder_adapter(self, AE_ADAPTER, config.ae_decoder_lora_r)
        enable_decoder_tuning(self, config.decoder_tuning)

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(input_ids)

    def compress(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rates: torch.Tensor | int,
        encoder: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context ids ``(B, L)`` (right-padded) -> soft tokens ``(B, N, H)`` and mask ``(B, N)``.

        ``encoder``: ``self.encoder`` (LoRA kept apart, as training needs it) unless given, e.g.
        :meth:`inference_encoder`.
        """
        encoder = self.encoder if encoder is None else encoder
        merged, merged_mask = self.merger(encoder, self.embed(input_ids), attention_mask, rates)
        return self.lsa(merged), merged_mask

    def inference_encoder(self) -> nn.Module:
        """The encoder inference runs: in eval mode a copy with each LoRA merged into its layer (cached),
        in training mode the encoder itself.

        Same outputs up to float rounding, without the low-rank matmuls and the scale-and-add per
        projection (about a fifth of the compression time on CPU).
        """
        return self.encoder if self.encoder.training else self.merged_encoder.of(self.encoder)

    def decoder_inputs(
        self,
        soft: torch.Tensor,
        soft_mask: torch.Tensor,
        segments: list[tuple[torch.Tensor, torch.Tensor]],
        left_pad: bool = False,
    ) -> Packed:
        """Pack ``[soft_i; segment_1_i; segment_2_i; ...]`` per sample.

        ``segments`` are ``(ids (B, T_k), mask (B, T_k))`` pairs of right-padded token ids;
        only each sample's real tokens are kept, so no padding sits between pieces.
        """
        embedded = [(self.embed(ids), mask.bool()) for ids, mask in segments]
        pieces = [
            [soft[i][soft_mask[i].bool()]] + [emb[i][mask[i]] for emb, mask in embedded] for i in range(soft.shape[0])
        ]
        return pack(pieces, left_pad=left_pad)

    def forward(self, reduction: str = "mean", **batch: torch.Tensor) -> torch.Tensor:
        """Cross entropy over all real target tokens of ``batch`` (the tensors :meth:`target_logits` takes,
        by name): their mean (or ``"sum"``), a scalar."""
        logits = self.target_logits(**batch)
        targets = batch["target_ids"][batch["target_mask"].bool()]
        return F.cross_entropy(logits.float(), targets, reduction=reduction)

    def target_logits(
        self,
        context_ids: torch.Tensor,
        context_mask: torch.Tensor,
        rates: torch.Tensor | int,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        target_ids: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced next-token logits ``(n_targets, V)`` for every real target token, in batch order."""
        soft, soft_mask = self.compress(context_ids, context_mask, rates)
        packed = self.decoder_inputs(soft, soft_mask, [(prompt_ids, prompt_mask), (target_ids, target_mask)])
        hidden = base_model(self.decoder)(
            inputs_embeds=packed.inputs_embeds, attention_mask=packed.attention_mask
        ).last_hidden_state
        rows, cols = target_positions(packed.lengths, target_mask.sum(dim=1))
        logits = self.decoder.get_output_embeddings()(hidden[rows, cols - 1])
        return soft_cap(logits, getattr(self.decoder.config, "final_logit_softcapping", None))


def target_positions(lengths: torch.Tensor, n_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch rows and columns of the target tokens, which end each left-aligned sample."""
    rows = torch.repeat_interleave(torch.arange(len(lengths)), n_targets)
    offsets = torch.cat([torch.arange(n) for n in n_targets.tolist()]) if len(rows) else rows
    starts = torch.repeat_interleave(lengths - n_targets, n_targets)
    return rows, starts + offsets


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2-style final logit soft-capping, where the backbone uses it."""
    return logits if not cap else torch.tanh(logits / cap) * cap


QKV_NAMES = ("q_proj", "k_proj", "v_proj")
AE_ADAPTER = "ae"  # the decoder LoRA trained with the encoder in the AE stage; restatement keeps it on
KEFT_ADAPTER = "default"  # peft's default name: the KEFT decoder LoRA (older checkpoints use it too)


def adapter_param_names(module: nn.Module, adapter: str) -> list[str]:
    return [name for name, _ in module.named_parameters() if "lora_" in name and f".{adapter}." in name]


def decoder_adapters(model: GMSAModel) -> list[BaseTunerLayer]:
    return [m for m in model.decoder.modules() if isinstance(m, BaseTunerLayer)]


def add_decoder_adapter(model: GMSAModel, adapter: str, r: int) -> None:
    """Inject a named LoRA (rank = alpha = ``r``) into the decoder's projections and keep every adapter active."""
    stack = base_model(model.decoder)
    lora = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=linear_module_names(stack))
    with warnings.catch_warnings():  # a second named adapter is intended: peft warns about every one after the first
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(lora, stack, adapter_name=adapter)
    activate_adapters(model, None)


def activate_adapters(model: GMSAModel, names: list[str] | None) -> None:
    """Make ``names`` (``None``: all) the decoder's active adapters, leaving ``requires_grad`` as it was.

    peft's ``set_adapter`` also flips ``requires_grad``; which parameters train is ``set_stage``'s call.
    """
    flags = {name: p.requires_grad for name, p in model.decoder.named_parameters()}
    for layer in decoder_adapters(model):
        chosen = [a for a in layer.lora_A.keys() if names is None or a in names]
        layer.enable_adapters(bool(chosen))
        if chosen:
            layer.set_adapter(chosen)
    for name, param in model.decoder.named_parameters():
        param.requires_grad_(flags[name])


def decoder_tuned_names(model: GMSAModel) -> list[str]:
    """Decoder parameters that KEFT trains under ``config.decoder_tuning``.

    ``full`` leaves the token embeddings (tied to the LM head in small models, and shared
    with the encoder's input) frozen, so the encoder keeps reading the text it was trained on.
    """
    mode = model.config.decoder_tuning
    names = [name for name, _ in model.decoder.named_parameters()]
    if mode == "qkv":
        return [n for n in names if any(f".{p}." in n for p in QKV_NAMES) and "lora_" not in n]
    if mode == "full":
        return [n for n in names if ".layers." in n or n.endswith("norm.weight")]
    if mode == "lora":
        return adapter_param_names(model.decoder, KEFT_ADAPTER)
    return []


def enable_decoder_tuning(model: GMSAModel, mode: str) -> None:
    """Record what KEFT tunes in the decoder; a decoder LoRA is injected here, once."""
    if model.config.decoder_tuning not in {"none", mode} and mode != "none":
        raise ValueError(f"the decoder is already tuned as {model.config.decoder_tuning!r}, cannot switch to {mode!r}")
    if mode == "lora" and not adapter_param_names(model.decoder, KEFT_ADAPTER):
        add_decoder_adapter(model, KEFT_ADAPTER, model.config.decoder_lora_r)
    model.config.decoder_tuning = mode


def set_stage(model: GMSAModel, stage: str) -> list[str]:
    """Make exactly the stage's parameters trainable; return their names.

    ``ae``: encoder LoRA + LSA (+ the memory tokens of the ``merge="memory"`` ablation), and the
    decoder's AE adapter where the config has one (``ae_decoder_lora_r``; the paper keeps the decoder frozen).
    ``keft``: the decoder part chosen by ``decoder_tuning`` (the AE adapter stays frozen).
    """
    if stage not in {"ae", "keft"}:
        raise ValueError(f"stage must be 'ae' or 'keft', got {stage!r}")
    model.requires_grad_(False)
    if stage == "ae":
        for name, param in model.encoder.named_parameters():
            param.requires_grad_("lora_" in name)
        for name, param in model.lsa.named_parameters():
            param.requires_grad_("embed_tokens" not in name)
        model.merger.requires_grad_(True)
        tuned = set(adapter_param_names(model.decoder, AE_ADAPTER))
        for name, param in model.decoder.named_parameters():
            param.requires_grad_(name in tuned)
    else:
        if model.config.decoder_tuning == "none":
            raise ValueError("KEFT needs decoder_tuning = qkv, full or lora")
        tuned = set(decoder_tuned_names(model))
        for name, param in model.decoder.named_parameters():
            param.requires_grad_(name in tuned)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def trained_state_dict(model: GMSAModel) -> dict[str, torch.Tensor]:
    """Everything that differs from the backbone: encoder LoRA, LSA, tuned decoder parts."""
    state = {f"encoder.{n}": p for n, p in model.encoder.named_parameters() if "lora_" in n}
    state |= {f"lsa.{n}": p for n, p in model.lsa.named_parameters() if "embed_tokens" not in n}
    # a merger's own weights (the memory table) are saved under the config's merge name: "memory.embeddings"
    state |= {f"{model.config.merge}.{n}": p for n, p in model.merger.named_parameters()}
    decoder_params = dict(model.decoder.named_parameters())
    tuned = adapter_param_names(model.decoder, AE_ADAPTER) + decoder_tuned_names(model)
    state |= {f"decoder.{n}": decoder_params[n] for n in tuned}
    return {name: tensor.detach() for name, tensor in state.items()}


@contextmanager
def autoencoder_decoder(model: GMSAModel) -> Iterator[None]:
    """Run the decoder as the AE stage trained it: the KEFT decoder LoRA is switched off meanwhile.

    KEFT teaches the decoder to answer briefly, which makes it stop restating a context at once;
    a LoRA can be switched off (the AE adapter stays on), Q/K/V or full tuning cannot (then this
    changes nothing).
    """
    activate_adapters(model, [AE_ADAPTER])
    try:
        yield
    finally:
        activate_adapters(model, None)
