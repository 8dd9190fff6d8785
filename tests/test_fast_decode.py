"""Faster decoding: int8 and int4 steps (prefill untouched, steps within their rounding, tied heads stay tied,
undo works), the LoRA-merged decoder copy (same outputs, shared weights, rebuilt when a LoRA changes) and the
measured int8 and int4 decisions."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from gmsa import fast_decode
from gmsa.decoding import greedy_generate
from gmsa.fast_decode import (
    INT4_MIN_SPEEDUP,
    INT8_MIN_SPEEDUP,
    FastDecoder,
    StepChoice,
    StepLinear,
    int4_kernel_available,
    int4_matmul,
    int8_kernel_available,
    plain_linears,
    quantize_groups,
    quantize_rows,
    resolve_int4,
    resolve_int8,
    step_weights,
)
from gmsa.model import autoencoder_decoder, inference_copy

needs_int8 = pytest.mark.skipif(not int8_kernel_available(), reason="torch lacks _weight_int8pack_mm")
needs_int4 = pytest.mark.skipif(not int4_kernel_available(), reason="torch lacks _weight_int4pack_mm_for_cpu")


def test_quantized_rows_reconstruct_the_weight():
    weight = torch.randn(32, 64)
    qweight, scale = quantize_rows(weight)
    assert qweight.dtype == torch.int8 and scale.shape == (32,)
    assert (qweight.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-6


@needs_int8
@torch.inference_mode()
def test_narrow_inputs_take_int8_and_wide_ones_the_plain_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    step = StepLinear(linear, max_rows=4)
    wide = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(step(wide), linear(wide))  # the prefill: bit-identical
    narrow = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    out, exact = step(narrow).float(), linear(narrow).float()
    assert out.shape == exact.shape and not torch.equal(out, exact)
    assert (out - exact).norm() / exact.norm() < 0.03


@needs_int8
def test_the_int8_copy_is_a_snapshot_until_refreshed():
    linear = nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    step = StepLinear(linear)
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = step(x)
    with torch.no_grad():
        linear.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(step(x), before)
    step.refresh()
    with torch.inference_mode():
        assert torch.allclose(step(x).float(), 2 * before.float(), rtol=0.05, atol=0.05)


@needs_int8
def test_decoder_layers_are_converted_and_restored(backbone_dir):
    decoder = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])  # wider than STEP_ROWS: the plain path
    embeds = decoder.get_input_embeddings()(ids)
    plain, _ = greedy_generate(decoder, embeds, torch.ones_like(ids), 6)
    converted = step_weights(decoder)
    assert converted == 4 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output head
    assert decoder.get_output_embeddings().weight is decoder.get_input_embeddings().weight  # still tied
    with torch.inference_mode():
        first = decoder(inputs_embeds=embeds).logits  # a prefill: same weights as before
    quick, _ = greedy_generate(decoder, embeds, torch.ones_like(ids), 6)
    assert quick.shape == plain.shape and quick[0, 0] == plain[0, 0]  # the first token comes from the prefill
    assert plain_linears(decoder) == converted
    assert not any(isinstance(m, StepLinear) for m in decoder.modules())
    with torch.inference_mode():
        assert torch.equal(decoder(inputs_embeds=embeds).logits, first)
    again, _ = greedy_generate(decoder, embeds, torch.ones_like(ids), 6)
    assert torch.equal(again, plain)


def lora_gmsa(make_gmsa, backbone_dir):
    """A tiny fp32 GMSA whose decoder carries an AE and a KEFT LoRA with non-zero weights."""
    gmsa = make_gmsa(backbone_dir, decoder_tuning="lora", decoder_lora_r=4, ae_decoder_lora_r=4)
    with torch.no_grad():
        for name, param in gmsa.model.decoder.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return gmsa


def logits_of(decoder, ids):
    with torch.inference_mode():
        return decoder(input_ids=ids).logits


IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])


def test_inference_copy_computes_what_the_adapters_compute_and_shares_the_rest(make_gmsa, backbone_dir):
    gmsa = lora_gmsa(make_gmsa, backbone_dir)
    decoder = gmsa.model.decoder
    merged = inference_copy(decoder)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(logits_of(merged, IDS), logits_of(decoder, IDS), atol=1e-5)
    assert merged.get_input_embeddings().weight is decoder.get_input_embeddings().weight  # shared, not copied
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # still tied
    with autoencoder_decoder(gmsa.model):  # the KEFT adapter off: a copy of what runs then differs
        ae_only = inference_copy(decoder)
        assert torch.allclose(logits_of(ae_only, IDS), logits_of(decoder, IDS), atol=1e-5)
    assert not torch.allclose(logits_of(ae_only, IDS), logits_of(merged, IDS), atol=1e-3)


def test_fast_decoder_is_cached_and_rebuilt_when_a_lora_changes(make_gmsa, backbone_dir):
    gmsa = lora_gmsa(make_gmsa, backbone_dir)
    decoder, fast = gmsa.model.decoder, FastDecoder(int8="off")
    first = fast.of(decoder)
    assert first is not decoder and fast.of(decoder) is first
    with torch.no_grad():
        next(p for name, p in decoder.named_parameters() if "lora_B" in name).add_(1.0)
    rebuilt = fast.of(decoder)
    assert rebuilt is not first
    assert torch.allclose(logits_of(rebuilt, IDS), logits_of(decoder, IDS), atol=1e-5)
    with autoencoder_decoder(gmsa.model):
        assert fast.of(decoder) is not rebuilt
    assert fast.of(decoder) is rebuilt  # both adapter sets are kept
    decoder.train()
    assert fast.of(decoder) is decoder  # a decoder in training is decoded as it is
    decoder.eval()
    next(decoder.parameters()).requires_grad_(True)
    assert fast.of(decoder) is decoder


def test_generate_answers_as_the_unmerged_decoder_does(make_gmsa, backbone_dir):
    gmsa = lora_gmsa(make_gmsa, backbone_dir)
    context = gmsa.compress("Paris is the capital of France and its largest city.", rate=2)
    fast = gmsa.generate(context, ["Paris is"], max_new_tokens=6)
    gmsa.fast_decoder.of = lambda decoder: decoder  # the plain path
    assert fast == gmsa.generate(context, ["Paris is"], max_new_tokens=6)


@pytest.mark.parametrize("speedup,expected", [(INT8_MIN_SPEEDUP + 1, True), (0.5, False)])
def test_auto_int8_steps_follow_the_measurement(monkeypatch, speedup, expected):
    monkeypatch.setattr(fast_decode, "int8_kernel_available", lambda: True)
    monkeypatch.setattr(fast_decode, "measure_int8_step_speedup", lambda: speedup)
    choice = resolve_int8("auto", torch.bfloat16, torch.device("cpu"))
    assert choice.on is expected and f"{speedup:.2f}x" in choice.reason


def test_int8_steps_need_a_bf16_decoder_on_a_cpu():
    assert not resolve_int8("auto", torch.float32, torch.device("cpu")).on
    assert not resolve_int8("off", torch.bfloat16, torch.device("cpu")).on
    with pytest.raises(ValueError, match="bf16 decoder on a CPU"):
        resolve_int8("on", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="int8 steps must be one of"):
        resolve_int8("fast", torch.bfloat16, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ int4 steps
def exactly_int4(out_features: int, in_features: int, group: int) -> torch.Tensor:
    """A weight that int4 in groups of ``group`` holds exactly: per group ``(q - 8) * scale + zero``, q in 0..15
    with both ends present (so min-max quantisation finds the same scale and zero)."""
    q = torch.randint(0, 16, (out_features, in_features // group, group))
    q[..., 0], q[..., 1] = 0, 15
    scale = torch.rand(out_features, in_features // group, 1) * 0.1 + 0.01
    zero = torch.randn(out_features, in_features // group, 1) * 0.1
    return ((q - 8) * scale + zero).reshape(out_features, in_features)


@needs_int4
@torch.inference_mode()
def test_int4_matmul_of_a_weight_int4_holds_matches_the_float_product():
    torch.manual_seed(0)
    weight = exactly_int4(48, 96, 32)
    packed, scale_zeros = quantize_groups(weight, 32)
    assert scale_zeros.shape == (3, 48, 2)
    x = torch.randn(3, 96)
    exact = x @ weight.T
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.02)):  # bf16: rounded inputs and scales
        out = int4_matmul(x.to(dtype), packed, 32, scale_zeros.to(dtype)).float()
        assert (out - exact).norm() / exact.norm() < tolerance


@needs_int4
@torch.inference_mode()
def test_int4_step_linear_takes_narrow_inputs_within_int4_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    step = StepLinear(linear, kind="int4", max_rows=4)
    assert step.kind == "int4" and "int4 steps" in repr(step)
    wide = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(step(wide), linear(wide))  # the prefill: bit-identical
    narrow = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    out, exact = step(narrow).float(), linear(narrow).float()
    assert out.shape == exact.shape
    assert (out - exact).norm() / exact.norm() < 0.15  # int4 in groups of 32 of random weights: about 8 %


@needs_int4
def test_shapes_the_int4_kernel_does_not_take_keep_int8():
    assert StepLinear(nn.Linear(64, 40).to(torch.bfloat16), kind="int4").kind == "int8"  # 40 outputs: not 16k
    assert StepLinear(nn.Linear(48, 32).to(torch.bfloat16), kind="int4").kind == "int8"  # 48 inputs: not 32k
    with pytest.raises(ValueError, match="int4 weights need"):
        quantize_groups(torch.randn(40, 64))
    with pytest.raises(ValueError, match="step weights must be one of"):
        StepLinear(nn.Linear(64, 32), kind="int2")


@needs_int4
def test_fast_decoder_with_int4_steps(backbone_dir):
    decoder = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.bfloat16).eval().requires_grad_(False)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    embeds = decoder.get_input_embeddings()(ids)
    plain, _ = greedy_generate(decoder, embeds, torch.ones_like(ids), 6)
    fast = FastDecoder(int8="on", int4="on")
    quick, _ = greedy_generate(fast.of(decoder), embeds, torch.ones_like(ids), 6)
    assert fast.step_kind == "int4" and fast.int4_choice.reason == "requested"
    kinds = {m.kind for m in fast.of(decoder).modules() if isinstance(m, StepLinear)}
    assert "int4" in kinds  # (an output head of a vocabulary that is not a multiple of 16 keeps int8)
    assert quick.shape == plain.shape and quick[0, 0] == plain[0, 0]  # the first token comes from the prefill
    assert FastDecoder(int8="on").step_kind is None  # nothing decided before the first decoder
    int8_only = FastDecoder(int8="on")
    int8_only.of(decoder)
    assert int8_only.step_kind == "int8"


@pytest.mark.parametrize("speedup,expected", [(INT4_MIN_SPEEDUP + 1, True), (0.5, False)])
def test_auto_int4_steps_follow_the_measurement(monkeypatch, speedup, expected):
    monkeypatch.setattr(fast_decode, "int4_kernel_available", lambda: True)
    monkeypatch.setattr(fast_decode, "measure_int4_step_speedup", lambda: speedup)
    choice = resolve_int4("auto", StepChoice(True, "requested"))
    assert choice.on is expected and f"{speedup:.2f}x" in choice.reason


def test_int4_steps_need_the_int8_steps():
    int8_off = StepChoice(False, "switched off")
    assert not resolve_int4("auto", int8_off).on
    assert not resolve_int4(False, StepChoice(True, "requested")).on
    with pytest.raises(ValueError, match="int4 steps replace int8 steps"):
        resolve_int4("on", int8_off)
    with pytest.raises(ValueError, match="int4 steps must be one of"):
        resolve_int4("fast", int8_off)
