"""What each trial asks of Ray, and whether the cluster's nodes can ever hold it.

A trial takes one bundle of the spec's resources, or for a measured `parallel.fsdp` = N trial one bundle
per rank (txlab.sweeps.ranks.trial_bundles); an estimate runs rank 0 alone on a fake process group. This
module is pure: it takes the nodes' resources as plain dicts (txlab.sweeps.cluster reads them from Ray).
"""

from __future__ import annotations

import sys
from typing import Any

from txlab.config import ConfigError
from txlab.sweeps.spec import SweepSpec, Trial


def trial_ranks(fsdp: int | None, mode: str) -> int:
    """How many ranks (bundles of the spec's resources) a trial of `parallel.fsdp` = `fsdp` takes in a sweep
    of mode `mode`: `fsdp` when measured; an estimate runs rank 0 alone on a fake process group."""
    return int(fsdp or 1) if mode == "measure" else 1


def trial_resources(spec: SweepSpec, trials: list[Trial]):
    """Tune's resources per trial, a function of the trial's config: a placement group of one bundle of the
    spec's resources, or for a measured `parallel.fsdp` = N trial an empty head bundle (the trainable) and N
    bundles of them, one per rank, packed onto as few nodes as hold them."""
    from ray.tune import PlacementGroupFactory

    from txlab.sweeps.ranks import trial_bundles

    ranks = {t.key: n for t in trials if (n := trial_ranks(t.config.parallel.fsdp, spec.mode)) > 1}  # pickled
    cpu, gpu = spec.cpu, spec.gpu

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        return PlacementGroupFactory(trial_bundles(cpu, gpu, ranks.get(config["trial_key"], 1)), strategy="PACK")

    return resources


def per_trial(spec: SweepSpec, trials: list[Trial]) -> str:
    """What each trial asks of Ray, for the sweep's opening line and the dry run."""
    text = f"each trial {spec.cpu:g} CPU, {spec.gpu:g} GPU"
    sizes = sorted({trial_ranks(t.config.parallel.fsdp, spec.mode) for t in trials} - {1})
    if sizes:
        text += f" (per rank: parallel.fsdp {'/'.join(map(str, sizes))} trials take that many times as much)"
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


def check_fits(
    spec: SweepSpec, trials: list[Trial], nodes: list[dict[str, float]], scales: bool | None, where: str
) -> None:
    """Every trial's bundles (one of the spec's resources per rank; one for a one-device trial) must fit on
    the cluster's nodes. A trial that cannot is refused (ConfigError: exit 2, before any trial runs) when the
    set of nodes is fixed; an autoscaling cluster (or one that does not say) may add such nodes: a warning."""
    sizes = sorted({trial_ranks(t.config.parallel.fsdp, spec.mode) for t in trials}, reverse=True)
    bundle = {"CPU": spec.cpu, "GPU": spec.gpu}
    misfit = next((n for n in sizes if not _placeable(bundle, n, nodes)), None)
    if misfit is None:
        return
    per = f"{{{spec.cpu:g} CPU, {spec.gpu:g} GPU}}"
    if misfit > 1:
        needs = (
            f"trials with parallel.fsdp {misfit} need {misfit} x {per} (resources per rank; "
            f"{misfit * spec.cpu:g} CPU and {misfit * spec.gpu:g} GPU in all)"
        )
    else:
        needs = f"each trial needs {per}"
    has = f"{where} has {_describe_nodes(nodes)}"
    if scales is False:
        raise ConfigError(
            f"sweep {spec.name}: {needs}; {has}: they can never be placed (lower resources or parallel.fsdp, "
            "or run on a larger cluster)"
        )
    print(
        f"warning: {needs}; {has}: such trials wait until the cluster (autoscaler) adds nodes that hold them",
        file=sys.stderr,
        flush=True,
    )
