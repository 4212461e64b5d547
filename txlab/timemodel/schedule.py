"""One step's timeline from the costed trace: compute on one stream, collectives on another, and where the two
wait for each other.

- Compute runs the traced operators in order.
- A collective starts when its link is free and it has been issued (each link, NVLink within a node or the
  network across nodes, carries one collective at a time; different links at once). FSDP2 issues a forward parameter
  all-gather while the block before still computes (the host runs ahead of the device by one all-gather);
  the backward's prefetching all-gathers are in the trace where FSDP2 issues them; a gradient reduce-scatter
  once its block's gradients exist; a tensor-parallel collective (on activations) where the computation
  reaches it.
- Compute waits for a collective at the first operator that reads its output (an all-gather's copy-out, a
  tensor-parallel collective's consumer), except FSDP2's gradient reduce-scatter, consumed on its own stream:
  the optimizer step waits for every collective.
- `overlap` (the profile's) is the share of a collective's time that may pass beside compute: 1 on a GPU (its
  own stream and copy engines), 0 on a CPU, whose cores do both.

Exposed communication is the step's time less its compute time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from txlab.timemodel.trace import Op


@dataclass(frozen=True)
class Timeline:
    step_s: float  # the step, compute and exposed communication
    compute_s: float  # every operator but the collectives, back to back
    comm_s: float  # every collective, back to back
    exposed_comm_s: float  # step_s - compute_s
    by_phase: dict[str, float] = field(default_factory=dict)  # compute seconds per phase
    by_class: dict[str, float] = field(default_factory=dict)  # seconds per operator class


def schedule(ops: list[Op], times: list[float], overlap: float = 1.0, links: list[str] | None = None) -> Timeline:
    """`links[i]`: the link collective i runs over (collectives on different links, such as tensor parallelism's
    NVLink and FSDP's network across nodes, run at once; on one link, in turn). None: one link for all."""
    clock = 0.0  # compute stream
    free: dict[str, float] = {}  # when each link is free
    ends: dict[int, float] = {}
    issued_at: float | None = None  # compute clock when the last forward all-gather was issued
    by_phase: dict[str, float] = {}
    by_class: dict[str, float] = {}
    in_optimizer = False
    for i, (op, t) in enumerate(zip(ops, times)):
        by_class[op.cls] = by_class.get(op.cls, 0.0) + t
        if op.phase == "optimizer" and not in_optimizer:
            in_optimizer = True
            clock = max([clock, *free.values()])  # the optimizer reads the reduced gradients
        if op.waits >= 0 and not ops[op.waits].background:
            clock = max(clock, ends.get(op.waits, 0.0))
        if op.cls != "collective":
            clock += t
            by_phase[op.phase] = by_phase.get(op.phase, 0.0) + t
            continue
        ready = clock
        if op.prefetch and op.phase == "forward":
            ready, issued_at = (issued_at if issued_at is not None else clock), clock
        name = links[i] if links is not None else ""
        start = max(ready, free.get(name, 0.0))
        free[name] = ends[i] = start + t
        hidden = overlap * t
        if hidden < t:  # the share that cannot run beside compute holds the compute stream too
            clock = max(clock, start) + (t - hidden)
    step = max([clock, *free.values()])
    compute = sum(t for op, t in zip(ops, times) if op.cls != "collective")
    comm = by_class.get("collective", 0.0)
    return Timeline(step, compute, comm, max(0.0, step - compute), by_phase, by_class)
