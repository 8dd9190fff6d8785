"""Real backbone shapes (no weights) and what a GMSA model on them costs: parameters and GPU memory.

``REAL_CONFIGS`` holds the public ``config.json`` of three backbones, typed by hand (no hub
access here): Llama-3.2-3B and Qwen3-4B (the paper's) and Mistral-7B-v0.3. ``count_params``
gives the exact parameter counts of a ``GMSAModel`` built on one of them (checked against a
meta-device build in ``tests/training/test_shapes.py``); ``memory_per_gpu`` estimates training memory
per GPU. Notation used in the formulas: H hidden size, L layers, V vocabulary, I MLP width,
q = heads x head_dim, kv = kv_heads x head_dim, r LoRA rank, w bytes per weight (2 in bf16),
N GPUs, B batch per GPU, T tokens per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from ..config import GMSAConfig

REAL_CONFIGS: dict[str, dict] = {
    # meta-llama/Llama-3.2-3B (the Instruct variant has the same shapes)
    "Llama-3.2-3B": {
        "model_type": "llama",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    # Qwen/Qwen3-4B (q_norm / k_norm per head; tied embeddings)
    "Qwen3-4B": {
        "model_type": "qwen3",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    # mistralai/Mistral-7B-v0.3 (v0.1: vocab 32000, rope_theta 1e4, sliding_window 4096)
    "Mistral-7B-v0.3": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32768,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}

# The paper's GMSA settings (../shared/METHOD.md): encoder = 8 layers + LoRA r=128, one LSA block.
PAPER_GMSA = {"k_enc": 8, "k_lsa": 1, "lora_r": 128, "lora_alpha": 32, "ae_decoder_lora_r": 0, "decoder_lora_r": 16}


def real_config(name: str, **overrides) -> PretrainedConfig:
    """The transformers config of a backbone in ``REAL_CONFIGS`` (``overrides`` e.g. fewer layers)."""
    values = dict(REAL_CONFIGS[name]) | overrides
    return AutoConfig.for_model(values.pop("model_type"), **values)


# ----------------------------------------------------------------------------- parameters
@dataclass
class Dims:
    """The widths the formulas need, read from a HF config."""

    H: int  # hidden size
    L: int  # layers
    V: int  # vocabulary
    I: int  # noqa: E741  MLP width
    q: int  # heads x head_dim
    kv: int  # kv heads x head_dim
    head_dim: int
    bias: bool  # q, k, v, o biases (``attention_bias``)
    qk_norm: bool  # Qwen3's per-head RMSNorm on q and k
    tied: bool

    @classmethod
    def of(cls, cfg: PretrainedConfig) -> Dims:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            H=cfg.hidden_size,
            L=cfg.num_hidden_layers,
            V=cfg.vocab_size,
            I=cfg.intermediate_size,
            q=cfg.num_attention_heads * head_dim,
            kv=cfg.num_key_value_heads * head_dim,
            head_dim=head_dim,
            bias=bool(getattr(cfg, "attention_bias", False)),
            qk_norm=cfg.model_type == "qwen3",
            tied=bool(cfg.tie_word_embeddings),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` features of each linear projection of one layer."""
        H, q, kv, I = self.H, self.q, self.kv, self.I  # noqa: E741
        return {"q": (H, q), "k": (H, kv), "v": (H, kv), "o": (q, H), "gate": (H, I), "up": (H, I), "down": (I, H)}


def qkv_params(d: Dims) -> int:
    """W_Q, W_K, W_V of one layer: H(q + 2kv) (+ q + 2kv biases)."""
    return (d.H + d.bias) * (d.q + 2 * d.kv)


def layer_params(d: Dims) -> int:
    """One decoder layer: q,k,v,o + gate,up,down + 2 RMSNorms (+ Qwen3 q/k norms, + biases)."""
    attention = qkv_params(d) + d.q * d.H + d.bias * d.H
    return attention + 3 * d.H * d.I + 2 * d.H + 2 * d.head_dim * d.qk_norm


