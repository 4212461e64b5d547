"""Analytic FLOPs per token, peak FLOP/s by device name, and MFU (txlab/measure/throughput.py)."""

from __future__ import annotations

import pytest

from txlab.measure.throughput import flops_per_token, mfu, peak_flops


def test_flops_per_token_on_hand_computed_numbers():
    # 6N + 12 L H Q T: 6 * 1_000_000 + 12 * 2 * 4 * 16 * 128 = 6_000_000 + 196_608
    assert flops_per_token(1_000_000, n_layers=2, n_heads=4, head_dim=16, seq_len=128) == 6_196_608
    # GPT-2 small's block matrices (12 layers of 12 d^2, d = 768) at T = 1024:
    # 6 * 84_934_656 = 509_607_936 and 12 * 12 * 12 * 64 * 1024 = 113_246_208
    assert flops_per_token(12 * 12 * 768**2, 12, 12, 64, 1024) == 509_607_936 + 113_246_208
    # no attention term without a sequence, no weight term without parameters
    assert flops_per_token(1000, 2, 4, 16, 0) == 6000
    assert flops_per_token(0, 1, 1, 1, 1) == 12


def test_flops_per_token_attention_term_is_linear_in_the_sequence():
    one = flops_per_token(5_000, 3, 2, 8, 100)
    two = flops_per_token(5_000, 3, 2, 8, 200)
    assert two - one == 12 * 3 * 2 * 8 * 100


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),  # torch.cuda.get_device_properties(...).name
        ("NVIDIA H100 80GB HBM3", "fp32", 66.9e12),
        ("H100", "bf16", 989.4e12),
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA H200", "fp32", 66.9e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "fp32", 19.5e12),
        ("NVIDIA A100 80GB PCIe", "bf16", 312e12),
        ("NVIDIA L40S", "bf16", 362.05e12),  # not L4's figure, though "L4" is in the name
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40", "bf16", 181.05e12),  # neither L4 nor L40S
        ("NVIDIA H100 PCIe", "bf16", 756.5e12),  # the PCIe part, not the SXM part's figure
        ("NVIDIA H100 PCIe", "fp32", 51.2e12),
        ("NVIDIA H100 NVL", "bf16", 835.5e12),
        ("NVIDIA H200 NVL", "fp32", 60e12),
    ],
)
def test_peak_flops_by_device_name(name, dtype, expected):
    assert peak_flops(name, dtype) == expected


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("cpu", "fp32"),
        ("cpu", "bf16"),
        ("NVIDIA GeForce RTX 4090", "bf16"),
        ("Tesla V100-SXM2-16GB", "fp32"),
        ("NVIDIA GH100-ish", "bf16"),  # a word that only contains a model's name
        ("", "bf16"),
        ("NVIDIA H100 80GB HBM3", "fp16"),  # a dtype with no entry
    ],
)
def test_unknown_device_or_dtype_has_no_peak(name, dtype):
    assert peak_flops(name, dtype) is None


def test_mfu_is_achieved_over_peak():
    # 6e8 FLOPs/token at 1e5 tokens/s = 6e13 FLOP/s; over an H100's bf16 peak
    assert mfu(6e8, 1e5, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(6e13 / 989.4e12)
    assert mfu(6e8, 1e5, "NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(6e13 / 19.5e12)
    # at the peak exactly, MFU is 1; it scales with the throughput
    assert mfu(312e12 / 2e4, 2e4, "NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(1.0)
    assert mfu(1e9, 2e4, "NVIDIA H200", "bf16") == pytest.approx(2 * mfu(1e9, 1e4, "NVIDIA H200", "bf16"))


def test_mfu_of_an_unknown_device_is_none():
    assert mfu(6e8, 1e5, "cpu", "fp32") is None
    assert mfu(6e8, 1e5, "NVIDIA GeForce RTX 4090", "bf16") is None
