"""The trial pipeline: a resolved trial (`txlab.trial.resolve.Setup`), one stage that fills its typed
records, the verdict (`txlab.trial.verdict`), the row (`txlab.trial.row`). Measured training, measured
inference, one rank of a sharded trial and the estimate on fake tensors are this pipeline with another
stage (`txlab.trial.run` picks it)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from txlab.config import TrialConfig
from txlab.measure.records import Records
from txlab.trial.resolve import Setup
from txlab.trial.row import Where, build_row
from txlab.trial.verdict import Limit, decide, fail

Stage = Callable[[Setup, Records, bool], None]


def pipeline(
    cfg: TrialConfig,
    setup: Setup,
    where: Where,
    stage: Stage,
    limits: list[Limit | None],
    predicted: bool = False,
    progress: bool = False,
    not_run: bool = False,
) -> dict[str, Any]:
    """Run `stage` on the resolved trial, decide its outcome against `limits`, and build its row. Exceptions
    of the stage are outcomes. `not_run`: a verdict over a limit says the trial will not be run."""
    t0 = time.perf_counter()
    rec = Records()
    try:
        stage(setup, rec, progress)
        rec.outcome = decide(rec, limits, predicted, not_run)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; OOM is a result, not a crash
        fail(rec, e, progress)
        if predicted:
            rec.outcome = dataclasses.replace(rec.outcome, measured=False)
    return build_row(cfg, where, rec, time.perf_counter() - t0)
