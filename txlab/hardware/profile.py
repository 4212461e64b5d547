"""A hardware profile: what the time model (txlab.timemodel) needs to know of a device and its links, read
from the catalogue (txlab.hardware.catalogue), a user's YAML file, or the `local` profile that `txlab
calibrate` writes for this machine.

`measure.hardware` names one: a catalogue name (`h100-sxm`), `local`, or a path to a YAML file. Bad input
(an unknown name, a file missing a field, a figure that is not positive, a dtype without a peak) raises
`ProfileError`, a ValueError whose one-line message names the profile and the field; the config layer turns
it into a ConfigError (exit 2). This package imports nothing else of txlab and not torch.

A profile file (units as the data sheets give them; docs/time_model.md):

    name: my-gpu                      # how rows name it (column `hardware`)
    kind: cuda                        # cuda (default) or cpu
    device_name: NVIDIA H100 80GB HBM3  # optional: the device's name as torch reports it
    peak_tflops: {bf16: 989.4, fp32: 66.9}  # dense peak per dtype
    memory_gb: 80                     # device memory, 10^9 bytes
    memory_bandwidth_gbps: 3350       # GB/s
    link_gbps: 450                    # intra-node link per device, GB/s each way
    devices_per_node: 8
    network_gbps: 50                  # inter-node bandwidth per device, GB/s each way
    efficiency: {matmul: 0.6, ...}    # optional: overrides of txlab.hardware.efficiency's curves
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from txlab.hardware.catalogue import CATALOGUE, MAIN_NAMES
from txlab.hardware.efficiency import Efficiency, efficiency_for

KINDS = ("cuda", "cpu")
LOCAL = "local"
ENV_DIR = "TXLAB_HARDWARE_DIR"  # where `local.yaml` lives (default: $XDG_CACHE_HOME or ~/.cache, /txlab/hardware)
# Required fields of a profile file and what each must be.
FIELDS: dict[str, str] = {
    "name": "a non-empty string",
    "peak_tflops": "a mapping of dtype to dense peak TFLOP/s, e.g. {bf16: 989.4}",
    "memory_gb": "device memory in GB (10^9 bytes)",
    "memory_bandwidth_gbps": "device memory bandwidth in GB/s",
    "link_gbps": "intra-node link bandwidth per device in GB/s",
    "devices_per_node": "devices in one node (an integer)",
    "network_gbps": "inter-node bandwidth per device in GB/s",
}
OPTIONAL = ("kind", "device_name", "efficiency", "source", "measured", "calibrated_at", "match")


class ProfileError(ValueError):
    """A profile that cannot be used (one line: the profile, the field, what is allowed)."""


@dataclass(frozen=True)
class Profile:
    """One device type and its links, in SI units (FLOP/s, bytes, bytes/s)."""

    name: str
    kind: str  # "cuda" or "cpu": the kind of device an estimate for it models
    device_name: str  # as torch names it ("cpu" for a CPU)
    peak_flops: dict[str, float]  # dense peak per dtype ("bf16", "fp32")
    memory_bytes: int
    memory_bw: float  # bytes/s
    link_bw: float  # intra-node, bytes/s per device each way
    devices_per_node: int
    network_bw: float  # inter-node, bytes/s per device each way
    efficiency: Efficiency = field(default_factory=Efficiency)
    measured: tuple[dict[str, Any], ...] = ()  # local profiles: `txlab calibrate`'s tables, one per thread count
    source: str = ""

    def peak(self, dtype: str) -> float:
        """The dense peak FLOP/s for `dtype`; ProfileError when the profile has none."""
        if dtype not in self.peak_flops:
            raise ProfileError(
                f"measure.hardware: profile {self.name!r} has no peak for workload.dtype {dtype!r}; "
                f"it has: {', '.join(sorted(self.peak_flops))}"
            )
        return self.peak_flops[dtype]

    def tables(self, threads: int | None) -> dict[str, Any] | None:
        """The measured tables for `threads` CPU threads (the nearest count measured), or None."""
        if not self.measured:
            return None
        if threads is None:
            return max(self.measured, key=lambda t: t.get("threads", 1))
        return min(self.measured, key=lambda t: (abs(t.get("threads", 1) - threads), -t.get("threads", 1)))


def names() -> list[str]:
    """Every name `measure.hardware` takes besides a path: the catalogue's and `local`."""
    return [*CATALOGUE, LOCAL]


def is_path(spec: str) -> bool:
    return "/" in spec or spec.endswith((".yaml", ".yml")) or spec.startswith("~")


def local_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "txlab" / "hardware"


def local_path() -> Path:
    """Where `txlab calibrate` writes this machine's profile and `measure.hardware: local` reads it."""
    return local_dir() / "local.yaml"


