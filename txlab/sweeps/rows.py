"""The rows a sweep makes itself, for trials that produced none (their process, actor or node died, or Tune
gave up on them): the trial's config columns, status `error`, no figures."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from txlab.results.columns import row_schema


def error_row(trial_key: str, flat: dict[str, Any], sweep: str, message: str, **identity: Any) -> dict[str, Any]:
    """A full row for a trial that produced none (its process or node died): config columns, no figures."""
    row: dict[str, Any] = dict.fromkeys(row_schema().names)
    row.update({k: v for k, v in flat.items() if k in row})
    row.update(trial_key=trial_key, sweep=sweep, status="error", error=message[:2000], measured=True)
    row.update({k: v for k, v in identity.items() if k in row})
    return row


def utc_now() -> str:
    """Now, as the rows' `started_at` says it: UTC, ISO 8601, whole seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
