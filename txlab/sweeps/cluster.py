"""Ray itself: checking an address, connecting (a cluster or a private local instance), and reading what
the cluster holds: the resources of a local instance before it starts, of each live node once connected,
and whether an autoscaler can add nodes. txlab.sweeps.placement decides from these whether trials fit.

Ray's public API is used where it has one (`ray.init`, `ray.nodes`, `ray.cluster_resources`). Two
questions have no public answer in Ray 2.60, so private calls are kept there, each guarded so that a
moved or changed private API gives the cautious answer instead of an error (`local_resources`,
`autoscaling`).
"""

from __future__ import annotations

import json
import logging
import os

from txlab.config import ConfigError
from txlab.text import first_line


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT that accepts no TCP connection is refused at once: ray.init would retry it for
    minutes. Other forms (`auto`, `ray://...`) are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"Ray address {address!r}: cannot connect ({e.strerror or e.__class__.__name__}); "
            "is the cluster up (`ray up cluster.yaml`), and is this HOST:6379?"
        ) from None


def check_address(address: str | None) -> None:
    """Refuse a dashboard URL, or a HOST:PORT nothing listens on, as a Ray address (before anything is created)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {address!r} is a dashboard (job server) address: submit the sweep with "
            f"`ray job submit --working-dir . -- txlab sweep ...`, or give --address the cluster's HOST:6379"
        )
    if address:
        _check_reachable(address)


def connect(address: str | None, quiet: bool = True) -> tuple[str, bool]:
    """ray.init: the given address, else RAY_ADDRESS (set inside `ray job submit`), else a local instance.
    Returns (where, started_here)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    level = logging.ERROR if quiet else logging.INFO
    if ray.is_initialized():
        return "existing", False
    check_address(address)
    if address:
        try:
            ray.init(address=address, logging_level=level, log_to_driver=not quiet)
        except (ConnectionError, TimeoutError, ValueError) as e:
            raise ConfigError(f"Ray address {address!r}: cannot connect ({first_line(e)})") from None
        return address, False
    # A laptop: a private local instance, no dashboard (nothing to submit jobs to), quiet logs.
    ray.init(include_dashboard=False, logging_level=level, log_to_driver=not quiet)
    return "local", True


def quiet_env() -> None:
    """Environment for a quiet Tune run (set before Tune is imported; a user's own setting wins)."""
    # Tune's own loggers (CSV/JSON/TensorBoard per trial) duplicate what the store holds.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's classic output path, which is silent at verbose=0 (the newer one still prints a banner and
    # the experiment path); our StoreWriter prints the progress line instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def local_resources() -> dict[str, float]:
    """The CPUs and GPUs a local Ray instance started here would have (Ray's own detection)."""
    # Private API, kept: Ray 2.60 has no public call for what a local instance *would* have before it
    # starts. The public ones (ray.cluster_resources, ray.available_resources) need a running instance,
    # and starting one just to ask would start Ray (seconds) and make the store before a sweep that can
    # never be placed is refused. These are what ray.init itself calls: the CPU count within the
    # container's cgroup limits, the GPUs NVML sees narrowed by CUDA_VISIBLE_DEVICES.
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager as gpus
        from ray._private.utils import get_num_cpus

        n_gpus = gpus.get_current_node_num_accelerators()
        visible = gpus.get_current_process_visible_accelerator_ids()
        return {"CPU": float(get_num_cpus()), "GPU": float(n_gpus if visible is None else min(n_gpus, len(visible)))}
    except (ImportError, AttributeError):  # private API moved: count as Python does (no GPUs known)
        return {"CPU": float(os.cpu_count() or 1), "GPU": 0.0}


def live_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def autoscaling() -> bool | None:
    """Whether the connected cluster's autoscaler can add nodes: True, False (a fixed set of nodes: `ray
    start` by hand, a local instance), None when Ray does not say (the check only warns then)."""
    # Private API, kept: Ray 2.60's public API says nothing of an autoscaler's limits. The autoscaler SDK
    # (ray.autoscaler.sdk) only requests resources or drives a cluster-launcher config file, and
    # ray.util.state lists nodes, not node groups; Ray's own libraries read the cluster config through
    # this private call too (ray.data's cluster autoscaler). Anything unexpected answers None.
    try:
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        config = state.get_cluster_config()  # autoscaler v2 / KubeRay: the node groups and their limits
        if config is not None and config.node_group_configs:
            groups = [g for g in config.node_group_configs if g.resources and g.max_count != 0]
            return any(g.max_count == -1 or g.max_count > g.min_count for g in groups)
        return scales_by_report(_internal_kv_get("__autoscaling_status"))  # the v1 monitor's last report
    except Exception:  # noqa: BLE001 - private API: unknown is a fine answer
        return None


def scales_by_report(raw: bytes | str | None) -> bool | None:
    """The v1 autoscaler's status report: without an autoscaling config the monitor runs a read-only
    provider that names each node's type after the node itself (nothing can be added); node types of a
    cluster config (`gpu_80gb`, ...) mean an autoscaler that can add nodes. None: no report (yet)."""
    try:
        types = (json.loads(raw or "{}").get("autoscaler_report") or {}).get("node_type_mapping") or {}
    except (ValueError, AttributeError):
        return None
    if not types:
        return None
    return not all(t == f"node_{node}" for node, t in types.items())
