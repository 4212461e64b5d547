"""Frontier plots: `frontier_heatmap` (the longest sequence that fits, per policy, depth and budget) and
`frontier_steps` (the same against depth). See docs/analysis.md.

Every marker sits at its value. In `frontier_steps` the depth axis is categorical, so the policies of a
depth sit side by side (a small sideways dodge) instead of on top of each other, and policies with the
same frontier everywhere are named in the note. With one depth the frontier is a dot per policy with its
value written beside it, not a line of one point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from txlab.analysis.data import Source, fmt_len, policy_order, prepare
from txlab.analysis.frontier import frontier
from txlab.analysis.layout import (
    MARGIN_W_IN,
    MAX_COLS,
    MAX_WIDTH_IN,
    finish,
    grid,
    hide_empty,
    is_last_in_column,
    panel_width,
    title,
    wrap,
)
from txlab.analysis.palette import style
from txlab.analysis.plotting import GIB_NOTE, TICK_PT, Drawn, Skipped, basis_handles, join_names, policy_handles
from txlab.analysis.time_plots import NEEDS


@dataclass(frozen=True)
class FrontierPanel:
    """One panel of a frontier plot: a budget, and its columns (setting, depth) with their tick labels."""

    setting: str | None  # None: the columns span settings (each setting has depths of its own)
    budget: float
    columns: list[tuple[str, int]]
    ticks: list[str]


def frontier_panels(fr: pd.DataFrame) -> list[FrontierPanel]:
    """Settings that share their depths: a panel per (setting, budget), depths across. Settings with depths
    of their own (gpt2 sizes): a panel per budget, the (setting, depth) pairs across, depth first."""
    settings = sorted(fr["setting"].unique())
    depths = sorted(int(d) for d in fr["depth"].dropna().unique())
    present = sorted({(s, int(d)) for s, d in zip(fr["setting"], fr["depth"]) if pd.notna(d)}, key=lambda k: k[::-1])
    budgets = sorted(fr["budget_gib"].unique())
    if len(present) == len(settings) * len(depths):
        return [
            FrontierPanel(s, b, [(s, d) for d in depths], [str(d) for d in depths]) for s in settings for b in budgets
        ]
    ticks = [f"{s.replace(', ', chr(10))}\n{d}" for s, d in present]
    return [FrontierPanel(None, b, present, ticks) for b in budgets]


def _panel_rows(fr: pd.DataFrame, p: FrontierPanel) -> pd.DataFrame:
    keys = set(p.columns)
    f = fr[fr["budget_gib"] == p.budget]
    return f[[pd.notna(d) and (s, int(d)) in keys for s, d in zip(f["setting"], f["depth"])]]


def _panel_title(p: FrontierPanel) -> tuple[str, str]:
    return (p.setting or ""), f"budget {p.budget:g} GiB"


def _depth_xlabel(p: FrontierPanel) -> str:
    return "depth (layers)" if p.setting is not None else "setting / depth (layers)"


def _fit_panels(items: list[FrontierPanel], panel_w: float) -> list[list[FrontierPanel | None]]:
    """A row of panels per setting, its budgets side by side as far as the width bound allows."""
    fits = max(1, int((MAX_WIDTH_IN - MARGIN_W_IN) // panel_w))
    groups = list(dict.fromkeys(p.setting for p in items))
    per_row = max(sum(1 for p in items if p.setting == g) for g in groups)
    n_cols = min(per_row, fits, MAX_COLS)
    return [row for g in groups for row in wrap([p for p in items if p.setting == g], n_cols)]


def _short_label(label: str) -> str:
    """A frontier label for a heat-map cell: '32k+', '4096', 'infeasible\\nat 256' (see fmt_len)."""
    if label.startswith("infeasible at "):
        return "infeasible\nat " + fmt_len(label.removeprefix("infeasible at "))
    if label[:1].isdigit():
        plus = label.endswith("+")
        return fmt_len(label.rstrip("+")) + ("+" if plus else "")
    return label


def _heat_cells(f: pd.DataFrame, pols: list[str], cols: list, all_estimated: bool, by_time: bool = False) -> dict:
    """(row, col) -> (log2 value or nan, main text, second line or None, infeasible), measured first. `by_time`:
    the value is log10 of the frontier trial's predicted step time, written as the second line."""
    meas = f[f["basis"] == "measured"].set_index(["policy", "setting", "depth"])
    est = f[f["basis"] == "estimated"].set_index(["policy", "setting", "depth"])
    cells = {}
    for r, p in enumerate(pols):
        for c, (s, d) in enumerate(cols):
            m = meas.loc[(p, s, d)] if (p, s, d) in meas.index else None
            e = est.loc[(p, s, d)] if (p, s, d) in est.index else None
            first = m if m is not None else e
            if first is None:
                cells[r, c] = (np.nan, "not run", None, False)
                continue
            longest = first["longest_feasible_seq_len"]
            text = ("est. " if m is None and not all_estimated else "") + _short_label(first["label"])
            second = None
            if m is not None and e is not None and e["label"] != m["label"]:
                second = "est. " + _short_label(e["label"]).replace("infeasible\nat ", "none ≥")
            value = np.log2(float(longest)) if pd.notna(longest) else np.nan
            if by_time:
                t = first["predicted_step_time_s_at_frontier"]
                value = np.log10(t) if pd.notna(t) and t > 0 else np.nan
                second = f"{t:.3g} s" if pd.notna(t) and t > 0 else ("no prediction" if pd.notna(longest) else None)
            cells[r, c] = (value, text, second, pd.isna(longest))
    return cells


