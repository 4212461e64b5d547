"""A deep model's estimate from a few depths, exact: the fake step (txlab.trial.fake) of the model cut to a few
copies of its repeating blocks, and the step at full depth extrapolated from them, live bytes and operator trace.

Why it is exact. After the policy wraps them, a decoder's units (`model.blocks`: a block, or a recomputed run of
blocks) repeat: a prefix P, a period R of units repeated n times, a suffix Q (DeepSeek-V3: 3 dense blocks, then 58
MoE ones; Qwen's sparse step or `remat: every` k: a period of 2 or k; planned: its per-unit plan). A step runs
the same ops on every copy of R, so every op's live bytes (by tracker category) and every traced op's work is an
affine function of the number of copies m, and inside one step, of the copy's index c (activations kept by the
copies before it, gradients made by those after it). The step at m copies is run at m = 3, 4, 5; each op is
named by where it runs (phase, unit: P's, Q's, the first two and last two copies of R, or a middle one with its
index) and its ordinal there (at 3 copies, copy 1 is copy 1 from either end); the timeline at m copies is that of 5
with its middle copies replaced by m - 4 copies interpolated between copies 1 and m - 2, every other op extrapolated
along the line through its values at 4 and 5.

Proved, not assumed: the same construction from the runs at 3 and 4 must give the run at 5 op for op, every
tracker category to the byte and every traced op field, else the estimate is the full run. The peak is then the
first op of the extrapolated timeline whose live total is largest, as the tracker finds it: any phase (forward
end, backward, optimizer step) wins as it would at full depth, since every op is a candidate.

Where it does not apply (the full run is used): fewer than `EXTRAPOLATE_FROM` blocks, no repeating period with
at least 6 copies (sqrt recomputation's segments of unequal length, a planned plan without a period), a model
at 3-5 copies whose units are not P + R^m + Q of the trial's, or the check above failing. `TXLAB_ESTIMATE_FULL=1`
forces the full run (tests compare the two).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from txlab.measure.memory import mem_tracker_cls, memory_at
from txlab.measure.records import Memory
from txlab.model.gpt import GPT
from txlab.policy.apply import apply_policy
from txlab.policy.remat import Recomputed
from txlab.timemodel.trace import Op, Recorder, record_step
from txlab.trial.fake import fake_step_memory
from txlab.trial.resolve import Setup

EXTRAPOLATE_FROM = 24  # blocks: shallower models run in full (the three cut runs would cover most of them)
# copies of the period run: two at each end (at 3, the middle copy is copy 1 from either end), then middle ones
COPIES = (3, 4, 5)
EDGE = 2  # copies at each end named on their own (a unit's neighbours differ there: FSDP's prefetch)
MAX_PERIOD, MAX_END = 8, 8  # units searched for the period, the prefix and the suffix
FULL_ENV = "TXLAB_ESTIMATE_FULL"

Runs = list[tuple[int, int, str]]


def step_memory(
    setup: Setup, plan: Runs | None = None, trace: bool = False, steady: bool = True, full: bool | None = None
) -> tuple[Memory, torch.nn.Module, list[Op] | None]:
    """The fake step's memory, its model (for parameter counts) and, with `trace`, its operators: extrapolated from
    a few depths when the model is deep and repeats (see the module), else one run of every block. `full`: True
    forces the full run, False the extrapolation wherever it applies whatever the depth (tests); None: the
    environment (TXLAB_ESTIMATE_FULL=1) and the depth decide."""
    if full is None:
        full = os.environ.get(FULL_ENV, "") not in ("", "0") or setup.model.n_layers < EXTRAPOLATE_FROM
    if not full:
        result = extrapolated(setup, plan, trace, steady)
        if result is not None:
            return result
    ops: list[Op] = []
    memory, model = fake_step_memory(setup, plan, steady, wrap_step=tracing(ops) if trace else None)
    return memory, model, ops if trace else None


def tracing(ops: list[Op], recorder: Callable[[], Recorder] = Recorder) -> Callable:
    """A `wrap_step` for fake_step_memory that records the step's operators into `ops` (the time model's trace)."""

    def wrap(step, optimizer):
        def traced(x, y):
            loss = None

            def run(x, y):
                nonlocal loss
                loss = step(x, y)

            ops.extend(record_step(run, optimizer, x, y, recorder=recorder()))
            return loss

        return traced

    return wrap


# --- the model's units and their period -------------------------------------------------------------------


def _units(setup: Setup, n_layers: int, plan: Runs | None) -> tuple[GPT, list[Hashable], list[int]]:
    """The model at `n_layers` on the meta device with the policy applied: the model, each unit's signature (its
    wrapper and mode, each block's parameter names and shapes: what Block(cfg, layer) varies by layer) and each
    unit's number of blocks."""
    m = dataclasses.replace(setup.model, n_layers=n_layers)
    with torch.device("meta"):
        model = GPT(m, setup.workload.seq_len)
    apply_policy(model, setup.policy, plan)
    sigs, sizes = [], []
    for unit in model.blocks:
        blocks = list(unit.inner) if isinstance(unit, Recomputed) else [unit]
        mode = ("selective" if unit.selective else "full", unit.save) if isinstance(unit, Recomputed) else "keep"
        shapes = tuple(tuple((n, tuple(p.shape)) for n, p in b.named_parameters()) for b in blocks)
        sigs.append((mode, shapes))
        sizes.append(len(blocks))
    return model, sigs, sizes


