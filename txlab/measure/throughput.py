"""Analytic FLOPs per token and model FLOPs utilisation (nanoGPT's estimate_mfu, per device)."""

from __future__ import annotations

import re

# Dense peak FLOP/s by device model and its variant's words, per dtype, from the vendors' data sheets (half
# the sparsity figure where only that is given). fp32 is the non-tensor-core rate (txlab does not enable
# TF32). Names are matched word by word, variants first: "NVIDIA H100 PCIe" is not the SXM part of
# "NVIDIA H100 80GB HBM3", nor "NVIDIA L40" an L4 or an L40S. Unknown devices get no MFU rather than a guess.
PEAK_FLOPS: list[tuple[str, tuple[str, ...], dict[str, float]]] = [
    ("H200", ("NVL",), {"bf16": 835.5e12, "fp32": 60e12}),
    ("H200", (), {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("H100", ("PCIe",), {"bf16": 756.5e12, "fp32": 51.2e12}),
    ("H100", ("NVL",), {"bf16": 835.5e12, "fp32": 60e12}),
    ("H100", (), {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("A100", (), {"bf16": 312e12, "fp32": 19.5e12}),
    ("L40S", (), {"bf16": 362.05e12, "fp32": 91.6e12}),
    ("L40", (), {"bf16": 181.05e12, "fp32": 90.5e12}),
    ("A10G", (), {"bf16": 70e12, "fp32": 31.2e12}),
    ("L4", (), {"bf16": 121e12, "fp32": 30.3e12}),
]


def flops_per_token(n_params_non_embedding: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights (forward + backward) plus 12*L*H*Q*T
    for attention scores and values (Kaplan et al. 2020 / PaLM appendix B). Recomputation is not
    counted: this is model FLOPs, so MFU compares policies on useful work."""
    return 6.0 * n_params_non_embedding + 12.0 * n_layers * n_heads * head_dim * seq_len


def peak_flops(device_name: str, dtype: str) -> float | None:
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+", device_name) if w}
    for model, variant, peaks in PEAK_FLOPS:
        if model.lower() in words and all(v.lower() in words for v in variant):
            return peaks.get(dtype)  # the device's entry, so an unknown dtype is no peak, not another part's
    return None


def mfu(flops_per_tok: float, tokens_per_s: float, device_name: str, dtype: str) -> float | None:
    peak = peak_flops(device_name, dtype)
    return None if peak is None else flops_per_tok * tokens_per_s / peak
