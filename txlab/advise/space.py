"""The search space of `txlab advise`: every way to train the config's model and global batch on N devices of
one hardware profile, as candidates (a layout, a memory policy, a micro-batch split, resharding).

A candidate is a set of config overrides on the user's config; whether it is a valid trial is decided by the
config layer itself (`build_config`), so a layout the config refuses (tp not dividing the KV heads, fsdp not
dividing the batch) is rejected with the config's own message, never by a second copy of its rules here.

Layouts: fsdp x tp (x cp where the config has `parallel.cp`) whose product is N, tp a power of two up to the
profile's devices per node (a TP group talks over the intra-node link); ep (mixture-of-experts models, where the
config has `parallel.ep`) draws expert groups from the data-parallel ranks and does not change N.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from txlab.config import ConfigError, TrialConfig, build_config, expand_dotted, merge
from txlab.config.schema import ParallelConfig, SelectiveSave

# Least recomputation first: the order in which, within one layout and micro-batch, predicted memory is assumed
# not to rise and predicted time not to fall (`planned` is searched apart: txlab.advise.search).
CHAIN = ("sdpa", "selective", "checkpoint", "recompute")
POLICIES = ("sdpa", "selective", "planned", "checkpoint", "recompute")
DEGREES = (1, 2, 4, 8, 16, 32, 64)  # tp and cp degrees tried (tp capped at devices per node)
MAX_CP = 16  # context parallelism beyond 16 ranks is for sequences far longer than a step of this search prices
# What `selective` saves (policy.selective_save): txlab's list (matmuls and attention) saves a superset of each of
# the others, and each saves more than `checkpoint` (a block's input only), so the variants sit between the two in
# the order; matmuls-only and torchtitan's every-second-matmul are not comparable with each other.
SAVES = typing.get_args(SelectiveSave)  # ("txlab", "matmuls", "torchtitan")
_RANK = {"sdpa": 0, "selective": 1, "checkpoint": 3, "recompute": 4}


def _rank(scheme: str) -> int | None:
    if scheme.startswith("selective:"):
        return 2
    return _RANK.get(scheme)  # planned: None (not in the order)


def recomputes_no_more(q: str, p: str) -> bool:
    """Scheme `q` saves at least what `p` saves (so, the search assumes, no less memory and no more time): the
    partial order the staircase walks (txlab.advise.search); `planned` is comparable with nothing."""
    rq, rp = _rank(q), _rank(p)
    return rq is not None and rp is not None and (q == p or rq < rp)


def _parallel_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(ParallelConfig)}


@dataclass(frozen=True)
class Layout:
    """One way to lay out N devices (a family of candidates: the search walks policies, micro-batches and
    resharding in it)."""

    fsdp: int
    tp: int = 1
    cp: int = 1
    ep: int = 1
    reshard: bool = True  # parallel.reshard_after_forward

    @property
    def world(self) -> int:
        return self.fsdp * self.tp * self.cp

    def label(self) -> str:
        parts = [f"{k} {v}" for k, v in (("fsdp", self.fsdp), ("cp", self.cp), ("tp", self.tp)) if v > 1] or [
            "1 device"
        ]
        text = " x ".join(parts) + (f" (ep {self.ep})" if self.ep > 1 else "")
        return text + ("" if self.reshard or self.fsdp == 1 else ", no reshard")

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"parallel.fsdp": self.fsdp, "parallel.tp": self.tp}
        if self.fsdp > 1:
            out["parallel.reshard_after_forward"] = self.reshard
        out.update({f"parallel.{k}": v for k, v in (("cp", self.cp), ("ep", self.ep)) if v > 1})
        return out


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    policy: str
    grad_accum: int = 1
    save: str = "txlab"  # policy.selective_save (other lists only with `selective`)

    @property
    def scheme(self) -> str:
        """The memory policy with its save list: `selective`, `selective:matmuls`, `checkpoint`, ..."""
        return self.policy if self.save == "txlab" else f"{self.policy}:{self.save}"

    def micro_batch(self, batch_size: int) -> int:
        """Sequences one data-parallel rank computes per micro-step."""
        return batch_size // self.layout.fsdp // self.grad_accum

    def label(self) -> str:
        return f"{self.layout.label()}, {self.scheme}, {self.grad_accum} micro-step{'s' * (self.grad_accum > 1)}"

    def overrides(self) -> dict[str, Any]:
        # the save list always written: a user's own policy.selective_save must not leak into another policy
        return {
            **self.layout.overrides(),
            "policy.name": self.policy,
            "policy.selective_save": self.save,
            "workload.grad_accum": self.grad_accum,
        }


@dataclass
class Space:
    base: dict[str, Any]  # the user's config (nested), with the profile's measure.hardware and device kind set
    devices: int
    families: dict[Layout, list[Candidate]]  # valid candidates per layout (resharding or not, both in it)
    rejected: list[tuple[str, str]]  # (layout or candidate label, the config's reason): refused before estimating
    policies: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.families.values())

    def config(self, cand: Candidate) -> TrialConfig:
        return build_config(raw_config(self.base, cand))


def raw_config(base: dict[str, Any], cand: Candidate) -> dict[str, Any]:
    """The nested raw config of a candidate: the user's config with the candidate's keys written over it."""
    return merge(base, expand_dotted(cand.overrides()))


def layouts(devices: int, per_node: int, moe_experts: int | None) -> list[Layout]:
    """Every fsdp x cp x tp whose product is `devices` (ep for MoE models), resharding after forward; cp and ep
    only where the config has those keys. (Not resharding is searched inside each layout: txlab.advise.search.)"""
    keys = _parallel_keys()
    cps = [d for d in DEGREES if devices % d == 0 and d <= MAX_CP] if "cp" in keys else [1]
    out = []
    for tp in [d for d in DEGREES if d <= per_node and devices % d == 0]:
        for cp in cps:
            if devices % (tp * cp):
                continue
            fsdp = devices // (tp * cp)
            eps = [1]
            if moe_experts and "ep" in keys:
                eps = [e for e in DEGREES if fsdp % e == 0 and moe_experts % e == 0]
            out += [Layout(fsdp, tp, cp, ep) for ep in eps]
    return out


def build_space(base: dict[str, Any], devices: int, per_node: int, policies: tuple[str, ...] = POLICIES) -> Space:
    """The candidates of `base` on `devices` devices, each checked by the config layer. Raises ConfigError when
    no layout reaches `devices` (its message names the first layout's reason)."""
    cfg = build_config(base)
    families: dict[Layout, list[Candidate]] = {}
    rejected: list[tuple[str, str]] = []
    for layout in layouts(devices, per_node, cfg.model.moe_experts if cfg.model.mlp == "moe" else None):
        probe = Candidate(layout, "sdpa")
        try:
            build_config(raw_config(base, probe))
        except ConfigError as e:  # the layout itself is refused (tp vs heads, fsdp vs batch, ...)
            rejected.append((layout.label(), str(e)))
            continue
        share = cfg.workload.batch_size // layout.fsdp
        cands = []
        for lo in (layout, dataclasses.replace(layout, reshard=False)) if layout.fsdp > 1 else (layout,):
            for policy, save in [(p, sv) for p in policies for sv in (SAVES if p == "selective" else ("txlab",))]:
                for ga in [g for g in range(1, share + 1) if share % g == 0]:
                    cand = Candidate(lo, policy, ga, save)
                    try:
                        build_config(raw_config(base, cand))
                    except ConfigError:  # e.g. planned with micro-steps (the planner plans the whole batch)
                        continue
                    cands.append(cand)
        families[layout] = cands
    if not families:
        first = rejected[0][1] if rejected else f"no power-of-two tp up to {per_node} divides it"
        tried = ", ".join(label for label, _ in rejected) or "none"
        raise ConfigError(
            f"--devices: no layout of {devices} devices is valid for this config (tried {tried}); "
            f"the first refusal: {first}"
        )
    return Space(base, devices, families, rejected, policies)
