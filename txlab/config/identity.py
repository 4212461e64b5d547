"""The trial key: a stable hash of the resolved config.

Every key of the config enters the hash with its resolved value (defaults and presets filled in), except
the keys marked run-only (they change how a trial is run or reported, not what is measured).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass
from typing import Any

# Field metadata flag: a key that changes how a trial is run or reported but not what is measured;
# left out of the trial key.
RUN_ONLY = "run_only"


def run_only_keys(cfg) -> set[str]:
    """Dotted names of the run-only keys of a config (a `TrialConfig`)."""
    return {
        f"{s.name}.{f.name}"
        for s in fields(cfg)
        if is_dataclass(section := getattr(cfg, s.name))
        for f in fields(section)
        if f.metadata.get(RUN_ONLY)
    }


def canonical(cfg) -> dict[str, Any]:
    """The config as the hash sees it: sorted dotted keys, run-only keys left out."""
    skip = run_only_keys(cfg)
    return {k: v for k, v in sorted(cfg.flat().items()) if k not in skip}


def trial_key(cfg) -> str:
    """Stable hash of the resolved config (defaults and presets filled in, run-only keys left out)."""
    blob = json.dumps(canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
