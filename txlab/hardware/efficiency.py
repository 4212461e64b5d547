"""The time model's achieved-efficiency curves: what share of a device's data-sheet figures each class of
operator reaches, by shape. The figures for GPUs are calibrated against published PyTorch eager + FSDP2 + SDPA
training throughput (benchmarks/time_model_anchors.py, docs/time_model.md, "Calibration"); a profile file may
override any of them, and a `local` profile replaces them with what `txlab calibrate` measured.

- matmul: `matmul * m / (m + matmul_knee)` of the dense peak, m the smallest of a GEMM's M, N, K (small or
  skinny GEMMs fill fewer tiles), and never faster than its bytes at `memory` of the bandwidth;
- attention (fused kernels, FLOPs counted as the kernel computes them, backward 2.5x forward):
  `attention * t / (t + attention_knee)` of the peak, t the key length, the backward at `attention_bwd`
  times the forward's efficiency;
- memory-bound operators (elementwise, norms, softmax, reductions, copies, the optimizer): their bytes at
  `memory` of the bandwidth, and at least `launch_s` each;
- collectives: bytes on the wire at `comm` of the link's bandwidth plus `comm_latency_s`; `overlap` is the
  share of their time that can run beside compute (separate streams on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Efficiency:
    matmul: float = 0.70  # share of the dense peak a large GEMM reaches
    matmul_knee: float = 128.0  # the smallest GEMM dimension at which a GEMM reaches half of `matmul`
    attention: float = 0.50  # share of the peak a fused attention kernel's forward reaches at long sequences
    attention_bwd: float = 0.80  # the backward kernel's efficiency relative to the forward's
    attention_knee: float = 256.0  # key length (tokens) at which attention reaches half of `attention`
    memory: float = 0.70  # memory-bound kernels: share of the memory bandwidth
    comm: float = 0.80  # collectives: share of the link bandwidth (NCCL's bus bandwidth)
    comm_latency_s: float = 3e-5  # fixed time of one collective, seconds
    launch_s: float = 4e-6  # least time of one kernel (launch and tail), seconds
    overlap: float = 1.0  # share of a collective's time that can run beside compute (0: none)


# Calibrated efficiencies by device family (docs/time_model.md, "Calibration"): `ampere` is fitted to
# torchtitan's FSDP2 runs on 64 x A100-80GB; `hopper` scales it by the ratio of MosaicML's MPT-7B runs on
# H100 and A100 (the same model and stack on both). Families without published runs of this stack take the
# nearest calibrated family: Ada and Ampere PCIe parts take `ampere`, Blackwell and MI300X `hopper`.
# Fitted by `python benchmarks/time_model_anchors.py --fit` (docs/time_model.md has the anchors and errors):
# matmul and attention of `ampere` on torchtitan's three calibration runs (log error of tokens/s per GPU), the
# `hopper` factor 0.7535 on MosaicML's MPT-7B H100 / A100 throughput ratio; the other fields are the stated
# priors (memory-bound kernels at 70% of the bandwidth, collectives at 80% of the link, 30 µs per collective,
# 4 µs per kernel, the knees).
FAMILIES: dict[str, Efficiency] = {
    "ampere": Efficiency(matmul=0.77, attention=0.50),
    "hopper": Efficiency(matmul=0.5802, attention=0.3768),
}
FAMILY_OF: dict[str, str] = {
    "a100-80g": "ampere", "a10g": "ampere", "l40": "ampere", "l40s": "ampere", "l4": "ampere",
    "h100-sxm": "hopper", "h100-pcie": "hopper", "h100-nvl": "hopper", "h200": "hopper", "h200-nvl": "hopper",
    "b200": "hopper", "mi300x": "hopper",
}  # fmt: skip
# A CPU's efficiencies: used only where a local profile has no measured table for an operator class.
CPU = Efficiency(matmul=0.5, attention=0.3, memory=0.3, launch_s=1e-5, overlap=0.0, comm=0.5, comm_latency_s=1e-4)


def efficiency_for(name: str, kind: str) -> Efficiency:
    """The calibrated efficiencies of a profile named `name` (a user's own name: the `ampere` family's)."""
    if kind == "cpu":
        return CPU
    return FAMILIES[FAMILY_OF.get(name, "ampere")]
