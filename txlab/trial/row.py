"""The one place a trial's result row is made: identity columns, the flat config, and the figures of its
records (txlab.measure.records), in the order of the row schema (txlab.results.columns)."""

from __future__ import annotations

import datetime as _dt
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from txlab import __version__
from txlab.config import TrialConfig
from txlab.measure.records import Records


def now() -> str:
    """A row's `started_at`: ISO 8601, UTC, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Where:
    """Where and when a trial ran (or was estimated for)."""

    device: str | None  # "cpu" or the CUDA device's name
    device_capacity_bytes: int | None
    started_at: str = field(default_factory=now)
    host: str = field(default_factory=socket.gethostname)  # a sharded trial placed by Ray: its ranks' hosts
    node_id: str | None = None  # Ray node id(s) when run by a sweep
    torch_version: str = torch.__version__
    threads: int | None = field(default_factory=torch.get_num_threads)  # None for an estimate: nothing timed


def build_row(cfg: TrialConfig, where: Where, rec: Records, duration_s: float | None) -> dict[str, Any]:
    """The result row of a trial (docs/design.md, "Result row")."""
    row: dict[str, Any] = {
        "trial_key": cfg.trial_key,
        "sweep": None,
        "status": None,
        "error": None,
        "started_at": where.started_at,
        "duration_s": duration_s,
        "host": where.host,
        "node_id": where.node_id,
        "device": where.device,
        "device_capacity_bytes": where.device_capacity_bytes,
        "torch_version": where.torch_version,
        "txlab_version": __version__,
        "measured": None,
        "threads": where.threads,
    }
    row.update(cfg.flat())
    row.update(rec.figures())
    return row