@dataclass(frozen=True)
class Cut:
    """The model's units as P + R^n + Q, counted in units (a, p, b) and blocks, and the plan of each cut depth."""

    a: int  # units of the prefix
    p: int  # units of the period
    b: int  # units of the suffix
    layers: tuple[int, int, int]  # blocks of P, R, Q
    plans: dict[int, Runs | None]  # copies -> the plan of the cut model (planned), None otherwise

    def n_layers(self, m: int) -> int:
        return self.layers[0] + m * self.layers[1] + self.layers[2]


def find_cut(setup: Setup, plan: Runs | None) -> tuple[Cut, int, GPT] | None:
    """The cheapest P + R^n + Q decomposition of the trial's units with n > max(COPIES) whose cut models (COPIES
    copies of R) are built with exactly those units; with n and the full model (meta). None: none."""
    model, sigs, sizes = _units(setup, setup.model.n_layers, plan)
    found = []
    for p in range(1, MAX_PERIOD + 1):
        for a in range(MAX_END + 1):
            period = sigs[a : a + p]
            if len(period) < p:
                break
            n = 1
            while sigs[a + n * p : a + (n + 1) * p] == period:
                n += 1
            b = len(sigs) - a - n * p
            if n > max(COPIES) and b <= MAX_END:
                layers = (sum(sizes[:a]), sum(sizes[a : a + p]), sum(sizes[a + n * p :]))
                found.append((3 * (layers[0] + layers[2]) + sum(COPIES) * layers[1], a, p, b, n, layers))
    for _, a, p, b, n, layers in sorted(found):
        plans = {}
        for m in COPIES:
            want = sigs[:a] + sigs[a : a + p] * m + sigs[len(sigs) - b :]
            sizes_m = sizes[:a] + sizes[a : a + p] * m + sizes[len(sizes) - b :]
            cut_plan = _cut_plan(plan, want, sizes_m) if plan is not None else None
            _, got, _ = _units(setup, layers[0] + m * layers[1] + layers[2], cut_plan)
            if got != want:
                break
            plans[m] = cut_plan
        else:
            return Cut(a, p, b, layers, plans), n, model
    return None


def _cut_plan(plan: Runs, sigs: list, sizes: list[int]) -> Runs:
    """The planned runs that build these units: a recomputed unit one run, a kept block a run of one."""
    runs, start = [], 0
    for (mode, _), size in zip(sigs, sizes):
        runs.append((start, start + size, mode if mode == "keep" else mode[0]))
        start += size
    return runs


# --- where each op runs -------------------------------------------------------------------------------------

UNIT = re.compile(r"\.blocks\.(\d+)(?:\.|$)")


def _storage(t: torch.Tensor):
    local = getattr(t, "_local_tensor", None)  # a DTensor: the shard this rank holds
    t = local if isinstance(local, torch.Tensor) else t
    return t.untyped_storage()._cdata


def _leaves(args) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]


