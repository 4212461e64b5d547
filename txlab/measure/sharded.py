"""A sharded trial (`parallel.fsdp` = N > 1) measured on this machine: N ranks, one process each
(`torch.distributed` over gloo on CPU, NCCL on CUDA, one GPU a rank), each running the training steps of
`txlab.measure.training` on its shard of the model (FSDP2) and its rows of the global batch.

The row: `peak_bytes` and its breakdown are the largest rank's (`peak_spread_bytes`: largest minus
smallest), `step_time_s` the slowest rank's, `tokens_per_s` the global batch's, `loss` the global batch's
(the mean of the ranks' equal shares, as a one-device trial computes it). An out-of-memory on any rank
is the trial's `oom`; a rank that dies is an `error` naming it; no rank is left running.
"""

from __future__ import annotations

import gc
import os
import time
from datetime import timedelta
from typing import Any

import torch

from txlab.config import ConfigError, TrialConfig
from txlab.measure.device import device_info, resolve_device
from txlab.measure.progress import log
from txlab.measure.row import base_row, failure_row
from txlab.measure.step import trial_batches
from txlab.measure.throughput import mfu
from txlab.measure.training import check_inputs, measure_training
from txlab.parallel.fsdp import Ranks, close_ranks
from txlab.parallel.launch import spawn_ranks

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank waits this long for a peer before its collective fails
MEMORY_COLUMNS = ("peak_bytes", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes",
                  "gathered_params_bytes", "comm_bytes", "tracked_peak_bytes", "reserved_bytes")  # fmt: skip


def rank_device(cfg: TrialConfig, rank: int) -> torch.device:
    device = resolve_device(cfg.measure.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def check_ranks(cfg: TrialConfig) -> torch.device:
    """Bad input before any work: more ranks than this machine has devices for."""
    n, device = cfg.parallel.fsdp, resolve_device(cfg.measure.device)
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(
            f"parallel.fsdp: {n} ranks need {n} GPUs on this machine, it has {torch.cuda.device_count()} "
            "(a sweep places ranks across a cluster; txlab estimate predicts any N)"
        )
    if device.type == "cpu" and n > (os.cpu_count() or 1) * 4:
        raise ConfigError(
            f"parallel.fsdp: {n} CPU ranks on {os.cpu_count()} cores; allowed here: up to {(os.cpu_count() or 1) * 4}"
        )
    return device


def _rank_main(
    rank: int, world: int, cfg: TrialConfig, progress: bool, local_rank: int | None = None, threads: int | None = None
) -> dict[str, Any]:
    """One rank: join the process group (MASTER_ADDR / MASTER_PORT from the environment), measure its
    share, return its row. `local_rank`: the index of its GPU on this machine (default: its rank);
    `threads`: CPU threads (default: this machine's cores shared by the `world` ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device = rank_device(cfg, rank if local_rank is None else local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the cores: one thread each, as many as fit
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    row = base_row(cfg)
    row["device"], row["device_capacity_bytes"] = device_info(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)  # fmt: skip
    try:
        ranks = Ranks(rank, world, init_device_mesh(device.type, (world,)))
        data = trial_batches(cfg, device, check_inputs(cfg), ranks)
        measure_training(cfg, device, row, progress and rank == 0, data, ranks)
    except Exception as e:  # noqa: BLE001 - the rank's failure is its row; the parent decides the trial's
        failure_row(row, e, progress)
    finally:
        gc.collect()
        close_ranks()
    return row


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


def merge_ranks(row: dict[str, Any], ranks: list[dict[str, Any] | str], cfg: TrialConfig) -> None:
    """The trial's row from its ranks' rows (see the module docstring)."""
    dead = [(r, how) for r, how in enumerate(ranks) if isinstance(how, str) and not how.startswith("stopped")]
    rows = [r for r in ranks if isinstance(r, dict)]
    failed = [(i, r) for i, r in enumerate(ranks) if isinstance(r, dict) and r["status"] != "ok"]
    if dead:
        r, how = dead[0]
        row.update(status="error", error=f"rank {r} of {len(ranks)} died ({how})")
        return
    for status in ("oom", "error", "over_budget"):
        hit = [(i, r) for i, r in failed if r["status"] == status]
        if hit:
            i, r = hit[0]
            row.update({k: r.get(k) for k in MEMORY_COLUMNS}, status=status, error=f"rank {i}: {r['error']}")
            return
    if len(rows) != len(ranks):
        row.update(status="error", error=f"ranks ended without a result: {[r for r in ranks if isinstance(r, str)]}")
        return
    top = max(rows, key=lambda r: r["peak_bytes"])
    row.update({k: top.get(k) for k in MEMORY_COLUMNS})
    row["peak_spread_bytes"] = top["peak_bytes"] - min(r["peak_bytes"] for r in rows)
    for k in ("n_params", "flops_per_token", "formula_activation_bytes", "loss", "bits_per_byte"):
        row[k] = rows[0].get(k)
    rss = [r["peak_rss_bytes"] for r in rows if r.get("peak_rss_bytes") is not None]
    row["peak_rss_bytes"] = max(rss) if rss else None
    w = cfg.workload
    row["step_time_s"] = max(r["step_time_s"] for r in rows)  # the ranks step together: the slowest sets the pace
    row["tokens_per_s"] = w.batch_size * w.seq_len / row["step_time_s"]
    if row["device"] != "cpu":
        per_device = mfu(row["flops_per_token"], row["tokens_per_s"] / len(rows), row["device"], w.dtype)
        row["mfu"] = per_device
    row["status"] = "ok"


def run_sharded(cfg: TrialConfig, progress: bool = False) -> dict[str, Any]:
    """Measure a `parallel.fsdp` = N trial with N local ranks; one row."""
    t0 = time.perf_counter()
    row = base_row(cfg)
    device = check_ranks(cfg)
    row["device"], row["device_capacity_bytes"] = device_info(rank_device(cfg, 0))
    check_inputs(cfg)
    n = cfg.parallel.fsdp
    log(progress, f"trial {row['trial_key']}: {cfg.model.size} x{cfg.model.n_layers}, policy {cfg.policy.name}, "
                  f"FSDP over {n} ranks ({device.type}), global batch {cfg.workload.batch_size}")  # fmt: skip
    ranks = spawn_ranks(_rank_main, n, (cfg, progress), bad=_stops_the_others)
    merge_ranks(row, ranks, cfg)
    row["duration_s"] = time.perf_counter() - t0
    return row
