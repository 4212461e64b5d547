"""`txlab calibrate`: measure this machine's device and write the `local` hardware profile the time model reads
(`measure.hardware: local`; a measured row's prediction when no profile is named).

What is measured, for each thread count a trial's ranks may compute with on a CPU (all cores: one rank; one
core: a rank of a trial sharded over the cores), in each dtype (fp32, bf16):
- matmul FLOP/s at GEMM shapes like a transformer's (activations x weights, and the backward's two products);
- fused attention (SDPA, causal) FLOP/s forward and backward at several sequence lengths;
- bytes/s of memory-bound operators by family (elementwise, transcendental, gelu_tanh, norm, reduce, gather), on
  tensors small enough to reuse memory, and the first-touch rate of new pages (CPU: outputs from 32 MiB are new pages);
- the fixed time of one small operator;
- with two or more ranks possible (cores or GPUs), the collectives the trial runs (all-gather, reduce-scatter,
  all-reduce) between two ranks, as latency and bytes/s on the wire (gloo on a CPU, NCCL on GPUs).

The profile is written whole or not at all (temporary file and rename). docs/time_model.md, "Calibration".
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# GEMM shapes (M, N, K): a transformer's activations x weights at d = 768 and 3072 (the MLP), the backward's
# weight gradients (K = tokens) and a few squares and skinny ones around them.
MATMUL_SHAPES = [
    (1024, 768, 768), (2048, 768, 768), (2048, 2304, 768), (2048, 3072, 768), (2048, 768, 3072),
    (768, 768, 2048), (768, 3072, 2048), (3072, 768, 2048), (4096, 768, 768), (512, 512, 512),
    (256, 256, 256), (64, 768, 768), (1024, 8192, 768), (4096, 4096, 1024),
]  # fmt: skip
QUICK_MATMUL = [(256, 256, 256), (512, 768, 768), (768, 768, 512)]
ATTENTION_T = [256, 1024, 2048]
QUICK_ATTENTION_T = [128, 256]
MEMORY_NUMEL = 4 * 2**20  # 16 MiB fp32 tensors: below glibc's mmap threshold (memory is reused, as in a trial)
FRESH_NUMEL = 32 * 2**20  # 128 MiB fp32 outputs: new pages each time
COLLECTIVE_BYTES = [2**22, 2**25, 2**27]
QUICK_COLLECTIVE_BYTES = [2**16, 2**20]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """The clock a measurement reads: on a CPU computing with one thread, that thread's CPU time, so a core
    shared with other processes does not slow the figures (the profile describes the machine, not its load at
    the time; docs/time_model.md); else the wall clock (several threads, a GPU)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def timed(fn: Callable[[], Any], device: torch.device, min_s: float = 0.15, max_reps: int = 50) -> float:
    """Median seconds of `fn` after one warm-up call, repeated until `min_s` has passed (at least 3 times)."""
    now = clock(device)
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_s and len(times) < max_reps):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return statistics.median(times)


def _matmul_rate(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)  # x @ W^T, as a linear layer computes it
    return round(2 * m * n * k / timed(lambda: a @ b.t(), device) / 1e9, 3)


def measure_matmul(device: torch.device, dtype: torch.dtype, shapes) -> list[list[float]]:
    """[M, N, K, GFLOP/s] per shape."""
    return [[m, n, k, _matmul_rate(device, dtype, m, n, k)] for m, n, k in shapes]