class Places:
    """Names each op of a step by where it runs: (phase, inside a unit or after it, the unit's name) and, in a
    middle copy of R, the copy's index apart. A phase is a stretch of forward or of backward (autograd running);
    a unit is named by the module tracker's parents (`...blocks.<i>`)."""

    def __init__(self, cut: Cut, m: int):
        self.cut, self.m = cut, m
        self.units = cut.a + m * cut.p + cut.b
        self.phase, self.bw, self.last = 0, False, None
        self.owners: dict | None = None
        self.current: list[int] = []
        self.active: set[int] = set()
        self.where: tuple[Hashable, int | None] = ((0, False, None), None)
        self.memory: list[tuple[tuple, int | None, dict]] = []

    def name(self, u: int) -> tuple[tuple, int | None]:
        a, p = self.cut.a, self.cut.p
        if u < a:
            return ("P", u), None
        if u >= a + self.m * p:
            return ("Q", self.units - 1 - u), None
        c, r = divmod(u - a, p)
        if c < EDGE:
            return ("s", r, c), None
        if self.m - 1 - c < EDGE:
            return ("e", r, self.m - 1 - c), None
        return ("mid", r), c

    def on_op(self, tracker) -> None:
        mods = tracker._mod_tracker
        bw = mods.is_bw
        if bw != self.bw:
            self.phase, self.bw, self.last, self.owners, self.current = self.phase + 1, bw, None, None, []
        if tracker._in_opt:  # the optimizer's step: an op belongs to the unit whose parameter it reads
            units = self._owner(tracker)
        else:  # the unit entered last (in backward the tracker's parents keep units whose backward ended)
            active = {int(hit.group(1)) for name in mods.parents if (hit := UNIT.search(name))}
            added = active - self.active
            if added:
                self.current = sorted(added)
            elif not set(self.current) <= active:
                self.current = []  # between units
            self.active = active
            units = self.current
        inside = bool(units)
        if inside:
            if self.last and abs(units[0] - self.last[0]) > 1:  # a new pass over the units (the next group's)
                self.phase += 1
            self.last = units
        copy = None
        names = []
        for u in self.last or ():
            name, c = self.name(u)
            if c is not None:  # a middle copy: named by its copy apart (several units: the first's)
                copy = c if copy is None else copy
                name = (*name, c - copy)
            names.append(name)
        self.where = ((self.phase, inside, tuple(names)), copy)
        snap = next((s for d, s in tracker._curr_mem_snap.items() if d.type == "cpu"), {})
        self.memory.append((*self.where, {k: v for k, v in snap.items() if v}))

    def _owner(self, tracker) -> list[int]:
        """The unit whose parameter (or its gradient or state: the optimizer's step steps one parameter after
        another) the op reads; [] for a parameter of no unit; the last owner for an op on temporaries."""
        if self.owners is None:  # storages of each parameter, its gradient and state: their unit (None: no unit's)
            unit_of = {}
            for module, name in list(tracker._mod_tracker._known_modules.items()):
                hit = UNIT.search(name)
                if hit is not None and hit.end() == len(name):
                    unit_of.update({id(p): int(hit.group(1)) for p in module.parameters()})
            self.owners = {}
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    for t in (p, p.grad, *self.optimizer.state.get(p, {}).values()):
                        if isinstance(t, torch.Tensor):
                            self.owners[_storage(t)] = unit_of.get(id(p))
        for t in _leaves(getattr(tracker, "op_args", ())):
            key = _storage(t)
            if key in self.owners:
                self.current = [] if self.owners[key] is None else [self.owners[key]]
                break
        return self.current

    def wrap(self, trace: list[Op] | None) -> Callable:
        """The wrap_step of a cut run: the optimizer noted (its parameters' owners), the step traced into `trace`."""

        def wrap(step, optimizer):
            self.optimizer = optimizer
            return tracing(trace, self.recorder)(step, optimizer) if trace is not None else step

        return wrap

    def recorder(self) -> Recorder:
        places = self

        class Placed(Recorder):
            """The time model's recorder, each op it keeps named where the tracker saw it run."""

            def __init__(self) -> None:
                super().__init__()
                self.places: list[tuple[tuple, int | None]] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                n = len(self.ops)
                out = super().__torch_dispatch__(func, types, args, kwargs)
                if len(self.ops) > n:
                    self.places.append(places.where)
                return out

        self.ops_recorder = Placed()
        return self.ops_recorder


# --- the timeline at m copies -------------------------------------------------------------------------------

OP_NUMBERS = ("flops", "read", "write", "fresh", "size", "waits")  # Op fields extrapolated; the rest must agree


@dataclass
class Run:
    """One cut depth's timelines: (place, middle copy, values) per op, values a dict of numbers (live bytes by
    tracker category; an Op's numeric fields, waits as the distance back to the op waited on) and, for ops,
    the rest of the Op."""

    memory: list[tuple[tuple, int | None, dict]]
    ops: list[tuple[tuple, int | None, dict]] | None
    memory_out: Memory  # the tracker's own figures


def _op_values(i: int, op: Op) -> dict:
    values = {k: getattr(op, k) for k in OP_NUMBERS}
    values["waits"] = i - op.waits if op.waits >= 0 else 0  # 0: waits on nothing
    values["dims"] = op.dims
    values["rest"] = dataclasses.replace(op, flops=0.0, read=0.0, write=0.0, fresh=0.0, size=0.0, waits=-1, dims=())
    return {k: v for k, v in values.items() if v != 0}


