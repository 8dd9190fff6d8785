"""The inference dtype: chosen at load, weights cast once at first use, trained models left alone."""

import pytest
import torch

from gmsa import GMSA, GMSAConfig
from gmsa.cli import build_parser
from gmsa.model import set_stage
from tests.conftest import TINY

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and its largest city."]


def tiny(backbone_dir, dtype) -> GMSA:
    torch.manual_seed(0)
    return GMSA.from_backbone(backbone_dir, GMSAConfig(**TINY), dtype=dtype)


def test_bf16_weights_are_cast_once_at_first_use(backbone_dir):
    gmsa = tiny(backbone_dir, "bfloat16")
    assert gmsa.inference_dtype == torch.bfloat16
    assert gmsa.model.decoder.dtype == torch.float32  # built in fp32; nothing computed yet
    compressed = gmsa.compress(TEXTS, rate=2)
    assert {p.dtype for p in gmsa.model.parameters()} == {torch.bfloat16}
    assert not any(p.is_inference() for p in gmsa.model.parameters())  # usable outside inference mode too
    assert all(soft.dtype == torch.bfloat16 for soft in compressed.soft_tokens)
    pointers = [p.data_ptr() for p in gmsa.model.parameters()]
    answers = gmsa.generate(compressed, ["Who jumps?", "What is the capital?"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert [p.data_ptr() for p in gmsa.model.parameters()] == pointers  # no per-call casts or copies
    assert all(row.dtype == torch.bfloat16 for row in gmsa.prompt_embeds(compressed, ["a?", "b?"]))


def test_the_fingerprint_does_not_depend_on_the_dtype(backbone_dir):
    assert (
        tiny(backbone_dir, "bfloat16").config.backbone_fingerprint
        == tiny(backbone_dir, "float32").config.backbone_fingerprint
    )


def test_soft_tokens_made_in_fp32_are_read_by_a_bf16_model(backbone_dir):
    compressed = tiny(backbone_dir, "float32").compress(TEXTS, rate=2)
    bf16 = tiny(backbone_dir, "bfloat16")
    assert all(soft.dtype == torch.float32 for soft in compressed.soft_tokens)
    assert len(bf16.generate(compressed, ["Who?", "Where?"], max_new_tokens=3)) == 2


def test_trained_weights_are_loaded_then_cast(backbone_dir, tmp_path):
    fp32 = tiny(backbone_dir, "float32")
    with torch.no_grad():
        for param in fp32.model.lsa.parameters():
            param.add_(0.01 * torch.randn_like(param))
    fp32.save_pretrained(tmp_path / "ckpt", dtype=None)
    bf16 = GMSA.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    bf16.compress(TEXTS[0])
    loaded = dict(bf16.model.lsa.named_parameters())
    for name, saved in fp32.model.lsa.named_parameters():
        if "embed_tokens" in name:  # a 1-row placeholder, not saved
            continue
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], saved.to(torch.bfloat16)), name


def test_bf16_soft_tokens_stay_close_to_fp32(backbone_dir):
    fp32 = tiny(backbone_dir, "float32").compress(TEXTS, rate=2)
    bf16 = tiny(backbone_dir, "bfloat16").compress(TEXTS, rate=2)
    for a, b in zip(fp32.soft_tokens, bf16.soft_tokens):
        relative = (a - b.float()).norm() / a.norm()
        assert relative < 0.05, relative  # bf16 keeps 8 bits of mantissa through a few layers


def test_a_model_being_trained_keeps_fp32_trainable_weights(backbone_dir):
    gmsa = tiny(backbone_dir, "bfloat16")
    trained = set_stage(gmsa.model, "ae")
    assert gmsa.hold_inference_dtype() is False
    gmsa.compress(TEXTS[0])  # validation during training: runs, casts nothing
    params = dict(gmsa.model.named_parameters())
    assert trained and all(params[name].dtype == torch.float32 for name in trained)


def test_auto_picks_a_dtype_and_says_why(backbone_dir):
    gmsa = tiny(backbone_dir, "auto")
    assert gmsa.inference_dtype in {torch.float32, torch.bfloat16}
    assert gmsa.dtype_choice.reason


def test_unknown_dtype_is_a_clear_error(backbone_dir):
    with pytest.raises(ValueError, match="dtype must be one of"):
        tiny(backbone_dir, "float8")


def test_cli_takes_dtype():
    parser = build_parser()
    assert parser.parse_args(["compress", "--out", "x.safetensors"]).dtype == "auto"
    assert parser.parse_args(["answer", "-q", "a?", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["answer", "-q", "a?", "--dtype", "float8"])
