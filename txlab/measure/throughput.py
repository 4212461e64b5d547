"""Analytic FLOPs per token and model FLOPs utilisation (nanoGPT's estimate_mfu, per device)."""

from __future__ import annotations

# Dense peak FLOP/s by (device-name fragment, dtype), from the vendors' data sheets. fp32 is the
# non-tensor-core rate (txlab does not enable TF32). Unknown devices get no MFU rather than a guess.
PEAK_FLOPS: list[tuple[str, str, float]] = [
    ("H200", "bf16", 989.4e12),
    ("H200", "fp32", 66.9e12),
    ("H100", "bf16", 989.4e12),
    ("H100", "fp32", 66.9e12),
    ("A100", "bf16", 312e12),
    ("A100", "fp32", 19.5e12),
    ("L40S", "bf16", 362.05e12),
    ("L40S", "fp32", 91.6e12),
    ("A10G", "bf16", 70e12),
    ("A10G", "fp32", 31.2e12),
    ("L4", "bf16", 121e12),
    ("L4", "fp32", 30.3e12),
]


def flops_per_token(n_params_non_embedding: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights (forward + backward) plus 12*L*H*Q*T
    for attention scores and values (Kaplan et al. 2020 / PaLM appendix B). Recomputation is not
    counted: this is model FLOPs, so MFU compares policies on useful work."""
    return 6.0 * n_params_non_embedding + 12.0 * n_layers * n_heads * head_dim * seq_len


def peak_flops(device_name: str, dtype: str) -> float | None:
    for fragment, dt, flops in PEAK_FLOPS:
        if fragment in device_name and dt == dtype:
            return flops
    return None


def mfu(flops_per_tok: float, tokens_per_s: float, device_name: str, dtype: str) -> float | None:
    peak = peak_flops(device_name, dtype)
    return None if peak is None else flops_per_tok * tokens_per_s / peak
