"""A trial's predicted time on a hardware profile: the costed trace of its real step (txlab.timemodel.cost) laid
on one timeline (txlab.timemodel.schedule), and what follows: tokens per second of all devices together, model
FLOPs utilisation (the row's analytic FLOPs per token over the profile's dense peak), exposed communication,
and dollars per million tokens when a price per device-hour is given.

The trace is rank 0's: FSDP's ranks are symmetric, so the step of one is the step of all.
"""

from __future__ import annotations

from dataclasses import dataclass

from txlab.hardware import Profile
from txlab.measure.records import Prediction
from txlab.timemodel.cost import Coster
from txlab.timemodel.schedule import Timeline, schedule
from txlab.timemodel.trace import Op


@dataclass(frozen=True)
class Work:
    """What the predicted step does, besides its operators."""

    tokens: int  # tokens of one optimizer step, all devices together (global batch x sequence)
    devices: int  # devices the step runs on
    dtype: str  # the workload's dtype (the peak MFU is taken against)
    flops_per_token: float | None  # analytic model FLOPs (txlab.measure.throughput), for MFU
    threads: int | None = None  # a CPU rank's threads (local profiles' tables)


def timeline(ops: list[Op], profile: Profile, work: Work) -> Timeline:
    coster = Coster(profile, work.dtype, work.threads)
    links = [coster.link(op.group)[1] if op.cls == "collective" else "" for op in ops]
    return schedule(ops, coster.times(ops), profile.efficiency.overlap, links)


def predict(ops: list[Op], profile: Profile, work: Work, usd_per_device_hour: float | None = None) -> Prediction:
    """The row's predicted figures for one step of `ops` on `profile`."""
    line = timeline(ops, profile, work)
    return prediction(line, profile, work, usd_per_device_hour)


def prediction(line: Timeline, profile: Profile, work: Work, usd_per_device_hour: float | None = None) -> Prediction:
    step = line.step_s
    tokens_per_s = work.tokens / step
    mfu = None
    if work.flops_per_token is not None:
        mfu = work.flops_per_token * tokens_per_s / (work.devices * profile.peak(work.dtype))
    usd = None
    if usd_per_device_hour is not None:
        usd = usd_per_device_hour * work.devices * step / 3600 / work.tokens * 1e6
    return Prediction(
        hardware=profile.name,
        predicted_step_time_s=step,
        predicted_tokens_per_s=tokens_per_s,
        predicted_mfu=mfu,
        predicted_exposed_comm_s=line.exposed_comm_s,
        predicted_usd_per_mtok=usd,
    )
