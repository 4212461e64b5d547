"""`policy.remat: planned`: choose what to recompute so the predicted peak fits `measure.budget_gib`
at the least recompute cost, by an exact optimisation over the chain of blocks.

A plan is a list of runs (start, stop, mode) covering the blocks in order; mode is `keep` (nothing
recomputed), `full` (the run is recomputed from its input in backward, as in checkpointing; runs of
several blocks keep only the first input, as `sqrt` does) or `selective` (one block that keeps its
matmul and attention outputs and recomputes the cheap ops). Every `every k` and `sqrt` plan is in
this space.

How it is chosen:
1. Profile one block on fake tensors with the same MemTracker (`profile_block`): bytes a block
   retains from forward to backward in each mode, the transient bytes of its (recompute +)
   backward, its gradient bytes, and the cost of recomputing it (FLOPs and bytes written of the
   ops each mode recomputes, turned into seconds by the device's nominal rates).
2. Peak model of a plan: the most, over the forward's end and the backward of each run, of the
   bytes retained by the runs below + that run's recompute and backward transients + gradients of
   the blocks above, plus a constant (parameters, optimizer state, embeddings, loss) calibrated
   against the estimator on the keep-everything and recompute-everything plans.
3. Exact dynamic programming over the chain (optimal checkpointing for heterogeneous chains,
   Herrmann et al. 2019, with runs instead of single checkpoints): states are (block, bytes retained
   below), Pareto-pruned on (bytes, cost); every run length and mode is tried.
4. The chosen plan is checked by the estimator (the real step on fake tensors). If its predicted peak
   is over the budget, the model's budget is lowered by the excess and the plan re-chosen (a few rounds).
   If no plan fits, the trial is over budget, and the message names the smallest feasible budget (the
   estimator's peak of the plan of least modelled peak)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from txlab.policy.remat import PLAN_MODES
from txlab.units import GiB

Run = tuple[int, int, str]

# Nominal rates that turn recomputed work into seconds: FLOP/s and bytes written per second.
RATES = {"cpu": (1e11, 1e10), "cuda": (5e13, 2e12)}


@dataclass(frozen=True)
class BlockCost:
    """What one block costs in each mode (bytes; seconds of recomputation)."""

    x_bytes: int  # the block's input (the residual stream), kept by every run at its start
    kept: dict[str, int]  # bytes the block retains from forward to backward, input and output excluded
    backward: dict[str, int]  # transient bytes of the block's (recompute +) backward above what is retained
    grad_bytes: int  # its parameters' gradients, live from its backward on
    recompute_s: dict[str, float]  # seconds of recomputation


@dataclass
class Plan:
    runs: list[Run]
    cost_s: float  # predicted recompute time per step
    model_peak: int  # the peak model's figure
    peak_bytes: int | None = None  # the estimator's figure for this plan (when checked)

    def describe(self) -> str:
        """e.g. `0-3:full/block 4-5:full 6-17:selective 18-23:keep`: `full/block` is each block
        recomputed on its own, `full` one run recomputed whole from its input; `selective` is per block."""
        groups: list[list] = []  # [start, stop, label]
        for a, b, mode in self.runs:
            label = "full/block" if mode == "full" and b == a + 1 else mode
            if groups and groups[-1][2] == label and label in ("full/block", "selective", "keep"):
                groups[-1][1] = b
            else:
                groups.append([a, b, label])
        parts = []
        for a, b, label in groups:
            if label == "full/block" and b == a + 1:
                label = "full"
            blocks = f"{a}" if b == a + 1 else f"{a}-{b - 1}"
            parts.append(f"{blocks}:{label}")
        peak = self.peak_bytes if self.peak_bytes is not None else self.model_peak
        return f"{' '.join(parts)} | peak {peak / GiB:.3f} GiB | recompute {self.cost_s * 1e3:.1f} ms/step"

    @property
    def recomputed_blocks(self) -> int:
        return sum(b - a for a, b, m in self.runs if m != "keep")


class NoFeasiblePlan(RuntimeError):
    def __init__(self, budget_bytes: int, smallest_bytes: int, plan: Plan):
        self.budget_bytes, self.smallest_bytes, self.plan = budget_bytes, smallest_bytes, plan
        super().__init__(
            f"no recomputation plan fits the budget of {budget_bytes / GiB:.3f} GiB; the smallest feasible budget is "
            f"{smallest_bytes / GiB:.3f} GiB (plan {plan.describe()})"
        )


# --- the chain model and its exact optimisation -----------------------------------------------------


def run_retained(blocks: list[BlockCost], a: int, b: int, mode: str) -> int:
    """Bytes a run keeps from forward to backward: its input, plus what kept blocks save."""
    if mode == "full":
        return blocks[a].x_bytes
    return sum(blocks[i].x_bytes + blocks[i].kept[mode] for i in range(a, b))


def run_backward_extra(blocks: list[BlockCost], a: int, b: int, mode: str) -> int:
    """Bytes live on top of what the runs below retain, at the worst moment of the run's backward."""
    if mode == "full":  # recompute the whole run: every block below the last keeps its activations
        inner = sum(blocks[i].x_bytes + blocks[i].kept["keep"] for i in range(a, b - 1))
        return inner + blocks[b - 1].x_bytes + blocks[b - 1].backward["full"]
    # one or more blocks processed from the top: the worst is the top block's backward with all kept
    return run_retained(blocks, a, b, mode) + blocks[b - 1].backward[mode]


