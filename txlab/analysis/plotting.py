"""What every plot of a store shares: the matplotlib backend and theme, `Skipped`, axes in one memory unit,
log2 length axes, legend entries, and `place_labels`, which sets text labels beside their points without
overlaps. The plots themselves live one family a module (`memory_plots`, `frontier_plots`,
`tradeoff_plots`, `chunk_plots`, `device_plots`, `training_plots`); `plots` names them all.

Every marker sits at its value: series that coincide are told apart by marker size, by a small sideways
dodge on a categorical axis, or by a note, never by moving a point along a numeric axis.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from txlab.analysis.data import fmt_len  # noqa: E402
from txlab.analysis.palette import style  # noqa: E402

GIB_NOTE = "GiB = 2^30 bytes"
ESTIMATED_DASHES = (0, (4, 2))
# a budget's label sits on its line at the left, on a light backing so grid lines do not cross it
LINE_LABEL = dict(
    xycoords=("axes fraction", "data"), va="center", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1)
)

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
TICK_PT = float(matplotlib.rcParams["ytick.labelsize"])  # cell text is never smaller than tick labels


@dataclass(frozen=True)
class Skipped:
    """What a plot function returns instead of a figure: the store has nothing it can show, and why."""

    reason: str

    def __bool__(self) -> bool:  # `if fig:` reads "was something drawn"
        return False

    def __str__(self) -> str:
        return self.reason


Drawn = plt.Figure | Skipped


# --- memory in one unit per axis ---------------------------------------------------------------------


@dataclass(frozen=True)
class MemUnit:
    """The unit an axis (and every annotation on it) shows memory in; values come in GiB."""

    name: str  # GiB, MiB or KiB
    per_gib: int  # units in one GiB

    def number(self, gib: float) -> str:
        v = gib * self.per_gib
        return f"{v:.0f}" if v >= 100 else f"{v:.3g}"

    def text(self, gib: float) -> str:
        """'154 MiB': a value with its unit, for annotations on an axis in this unit."""
        return f"{self.number(gib)} {self.name}"


UNITS = (MemUnit("GiB", 1), MemUnit("MiB", 2**10), MemUnit("KiB", 2**20))


def units_note(*units: MemUnit) -> str:
    """'GiB = 2^30 bytes, MiB = 2^20 bytes': the units a plot shows (GiB always: budgets are in GiB)."""
    powers = {"GiB": 30, "MiB": 20, "KiB": 10}
    return ", ".join(f"{n} = 2^{powers[n]} bytes" for n in dict.fromkeys(["GiB", *(u.name for u in units)]))


def mem_unit(values_gib: Iterable[float]) -> MemUnit:
    """GiB when the largest value is 1 GiB or more, else MiB, else KiB: one unit for a whole axis."""
    finite = [float(v) for v in values_gib if v is not None and np.isfinite(v) and v > 0]
    top = max(finite, default=1.0)
    return next((u for u in UNITS if top * u.per_gib >= 1), UNITS[-1])


def log2_mem_axis(ax, unit: MemUnit, which: str = "y") -> None:
    """A log2 memory axis whose ticks are numbers in `unit` (the axis label names it)."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log", base=2)
    axis.set_major_locator(mticker.LogLocator(base=2, numticks=8))
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: unit.number(v)))
    axis.set_minor_locator(mticker.NullLocator())


def log2_len_axis(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    lengths = sorted({int(t) for t in lengths})
    if len(lengths) > 6:  # every other tick, counted from the longest (both ends when the count is odd)
        lengths = lengths[::-1][::2][::-1]
    ax.xaxis.set_major_locator(mticker.FixedLocator(lengths))
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt_len(v)))
    ax.xaxis.set_minor_locator(mticker.NullLocator())


def coincide(a: float, b: float, tol: float = 0.04) -> bool:
    """Two values that would draw on top of each other on a log2 axis (within `tol` of a doubling)."""
    return bool(a > 0 and b > 0 and abs(np.log2(a / b)) < tol)


# --- legends ----------------------------------------------------------------------------------------


def policy_handles(labels: Iterable[str], lw: float = 2, line: bool = True) -> tuple[list, list]:
    labels = list(labels)
    handles = [
        Line2D([], [], color=style(p).color, marker=style(p).marker, lw=lw if line else 0, markersize=style(p).size(7))
        for p in labels
    ]
    return handles, labels


