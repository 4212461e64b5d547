"""The trial key: a stable hash of the resolved config, stable across txlab versions.

The rule (docs/design.md, "Trial keys"):

- Every key of the config enters the hash with its resolved value (defaults and presets filled in), except
  the keys marked run-only (`RUN_ONLY`: they change how a trial is run or reported, not what is measured).
- A key added after txlab 0.1 is marked `since` (field metadata `{SINCE: "0.2"}`) and declares as its
  default the value that reproduces the behaviour before it existed. It enters the hash only when its
  resolved value differs from that default. So adding a key leaves the key of every trial that keeps the
  default unchanged (a store written before the key existed resumes with nothing rerun), and a trial that
  sets it gets a new key.
- Changing what a preset or default resolves to is a different computation: the resolved values change, and
  so do the keys. That is intended.

The JSON below (sorted keys, no spaces, sha256, first 16 hex digits) is the 0.1 format byte for byte; the
0.1 keys are pinned by tests/fixtures/trial_keys_v0_1.json and the 0.1 store fixture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import Field, fields, is_dataclass
from typing import Any

# Field metadata flag: a key that changes how a trial is run or reported but not what is measured;
# left out of the trial key.
RUN_ONLY = "run_only"
# Field metadata: the txlab version that added the key (e.g. "0.2"). Such a key enters the trial key only
# when its resolved value differs from its declared default (which must reproduce the behaviour before it).
SINCE = "since"


def _key_fields(cfg) -> Iterator[tuple[str, Field]]:
    """(dotted key, dataclass field) of every leaf of a `TrialConfig`, sections and top-level keys alike."""
    for s in fields(cfg):
        section = getattr(cfg, s.name)
        if is_dataclass(section):
            for f in fields(section):
                yield f"{s.name}.{f.name}", f
        else:
            yield s.name, s


def declared_default(f: Field) -> Any:
    """The field's default value (its factory's value for a default_factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config key {f.name!r} has no default; every config key needs one")


def run_only_keys(cfg) -> set[str]:
    """Dotted names of the run-only keys of a config (a `TrialConfig`)."""
    return {k for k, f in _key_fields(cfg) if f.metadata.get(RUN_ONLY)}


def since_keys(cfg) -> dict[str, str]:
    """Dotted name -> version, for the keys added after txlab 0.1 (hashed only when not at their default)."""
    return {k: str(f.metadata[SINCE]) for k, f in _key_fields(cfg) if f.metadata.get(SINCE)}


def _same(a: Any, b: Any) -> bool:
    # Strict: True is not 1, 1 is not 1.0 (loading already coerces int -> float for float keys).
    return type(a) is type(b) and a == b


def canonical(cfg) -> dict[str, Any]:
    """The config as the hash sees it: sorted dotted keys; run-only keys left out, and keys added since 0.1
    left out while they hold their declared default."""
    flat = cfg.flat()
    out: dict[str, Any] = {}
    for key, f in _key_fields(cfg):
        if f.metadata.get(RUN_ONLY):
            continue
        if f.metadata.get(SINCE) and _same(flat[key], declared_default(f)):
            continue
        out[key] = flat[key]
    return dict(sorted(out.items()))


def trial_key(cfg) -> str:
    """Stable hash of the resolved config (see the module docstring for which keys enter it)."""
    blob = json.dumps(canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