def _draw_heat_cells(ax, cells: dict, lo: float, hi: float) -> None:
    for (r, c), (value, text, second, infeasible) in cells.items():
        if text == "not run":
            ax.text(c + 0.5, r + 0.5, text, ha="center", va="center", fontsize=TICK_PT, color="0.5")
            continue
        if infeasible:
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor="0.93", hatch="///", edgecolor="0.75", lw=0))
        bright = not infeasible and (value - lo) / max(hi - lo, 1) > 0.55
        color = "white" if bright else "0.1"
        kw = dict(ha="center", va="center", fontsize=TICK_PT, color=color)
        ax.text(c + 0.5, r + (0.36 if second else 0.5), text, fontweight="bold", **kw)
        if second:
            ax.text(c + 0.5, r + 0.76, second, style="italic", **kw)


def _heat_panel(ax, cells: dict, p: FrontierPanel, pols: list[str], scale: tuple) -> None:
    val = np.full((len(pols), len(p.columns)), np.nan)
    for (r, c), (value, *_) in cells.items():
        val[r, c] = value
    ax.grid(False)
    lo, hi, cmap = scale
    sns.heatmap(
        val,
        ax=ax,
        cmap=cmap,
        vmin=lo,
        vmax=max(hi, lo + 1),
        cbar=False,
        linewidths=1.5,
        linecolor="white",
        xticklabels=p.ticks,
        yticklabels=pols,
    )
    _draw_heat_cells(ax, cells, lo, hi)
    title(ax, *_panel_title(p))
    ax.set_xlabel(_depth_xlabel(p))
    ax.tick_params(axis="y", rotation=0)
    ax.tick_params(axis="x", rotation=0)


def _text_width_in(texts: Iterable[str], pt: float = TICK_PT) -> float:
    """Rough width of the widest line of `texts` in inches (bold DejaVu Sans: ~0.68 em a character)."""
    return max((len(line) for t in texts for line in str(t).split("\n")), default=1) * 0.68 * pt / 72