def _attention_rates(device: torch.device, dtype: torch.dtype, t: int, heads: int, d: int) -> list[float]:
    from txlab.timemodel.trace import causal_share

    # (B, T, H, D) viewed as (B, H, T, D), as the model's projections give q, k and v to the kernel
    q, k, v = (torch.randn(1, t, heads, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flops = 4.0 * heads * t * t * d * causal_share(t, t)

    def forward():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

    fwd = timed(forward, device)
    grad = torch.randn_like(forward())

    def both():
        torch.autograd.grad(forward(), (q, k, v), grad)

    bwd = max(timed(both, device) - fwd, fwd * 0.5)
    return [t, round(flops / fwd / 1e9, 3), round(2.5 * flops / bwd / 1e9, 3)]


def measure_attention(device: torch.device, dtype: torch.dtype, lengths, heads: int = 12, d: int = 64):
    """[T, forward GFLOP/s, backward GFLOP/s] per sequence length (FLOPs as the trace counts them)."""
    return [_attention_rates(device, dtype, t, heads, d) for t in lengths]


def measure_memory(device: torch.device, numel: int) -> dict[str, float]:
    """Bytes/s of each memory-bound family, bytes counted as the trace counts them (read + written)."""
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)
    nb = numel * 4
    rows, cols = 1024, numel // 1024
    x = a.view(rows, cols)
    w, bias = torch.ones(cols, device=device), torch.zeros(cols, device=device)
    ln = torch.ops.aten.native_layer_norm(x, [cols], w, bias, 1e-5)
    table = torch.randn(8192, 1024, device=device)
    idx = torch.randint(0, 8192, (numel // 1024,), device=device)
    rates = {
        "elementwise": statistics.median(
            [3 * nb / timed(lambda: a + b, device), 3 * nb / timed(lambda: a.mul_(1.0), device)]
        ),
        "transcendental": statistics.median(
            [
                2 * nb / timed(lambda: F.gelu(a), device),
                2 * nb / timed(lambda: torch.log_softmax(x, -1), device),
                3 * nb / timed(lambda: torch.ops.aten.gelu_backward(a, b), device),
            ]
        ),  # fmt: skip
        "gelu_tanh": statistics.median(  # trace.TANH_GELU
            [
                2 * nb / timed(lambda: F.gelu(a, approximate="tanh"), device),
                3 * nb / timed(lambda: torch.ops.aten.gelu_backward(a, b, approximate="tanh"), device),
            ]
        ),
        "norm": statistics.median(
            [
                2 * nb / timed(lambda: torch.ops.aten.native_layer_norm(x, [cols], w, bias, 1e-5), device),
                4
                * nb
                / timed(
                    lambda: torch.ops.aten.native_layer_norm_backward(
                        x, x, [cols], ln[1], ln[2], w, bias, [True, True, True]
                    ),
                    device,
                ),
            ]
        ),  # fmt: skip
        "reduce": nb / timed(lambda: x.sum(0), device),
        "gather": 2 * idx.numel() * 1024 * 4 / timed(lambda: F.embedding(idx, table), device),
    }
    return {k: round(v / 1e9, 3) for k, v in rates.items()}


def measure_dram(device: torch.device, numel: int) -> float:
    """GB/s of in-place elementwise operators on tensors far larger than the caches (`mul_`, `add_`: no new
    pages), bytes counted as the trace counts them."""
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)
    nb = numel * 4
    return round(
        statistics.median([2 * nb / timed(lambda: a.mul_(1.0), device), 3 * nb / timed(lambda: a.add_(b), device)])
        / 1e9,
        3,
    )


def measure_fresh(device: torch.device, numel: int, dram_gbps: float) -> float:
    """GB/s at which new pages are first written (an output from 32 MiB on a CPU): the time of `a + b` beyond
    its bytes at the large-tensor rate. On a GPU (a caching allocator) there is no such cost: 0 is written."""
    if device.type == "cuda":
        return 0.0
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)
    nb = numel * 4
    t = timed(lambda: a + b, device, min_s=0.3)
    extra = t - 3 * nb / (dram_gbps * 1e9)
    return round(nb / max(extra, 1e-9) / 1e9, 3) if extra > 0 else 0.0


def measure_overhead(device: torch.device) -> float:
    a = torch.ones(8, device=device)
    n = 200

    def many():
        for _ in range(n):
            a.add(a)

    return round(timed(many, device) / n * 1e6, 3)


def _collective_rank(rank: int, world: int, sizes: list[int], threads: int, backend: str) -> dict[str, Any]:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 renames the *_tensor collectives
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    out: dict[str, list[list[float]]] = {"all_gather": [], "reduce_scatter": [], "all_reduce": []}
    try:
        for size in sizes:
            n = size // 4 // world * world
            full, shard = torch.randn(n, device=device), torch.randn(n // world, device=device)
            wire = n * 4 * (world - 1) / world
            calls = {
                "all_gather": (partial(dist.all_gather_into_tensor, full, shard), wire),
                "reduce_scatter": (partial(dist.reduce_scatter_tensor, shard, full), wire),
                "all_reduce": (partial(dist.all_reduce, full), 2 * wire),
            }
            for name, (fn, on_wire) in calls.items():
                dist.barrier()
                out[name].append([on_wire, _timed_together(fn, device)])
    finally:
        dist.destroy_process_group()
    return out


def _timed_together(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    """Median seconds of a collective: the same number of calls on every rank (a rank timing until its own
    clock says enough would wait forever for the others). On a CPU, the process's CPU time (its threads'
    and gloo's, copying and sending; not the waiting for a peer that another process held off the core)."""
    now = time.process_time if device.type == "cpu" else time.perf_counter
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return statistics.median(times)


def fit_collective(points: list[list[float]]) -> list[float]:
    """[latency in µs, GB/s] of `t = latency + bytes / rate` fitted to [wire bytes, seconds] points."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else my / mx
    if slope <= 0:
        slope = max(ys) / max(xs)
    latency = max(0.0, my - slope * mx)
    return [round(latency * 1e6, 3), round(1 / slope / 1e9, 4)]


def measure_collectives(device: torch.device, sizes: list[int], threads: int) -> dict[str, list[float]] | None:
    """Two ranks' collectives on this machine (None when it cannot hold two ranks)."""
    from txlab.parallel.launch import spawn_ranks

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return None
    results = spawn_ranks(_collective_rank, 2, (sizes, threads, backend))
    first = results[0]
    if not isinstance(first, dict):
        raise RuntimeError(f"collective ranks failed: {results}")
    slowest = {k: [[x, max(r[k][i][1] for r in results if isinstance(r, dict))] for i, (x, _) in enumerate(v)]
               for k, v in first.items()}  # fmt: skip
    return {k: fit_collective(v) for k, v in slowest.items()}


def thread_counts(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [torch.get_num_threads()]
    cores = os.cpu_count() or 1
    return sorted({1, cores})


def calibrate(device_name: str = "auto", quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure this machine's device; returns the profile's mapping (txlab.hardware.profile's fields)."""
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else (
        "cpu" if device_name == "auto" else device_name))  # fmt: skip
    before = torch.get_num_threads()
    tables = []
    try:
        for threads in thread_counts(device):
            torch.set_num_threads(threads)
            log(f"  {threads} thread(s): matmul, attention, memory-bound operators, overhead")
            table: dict[str, Any] = {"threads": threads, "matmul": {}, "attention": {}}
            for name, dtype in DTYPES.items():
                table["matmul"][name] = measure_matmul(device, dtype, QUICK_MATMUL if quick else MATMUL_SHAPES)
                table["attention"][name] = measure_attention(device, dtype, QUICK_ATTENTION_T if quick else ATTENTION_T)
            numel = MEMORY_NUMEL // (16 if quick else 1)
            table["memory_gbps"] = measure_memory(device, numel)
            large = FRESH_NUMEL // (8 if quick else 1)
            table["dram_gbps"] = measure_dram(device, large)
            table["fresh_gbps"] = measure_fresh(device, large, table["dram_gbps"])
            table["op_overhead_us"] = measure_overhead(device)
            if device.type == "cuda" or threads * 2 <= max(2, os.cpu_count() or 1):  # two ranks of `threads` fit
                log(f"  {threads} thread(s): collectives between two ranks")
                table["collectives"] = measure_collectives(
                    device, QUICK_COLLECTIVE_BYTES if quick else COLLECTIVE_BYTES, threads
                )
            tables.append(table)
    finally:
        torch.set_num_threads(before)
    return profile_mapping(device, tables)


def profile_mapping(device: torch.device, tables: list[dict[str, Any]]) -> dict[str, Any]:
    """The profile's fields around the measured tables: peaks are the best measured matmul rates (a CPU) or the
    catalogue's for a GPU it knows; memory and links as measured."""
    from txlab.hardware import by_device_name
    from txlab.runtime.device import device_info

    name, capacity = device_info(device)
    best = max(tables, key=lambda t: t["threads"])
    peaks = {d: round(max(r[3] for r in rows) / 1e3, 4) for d, rows in best["matmul"].items()}
    known = by_device_name(name) if device.type == "cuda" else None
    if known is not None:
        peaks = {d: v / 1e12 for d, v in known.peak_flops.items()}
    coll = next((t["collectives"] for t in tables if t.get("collectives")), None)
    link = coll["all_gather"][1] if coll else best["memory_gbps"]["elementwise"]
    return {
        "name": "local",
        "kind": device.type,
        "device_name": name,
        "peak_tflops": peaks,
        "memory_gb": round(capacity / 1e9, 3),
        "memory_bandwidth_gbps": best["dram_gbps"],
        "link_gbps": link,
        "devices_per_node": (os.cpu_count() or 1) if device.type == "cpu" else max(1, torch.cuda.device_count()),
        "network_gbps": link,
        "source": f"txlab calibrate on {name}, torch {torch.__version__}",
        "calibrated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "measured": tables,
    }


def write_profile(mapping: dict[str, Any], path: Path) -> Path:
    """Write the profile whole or not at all; it is checked by reading it back as a profile first."""
    import yaml

    from txlab.hardware.profile import from_mapping

    from_mapping(mapping, f"profile {path}")  # a profile that would not load is not written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None, width=120))
    os.replace(tmp, path)
    return path


def summary(mapping: dict[str, Any]) -> list[str]:
    lines = []
    for t in mapping["measured"]:
        mm = ", ".join(f"{d} {max(r[3] for r in rows):.0f}" for d, rows in t["matmul"].items())
        att = ", ".join(
            f"{d} {max(r[1] for r in rows):.0f}/{max(r[2] for r in rows):.0f}" for d, rows in t["attention"].items()
        )
        mem = ", ".join(f"{k} {v:.1f}" for k, v in t["memory_gbps"].items())
        lines.append(f"{t['threads']} thread(s): matmul GFLOP/s (best) {mm}; attention fwd/bwd {att}")
        lines.append(
            f"  memory-bound GB/s: {mem}; new pages {t['fresh_gbps']:.1f} GB/s; {t['op_overhead_us']:.1f} µs per operator"
        )
        if t.get("collectives"):
            c = ", ".join(f"{k} {v[1]:.2f} GB/s + {v[0]:.0f} µs" for k, v in t["collectives"].items())
            lines.append(f"  two ranks: {c}")
    return lines