def lora_params(d: Dims, r: int) -> int:
    """LoRA on every linear of one layer: sum over projections of r(in + out)."""
    return sum(r * (n_in + n_out) for n_in, n_out in d.linears().values())


def count_params(cfg: PretrainedConfig, gmsa: GMSAConfig) -> dict[str, int]:
    """Exact parameter counts of ``GMSAModel(decoder(cfg), gmsa)`` (mean merging; LSA from layers or linear).

    backbone = VH (+ VH untied head) + L layer + H;  encoder copy = H (1-row embedding) + k_enc layer + H;
    LSA = H + k_lsa layer + H (``lsa_init="linear"``: H^2 + H); encoder LoRA = k_enc lora(r); AE decoder
    LoRA = L lora(ae_decoder_lora_r). Trainable: ``ae`` = encoder LoRA + LSA without its 1-row embedding + AE
    decoder LoRA; ``keft_qkv`` = L qkv;
    ``keft_full`` = L layer + H; ``keft_lora`` = L lora(decoder_lora_r).
    """
    d = Dims.of(cfg)
    backbone = d.V * d.H * (1 if d.tied else 2) + d.L * layer_params(d) + d.H
    encoder = 2 * d.H + gmsa.k_enc * layer_params(d)
    encoder_lora = gmsa.k_enc * lora_params(d, gmsa.lora_r)
    if gmsa.lsa_init == "linear":
        lsa, lsa_trainable = d.H * d.H + d.H, d.H * d.H + d.H
    else:
        lsa = 2 * d.H + gmsa.k_lsa * layer_params(d) if gmsa.k_lsa else 0
        lsa_trainable = lsa - d.H if gmsa.k_lsa else 0
    decoder_lora = d.L * lora_params(d, gmsa.decoder_lora_r)
    ae_decoder_lora = d.L * lora_params(d, gmsa.ae_decoder_lora_r)
    total = backbone + encoder + encoder_lora + lsa + ae_decoder_lora + decoder_lora * (gmsa.decoder_tuning == "lora")
    return {
        "backbone": backbone,
        "encoder_copy": encoder,
        "lsa_copy": lsa,
        "encoder_lora": encoder_lora,
        "total": total,
        "ae_decoder_lora": ae_decoder_lora,
        "ae": encoder_lora + lsa_trainable + ae_decoder_lora,
        "keft_qkv": d.L * qkv_params(d),
        "keft_full": d.L * layer_params(d) + d.H,
        "keft_lora": decoder_lora,
    }


# ----------------------------------------------------------------------------- memory
@dataclass
class TrainSetup:
    """One training stage on a GPU cluster (lengths in tokens, ``batch`` per GPU).

    ``zero``: 0 = plain data parallel (everything replicated), 1 = optimizer states sharded,
    2 = + gradients sharded (ZeRO-2, the paper), 3 = + weights sharded (ZeRO-3 / FSDP full shard).
    """

    stage: str = "ae"  # "ae" or "keft_qkv" / "keft_full" / "keft_lora"
    batch: int = 4
    context: int = 512
    prompt: int = 8
    target: int = 513
    rate: int = 4
    weight_bytes: int = 2  # bf16
    grad_ckpt: bool = True
    n_gpus: int = 2
    zero: int = 2


# The paper's setups (METHOD.md): AE batch 4, 512-token contexts, target = context + EOS;
# KEFT batch 16, 3072-token contexts; question / answer lengths (32 / 32) are our assumption.
PAPER_AE = TrainSetup(stage="ae", batch=4, context=512, prompt=8, target=513)
PAPER_KEFT = TrainSetup(stage="keft_qkv", batch=16, context=3072, prompt=32, target=32)


def layer_activation_bytes(d: Dims, w: int) -> int:
    """Bytes one layer keeps for backward, per token (SDPA / flash attention: nothing quadratic).

    2 RMSNorms x (fp32 upcast 4H + normalised wH + output wH) + w(3q + 2kv) (q, k, v after RoPE,
    attention output, its contiguous copy into o_proj) + 4wI (gate, up, silu(gate), product).
    """
    return 2 * (4 * d.H + 2 * w * d.H) + w * (3 * d.q + 2 * d.kv) + 4 * w * d.I


