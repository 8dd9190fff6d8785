"""Int8 decoding steps: prefill untouched, steps within int8 rounding, tied heads stay tied, undo works."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from gmsa.decoding import greedy_generate
from gmsa.fast_decode import Int8StepLinear, int8_kernel_available, int8_steps, plain_linears, quantize_rows

pytestmark = pytest.mark.skipif(not int8_kernel_available(), reason="torch lacks _weight_int8pack_mm")


def test_quantized_rows_reconstruct_the_weight():
    weight = torch.randn(32, 64)
    qweight, scale = quantize_rows(weight)
    assert qweight.dtype == torch.int8 and scale.shape == (32,)
    assert (qweight.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-6


@torch.inference_mode()
def test_narrow_inputs_take_int8_and_wide_ones_the_plain_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    step = Int8StepLinear(linear, max_rows=4)
    wide = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(step(wide), linear(wide))  # the prefill: bit-identical
    narrow = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    out, exact = step(narrow).float(), linear(narrow).float()
    assert out.shape == exact.shape and not torch.equal(out, exact)
    assert (out - exact).norm() / exact.norm() < 0.03


def test_an_in_place_weight_change_refreshes_the_int8_copy():
    linear = nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    step = Int8StepLinear(linear)
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = step(x)
    with torch.no_grad():
        linear.weight.mul_(2)
    with torch.inference_mode():
        assert torch.allclose(step(x).float(), 2 * before.float(), rtol=0.05, atol=0.05)


def test_decoder_layers_are_converted_and_restored(backbone_dir):
    decoder = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])  # wider than STEP_ROWS: the plain path
    embeds = decoder.get_input_embeddings()(ids)
    plain, _ = greedy_generate(decoder, embeds, torch.ones_like(ids), 6)
    converted = int8_steps(decoder)
    assert converted == 4 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output head
    assert decoder.get_output_embeddings().weight is decoder.get_input_embeddings().weight  # still tied
    with torch.inference_mode():
        first = decoder(inputs_embeds=embeds).logits  # a prefill: same weights as before
    quick, _ = greedy_generate(decoder, embeds, torch.ones_like(ids), 6)
    assert quick.shape == plain.shape and quick[0, 0] == plain[0, 0]  # the first token comes from the prefill
    assert plain_linears(decoder) == converted
    assert not any(isinstance(m, Int8StepLinear) for m in decoder.modules())
    with torch.inference_mode():
        assert torch.equal(decoder(inputs_embeds=embeds).logits, first)
    again, _ = greedy_generate(decoder, embeds, torch.ones_like(ids), 6)
    assert torch.equal(again, plain)
