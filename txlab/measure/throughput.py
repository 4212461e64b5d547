"""Analytic FLOPs per token and model FLOPs utilisation (nanoGPT's estimate_mfu, per device).

Peak FLOP/s come from the hardware catalogue (txlab.hardware.catalogue: vendors' data sheets, dense figures),
the one table of them: a CUDA device's name is matched word by word against its parts, variants first ("NVIDIA
H100 PCIe" is not the SXM part of "NVIDIA H100 80GB HBM3", nor "NVIDIA L40" an L4 or an L40S). Unknown devices
get no MFU rather than a guess.
"""

from __future__ import annotations

from txlab.hardware import by_device_name


def flops_per_token(n_params_non_embedding: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights (forward + backward) plus 12*L*H*Q*T
    for attention scores and values (Kaplan et al. 2020 / PaLM appendix B). Recomputation is not
    counted: this is model FLOPs, so MFU compares policies on useful work."""
    return 6.0 * n_params_non_embedding + 12.0 * n_layers * n_heads * head_dim * seq_len


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The catalogue's dense peak of the part `device_name` names, for `dtype`; None for an unknown part or a
    dtype its entry has no figure for (not another part's)."""
    profile = by_device_name(device_name)
    return None if profile is None else profile.peak_flops.get(dtype)


def mfu(flops_per_tok: float, tokens_per_s: float, device_name: str, dtype: str) -> float | None:
    peak = peak_flops(device_name, dtype)
    return None if peak is None else flops_per_tok * tokens_per_s / peak