def plot_frontier_heatmap(source: Source, budgets: Iterable[float] | None = None, color: str = "length") -> Drawn:
    """Per budget: policy x depth cells holding the longest feasible seq_len (colour: log2 of it; `color`
    "predicted_time": log10 of the frontier trial's predicted step time, written under the length).

    '32k+': the longest length tried fits; 'infeasible at 256': not even the shortest fits (hatched);
    'est. N' below a cell: the frontier estimated rows give, when it differs from the measured one.
    Cell text is the size of the tick labels; cells are as wide as their text; panels wrap into rows to
    keep the figure within the width bound.
    """
    fr = frontier(prepare(source), budgets)
    if fr.empty:
        return Skipped("no budget to judge against, or no rows other than errors")
    by_time = color == "predicted_time"
    times = pd.to_numeric(fr["predicted_step_time_s_at_frontier"], errors="coerce").dropna()
    if by_time and times.empty:
        return Skipped(f"no frontier trial has a predicted step time ({NEEDS})")
    pols = policy_order(fr["policy"])
    all_estimated = bool((fr["basis"] == "estimated").all())
    items = frontier_panels(fr)
    cells = {id(p): _heat_cells(_panel_rows(fr, p), pols, p.columns, all_estimated, by_time) for p in items}
    lens = pd.concat([fr["longest_feasible_seq_len"], fr["shortest_tried"]]).dropna().astype(int)
    scale = (np.log2(lens.min()), np.log2(lens.max()), sns.color_palette("crest", as_cmap=True))
    if by_time:
        scale = (np.log10(times.min()), np.log10(times.max()), sns.color_palette("flare", as_cmap=True))
    texts = [t for c in cells.values() for v in c.values() for t in v[1:3] if t]
    cell_w = max(0.7, _text_width_in(texts + [t for p in items for t in p.ticks]) + 0.15)
    two_lines = any("\n" in t for t in texts) or any(v[2] for c in cells.values() for v in c.values())
    cell_h = 0.62 if two_lines else 0.45
    panel_w = cell_w * len(items[0].columns) + _text_width_in(pols, TICK_PT * 0.9) + 0.5
    layout = _fit_panels(items, panel_w)
    fig, axes = grid(len(layout), len(layout[0]), panel_w, cell_h * len(pols) + 1.2, sharex=False, sharey=False)
    for i, row in enumerate(layout):
        for j, p in enumerate(row):
            if p is not None:
                _heat_panel(axes[i][j], cells[id(p)], p, pols, scale)
                axes[i][j].set_ylabel("policy" if j == 0 else "")
    hide_empty(axes, layout)
    note = (
        f"Cell: longest sequence length (tokens, k = 1024) with status ok and peak <= budget; {GIB_NOTE}. "
        "'N+': the longest length tried fits, the limit lies beyond. Hatched 'infeasible at N': not even the "
        "shortest length tried fits. "
        + (
            "Every cell is an estimate (measured = false)."
            if all_estimated
            else "'est.': from estimated rows (measured = false); in italics under a cell where it differs."
        )
    )
    if by_time:
        note = (
            "Cell: longest sequence length (tokens, k = 1024) with status ok and peak <= budget, and under it the "
            "predicted step time of the trial that reached it (the time model on the row's hardware profile, not "
            f"measured); colour: that time, log scale, darker is slower. {GIB_NOTE}. 'N+': the longest length tried "
            "fits. Hatched: not even the shortest length tried fits. 'est.': from estimated rows (measured = false)."
        )
        return finish(fig, "Feasibility frontier, coloured by predicted step time", [], [], note)
    return finish(fig, "Feasibility frontier: longest sequence that fits", [], [], note)


# --- frontier_steps ----------------------------------------------------------------------------------


def _step_series(f: pd.DataFrame, p: str, basis: str, cols: list) -> pd.DataFrame | None:
    """One policy's frontier points across the panel's columns; estimated only where it moves the frontier."""
    index = {k: n for n, k in enumerate(cols)}
    s = f[(f["policy"] == p) & (f["basis"] == basis)]
    s = s.assign(x=[index[(a, int(d))] for a, d in zip(s["setting"], s["depth"])]).sort_values("x")
    if s.empty:
        return None
    if basis == "estimated":
        m = f[(f["policy"] == p) & (f["basis"] == "measured")]
        m = dict(zip(zip(m["setting"], m["depth"]), m["label"]))
        if m and all(m.get((a, d)) == lab for a, d, lab in zip(s["setting"], s["depth"], s["label"])):
            return None
    return s


def _dodge(pols: list[str], width: float = 0.7) -> dict[str, float]:
    """Each policy's sideways offset within a category (a depth), so equal values sit side by side."""
    step = min(0.14, width / max(len(pols), 1))
    return {p: (k - (len(pols) - 1) / 2) * step for k, p in enumerate(pols)}


