"""The result row of a trial before it runs (identity columns, the flat config, every figure null), and
the one rule by which a failure becomes a row: out of memory is status `oom`, anything else `error`."""

from __future__ import annotations

import datetime as _dt
import socket
import traceback
from typing import Any

import torch

from txlab import __version__
from txlab.config import TrialConfig
from txlab.measure.device import is_oom
from txlab.measure.progress import log
from txlab.results.columns import FIGURES


def base_row(cfg: TrialConfig) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial_key": cfg.trial_key,
        "sweep": None,
        "status": "error",
        "error": None,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": None,
        "host": socket.gethostname(),
        "node_id": None,
        "device": None,
        "device_capacity_bytes": None,
        "torch_version": torch.__version__,
        "txlab_version": __version__,
        "measured": True,
    }
    row.update(cfg.flat())
    row.update(dict.fromkeys(FIGURES))
    return row


def failure_row(row: dict[str, Any], e: BaseException, progress: bool = False) -> None:
    """Record an exception of the measured run: `oom` for an allocation failure, else `error` with it."""
    if is_oom(e):
        row.update(status="oom", error=f"{e.__class__.__name__}: {str(e).splitlines()[0][:500]}")
    else:
        row.update(status="error", error=f"{e.__class__.__name__}: {e}"[:2000])
        log(progress, traceback.format_exc())
