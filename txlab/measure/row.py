"""The empty result row of a trial: identity columns, the flat config, every figure null."""

from __future__ import annotations

import datetime as _dt
import socket
from typing import Any

import torch

from txlab import __version__
from txlab.config import TrialConfig
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