def run_cost(blocks: list[BlockCost], a: int, b: int, mode: str) -> float:
    return sum(blocks[i].recompute_s[mode] for i in range(a, b))


def _runs_from(i: int, L: int, mode: str) -> Iterable[int]:
    if mode == "full":
        return range(i + 1, L + 1)
    return (i + 1,)  # keep and selective: one block per run (longer runs are the same plan)


def model_peak(blocks: list[BlockCost], runs: list[Run], const: int = 0) -> int:
    """The peak model of a plan (see the module docstring)."""
    L = len(blocks)
    below, worst = 0, 0
    grads_above = [sum(b.grad_bytes for b in blocks[j:]) for j in range(L + 1)]
    for a, b, mode in runs:
        worst = max(worst, below + run_backward_extra(blocks, a, b, mode) + grads_above[b])
        below += run_retained(blocks, a, b, mode)
    return const + max(worst, below)


def optimise(blocks: list[BlockCost], budget: float, const: int = 0, objective: str = "cost") -> Plan | None:
    """Exact DP over the chain. objective 'cost': least recompute cost with model peak <= budget;
    'peak': least model peak (cost breaks ties). None when nothing fits."""
    L = len(blocks)
    grads_above = [sum(b.grad_bytes for b in blocks[j:]) for j in range(L + 1)]
    # states[i]: {below_bytes: (cost, worst_so_far, runs)} Pareto-pruned
    states: list[dict[int, tuple[float, int, tuple[Run, ...]]]] = [dict() for _ in range(L + 1)]
    states[0][0] = (0.0, 0, ())
    for i in range(L):
        frontier = _pareto(states[i], objective)
        for below, (cost, worst, runs) in frontier.items():
            for mode in PLAN_MODES:
                for j in _runs_from(i, L, mode):
                    w = max(worst, below + run_backward_extra(blocks, i, j, mode) + grads_above[j])
                    nb = below + run_retained(blocks, i, j, mode)
                    if const + max(w, nb) > budget:
                        continue
                    c = cost + run_cost(blocks, i, j, mode)
                    old = states[j].get(nb)
                    if old is None or _better((c, w), (old[0], old[1]), objective):
                        states[j][nb] = (c, w, runs + ((i, j, mode),))
    finals = [(c, const + max(w, below), runs) for below, (c, w, runs) in states[L].items()]
    if not finals:
        return None
    key = (lambda f: (f[0], f[1])) if objective == "cost" else (lambda f: (f[1], f[0]))
    c, peak, runs = min(finals, key=key)
    return Plan(list(_merge(runs)), c, peak)


def _better(new: tuple[float, int], old: tuple[float, int], objective: str) -> bool:
    return (new < old) if objective == "cost" else ((new[1], new[0]) < (old[1], old[0]))


def _pareto(states: dict[int, tuple[float, int, tuple]], objective: str) -> dict[int, tuple[float, int, tuple]]:
    """Drop states that another state beats on bytes below, cost and worst peak alike."""
    items = sorted(states.items())
    kept: dict[int, tuple[float, int, tuple]] = {}
    best: list[tuple[float, int]] = []
    for below, (c, w, runs) in items:  # ascending bytes below: a state is dominated by an earlier one
        if any(bc <= c and bw <= w for bc, bw in best):
            continue
        best.append((c, w))
        kept[below] = (c, w, runs)
    return kept


def _merge(runs: Iterable[Run]) -> list[Run]:
    out: list[Run] = []
    for a, b, mode in runs:
        if out and mode == "keep" and out[-1][2] == "keep":
            out[-1] = (out[-1][0], b, "keep")
        else:
            out.append((a, b, mode))
    return out


def all_plans(L: int) -> Iterable[list[Run]]:
    """Every plan of L blocks (for tests: brute force over the same space the DP searches)."""
    if L == 0:
        yield []
        return
    for first_stop in range(1, L + 1):
        for mode in PLAN_MODES:
            if mode != "full" and first_stop != 1:
                continue
            for rest in all_plans(L - first_stop):
                yield [(0, first_stop, mode)] + [(a + first_stop, b + first_stop, m) for a, b, m in rest]