def _draw_points(ax, x: np.ndarray, s: pd.DataFrame, p: str, floor: float, measured: bool = True) -> np.ndarray:
    """A policy's frontier points at their values: its marker; a hollow up-triangle where the longest length
    tried fits (the limit lies beyond); a down-triangle on the 'infeasible' row. Returns the y values."""
    st = style(p)
    y = s["longest_feasible_seq_len"].astype(float).fillna(floor).to_numpy()
    censored = s["fits_at_longest_tried"].to_numpy(dtype=bool)
    none = s["longest_feasible_seq_len"].isna().to_numpy()
    plain = ~censored & ~none
    face = st.color if measured else "white"
    ax.scatter(x[plain], y[plain], marker=st.marker, s=st.size(6) ** 2, facecolors=face, edgecolors=st.color,
               linewidths=1.2, zorder=4, label=p)  # fmt: skip
    ax.scatter(x[censored], y[censored], marker="^", s=64, facecolors="white", edgecolors=st.color, linewidths=1.5,
               zorder=4, label=p)  # fmt: skip
    ax.scatter(x[none], y[none], marker="v", s=50, color=st.color, zorder=4, label=p)
    return y


def _draw_step_line(ax, s: pd.DataFrame, p: str, basis: str, floor: float, dx: float) -> None:
    x = s["x"].to_numpy() + dx
    measured = basis == "measured"
    y = _draw_points(ax, x, s, p, floor)
    ax.step(x, y, where="mid", color=style(p).color, ls="-" if measured else "--", lw=2 if measured else 1.4)


def _steps_axes(ax, floor: float, lens: list[int]) -> None:
    ax.set_yscale("log", base=2)
    ticks = [floor] + (lens if len(lens) <= 8 else lens[::2])
    ax.yaxis.set_major_locator(mticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: "infeasible" if v <= floor * 1.01 else fmt_len(v)))
    ax.yaxis.set_minor_locator(mticker.NullLocator())
    ax.set_ylim(floor / 1.4, max(lens) * 1.6)
    ax.axhspan(floor / 1.4, floor * 1.3, color="0.92", zorder=0)


def _same_frontier(f: pd.DataFrame, pols: list[str]) -> list[list[str]]:
    """Groups of policies whose measured frontier is the same at every column of a panel."""
    m = f[f["basis"] == "measured"]
    by = {}
    for p in pols:
        s = m[m["policy"] == p]
        if len(s):
            by.setdefault(tuple(sorted(zip(s["setting"], s["depth"].astype(int), s["label"]))), []).append(p)
    return [g for g in by.values() if len(g) > 1]


def _steps_panel(ax, f: pd.DataFrame, p: FrontierPanel, pols: list[str], floor: float) -> None:
    """Step lines across depths, each policy dodged sideways within a depth (the axis is categorical)."""
    dodge = _dodge(pols)
    for pol in pols:
        for basis in ("measured", "estimated"):
            s = _step_series(f, pol, basis, p.columns)
            if s is not None:
                _draw_step_line(ax, s, pol, basis, floor, dodge[pol])
    ax.set_xticks(range(len(p.columns)), p.ticks)
    ax.set_xlim(-0.5, len(p.columns) - 0.5)


def _dots_panel(ax, f: pd.DataFrame, p: FrontierPanel, pols: list[str], floor: float) -> None:
    """One depth: a dot per policy at its longest feasible length, the value written above it; a hollow
    dot beside it, 'est. N', where estimated rows move the frontier."""
    for k, pol in enumerate(pols):
        m = _step_series(f, pol, "measured", p.columns)
        e = _step_series(f, pol, "estimated", p.columns)
        for s, measured in ((m, True), (e, False)):
            if s is None:
                continue
            beside = not measured and m is not None
            x = np.full(len(s), k + (0.25 if beside else 0.0))
            y = _draw_points(ax, x, s, pol, floor, measured)
            text = ("est. " if beside else "") + _short_label(s["label"].iloc[0]).replace("\n", " ")
            ax.annotate(text, (x[0], y[0]), xytext=(0, 8), textcoords="offset points", ha="center", va="bottom",
                        fontsize=TICK_PT * 0.95, color=style(pol).color, fontweight="bold")  # fmt: skip
    many = len(pols) > 4
    ax.set_xticks(range(len(pols)), pols, rotation=30 if many else 0, ha="right" if many else "center")
    ax.set_xlim(-0.6, len(pols) - 0.4)