def _cut_run(setup: Setup, cut: Cut, m: int, trace: bool, steady: bool) -> Run:
    places = Places(cut, m)
    cut_setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, n_layers=cut.n_layers(m)))
    ops: list[Op] = []
    wrap = places.wrap(ops if trace else None)
    memory, _ = fake_step_memory(cut_setup, cut.plans[m], steady, wrap_step=wrap, on_op=places.on_op)
    timeline = None
    if trace:
        where = places.ops_recorder.places
        if len(where) != len(ops):  # one step traced: each op named
            raise AssertionError("ops and their places differ in number")
        timeline = [(*w, _op_values(i, op)) for i, (w, op) in enumerate(zip(where, ops))]
    return Run(places.memory, timeline, memory)


class NotLinear(Exception):
    """The cut runs do not extrapolate (a place missing, a value off its line): the full run decides."""


def _line(va, vb, steps: int):
    """The value `steps` copies past b on the line through a and b (numbers; anything else must agree)."""
    if isinstance(vb, (int, float)) and not isinstance(vb, bool):
        return vb + steps * (vb - va)
    if isinstance(vb, tuple) and isinstance(va, tuple) and len(va) == len(vb) and all(isinstance(x, int) for x in vb):
        return tuple(y + steps * (y - x) for x, y in zip(va, vb))
    if va != vb:
        raise NotLinear(f"{va!r} != {vb!r}")
    return vb


def _values(va: dict, vb: dict, steps: int) -> dict:
    out = {}
    for k in va.keys() | vb.keys():
        v = _line(va.get(k, 0), vb.get(k, 0), steps)
        if v != 0:
            out[k] = v
    return out


def _between(v1, v2, i: int, n: int):
    """The value i/n of the way from v1 to v2, exactly (middle copies lie on the line between copies 1 and m-2)."""
    if isinstance(v1, int) and isinstance(v2, int) and not isinstance(v1, bool):
        q, r = divmod(i * (v2 - v1), n)
        if r:
            raise NotLinear("a middle copy off the line between its neighbours")
        return v1 + q
    if isinstance(v1, float) or isinstance(v2, float):
        return v1 if v1 == v2 else v1 + i * (v2 - v1) / n
    if isinstance(v1, tuple) and v1 != v2 and all(isinstance(x, int) for x in v1 + v2):
        return tuple(_between(x, y, i, n) for x, y in zip(v1, v2))
    if v1 != v2:
        raise NotLinear(f"{v1!r} != {v2!r}")
    return v1


def _keyed(timeline: list, m: int) -> tuple[dict, list]:
    """Ops of a run by (place, ordinal at that place); the middle copies' ops dropped from the order."""
    counts: dict = {}
    keyed, order = {}, []
    for place, copy, values in timeline:
        if copy is not None:
            continue
        k = (place, counts.get(place, 0))
        counts[place] = k[1] + 1
        keyed[k] = values
        order.append(k)
    for k in list(keyed):  # 3 copies: copy 1 is also copy m - 2, copy 1 from the end
        names = k[0][2]
        if names and all(len(n) == 3 and n[0] == "s" and n[2] == EDGE - 1 == m - 1 - n[2] for n in names):
            keyed[((*k[0][:2], tuple(("e", *n[1:]) for n in names)), k[1])] = keyed[k]
    return keyed, order


def _copy_of(place: tuple, which: str) -> tuple | None:
    """A place in copy 1 from the start (`s`) or end (`e`) of R, as a middle copy's place (None: not there)."""
    phase, inside, names = place
    if not names or any(len(n) != 3 or n[0] != which or n[2] != EDGE - 1 for n in names):
        return None
    return (phase, inside, tuple(("mid", n[1], 0) for n in names))


