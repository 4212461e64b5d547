"""One colour and one marker per policy label, the same in every plot of every store. See docs/analysis.md.

The style of a label depends on the label alone, never on which other labels a store holds, so two reports
can be compared by eye:

- a preset name (`naive`, `sdpa`, `checkpoint`, ...) has a fixed colour and marker (`PRESETS`);
- a prefill/decode label (`sdpa (kv=recompute)`) takes the colour of its KV policy (`KV_POLICIES`) and the
  marker of its preset, so `kv=cache` / `kv=grouped` / `kv=recompute` read the same in every store;
- a variant (`custom (remat=every)`, any policy key besides the KV policy) keeps its family's colour, a
  shade lighter or darker, and a marker of its own, both picked by a hash of the variant;
- any other name (a preset that lands later) hashes into a reserved range of colours and markers
  (`RESERVED`) that no fixed label uses.

Line style is not part of it: measured rows are drawn solid, estimated rows dashed, in every plot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from matplotlib.colors import to_rgb

from txlab.analysis.data import parse_label, policy_order

# Okabe-Ito / seaborn "colorblind" hues for the presets (grey is kept for budgets and annotations), Paul
# Tol's "muted" hues for the KV policies and the reserved range.
PRESETS: dict[str, tuple[str, str]] = {  # preset name -> (colour, marker)
    "naive": ("#0173b2", "o"),  # blue
    "sdpa": ("#de8f05", "s"),  # orange
    "checkpoint": ("#029e73", "D"),  # green
    "selective": ("#cc78bc", "P"),  # pink-purple
    "recompute": ("#d55e00", "*"),  # vermillion
    "planned": ("#ca9161", "h"),  # brown
    "custom": ("#56b4e9", "p"),  # sky blue
}
KV_POLICIES: dict[str, str] = {  # policy.kv -> colour of prefill/decode rows
    "cache": "#332288",  # indigo
    "grouped": "#999933",  # olive
    "recompute": "#882255",  # wine
}
RESERVED_COLORS = ("#44aa99", "#aa4499", "#117733", "#cc6677", "#6699cc", "#997700")  # teal, purple, ...
RESERVED_MARKERS = ("<", ">", "d", "8", "H")
SHADES = (-0.5, -0.35, -0.2, 0.15, 0.3)  # < 0: towards black, > 0: towards white (pale shades read badly)
# Kept for the status of a point (oom X, over budget / limit beyond ^, infeasible v): no label draws with them.
STATUS_MARKERS = ("X", "^", "v")


MARKER_SCALE = {"*": 1.5, "P": 1.1, "h": 1.1, "p": 1.1}  # markers that look small at one size


@dataclass(frozen=True)
class Style:
    color: tuple[float, float, float]
    marker: str

    def size(self, base: float) -> float:
        """A marker size (points) that looks like `base` for this marker."""
        return base * MARKER_SCALE.get(self.marker, 1.0)


def _pick(text: str, *choices: tuple) -> list:
    """One item of each `choices`, picked by its own byte of the SHA-1 of `text`: stable across runs and
    machines (Python's hash() is salted per process), the picks independent of one another."""
    digest = hashlib.sha1(text.encode()).digest()
    return [c[digest[k] % len(c)] for k, c in enumerate(choices)]


def _shade(color: str, by: float) -> tuple[float, float, float]:
    rgb = to_rgb(color)
    target = 1.0 if by > 0 else 0.0
    return tuple(c + (target - c) * abs(by) for c in rgb)


def style(label: str) -> Style:
    """The colour and marker of one policy label (a preset name, maybe with `(key=value, ...)`)."""
    name, keys = parse_label(label)
    kv = keys.pop("kv", None)
    variant = ", ".join(f"{k}={v}" for k, v in keys.items())
    if name in PRESETS:
        color, marker = PRESETS[name]
    else:  # a name no fixed entry knows: the reserved range
        color, marker = _pick(name, RESERVED_COLORS, RESERVED_MARKERS)
    if kv is not None:
        color = KV_POLICIES.get(kv) or _pick("kv=" + kv, RESERVED_COLORS)[0]
    if not variant:
        return Style(to_rgb(color), marker)
    shade, marker = _pick(variant, SHADES, RESERVED_MARKERS)
    return Style(_shade(color, shade), marker)


def palette(labels: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """label -> colour, in the fixed policy order (the order of legends)."""
    return {p: style(p).color for p in policy_order(labels)}


def markers(labels: Iterable[str]) -> dict[str, str]:
    return {p: style(p).marker for p in policy_order(labels)}
