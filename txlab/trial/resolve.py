"""A trial's config resolved once into what its stages need: `Setup`.

The stages (build, memory, timing, inference, estimation on fake tensors) take this small record, or the
narrow parts of it they use, never the whole config: the budget is in bytes here and nowhere else, the
device is a `torch.device`, the ranks are a `Layout`, the data is opened (bad data is a ConfigError here,
before any work). What comes next lands here too: a layout of several parallel dimensions (tensor,
context and expert parallel degrees beside `fsdp`), and the hardware profile a time model reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from txlab.config import ConfigError, ModelConfig, ParallelConfig, PolicyConfig, TrialConfig, WorkloadConfig
from txlab.data.loader import Data, open_data
from txlab.hardware import LOCAL, Profile, ProfileError, load_profile, local_path
from txlab.model.hf import check_pretrained
from txlab.runtime.device import device_info, device_kind, resolve_device
from txlab.units import GiB


@dataclass(frozen=True)
class Layout:
    """How a trial's ranks are laid out: one mesh of `fsdp` data-parallel ranks (FSDP2) x `cp` context-parallel
    x `tp` tensor-parallel ranks, tp innermost. Further degrees (expert) are one more field each, `world` their
    product."""

    fsdp: int = 1
    reshard_after_forward: bool = True  # free gathered block parameters after forward
    tp: int = 1
    sequence_parallel: bool = True  # split the residual stream and norms over the sequence inside TP regions
    cp: int = 1  # context-parallel ranks: the sequence split over them (txlab.parallel.cp)
    ep: int = 1  # expert-parallel ranks, drawn from the fsdp ranks (not more ranks: txlab.parallel.ep)

    @classmethod
    def of(cls, parallel: ParallelConfig) -> Layout:
        return cls(parallel.fsdp, parallel.reshard_after_forward, parallel.tp, parallel.sequence_parallel,
                   cp=parallel.cp, ep=parallel.ep)  # fmt: skip

    @property
    def world(self) -> int:
        """Ranks (processes, devices) the trial takes."""
        return self.fsdp * self.cp * self.tp

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """The device mesh's shape: (fsdp,), with (fsdp, cp), (fsdp, tp) or (fsdp, cp, tp) where they are > 1."""
        return (self.fsdp, *(n for n in (self.cp, self.tp) if n > 1))

    def cp_group(self, rank: int = 0) -> tuple[int, ...]:
        """The ranks of `rank`'s context-parallel group: on the fsdp x cp x tp mesh (tp innermost) those of its
        fsdp and tp coordinates, tp apart."""
        first = rank - (rank // self.tp % self.cp) * self.tp
        return tuple(first + j * self.tp for j in range(self.cp))

    def describe(self) -> str:
        """The layout in a progress line: "FSDP over 4 ranks", "FSDP 2 x TP 2 (sequence parallel)"."""
        sp = "sequence parallel" if self.sequence_parallel else "no sequence parallelism"
        if self.cp > 1:
            tp = f" x TP {self.tp} ({sp})" if self.tp > 1 else ""
            return (f"FSDP {self.fsdp} x " if self.fsdp > 1 else "") + f"CP {self.cp} (load-balanced chunks){tp}"
        if self.tp == 1:
            return f"FSDP over {self.fsdp} ranks" + (f" (experts over EP {self.ep})" if self.ep > 1 else "")
        return (f"FSDP {self.fsdp} x " if self.fsdp > 1 else "") + f"TP {self.tp} ({sp})"


@dataclass(frozen=True)
class Setup:
    """One trial, resolved: what every stage reads."""

    trial_key: str
    model: ModelConfig
    policy: PolicyConfig
    workload: WorkloadConfig
    seed: int
    kind: str  # "cpu" or "cuda": the device kind the figures are for (an estimate's fake tensors live on the CPU)
    device: torch.device  # where tensors live: the trial's device (rank 0's when sharded); the CPU for estimates
    budget_bytes: int | None  # measure.budget_gib in bytes (2^30 per GiB); None: no budget
    layout: Layout
    data: Data | None  # the opened real text; None: synthetic tokens
    measure_device: str  # measure.device as written (free memory of a named GPU, a rank's GPU)
    hardware: Profile | None = None  # the time model's profile: measure.hardware's (measured: else `local`'s)
    usd_per_device_hour: float | None = None  # measure.usd_per_device_hour: the price of the predicted time

    @property
    def sharded(self) -> bool:
        return self.layout.world > 1

    @property
    def context_length(self) -> int:
        return context_length(self.workload)

    def on(self, device: torch.device) -> Setup:
        """The same trial on another device (a rank's own GPU)."""
        return replace(self, device=device)


def context_length(w: WorkloadConfig) -> int:
    """Positions a trial's model must hold: the prompt, plus the generated tokens when decoding."""
    return w.seq_len + (w.decode_tokens if w.kind == "decode" else 0)


def resolve(cfg: TrialConfig, estimate: bool = False, kind: str | None = None) -> Setup:
    """Resolve `cfg` once. Measured (`estimate` False): the device must exist here, the data and a
    pretrained checkpoint are opened and checked (ConfigError before any work). An estimate models device
    `kind` (default: the kind `measure.device` names) on fake CPU tensors and reads no data or weights."""
    m, w = cfg.model, cfg.workload
    hardware = hardware_profile(cfg, estimate)
    if estimate:
        auto = cfg.measure.device == "auto" and hardware is not None  # a profile of a GPU: estimate for CUDA
        kind = kind or (hardware.kind if auto else device_kind(cfg.measure.device))
        device, data = torch.device("cpu"), None
    else:
        device = resolve_device(cfg.measure.device)
        kind = device.type
        data = open_data(cfg) if cfg.data.source != "synthetic" else None
        if m.init == "pretrained":
            check_pretrained(m, context_length(w))
    return Setup(
        trial_key=cfg.trial_key, model=m, policy=cfg.policy, workload=w, seed=cfg.seed, kind=kind, device=device,
        budget_bytes=None if cfg.measure.budget_gib is None else int(cfg.measure.budget_gib * GiB), layout=Layout.of(cfg.parallel), data=data,
        measure_device=cfg.measure.device, hardware=hardware, usd_per_device_hour=cfg.measure.usd_per_device_hour,
    )  # fmt: skip


def hardware_profile(cfg: TrialConfig, estimate: bool = False) -> Profile | None:
    """The profile the trial's time is predicted on: measure.hardware's; for a measured trial without one, this
    machine's `local` profile when `txlab calibrate` wrote one for the device the trial runs on (so every
    measured row is also a check of the time model); else None. A bad profile is a ConfigError."""
    spec = cfg.measure.hardware
    try:
        if spec is not None:
            return load_profile(spec)
        if estimate or not local_path().exists():
            return None
        profile = load_profile(LOCAL)
    except ProfileError as e:
        raise ConfigError(str(e)) from None
    here = device_info(resolve_device(cfg.measure.device))[0]
    return profile if profile.device_name == here else None
