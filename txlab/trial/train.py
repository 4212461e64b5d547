"""The measured training stage, on one device or as one rank of a sharded trial: two steps under the
memory monitor (the first creates AdamW's state, the second is a steady-state step; the peak is over
both), then `warmup_steps` untimed steps, then `steps` timed steps (device synchronized around each; the
median is reported). It fills the trial's records; an exception it raises is the trial's outcome
(txlab.trial.pipeline.fail).

A `workload.compile` trial compiles in an untimed step before the memory steps, and that step is its first
warm-up step: so a compiled trial trains the same steps on the same batches as the eager one and their
losses compare (with `warmup_steps: 0` the compiling step is still taken: one step more than eager).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from txlab.data.loader import bits_per_byte
from txlab.measure.memory import RssWindow, measure_steps
from txlab.measure.records import Memory, Quality, Records, Routing, Timing
from txlab.measure.throughput import mfu
from txlab.model.moe import routing_stats
from txlab.parallel.fsdp import Ranks, mean_over_ranks
from txlab.runtime.device import device_info, sync
from txlab.runtime.progress import log
from txlab.trial.build import MEMORY_STEPS, TrialParts, build_trial, compile_step, training_facts
from txlab.trial.plan import planned
from txlab.trial.resolve import Setup


def _memory_steps(parts: TrialParts, setup: Setup, progress: bool, sharded: bool) -> Memory:
    """The two monitored steps (AdamW's state is created in the first): the peak and its breakdown."""
    batches = [parts.data.next() for _ in range(MEMORY_STEPS)]

    def after(i: int, loss) -> None:
        log(progress, f"  memory step {i + 1}/{MEMORY_STEPS}  loss {loss.item():.4f}")

    try:
        memory, _ = measure_steps(
            setup.device, parts.model, parts.optimizer, batches, parts.step, setup.budget_bytes, sharded=sharded,
            after_step=after,
        )  # fmt: skip
    finally:
        del batches
    return memory


def _timed_steps(parts: TrialParts, setup: Setup, progress: bool, warmup: int) -> tuple[list[float], float]:
    """`warmup` untimed steps, then `steps` timed ones (device synchronized): their times, last loss."""
    device = setup.device
    for i in range(warmup):
        parts.step(*parts.data.next())
        log(progress, f"  warm-up step {i + 1}/{warmup}")
    times = []
    for i in range(setup.workload.steps):
        x, y = parts.data.next()
        sync(device)
        t0 = time.perf_counter()
        loss = parts.step(x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
        log(progress, f"  timed step {i + 1}/{setup.workload.steps}  {times[-1]:.3f} s  loss {loss.item():.4f}")
    return times, float(loss.item())


def measured_routing(model, ranks: Ranks | None) -> Routing | None:
    """A mixture of experts' routing in the last forward (None for a dense model): the global batch's, its
    counts summed over the ranks FSDP shards over, which hold distinct tokens (every rank calls this: a
    collective; the ranks of a TP group hold the same tokens)."""
    import torch.distributed as dist

    group = ranks.dp_mesh.get_group() if ranks is not None and ranks.dp_mesh.size() > 1 else None
    reduce = (lambda t: dist.all_reduce(t, group=group)) if group is not None else None
    load, aux = routing_stats(model, reduce)
    return Routing("measured", load, aux) if load is not None else None


def measure_training(setup: Setup, rec: Records, progress: bool = False, ranks: Ranks | None = None) -> None:
    """Fill `rec` with the figures of the training steps (one rank's when `ranks` is given: its memory, its
    step time; the loss is the global batch's, averaged over the ranks)."""
    w, device = setup.workload, setup.device
    plan = planned(setup, progress)
    parts = build_trial(setup, plan=plan.runs if plan is not None else None, ranks=ranks)
    rec.facts = training_facts(setup, parts.model, plan)
    with RssWindow() as rss:
        # compiled: the compiling step first, so compilation is timed apart and stays out of the memory window
        first_s = compile_step(parts.step, parts.data, device) if w.compile else None
        rec.memory = _memory_steps(parts, setup, progress, sharded=ranks is not None and ranks.shards > 1)
        warmup = max(0, w.warmup_steps - 1) if w.compile else w.warmup_steps  # the compiling step was the first
        times, loss = _timed_steps(parts, setup, progress, warmup)
    if ranks is not None:
        loss = mean_over_ranks(loss, device)
    rec.routing = measured_routing(parts.model, ranks)
    rec.memory = dataclasses.replace(rec.memory, peak_rss_bytes=rss.peak if device.type == "cpu" else None)
    step_time_s = statistics.median(times)
    compile_s = max(0.0, first_s - step_time_s) if first_s is not None else None
    if compile_s is not None:
        log(progress, f"  compiled in {compile_s:.1f} s (first step {first_s:.1f} s)")
    tokens_per_s = w.batch_size * w.seq_len / step_time_s  # the global batch
    achieved = None
    if device.type == "cuda" and ranks is None:  # a sharded trial's MFU is per device, over the merged ranks
        achieved = mfu(rec.facts.flops_per_token, tokens_per_s, device_info(device)[0], w.dtype)
    rec.timing = Timing(step_time_s=step_time_s, tokens_per_s=tokens_per_s, compile_s=compile_s, mfu=achieved)
    nbytes = parts.data.last_bytes  # real text: the same batch's loss over the bytes its targets cover
    bpb = bits_per_byte(loss, w.batch_size * w.seq_len, nbytes) if nbytes is not None else None
    rec.quality = Quality(loss=loss, bits_per_byte=bpb)
