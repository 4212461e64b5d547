"""A step of many micro-steps estimated from 2, 3 and 4 of them, exact: gradient accumulation repeats one
micro-step (the same shapes, the accumulated gradients alive from the first backward on), so the step at k
micro-steps is the step at 2 with k - 2 more copies of one micro-step's operators.

Why. A step of k micro-steps runs micro-step 1 (no gradients yet), then k - 1 identical micro-steps (each adds
into the same gradients; FSDP reduce-scatters each into the same sharded ones), then the optimizer. Its live
memory over micro-steps 2..k repeats but for the step's input tokens (all micro-batches of them, live through
the step), so the peak and each figure of its breakdown lie on the line through 2, 3 and 4 (checked) out to k; its
operator trace at k is the trace at 2 with a window of the trace repeated (k - 2) times: the window is what the run
at 3 adds to the run at 2, and the run at 4 must be the run at 2 with that window twice, op for op
(collective waits compared as offsets), else the step runs in full. Each run keeps the trial's micro-batch
(`workload.batch_size` scaled with the micro-steps), so every tensor has its real shape; a deep model's runs are
themselves extrapolated over depth (txlab.trial.extrapolate).

Below `ACCUM_FROM` micro-steps (2 + 3 + 4 would cost more than k) or with `TXLAB_ESTIMATE_FULL=1`, the step runs in
full. This makes an advise search's leanest corners (hundreds of micro-steps on few devices) cost what 9 do.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from txlab.measure.records import Memory
from txlab.timemodel.trace import Op
from txlab.trial.extrapolate import FULL_ENV, step_memory
from txlab.trial.resolve import Setup

ACCUM_FROM = 10  # micro-steps: fewer run in full
RUNS = (2, 3, 4)


def accumulated_step_memory(
    setup: Setup, plan: list[tuple[int, int, str]] | None = None, trace: bool = False, full: bool | None = None
) -> tuple[Memory, torch.nn.Module, list[Op] | None]:
    """`step_memory` (txlab.trial.extrapolate) for any number of micro-steps: from 2, 3 and 4 of them when there are
    many (module docstring). `full`: True runs every micro-step (and every block), False extrapolates whatever the
    count (tests), None: the environment and the count decide."""
    k = setup.workload.grad_accum
    whole = full if full is not None else os.environ.get(FULL_ENV, "") not in ("", "0") or k < ACCUM_FROM
    if whole or k <= max(RUNS):  # every micro-step run; the depth as `full` says (None: the depth decides)
        return step_memory(setup, plan, trace=trace, full=full)
    runs = {a: step_memory(with_micro_steps(setup, a), plan, trace=trace) for a in RUNS}
    memory = _line([runs[a][0] for a in RUNS], k)
    ops = _repeated([runs[a][2] for a in RUNS], k) if trace else None
    if memory is None or (trace and ops is None):
        return step_memory(setup, plan, trace=trace)  # not periodic as assumed: the whole step
    return memory, runs[2][1], ops


def with_micro_steps(setup: Setup, a: int) -> Setup:
    """The trial with `a` micro-steps of the same micro-batch (the global batch scaled with them)."""
    w = setup.workload
    micro_rows = w.batch_size // w.grad_accum
    return dataclasses.replace(setup, workload=dataclasses.replace(w, grad_accum=a, batch_size=micro_rows * a))


def _line(mems: list[Memory], k: int) -> Memory | None:
    """Each figure at k micro-steps along the line through 2 and 3, which must pass through 4 (the step's tokens,
    all micro-batches of them, are live through the step: every op's live bytes grow by one micro-batch's input per
    micro-step, so the peak stays at the same op); None when one does not."""
    out = {}
    for f in dataclasses.fields(Memory):
        v2, v3, v4 = (getattr(m, f.name) for m in mems)
        if v2 is None or v3 is None or v4 is None:
            if any(v is not None for v in (v2, v3, v4)):
                return None
            out[f.name] = None
        elif v4 - v3 != v3 - v2:
            return None
        else:
            out[f.name] = v2 + (k - 2) * (v3 - v2)
    return Memory(**out)


def _flip_waits(ops: list[Op]) -> list[Op]:
    """`waits` between an index and the distance back to the awaited collective (i - w both ways: its own inverse).
    As distances the trace is position-free, so copies of a window compare equal and can be repeated."""
    return [dataclasses.replace(o, waits=i - o.waits) if o.waits >= 0 else o for i, o in enumerate(ops)]


def _repeated(traces: list[list[Op] | None], k: int) -> list[Op] | None:
    """The trace at k micro-steps from those at 2, 3, 4: the window the run at 3 adds, repeated; None when the run
    at 4 is not the run at 2 with the window twice."""
    if any(t is None for t in traces):
        return None
    o2, o3, o4 = (_flip_waits(t) for t in traces)
    n = len(o3) - len(o2)
    if n <= 0 or len(o4) - len(o3) != n:
        return None
    s = 0  # the window is inserted where the runs at 2 and 3 first differ
    while s < len(o2) and o2[s] == o3[s]:
        s += 1
    window = o3[s : s + n]
    if o3 != o2[:s] + window + o2[s:] or o4 != o2[:s] + window * 2 + o2[s:]:
        return None
    return _flip_waits(o2[:s] + window * (k - 2) + o2[s:])