def lora_activation_bytes(d: Dims, r: int, w: int) -> int:
    """Extra bytes per token per LoRA'd layer: each projection keeps its dropped-out input and A(x)."""
    return w * sum(n_in + r for n_in, _ in d.linears().values())


def stack_activations(d: Dims, tokens: int, layers: int, w: int, ckpt: bool, extra: int = 0) -> tuple[int, int]:
    """``(kept, transient)`` bytes of ``layers`` layers over ``tokens`` = B x T tokens.

    Without checkpointing every layer keeps everything; with it each layer keeps only its
    input (wH per token) and one layer at a time is recomputed during backward (transient).
    """
    full = tokens * (layer_activation_bytes(d, w) + extra)
    return (layers * tokens * w * d.H, full) if ckpt else (layers * full, 0)


def activation_bytes(cfg: PretrainedConfig, gmsa: GMSAConfig, s: TrainSetup) -> dict[str, int]:
    """Activation memory of one micro-batch: kept tensors + the largest transient + logits.

    AE keeps the encoder (k_enc layers over B x context, with LoRA extras), the LSA (k_lsa layers over
    B x ceil(context / rate), never checkpointed) and the frozen decoder (L layers over B x T_dec,
    T_dec = ceil(context / rate) + prompt + target: gradients flow through it to the soft tokens).
    KEFT keeps only the decoder (encoder and LSA are frozen and run without a graph).
    Logits: B x target x V x (w + 4 + 4): the head's output, its fp32 copy (log-softmax) and fp32 grad.
    Attention masks: B x T^2 bytes per stack (a boolean 4-D mask).
    """
    d, w, B = Dims.of(cfg), s.weight_bytes, s.batch
    soft = math.ceil(s.context / s.rate)
    dec_tokens = B * (soft + s.prompt + s.target)
    stacks = [stack_activations(d, dec_tokens, d.L, w, s.grad_ckpt)]
    masks = B * (soft + s.prompt + s.target) ** 2
    if s.stage == "ae":
        lora = lora_activation_bytes(d, gmsa.lora_r, w)
        stacks.append(stack_activations(d, B * s.context, gmsa.k_enc, w, s.grad_ckpt, lora))
        stacks.append(stack_activations(d, B * soft, gmsa.k_lsa, w, False))
        masks += B * (s.context**2 + soft**2)
    kept = sum(k for k, _ in stacks) + masks
    logits = B * s.target * d.V * (w + 8)
    transient = max(t for _, t in stacks)
    peak = kept + (max(logits, transient) if s.grad_ckpt else logits)
    return {"kept": kept, "logits": logits, "recompute": transient, "activations": peak}


def memory_per_gpu(cfg: PretrainedConfig, gmsa: GMSAConfig, s: TrainSetup) -> dict[str, int]:
    """Bytes per GPU of one training stage (ZeRO paper accounting, P_all all weights, P_t trainable).

    weights   = w P_all / (N if zero >= 3)
    grads     = w P_t / (N if zero >= 2)
    optimizer = (8 + 4 [fp32 master copy, when w < 4]) P_t / (N if zero >= 1)   (Adam m and v in fp32)
    plus ``activation_bytes``. Not included: CUDA context (~0.5-1 GB), allocator fragmentation,
    communication buckets (DeepSpeed's reduce / all-gather buckets, ~1 GB each by default).
    """
    counts = count_params(cfg, gmsa)
    p_all, p_t, n, w = counts["total"], counts[s.stage], s.n_gpus, s.weight_bytes
    parts = {
        "weights": w * p_all // (n if s.zero >= 3 else 1),
        "grads": w * p_t // (n if s.zero >= 2 else 1),
        "optimizer": (8 + 4 * (w < 4)) * p_t // (n if s.zero >= 1 else 1),
    }
    parts["activations"] = activation_bytes(cfg, gmsa, s)["activations"]
    parts["total"] = sum(parts.values())
    return parts
