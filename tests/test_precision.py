"""Start-up dtype choice: requested dtypes pass through, "auto" measures, bad names are refused."""

import pytest
import torch
from torch import nn

from gmsa import precision
from gmsa.precision import BF16_MIN_SPEEDUP, hold_frozen_in, resolve_dtype


def test_requested_dtypes_pass_through():
    assert resolve_dtype("float32").dtype == torch.float32
    assert resolve_dtype("bfloat16").dtype == torch.bfloat16
    assert resolve_dtype(torch.bfloat16).dtype == torch.bfloat16


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float8")


@pytest.mark.parametrize("speedup,expected", [(BF16_MIN_SPEEDUP + 1, torch.bfloat16), (0.05, torch.float32)])
def test_auto_picks_bf16_only_where_it_measures_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "measure_cpu_bf16_speedup", lambda: speedup)
    choice = resolve_dtype("auto", "cpu")
    assert choice.dtype == expected and choice.bf16_speedup == speedup
    assert f"{speedup:.2f}x" in choice.reason


def test_measurement_leaves_the_global_rng_alone():
    precision.measure_cpu_bf16_speedup.cache_clear()
    state = torch.get_rng_state()
    precision.measure_cpu_bf16_speedup()
    assert torch.equal(state, torch.get_rng_state())


def test_hold_frozen_in_casts_only_frozen_parameters():
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    module[0].requires_grad_(False)
    assert hold_frozen_in(module, torch.bfloat16) == 2
    assert module[0].weight.dtype == torch.bfloat16 and module[1].weight.dtype == torch.float32


def test_measurement_times_the_dtypes_in_turns(monkeypatch):
    """fp32 and bf16 alternate, so a stall on a busy machine hits one timing, not one dtype."""
    seen = []
    real_mm = torch.mm

    def recording_mm(a, b):
        seen.append(a.dtype)
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", recording_mm)
    best = precision._best_matmul_seconds((torch.float32, torch.bfloat16), (8, 16, 8), repeats=4)
    assert len(best) == 2 and all(0 < t < float("inf") for t in best)
    assert seen == [torch.float32, torch.bfloat16] * 5  # the warm-up pair, then 4 timed turns
