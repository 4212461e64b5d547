"""What each trial asks of Ray, and whether the cluster's nodes can ever hold it.

A trial takes one bundle of the spec's resources, or for a measured trial of N = fsdp x cp x tp ranks one
share of them per rank: one bundle per TP group (its tp ranks' shares together, so a TP group, whose
collectives run in every layer, always sits on one node: a bundle never spans nodes), packed onto as few
nodes as hold them (txlab.sweeps.ranks.trial_bundles). An estimate runs rank 0 alone on a fake process
group. This module is pure: it takes the nodes' resources as plain dicts (txlab.sweeps.cluster reads them
from Ray).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from txlab.config import ConfigError
from txlab.config.schema import ParallelConfig
from txlab.sweeps.spec import SweepSpec, Trial
from txlab.trial.resolve import Layout


def layout_of(flat: dict[str, Any]) -> Layout:
    """The layout of a trial's flat config (the dotted keys the trainable receives)."""
    names = {f.name for f in dataclasses.fields(ParallelConfig)}
    return Layout.of(ParallelConfig(**{k: flat[f"parallel.{k}"] for k in names if f"parallel.{k}" in flat}))


def rank_groups(layout: Layout, mode: str) -> tuple[int, int]:
    """(ranks, ranks per group) a trial of `layout` takes in a sweep of mode `mode`: (fsdp x cp x tp, tp)
    when measured (a group is a TP group: consecutive ranks, tp innermost in the mesh); an estimate runs
    rank 0 alone on a fake process group: (1, 1)."""
    return (layout.world, layout.tp) if mode == "measure" and layout.world > 1 else (1, 1)


def trial_ranks(layout: Layout, mode: str) -> int:
    """How many ranks (shares of the spec's resources) a trial of `layout` takes in a sweep of `mode`."""
    return rank_groups(layout, mode)[0]


def trial_resources(spec: SweepSpec, trials: list[Trial]):
    """Tune's resources per trial, a function of the trial's config: a placement group of one bundle of the
    spec's resources, or for a measured trial of N ranks an empty head bundle (the trainable) and one bundle
    per TP group (txlab.sweeps.ranks.trial_bundles), packed onto as few nodes as hold them."""
    from ray.tune import PlacementGroupFactory

    from txlab.sweeps.ranks import trial_bundles

    groups = {t.key: g for t in trials if (g := rank_groups(Layout.of(t.config.parallel), spec.mode))[0] > 1}  # pickled
    cpu, gpu = spec.cpu, spec.gpu

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        ranks, group = groups.get(config["trial_key"], (1, 1))
        return PlacementGroupFactory(trial_bundles(cpu, gpu, ranks, group), strategy="PACK")

    return resources


def per_trial(spec: SweepSpec, trials: list[Trial]) -> str:
    """What each trial asks of Ray, for the sweep's opening line and the dry run."""
    text = f"each trial {spec.cpu:g} CPU, {spec.gpu:g} GPU"
    sizes = sorted({trial_ranks(Layout.of(t.config.parallel), spec.mode) for t in trials} - {1})
    if sizes:
        text += f" (per rank: trials of {'/'.join(map(str, sizes))} ranks take that many times as much)"
    return text


def _placeable(bundle: dict[str, float], n: int, nodes: list[dict[str, float]]) -> bool:
    """N equal bundles fit on these nodes (any number per node, as PACK allows)."""
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return True
    return sum(min(int(node.get(k, 0) / v + 1e-9) for k, v in need.items()) for node in nodes) >= n


def _describe_nodes(nodes: list[dict[str, float]]) -> str:
    counts: dict[str, int] = {}
    for node in nodes:
        text = f"{{{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU}}"
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"{c} x {t}" for t, c in counts.items()) or "none"


def _keys(layout: Layout) -> str:
    """The layout's degrees above 1 as keys: "parallel.fsdp 2 x parallel.tp 2"."""
    degrees = {k: getattr(layout, k, 1) for k in ("fsdp", "cp", "tp")}
    return " x ".join(f"parallel.{k} {v}" for k, v in degrees.items() if v > 1)


def check_fits(
    spec: SweepSpec, trials: list[Trial], nodes: list[dict[str, float]], scales: bool | None, where: str
) -> None:
    """Every trial's bundles (one of the spec's resources per rank, a TP group's on one node; one for a
    one-device trial) must fit on the cluster's nodes. A trial that cannot is refused (ConfigError: exit 2,
    before any trial runs) when the set of nodes is fixed; an autoscaling cluster (or one that does not say)
    may add such nodes: a warning."""
    bundle = {"CPU": spec.cpu, "GPU": spec.gpu}

    def fits(layout: Layout) -> bool:  # its groups' bundles (a group's shares together) on these nodes
        n, group = rank_groups(layout, spec.mode)
        return _placeable({k: v * group for k, v in bundle.items()}, n // group, nodes)

    layouts = sorted({Layout.of(t.config.parallel) for t in trials}, key=lambda lo: rank_groups(lo, spec.mode))
    misfit = next((lo for lo in reversed(layouts) if not fits(lo)), None)
    if misfit is None:
        return
    n, group = rank_groups(misfit, spec.mode)
    per = f"{{{spec.cpu:g} CPU, {spec.gpu:g} GPU}}"
    lower = "parallel.tp" if group > 1 else "parallel.fsdp"
    if group > 1:
        needs = (
            f"trials with {_keys(misfit)} need {n // group} x {{{group * spec.cpu:g} CPU, {group * spec.gpu:g} GPU}} "
            f"on one node each (a TP group's {group} ranks share a node; resources per rank {per})"
        )
    elif n > 1:
        needs = (
            f"trials with {_keys(misfit)} need {n} x {per} (resources per rank; "
            f"{n * spec.cpu:g} CPU and {n * spec.gpu:g} GPU in all)"
        )
    else:
        needs = f"each trial needs {per}"
    has = f"{where} has {_describe_nodes(nodes)}"
    if scales is False:
        raise ConfigError(
            f"sweep {spec.name}: {needs}; {has}: they can never be placed (lower resources or {lower}, "
            "or run on a larger cluster)"
        )
    print(
        f"warning: {needs}; {has}: such trials wait until the cluster (autoscaler) adds nodes that hold them",
        file=sys.stderr,
        flush=True,
    )
