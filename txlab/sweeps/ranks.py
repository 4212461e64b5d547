"""The ranks of a sharded trial (fsdp x cp x tp = N > 1 ranks) placed by Ray across the cluster.

Tune reserves a placement group per trial (`trial_bundles`): an empty head bundle for the trial's own
actor (the Tune function trainable, which only orchestrates) and one bundle per TP group holding its tp
ranks' shares of the spec's per-rank resources (one bundle per rank without TP), packed onto as few nodes
as hold them (PACK: one node when it can, NVLink; the next ones when it cannot). A bundle never spans
nodes, so a TP group, whose collectives run in every layer, is on one node; the slower data-parallel and
context-parallel traffic crosses nodes if it must. `run_ranks`, inside that trainable:

  1. starts one `Rank` actor per rank in its group's bundle (bundle r // tp holds rank r: mesh order, tp
     innermost) and asks each where it is (node id, IP, host name); rank 0 also picks a free port on its
     node, and (IP, port) is the process group's MASTER_ADDR / MASTER_PORT;
  2. has each actor run its rank as `python -m txlab.sweeps.worker` in a fresh process
     (txlab.sweeps.worker.rank_row: the rank's precheck, then `txlab.trial.sharded.run_rank`), so a
     crash, a CUDA context or a leak stays in that process, as for one-device trials;
  3. waits for the N outcomes (the rank's row, or how its process ended). When one ends badly (a status
     other than ok, or a process that died) the others get `GRACE_S` to finish, then their actors are
     killed, and their processes with them (PR_SET_PDEATHSIG): no rank waits in a collective for a dead
     peer, none outlives the trial;
  4. merges one row with `txlab.trial.sharded.merge_ranks` (an OOM on any rank is `oom`, a dead rank an
     `error` naming it and its host), with `node_id` and `host` listing the ranks' nodes and hosts.

A rank whose actor dies (its node lost, the actor killed) is a Ray failure, not the trial's: the others
are stopped and the trainable raises, so Tune retries the trial (spec key `max_failures`), as for a
one-device trial whose node died.

Ray Train's TorchTrainer was the other way (docs/sweeps.md says why this one was chosen).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from txlab.parallel.launch import GRACE_S, exit_text, stopped
from txlab.text import first_line
from txlab.trial.resolve import Layout


def trial_bundles(cpu: float, gpu: float, ranks: int, group: int = 1) -> list[dict[str, float]]:
    """The placement-group bundles of one trial: its resources (one-device trial, estimate), or an empty
    head bundle (the trainable) and one bundle per group of `group` consecutive ranks (a TP group) with
    their resources together."""
    bundle = {"CPU": float(cpu) * group, **({"GPU": float(gpu) * group} if gpu else {})}
    return (
        [{"CPU": float(cpu), **({"GPU": float(gpu)} if gpu else {})}]
        if ranks <= 1
        else [{}] + [dict(bundle) for _ in range(ranks // group)]
    )


def rank_jobs(job: dict[str, Any], places: list[dict[str, Any]], gpu: float, cpu: float) -> list[dict[str, Any]]:
    """Each rank's worker job: the trial's job plus rank, world, master, local_rank (its GPU on its node:
    0 when Ray gave it one GPU of its own, else its index among the trial's ranks on that node), threads
    and ranks_here (the trial's ranks on its node, which share its RAM)."""
    nodes = [p["node_id"] for p in places]
    master = [places[0]["ip"], places[0]["port"]]
    jobs = []
    for r, node in enumerate(nodes):
        local = 0 if gpu else nodes[:r].count(node)
        threads = None if gpu else max(1, int(cpu))
        jobs.append({**job, "rank": r, "world": len(nodes), "master": master, "local_rank": local,
                     "threads": threads, "ranks_here": nodes.count(node)})  # fmt: skip
    return jobs


def _rank_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class Rank:
        """One rank's actor: where it is, then its rank's process."""

        def where(self) -> dict[str, Any]:
            ctx = ray.get_runtime_context()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", 0))  # rank 0's: the process group's store listens here
                port = s.getsockname()[1]
            return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                    "host": socket.gethostname(), "port": port}  # fmt: skip

        def run(self, job: dict[str, Any]) -> dict[str, Any]:
            from txlab.sweeps.worker import run_worker

            done = run_worker(job, tag=f"rank{job['rank']}", echo=True)
            if done.returncode == 0 and done.row is not None:
                return {"row": done.row}
            last = done.last_line()
            return {"how": f"{exit_text(done.returncode)} on {socket.gethostname()}" + (f": {last}" if last else "")}

    return Rank


class RankLost(RuntimeError):
    """A rank's Ray actor died (its node went away, or it was killed): Tune retries the trial."""


def run_ranks(cfg, job: dict[str, Any], cpu: float, gpu: float, started: str, t0: float) -> dict[str, Any]:
    """Run the N ranks of `cfg` in this trial's placement group and return the trial's row (module doc).
    `job`: the worker job of the trial (trial_key, config, mode, precheck)."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    layout = Layout.of(cfg.parallel)
    n, group = layout.world, layout.tp
    pg = get_current_placement_group()
    if pg is None:
        raise RuntimeError("a sharded trial runs in its placement group (txlab.sweeps.driver sets it up)")
    Rank = _rank_class()
    actors = [
        Rank.options(
            num_cpus=cpu,
            num_gpus=gpu,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r // group),
        ).remote()
        for r in range(n)
    ]
    try:
        try:
            places = ray.get([a.where.remote() for a in actors])
        except RayActorError as e:
            raise RankLost(f"a rank's Ray actor died before it started ({first_line(e)})") from None
        refs = {a.run.remote(j): r for r, (a, j) in enumerate(zip(actors, rank_jobs(job, places, gpu, cpu)))}
        outcomes = _wait(refs, actors, places, n)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)  # every rank process dies with its actor
    return _merge(cfg, outcomes, places, started, t0)


def _wait(refs: dict, actors: list, places: list[dict[str, Any]], n: int) -> list[dict[str, Any] | str]:
    """The N outcomes in rank order; stops the others GRACE_S after one ends badly; raises RankLost when
    an actor died without being stopped."""
    import ray
    from ray.exceptions import RayActorError

    outcomes: list[dict[str, Any] | str | None] = [None] * n
    culprit, stop_at, killed = None, None, set()
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
        for ref in ready:
            r = refs[ref]
            try:
                out = ray.get(ref)
            except RayActorError as e:
                if r in killed:
                    outcomes[r] = stopped(culprit)
                    continue
                for a in actors:
                    ray.kill(a, no_restart=True)
                raise RankLost(
                    f"rank {r} of {n} on {places[r]['host']}: its Ray actor died ({first_line(e)})"
                ) from None
            outcomes[r] = out.get("row", out.get("how"))
            bad = isinstance(outcomes[r], str) or outcomes[r].get("status") != "ok"
            if bad and culprit is None:
                culprit, stop_at = r, time.monotonic() + GRACE_S
        if stop_at is not None and pending and time.monotonic() > stop_at:
            for ref in pending:
                killed.add(refs[ref])
                ray.kill(actors[refs[ref]], no_restart=True)
            stop_at = None
    return outcomes


def _merge(cfg, outcomes: list, places: list[dict[str, Any]], started: str, t0: float) -> dict[str, Any]:
    from txlab.trial.row import Where, build_row
    from txlab.trial.sharded import merge_ranks

    first = next((o for o in outcomes if isinstance(o, dict)), {})
    where = Where(
        first.get("device"),
        first.get("device_capacity_bytes"),
        started_at=started,
        host=",".join(dict.fromkeys(p["host"] for p in places)),
        node_id=",".join(dict.fromkeys(p["node_id"] for p in places)),  # the ranks' nodes, rank 0's first
        **({"torch_version": first["torch_version"]} if first.get("torch_version") else {}),  # the ranks' torch
        threads=first.get("threads"),  # each rank's own
    )
    return build_row(cfg, where, merge_ranks(outcomes, where.device, cfg.workload), time.perf_counter() - t0)