def check_spec(spec: str) -> None:
    """Refuse a `measure.hardware` value that is neither a catalogue name, `local`, nor path-like, with the
    closest names (no file is read)."""
    if spec in CATALOGUE or spec == LOCAL or is_path(spec):
        return
    close = difflib.get_close_matches(spec.lower(), names(), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ProfileError(
        f"measure.hardware: unknown profile {spec!r}; {hint}allowed: {', '.join(MAIN_NAMES)}, "
        f"{', '.join(n for n in CATALOGUE if n not in MAIN_NAMES)}, local (txlab calibrate), or a profile YAML path"
    )


_CACHE: dict[tuple[str, int, int], Profile] = {}


def load_profile(spec: str) -> Profile:
    """The profile `measure.hardware` names (ProfileError for any bad input)."""
    check_spec(spec)
    if spec in CATALOGUE:
        raw = {k: v for k, v in CATALOGUE[spec].items()}
        return from_mapping({**raw, "name": spec}, f"catalogue entry {spec!r}")
    path = local_path() if spec == LOCAL else Path(spec).expanduser()
    what = f"local profile {path}" if spec == LOCAL else f"profile {path}"
    try:
        st = path.stat()
    except OSError:
        hint = "; write it with `txlab calibrate`" if spec == LOCAL else ""
        raise ProfileError(f"measure.hardware: {what}: no such file{hint}") from None
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE[key] = from_mapping(read_mapping(path, what), what)
    return _CACHE[key]


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise ProfileError(f"measure.hardware: {what}: is a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"measure.hardware: {what}: cannot read it ({e.__class__.__name__})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"measure.hardware: {what}: malformed YAML{where}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"measure.hardware: {what}: expected a mapping of profile fields, got {type(data).__name__}")
    return data


def _number(value: Any, what: str, key: str, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        raise ProfileError(f"measure.hardware: {what}: {key} must be {FIELDS.get(key, 'a number')}, got {value!r}")
    if value <= 0:
        raise ProfileError(f"measure.hardware: {what}: {key} must be > 0, got {value}")
    return float(value)


def _tera(value: float) -> float:
    """`value` x 10^12 rounded once (66.9 TFLOP/s is 66.9e12, not 66.9 * 1e12's 66900000000000.01)."""
    from decimal import Decimal

    return float(Decimal(repr(value)) * 10**12)


def from_mapping(raw: dict[str, Any], what: str) -> Profile:
    """A profile from its fields (a catalogue entry or a YAML file's mapping), every figure checked."""
    missing = [k for k in FIELDS if k not in raw or raw[k] is None]
    if missing:
        raise ProfileError(
            f"measure.hardware: {what}: missing field {missing[0]} ({FIELDS[missing[0]]}); "
            f"required: {', '.join(FIELDS)}"
        )
    unknown = sorted(set(raw) - set(FIELDS) - set(OPTIONAL))
    if unknown:
        raise ProfileError(
            f"measure.hardware: {what}: unknown field {unknown[0]}; allowed: {', '.join([*FIELDS, *OPTIONAL])}"
        )
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise ProfileError(f"measure.hardware: {what}: name must be a non-empty string, got {name!r}")
    kind = raw.get("kind", "cuda")
    if kind not in KINDS:
        raise ProfileError(f"measure.hardware: {what}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    peaks = raw["peak_tflops"]
    if not isinstance(peaks, dict) or not peaks:
        raise ProfileError(f"measure.hardware: {what}: peak_tflops must be {FIELDS['peak_tflops']}, got {peaks!r}")
    peak_flops = {str(d): _tera(_number(v, what, f"peak_tflops.{d}")) for d, v in peaks.items()}
    eff = raw.get("efficiency") or {}
    if not isinstance(eff, dict):
        raise ProfileError(f"measure.hardware: {what}: efficiency must be a mapping, got {eff!r}")
    allowed = {f.name for f in dataclasses.fields(Efficiency)}
    for k, v in eff.items():
        if k not in allowed:
            raise ProfileError(
                f"measure.hardware: {what}: unknown efficiency.{k}; allowed: {', '.join(sorted(allowed))}"
            )
        _number(v, what, f"efficiency.{k}")
    measured = raw.get("measured") or ()
    if not isinstance(measured, (list, tuple)) or not all(isinstance(t, dict) for t in measured):
        raise ProfileError(f"measure.hardware: {what}: measured must be a list of tables (txlab calibrate writes it)")
    base = efficiency_for(name, kind)
    return Profile(
        name=name,
        kind=kind,
        device_name=str(raw.get("device_name") or ("cpu" if kind == "cpu" else name)),
        peak_flops=peak_flops,
        memory_bytes=int(_number(raw["memory_gb"], what, "memory_gb") * 1e9),
        memory_bw=_number(raw["memory_bandwidth_gbps"], what, "memory_bandwidth_gbps") * 1e9,
        link_bw=_number(raw["link_gbps"], what, "link_gbps") * 1e9,
        devices_per_node=int(_number(raw["devices_per_node"], what, "devices_per_node", integer=True)),
        network_bw=_number(raw["network_gbps"], what, "network_gbps") * 1e9,
        efficiency=dataclasses.replace(base, **{k: float(v) for k, v in eff.items()}),
        measured=tuple(measured),
        source=str(raw.get("source", "")),
    )


def catalogue_profiles() -> list[Profile]:
    return [load_profile(n) for n in CATALOGUE]


def by_device_name(device_name: str) -> Profile | None:
    """The catalogue profile whose `match` words are all words of `device_name` (a CUDA device's name as torch
    reports it), variants first; None for a device the catalogue does not know."""
    import re

    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+", device_name) if w}
    for name, raw in CATALOGUE.items():
        if all(w.lower() in words for w in raw["match"]):
            return load_profile(name)
    return None
