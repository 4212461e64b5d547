"""A sharded trial (`parallel.fsdp` x `parallel.tp` = N > 1 ranks) measured on this machine: N ranks, one
process each (`torch.distributed` over gloo on CPU, NCCL on CUDA, one GPU a rank), each running the training
stage of `txlab.trial.train` on its shard of the model (TP, then FSDP2) and its data-parallel rows of the
global batch, and returning its row; `merge_ranks` makes the trial's records of the N rows.

The trial's figures: `peak_bytes` and its breakdown are the largest rank's (`peak_spread_bytes`: largest
minus smallest), `step_time_s` the slowest rank's, `tokens_per_s` the global batch's, `loss` the global
batch's (the mean of the ranks' equal shares, as a one-device trial computes it). An out-of-memory on any
rank is the trial's `oom`; a rank that dies is an `error` naming it; no rank is left running.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from datetime import timedelta
from typing import Any

import torch

from txlab.config import ConfigError, TrialConfig, WorkloadConfig
from txlab.measure.records import Facts, Memory, Outcome, Quality, Records, Routing, Timing, from_row
from txlab.measure.throughput import mfu
from txlab.parallel.fsdp import close_ranks, make_ranks
from txlab.parallel.launch import spawn_ranks
from txlab.runtime.device import device_info
from txlab.trial.pipeline import pipeline
from txlab.trial.resolve import Setup, resolve
from txlab.trial.row import Where, build_row
from txlab.trial.train import measure_training

# How long a rank waits for a peer in one collective (or in joining the group) before it fails: the bound
# on a rank stuck behind a dead or hung peer when nothing else stops it (txlab.parallel.launch and
# txlab.sweeps.ranks stop the others seconds after a rank ends badly; this is the backstop if they cannot).
# In a healthy trial a collective waits only for the ranks' skew, not for a step: every rank does the same
# work between two collectives. The largest skew is at the start (N processes importing torch and building
# their shard on a loaded 2-core machine: tens of seconds) or a compiling step (minutes); 10 minutes is
# above both, and is NCCL's own default.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# What an unsuccessful rank's row tells of the trial's memory (the largest rank's, for a successful trial)
MEMORY_COLUMNS = ("peak_bytes", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes",
                  "gathered_params_bytes", "comm_bytes", "tracked_peak_bytes", "reserved_bytes")  # fmt: skip


def check_ranks(setup: Setup) -> None:
    """Bad input before any work: more ranks than this machine has devices for."""
    n, device, layout = setup.layout.world, setup.device, setup.layout
    key = " x ".join(f"parallel.{k}" for k in ("fsdp", "cp", "tp") if getattr(layout, k) > 1)
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(
            f"{key}: {n} ranks need {n} GPUs on this machine, it has {torch.cuda.device_count()} "
            "(a sweep places ranks across a cluster; txlab estimate predicts any N)"
        )
    if device.type == "cpu" and n > (os.cpu_count() or 1) * 4:
        raise ConfigError(
            f"{key}: {n} CPU ranks on {os.cpu_count()} cores; allowed here: up to {(os.cpu_count() or 1) * 4}"
        )


def _rank_main(
    rank: int, world: int, cfg: TrialConfig, progress: bool, local_rank: int | None = None, threads: int | None = None
) -> dict[str, Any]:
    """One rank: join the process group (MASTER_ADDR / MASTER_PORT from the environment), measure its
    share, return its row. `local_rank`: the index of its GPU on this machine (default: its rank);
    `threads`: CPU threads (default: this machine's cores shared by the `world` ranks)."""
    import torch.distributed as dist

    setup = resolve(cfg)
    if setup.device.type == "cuda":
        setup = setup.on(torch.device("cuda", rank if local_rank is None else local_rank))
        torch.cuda.set_device(setup.device)
    else:  # the ranks share the cores: one thread each, as many as fit
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    where = Where(*device_info(setup.device))
    dist.init_process_group("nccl" if setup.device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)  # fmt: skip

    def stage(setup: Setup, rec: Records, progress: bool) -> None:
        ranks = make_ranks(rank, setup.layout.fsdp, setup.layout.tp, setup.device.type, setup.layout.cp)
        for mesh in (ranks.mesh, ranks.dp_cp_mesh):  # the flattened fsdp x cp mesh has a group of its own
            if mesh is not None:
                bound_collectives(mesh, COLLECTIVE_TIMEOUT)
        measure_training(setup, rec, progress, ranks)

    try:
        return pipeline(cfg, setup, where, stage, progress=progress and rank == 0)
    finally:
        gc.collect()
        close_ranks()


def bound_collectives(mesh, timeout: timedelta) -> None:
    """Give every process group of `mesh` the world group's `timeout`: torch creates a mesh's sub-groups
    (the fsdp and tp dimensions of a 2-D mesh) with its backend default instead (30 minutes on gloo)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # no public setter for a mesh's groups

    for dim in range(mesh.ndim):
        _set_pg_timeout(timeout, mesh.get_group(dim))


def run_rank(
    cfg: TrialConfig,
    rank: int,
    world: int,
    master: tuple[str, int],
    local_rank: int | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One rank of a trial whose ranks were placed by someone else (a sweep on Ray: txlab.sweeps.ranks), in
    this process: rank 0 serves the process group's store at `master` (host, port). Returns the rank's
    row, which `merge_ranks` takes with the others'; stopping the other ranks is the caller's job."""
    os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank), WORLD_SIZE=str(world))
    return _rank_main(rank, world, cfg, progress, local_rank=local_rank, threads=threads)


