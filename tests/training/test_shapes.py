"""Real backbone shapes: exact parameter counts (meta device) and a sane memory model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from gmsa import GMSAConfig
from gmsa.model import GMSAModel, set_stage
from gmsa.training.shapes import (
    PAPER_AE,
    PAPER_GMSA,
    PAPER_KEFT,
    REAL_CONFIGS,
    count_params,
    memory_per_gpu,
    real_config,
)

# Published totals of the backbones themselves.
PUBLISHED = {"Llama-3.2-3B": 3_212_749_824, "Qwen3-4B": 4_022_468_096, "Mistral-7B-v0.3": 7_248_023_552}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
@pytest.mark.parametrize("tuning", ["qkv", "full", "lora"])
def test_analytic_counts_match_meta_model(name, tuning):
    cfg = real_config(name)
    gmsa = GMSAConfig(**PAPER_GMSA, decoder_tuning=tuning)
    with torch.device("meta"):
        model = GMSAModel(AutoModelForCausalLM.from_config(cfg), dataclasses.replace(gmsa))
    counts = count_params(cfg, gmsa)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["backbone"] == PUBLISHED[name]
    for stage, key in (("ae", "ae"), ("keft", f"keft_{tuning}")):
        set_stage(model, stage)
        assert counts[key] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_counts_of_ablation_variants():
    cfg = real_config("Qwen3-4B", num_hidden_layers=3)
    for gmsa in (GMSAConfig(k_enc=2, k_lsa=0, lora_r=4), GMSAConfig(k_enc=1, lsa_init="linear", lora_r=4)):
        with torch.device("meta"):
            model = GMSAModel(AutoModelForCausalLM.from_config(cfg), dataclasses.replace(gmsa))
        assert count_params(cfg, gmsa)["total"] == sum(p.numel() for p in model.parameters())
        set_stage(model, "ae")
        assert count_params(cfg, gmsa)["ae"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("setup", [PAPER_AE, PAPER_KEFT, dataclasses.replace(PAPER_KEFT, stage="keft_full")])
def test_memory_estimate_is_monotonic(setup):
    cfg, gmsa = real_config("Llama-3.2-3B"), GMSAConfig(**PAPER_GMSA)

    def mem(**changes):
        return memory_per_gpu(cfg, gmsa, dataclasses.replace(setup, **changes))

    one, two, eight = mem(n_gpus=1), mem(n_gpus=2), mem(n_gpus=8)
    assert one["total"] > two["total"] > eight["total"]  # ZeRO-2 shards grads and Adam states
    assert one["weights"] == eight["weights"]  # ... but not the weights
    assert mem(zero=3, n_gpus=8)["weights"] < eight["weights"]
    assert mem(zero=0, n_gpus=8)["total"] == one["total"]  # plain data parallel: nothing sharded
    assert mem(grad_ckpt=True)["activations"] < mem(grad_ckpt=False)["activations"]
    assert mem(batch=2 * setup.batch)["activations"] > two["activations"]
    assert mem(weight_bytes=4)["total"] > two["total"]


def test_more_layers_more_memory():
    gmsa = GMSAConfig(**PAPER_GMSA)
    small, big = (real_config("Llama-3.2-3B", num_hidden_layers=n) for n in (16, 28))
    assert memory_per_gpu(small, gmsa, PAPER_AE)["total"] < memory_per_gpu(big, gmsa, PAPER_AE)["total"]