def basis_handles(bases: set[str], estimated_text: str = "estimated") -> tuple[list, list]:
    """Solid 'measured' and dashed 'estimated' legend entries, for the bases a plot shows."""
    entries = [("measured", "-", "measured"), ("estimated", "--", estimated_text)]
    shown = [(ls, text) for basis, ls, text in entries if basis in bases]
    return [Line2D([], [], color="0.3", lw=1.5, ls=ls) for ls, _ in shown], [text for _, text in shown]


def join_names(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# --- labels beside points, never on top of each other ------------------------------------------------

# Offsets (points) a label tries around its point, nearest first: right, left, above, below, the diagonals,
# then the same directions farther out. A label away from its point gets a thin leader line.
_DIRECTIONS = ((1, 0.3), (-1, 0.3), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1), (1, -0.3), (-1, -0.3))
_RADII = (9, 16, 28, 42, 60, 80, 105)
LEADER_PT = 12  # farther than this from its point, a label gets a leader line


def text_bbox(t: Text, renderer) -> Bbox:
    """The window extent of the text alone (an annotation's extent also covers its leader line)."""
    if isinstance(t, Annotation):
        t.update_positions(renderer)  # where its offset puts it now
    return Text.get_window_extent(t, renderer)


def _overlaps(b: Bbox, others: list[Bbox], pad: float) -> bool:
    return any(b.x0 < o.x1 + pad and o.x0 < b.x1 + pad and b.y0 < o.y1 + pad and o.y0 < b.y1 + pad for o in others)


def _line_boxes(ax, step_px: float) -> list[Bbox]:
    """Small boxes along the lines drawn in `ax` (display coordinates), so labels keep off them."""
    boxes = []
    for line in ax.lines:
        xy = line.get_transform().transform(line.get_path().vertices)
        for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
            n = max(1, int(np.hypot(x1 - x0, y1 - y0) // step_px))
            for f in np.linspace(0, 1, n + 1):
                x, y = x0 + f * (x1 - x0), y0 + f * (y1 - y0)
                boxes.append(Bbox.from_extents(x - 1, y - 1, x + 1, y + 1))
    return boxes


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], colors: Sequence, **kw) -> list:
    """Annotate each point (data coordinates) with its text, in the first spot of `_DIRECTIONS` x `_RADII`
    that stays inside the axes and clear of every marker, every line and the labels placed before it.

    Call it once the figure is laid out (after `layout.finish`): positions are measured with the renderer.
    A label that finds no free spot takes the one overlapping the least."""
    renderer = ax.figure.canvas.get_renderer()
    px = ax.figure.dpi / 72
    frame = ax.get_window_extent(renderer)
    r_marker = 7.5 * px  # a marker and the ring around a point of the Pareto front
    taken = [
        Bbox.from_extents(x - r_marker, y - r_marker, x + r_marker, y + r_marker)
        for x, y in (ax.transData.transform(p) for p in points)
    ] + _line_boxes(ax, 3 * px)
    placed = []
    for point, text, color in zip(points, texts, colors):
        t = ax.annotate(
            text, point, xytext=(0, 0), textcoords="offset points", fontsize=8.5, color=color, fontweight="bold", **kw
        )
        best, best_cost = None, None
        for r in _RADII:
            for dx, dy in _DIRECTIONS:
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0.5 else "top" if dy < -0.5 else "center"
                t.set(ha=ha, va=va)
                t.xyann = (dx * r, dy * r)
                b = text_bbox(t, renderer)
                inside = frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
                cost = sum(_overlaps(b, [o], px) for o in taken) + (0 if inside else 100)
                if best_cost is None or cost < best_cost:
                    best, best_cost = (ha, va, dx * r, dy * r), cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        t.remove()
        ha, va, ox, oy = best
        far = np.hypot(ox, oy) > LEADER_PT
        label = ax.annotate(
            text,
            point,
            xytext=(ox, oy),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=8.5,
            color=color,
            fontweight="bold",
            arrowprops=dict(arrowstyle="-", color=color, lw=0.7, shrinkA=1, shrinkB=5) if far else None,
            **kw,
        )
        taken.append(text_bbox(label, renderer))
        placed.append(label)
    return placed