def _stops_the_others(row: dict[str, Any]) -> bool:
    return row.get("status") != "ok"


def merge_ranks(ranks: list[dict[str, Any] | str], device: str | None, w: WorkloadConfig) -> Records:
    """The trial's records from its ranks' rows, or for a rank that left none how its process ended ("exit
    code 1", "stopped after rank 1 ended"); see the module docstring. `device`: the ranks' device name."""
    dead = [(r, how) for r, how in enumerate(ranks) if isinstance(how, str) and not how.startswith("stopped")]
    rows = [r for r in ranks if isinstance(r, dict)]
    measured = not any(r.get("measured") is False for r in rows)  # a rank's precheck: not run
    if dead:
        r, how = dead[0]
        return Records(outcome=Outcome("error", f"rank {r} of {len(ranks)} died ({how})", measured))
    failed = [(i, r) for i, r in enumerate(ranks) if isinstance(r, dict) and r["status"] != "ok"]
    for status in ("oom", "error", "over_budget"):
        hit = [(i, r) for i, r in failed if r["status"] == status]
        if hit:
            i, r = hit[0]
            memory = Memory(**{k: r.get(k) for k in MEMORY_COLUMNS})
            return Records(memory=memory, outcome=Outcome(status, f"rank {i}: {r['error']}", measured))
    if len(rows) != len(ranks):
        stopped = [r for r in ranks if isinstance(r, str)]
        return Records(outcome=Outcome("error", f"ranks ended without a result: {stopped}", measured))
    top, first = max(rows, key=lambda r: r["peak_bytes"]), rows[0]
    rss = [r["peak_rss_bytes"] for r in rows if r.get("peak_rss_bytes") is not None]
    memory = Memory(
        **{k: top.get(k) for k in MEMORY_COLUMNS},
        peak_spread_bytes=top["peak_bytes"] - min(r["peak_bytes"] for r in rows),
        peak_rss_bytes=max(rss) if rss else None,
    )
    facts = Facts(
        first.get("n_params"),
        first.get("flops_per_token"),
        first.get("formula_activation_bytes"),
        n_active_params=first.get("n_active_params"),
    )
    step_time_s = max(r["step_time_s"] for r in rows)  # the ranks step together: the slowest sets the pace
    tokens_per_s = w.batch_size * w.seq_len / step_time_s
    per_device = None
    if device != "cpu":
        per_device = mfu(facts.flops_per_token, tokens_per_s / len(rows), device, w.dtype)
    return Records(
        memory=memory,
        facts=facts,
        timing=Timing(step_time_s=step_time_s, tokens_per_s=tokens_per_s, mfu=per_device),
        quality=Quality(loss=first.get("loss"), bits_per_byte=first.get("bits_per_byte")),
        routing=from_row(Routing, first) if first.get("routing") is not None else None,  # the global batch's
        outcome=Outcome("ok", None, measured),
    )


def run_sharded(cfg: TrialConfig, setup: Setup, where: Where, progress: bool = False) -> dict[str, Any]:
    """A sharded trial measured here: its N ranks as N local processes (each runs the trial's pipeline on
    its share and returns its row), merged into the trial's row."""
    check_ranks(setup)
    t0 = time.perf_counter()
    ranks = spawn_ranks(_rank_main, setup.layout.world, (cfg, progress), bad=_stops_the_others)
    threads = next((r.get("threads") for r in ranks if isinstance(r, dict)), None)  # each rank's own
    where = dataclasses.replace(where, threads=threads)
    return build_row(cfg, where, merge_ranks(ranks, where.device, setup.workload), time.perf_counter() - t0)