def extend(a: list, b: list, m_b: int, m: int, ends_only: bool = False) -> list[tuple[tuple, dict]]:
    """The timeline at m copies from those at m_b - 1 (`a`) and m_b (`b`): b's ops in order with its middle copies
    replaced by m - 2 EDGE copies, each op's values on its line (`ends_only`: of those the first and the last run, all
    the peak needs). Raises NotLinear."""
    ka, _ = _keyed(a, m_b - 1)
    kb, order = _keyed(b, m_b)
    steps = m - m_b
    at = {k: _values(ka[k], kb[k], steps) for k in order if k in ka}
    if len(at) != len(order) or len(ka) != len(kb):
        raise NotLinear("places differ between the cut runs")
    middle = m - 2 * EDGE
    out: list[tuple[tuple, dict]] = []
    i = 0
    while i < len(order):
        k = order[i]
        out.append((k[0], at[k]))
        i += 1
        following = order[i][0] if i < len(order) else None
        # the boundary between copy 1 from one end and copy 1 from the other: the middle copies run there
        for this, other, forward in (("s", "e", True), ("e", "s", False)):
            if _copy_of(k[0], this) is not None and following is not None and _copy_of(following, other) is not None:
                out.extend(_middle(order, at, k[0][0], this, other, forward, middle, m, ends_only))
    return out


def _middle(order, at, phase: int, this: str, other: str, forward: bool, count: int, m: int, ends_only: bool):
    """The `count` middle copies of one phase, in the order it runs them, each op between copy 1 from the start
    and copy 1 from the end (m - 2)."""
    start = [k for k in order if k[0][0] == phase and _copy_of(k[0], "s") is not None]
    end = [k for k in order if k[0][0] == phase and _copy_of(k[0], "e") is not None]
    if [(_copy_of(k[0], "s"), k[1]) for k in start] != [(_copy_of(k[0], "e"), k[1]) for k in end]:
        raise NotLinear("copies 1 and m-2 run different ops")
    out = []
    span = m - 2 * EDGE + 1  # copies from EDGE - 1 (the start's copy 1) to m - EDGE (the end's)
    copies = list(range(EDGE, EDGE + count) if forward else range(EDGE + count - 1, EDGE - 1, -1))
    if ends_only:  # each value is linear in the copy: its largest is at the first or last copy run, or at all
        copies = copies[:1] + copies[1:][-1:]  # (then first at the first run); the peak needs no other
    for c in copies:
        for ks, ke in zip(start, end):
            vs, ve = at[ks], at[ke]
            values = {
                key: _between(vs.get(key, 0), ve.get(key, 0), c - EDGE + 1, span) for key in vs.keys() | ve.keys()
            }
            out.append(((*_copy_of(ks[0], "s")[:2], c), {k: v for k, v in values.items() if v != 0}))
    return out


def _actual(timeline: list) -> list[tuple[tuple, dict]]:
    return [((*place[:2], copy) if copy is not None else place, values) for place, copy, values in timeline]


def _peak(memory: list[tuple[tuple, dict]]) -> Memory:
    """The tracker's peak of a timeline: the first op whose live total is largest (categories of FSDPMemTracker's
    when the step ran under FSDP2)."""
    best: dict = {}
    for _, snap in memory:
        if snap.get("Total", 0) > best.get("Total", 0):
            best = snap
    _, fsdp_ref = mem_tracker_cls(sharded=True)
    return memory_at(best, any(isinstance(k, fsdp_ref) for k in best))


def _ops(timeline: list[tuple[tuple, dict]]) -> list[Op]:
    out = []
    for i, (_, v) in enumerate(timeline):
        waits = i - v["waits"] if v.get("waits") else -1
        numbers = {k: v.get(k, 0.0) for k in OP_NUMBERS if k != "waits"}
        out.append(dataclasses.replace(v["rest"], **numbers, waits=waits, dims=v.get("dims", ())))
    return out


def extrapolated(
    setup: Setup, plan: Runs | None, trace: bool, steady: bool = True
) -> tuple[Memory, torch.nn.Module, list[Op] | None] | None:
    """The step at full depth from the cut runs, or None where it does not extrapolate (see the module)."""
    found = find_cut(setup, plan)
    if found is None:
        return None
    cut, n, model = found
    runs = [_cut_run(setup, cut, m, trace, steady) for m in COPIES]
    try:
        streams = [[r.memory for r in runs]] + ([[r.ops for r in runs]] if trace else [])
        for a, b, c in streams:  # the check: 4 and 5 copies give 6's timeline op for op
            if [v for _, v in extend(a, b, COPIES[1], COPIES[2])] != [v for _, v in _actual(c)]:
                return None
        if _peak(_actual(runs[2].memory)) != runs[2].memory_out:
            return None  # the timeline is what the tracker's peak was taken from
        memory = _peak(extend(runs[1].memory, runs[2].memory, COPIES[2], n, ends_only=True))
        ops = _ops(extend(runs[1].ops, runs[2].ops, COPIES[2], n)) if trace else None
    except NotLinear:
        return None
    if setup.kind == "cuda":
        memory = dataclasses.replace(memory, reserved_bytes=None)
    return memory, model, ops