def _steps_legend(pols: list[str], bases: set[str], dots: bool) -> tuple[list, list]:
    handles, labels = policy_handles(pols, line=not dots)
    basis_h, basis_l = basis_handles(
        bases, "estimated rows included\n(where they differ)" if "measured" in bases else "estimated"
    )
    if dots and "measured" in bases and "estimated" in bases:
        basis_h = [Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor="0.3", markersize=7)]
        basis_l = ["estimated rows included\n(hollow, where they differ)"]
    handles += [
        *(basis_h if not dots or "estimated" in bases else []),
        Line2D([], [], marker="^", ls="", markerfacecolor="white", markeredgecolor="0.3", markersize=8),
        Line2D([], [], marker="v", ls="", color="0.3", markersize=7),
    ]
    labels += [
        *(basis_l if not dots or "estimated" in bases else []),
        "longest length tried fits\n(limit lies beyond)",
        "infeasible even at the\nshortest length tried",
    ]
    return handles, labels


def plot_frontier_steps(source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """Longest feasible seq_len against depth, one step line per policy, one panel per budget.

    Measured frontier solid, estimated (with estimated rows) dashed; a hollow triangle marks a frontier
    that is the longest length tried (the limit lies beyond); 'infeasible' sits on its own row below.
    Within a depth the policies sit side by side. With one depth per panel: a dot per policy, its value
    written beside it.
    """
    fr = frontier(prepare(source), budgets)
    if fr.empty:
        return Skipped("no budget to judge against, or no rows other than errors")
    pols = policy_order(fr["policy"])
    floor = int(fr["shortest_tried"].dropna().min()) / 2  # the "infeasible" row, below every real length
    lens = sorted(
        set(fr["longest_feasible_seq_len"].dropna().astype(int)) | set(fr["longest_tried"].dropna().astype(int))
    )
    items = frontier_panels(fr)
    dots = all(len(p.columns) == 1 for p in items)
    panel_w = max(3.2, (0.8 * len(pols) if dots else 0.5 * len(items[0].columns)) + 1.4)
    layout = _fit_panels(items, panel_w)
    panel_w = min(panel_w, panel_width(len(layout[0]), panel_w))
    fig, axes = grid(len(layout), len(layout[0]), panel_w, 3.6, sharex=False)
    same: dict[str, list[str]] = {}
    for i, row in enumerate(layout):
        for j, p in enumerate(row):
            if p is None:
                continue
            ax, f = axes[i][j], _panel_rows(fr, p)
            setting, text = _panel_title(p)
            if dots:
                _dots_panel(ax, f, p, pols, floor)
                text += f", {p.columns[0][1]} layers"
            else:
                _steps_panel(ax, f, p, pols, floor)
                for group in _same_frontier(f, pols):
                    same.setdefault(join_names(group), []).append(text)
            _steps_axes(ax, floor, lens)
            title(ax, setting, text)
            ax.set_xlabel(("policy" if dots else _depth_xlabel(p)) if is_last_in_column(layout, i, j) else "")
            ax.set_ylabel("longest feasible length (tokens, log2)" if j == 0 else "")
    hide_empty(axes, layout)
    note = f"Feasible: status ok and peak <= budget; {GIB_NOTE}. Every marker is at its value"
    note += (
        "; the value is written above it."
        if dots
        else "; at each depth the policies sit side by side (the depth axis is categorical)."
    )
    n_panels = sum(p is not None for r in layout for p in r)
    for names, where in same.items():
        note += f" Same frontier at every depth: {names}" + ("" if len(where) == n_panels else f" ({', '.join(where)})")
        note += "."
    title_text = "Feasibility frontier per policy" if dots else "Feasibility frontier by depth"
    return finish(fig, title_text, *_steps_legend(pols, set(fr["basis"]), dots), note)
