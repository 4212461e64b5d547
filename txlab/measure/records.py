"""The typed records a trial's stages return, and the one function that turns them into a row's figures.

Each record is one concern of the result row (txlab.results.columns.FIGURES); a field left None is a
figure the stage did not measure. `Records` holds what one trial has gathered, stage after stage, with
its `Outcome` (status, error, measured or estimated); `txlab.trial.row.build_row` makes the row from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from txlab.results.columns import FIGURES


@dataclass(frozen=True)
class Memory:
    """The peak and its breakdown at the peak, in bytes (a sharded trial's: the largest rank's)."""

    peak_bytes: int | None = None  # CUDA: allocator peak; CPU: live-tensor tracker peak
    params_bytes: int | None = None
    grads_bytes: int | None = None
    optimizer_bytes: int | None = None
    activations_bytes: int | None = None
    other_bytes: int | None = None
    tracked_peak_bytes: int | None = None
    reserved_bytes: int | None = None
    gathered_params_bytes: int | None = None  # FSDP: unsharded parameters in flight (all-gathered)
    comm_bytes: int | None = None  # FSDP: all-gather and reduce-scatter buffers
    peak_spread_bytes: int | None = None  # sharded: largest minus smallest rank's peak
    peak_rss_bytes: int | None = None  # CPU: resident high-water mark above the pre-trial baseline
    kv_cache_bytes: int | None = None  # prefill / decode: K/V held between steps (taken out of activations)
    kv_inputs_bytes: int | None = None  # policy.kv recompute: layer inputs kept to recompute K/V from


@dataclass(frozen=True)
class Facts:
    """What the trial computes, known before (or without) timing it."""

    n_params: int | None = None
    flops_per_token: float | None = None  # analytic model FLOPs (txlab.measure.throughput)
    formula_activation_bytes: int | None = None  # Korthikanti et al. 2022 (txlab.measure.formula)
    plan: str | None = None  # policy.remat planned: the runs chosen (txlab.policy.planner.Plan.describe)
    weight_bytes: int | None = None  # inference: weights as held (int4 packed)
    weight_bytes_fp: int | None = None  # inference: the same weights at full precision
    n_active_params: int | None = None  # parameters one token uses (mixture of experts: k of the E routed experts)


@dataclass(frozen=True)
class Timing:
    """Times of the timed steps (medians) and what follows from them."""

    step_time_s: float | None = None
    tokens_per_s: float | None = None  # all devices together
    compile_s: float | None = None
    mfu: float | None = None  # CUDA: achieved / peak FLOP/s of the device
    prefill_time_s: float | None = None
    time_per_token_s: float | None = None


@dataclass(frozen=True)
class Prediction:
    """The time model's figures for the trial's step on a hardware profile (txlab.timemodel): predictions, in
    columns of their own beside any measured time."""

    hardware: str | None = None  # the profile's name (measure.hardware, or `local` for a measured row)
    predicted_step_time_s: float | None = None
    predicted_tokens_per_s: float | None = None  # all devices together
    predicted_mfu: float | None = None  # analytic model FLOPs over the profile's dense peak, per device
    predicted_exposed_comm_s: float | None = None  # communication not hidden behind compute, per step
    predicted_usd_per_mtok: float | None = None  # measure.usd_per_device_hour set: dollars per million tokens


@dataclass(frozen=True)
class Traffic:
    """Bytes one device sends per optimizer step in each kind of collective, counted on the operator trace of the
    trial's step (txlab.timemodel.trace.traffic: an estimate's, or for a measured row the traced step the time
    model prices); 0 where the layout runs none, null where the step was not traced."""

    comm_all_gather_bytes: int | None = None  # FSDP's parameter gathers, TP's sequence-parallel ones, CP's K/V
    comm_reduce_scatter_bytes: int | None = None  # FSDP's gradients, TP's sequence-parallel ones, CP's dK/dV
    comm_all_reduce_bytes: int | None = None  # TP's activation reductions (ring: twice the (n-1)/n share)
    comm_all_to_all_bytes: int | None = None  # expert parallelism's token exchange
    comm_kv_exchange_bytes: int | None = None  # of the all-gather and reduce-scatter bytes: CP's K/V and dK/dV


@dataclass(frozen=True)
class Quality:
    """How well the model did on the trial's tokens."""

    loss: float | None = None  # last timed step's training loss (the global batch's), nats/token
    bits_per_byte: float | None = None
    logit_rel_error: float | None = None  # int4 vs full precision
    next_token_agreement: float | None = None  # int4 vs full precision


@dataclass(frozen=True)
class Routing:
    """A mixture of experts' routing (txlab.model.moe.routing_stats): measured, or an estimate's assumption."""

    routing: str | None = None  # "measured", or the estimate's assumption: "balanced", "imbalance 1.5"
    routing_load: float | None = None  # busiest expert's pairs over the mean, the largest over the layers
    aux_loss: float | None = None  # the load-balancing loss (softmax routers), reported apart from `loss`


@dataclass(frozen=True)
class Outcome:
    """How the trial ended: `status` (ok, oom, over_budget, error), the message, and whether its figures
    come from a run (measured) or from an estimate."""

    status: str = "ok"
    error: str | None = None
    measured: bool = True


RECORDS = (Memory, Facts, Timing, Quality, Prediction, Traffic, Routing)


def from_row(cls, row: dict[str, Any]):
    """A record read back from a row (a rank's, sent as JSON): its fields' columns, missing ones None."""
    return cls(**{f.name: row.get(f.name) for f in dataclasses.fields(cls)})


@dataclass
class Records:
    """What one trial gathered: a record per concern (None until its stage ran) and how it ended (None
    while it runs: the verdict decides)."""

    memory: Memory | None = None
    facts: Facts | None = None
    timing: Timing | None = None
    quality: Quality | None = None
    prediction: Prediction | None = None
    traffic: Traffic | None = None
    routing: Routing | None = None
    outcome: Outcome | None = None

    def figures(self) -> dict[str, Any]:
        """The row's figure columns (every FIGURES key; None where nothing was measured) and the outcome's
        status, error and measured."""
        out: dict[str, Any] = dict.fromkeys(FIGURES)
        for record in (self.memory, self.facts, self.timing, self.quality, self.prediction, self.traffic, self.routing):
            if record is not None:
                out.update(dataclasses.asdict(record))
        outcome = self.outcome or Outcome("error", "the trial ended without a verdict")
        out.update(status=outcome.status, error=outcome.error, measured=outcome.measured)
        return out


def _check_columns() -> None:
    # Every record field is a figure column of the row schema: a field added here without its column (or a
    # column renamed there) fails at import, not in a store.
    names = {f.name for cls in RECORDS for f in dataclasses.fields(cls)}
    missing = names - set(FIGURES)
    if missing:
        raise TypeError(f"record fields without a row column: {sorted(missing)}")
    unrecorded = set(FIGURES) - names
    if unrecorded:
        raise TypeError(f"row figure columns that no record holds: {sorted(unrecorded)}")


_check_columns()
