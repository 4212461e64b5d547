"""Memory plots: `memory_vs_length` (how the peak grows with length and depth) and `memory_breakdown`
(what the peak is made of). See docs/analysis.md.

Memory axes and the budgets written on them share one unit (GiB, or MiB for small models). Lines that
coincide (two policies with the same peaks) are drawn one inside the other, the earlier policy wider, and
named in the note; no point is moved off its value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from txlab.analysis.data import (
    BUDGET,
    COMPONENTS,
    OPTIONAL_COMPONENTS,
    Source,
    budgets_of,
    fmt_len,
    policy_order,
    prepare,
)
from txlab.analysis.frontier import best_ok
from txlab.analysis.layout import (
    MAX_COLS,
    finish,
    grid,
    hide_empty,
    is_last_in_column,
    panel_width,
    panels,
    title,
    wrap,
)
from txlab.analysis.palette import style
from txlab.analysis.plotting import (
    ESTIMATED_DASHES,
    LINE_LABEL,
    Drawn,
    MemUnit,
    Skipped,
    basis_handles,
    coincide,
    join_names,
    log2_len_axis,
    log2_mem_axis,
    mem_unit,
    policy_handles,
    units_note,
)
from txlab.results.columns import GiB

STATUS_MARKERS = {"oom": ("X", "out of memory"), "over_budget": ("^", "over budget")}


def _row_cap_gib(r, budgets: list[float]) -> float:
    """Where an oom / over-budget trial is drawn: the budget it ran under, else its device's capacity."""
    for v in (r[BUDGET], (r["device_capacity_bytes"] / GiB) if pd.notna(r["device_capacity_bytes"]) else None):
        if v is not None and pd.notna(v):
            return float(v)
    return max(budgets) if budgets else np.nan


def _lowest_peaks(valid: pd.DataFrame) -> pd.DataFrame:
    """Ok rows with a peak, one per (group, length, basis): the lowest peak over chunk settings."""
    ok = valid[(valid["status"] == "ok") & valid["peak_gib"].notna()]
    return ok.loc[ok.groupby(["group", "seq_len", "basis"])["peak_gib"].idxmin().values] if len(ok) else ok


def _failed_points(valid: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    failed = valid[valid["status"].isin(list(STATUS_MARKERS))].copy()
    failed["y"] = [_row_cap_gib(r, budgets) for _, r in failed.iterrows()]
    return failed


def _series(sel: pd.DataFrame, order: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(policy, its points sorted by length) per experiment, in the policy order of the legend."""
    out = [(g["policy"].iloc[0], g.sort_values("seq_len")) for _, g in sel.groupby("group", sort=False)]
    return sorted(out, key=lambda s: order.index(s[0]))


def _meeting(a: pd.DataFrame, b: pd.DataFrame) -> tuple[list[tuple], bool]:
    """The (length, basis) points where two series draw on top of each other, and whether they do so at
    every point they share (two or more): then their lines coincide, not only some markers."""
    pa = dict(zip(zip(a["seq_len"], a["basis"]), a["peak_gib"]))
    pb = dict(zip(zip(b["seq_len"], b["basis"]), b["peak_gib"]))
    shared = sorted(pa.keys() & pb.keys())
    meet = [k for k in shared if coincide(pa[k], pb[k])]
    return meet, len(shared) >= 2 and len(meet) == len(shared)


@dataclass
class Overlap:
    """What coincides in one panel: series drawn wider (whole lines) or with a larger marker at a point,
    so the later ones show inside them, and the notes that say so."""

    wider: list[int]  # per series: later series whose whole line coincides with it
    bigger: dict[tuple, int]  # (series, length, basis) -> later series whose marker sits on it there
    notes: list[str]


def overlaps(series: list[tuple[str, pd.DataFrame]]) -> Overlap:
    out = Overlap([0] * len(series), {}, [])
    for i, (pi, a) in enumerate(series):
        for j in range(i + 1, len(series)):
            pj, b = series[j]
            meet, whole = _meeting(a, b)
            if whole:
                out.wider[i] += 1
                out.notes.append(f"the lines of {pi} and {pj} coincide (equal peaks)")
            elif meet:
                for t, basis in meet:
                    out.bigger[i, t, basis] = out.bigger.get((i, t, basis), 0) + 1
                at = join_names([fmt_len(t) for t in dict.fromkeys(t for t, _ in meet)])
                out.notes.append(f"{pi} and {pj} have equal peaks at {at}")
    return out


def _draw_memory_lines(ax, sel: pd.DataFrame, order: list[str]) -> list[str]:
    """One line per experiment: measured solid; estimated dashed, from the last measured point on. Series
    that coincide are drawn one inside the other (`overlaps`); returns the notes saying where."""
    series = _series(sel, order)
    ov = overlaps(series)
    for k, ((pol, g), wider) in enumerate(zip(series, ov.wider)):
        st = style(pol)
        meas, est = g[g["basis"] == "measured"], g[g["basis"] == "estimated"]
        size = st.size(5.5) * (1 + 0.75 * wider)
        kw = dict(color=st.color, marker=st.marker, markersize=size, markeredgecolor="white", markeredgewidth=0.5)
        if len(meas):
            ax.plot(meas["seq_len"].astype(float), meas["peak_gib"], lw=1.8 + 2.2 * wider, label=pol, **kw)
        if len(est):
            est = pd.concat([meas.tail(1), est])  # so the estimate reads as an extension
            ax.plot(est["seq_len"].astype(float), est["peak_gib"], lw=1.5 + 2.2 * wider, ls=ESTIMATED_DASHES, **kw)
        for (i, t, basis), n in ov.bigger.items():  # a point another series covers: a larger marker under it
            if i == k:
                peak = g[(g["seq_len"] == t) & (g["basis"] == basis)]["peak_gib"].iloc[0]
                ax.plot([float(t)], [peak], ls="", zorder=1.9, **dict(kw, markersize=size * (1 + 0.75 * n)))
    return ov.notes


def _draw_failures(ax, fs: pd.DataFrame, order: list[str]) -> list[str]:
    """Oom (X) / over-budget (^) trials at their length on the budget line they ran under; hollow: an
    estimate. Several policies failing at one point are drawn one inside the other, the first largest;
    returns those points as text ('naive and sdpa over budget at 2048')."""
    fs = fs.assign(rank=[order.index(p) for p in fs["policy"]]).sort_values("rank")
    shared = []
    for (t, y), at in fs.groupby(["seq_len", "y"], sort=False):
        at = at.drop_duplicates(["policy", "status", "basis"])
        for k, (_, r) in enumerate(at.iterrows()):
            # the outermost twice the width of the innermost, however many there are
            marker, size = STATUS_MARKERS[r["status"]][0], 70 * (1 + (len(at) - 1 - k) / max(len(at) - 1, 1)) ** 2
            color = style(r["policy"]).color
            edge = "black" if k == 0 else "white"  # inner markers: a white rim, so the one around shows
            if r["basis"] == "measured":
                kw = dict(c=[color], edgecolors=edge, linewidths=0.8)
            else:
                kw = dict(facecolors="white", edgecolors=[color], linewidths=1.5)
            ax.scatter([float(r["seq_len"])], [y], marker=marker, s=size, zorder=5 + k, label=r["policy"], **kw)
        if at["policy"].nunique() > 1:
            what = join_names([STATUS_MARKERS[st][1] for st in dict.fromkeys(at["status"])])
            shared.append(f"{join_names(list(dict.fromkeys(at['policy'])))} {what} at {fmt_len(t)}")
    return shared


def _draw_budget_lines(ax, budgets: list[float], caps: Iterable[float], unit: MemUnit) -> None:
    """Dotted: the budgets asked; dash-dotted: a cap failures ran under that is not one of them. Labelled
    in the axis unit."""
    for cap in sorted(set(caps) - set(budgets)):
        ax.axhline(cap, color="0.6", ls="-.", lw=0.9, zorder=1)
        ax.annotate(f"{unit.text(cap)} (ran under)", xy=(0.01, cap), fontsize=8.5, color="0.45", **LINE_LABEL)
    for b in budgets:
        ax.axhline(b, color="0.35", ls=":", lw=1.2, zorder=1)
        ax.annotate(unit.text(b), xy=(0.01, b), fontsize=9, color="0.25", **LINE_LABEL)


def _memory_legend(labels: list[str], valid: pd.DataFrame, failed: pd.DataFrame) -> tuple[list, list]:
    handles, labels = policy_handles(labels)
    basis_h, basis_l = basis_handles(set(valid["basis"]))
    handles += [*basis_h, Line2D([], [], color="0.35", lw=1.2, ls=":")]
    labels += [*basis_l, "budget"]
    for status, (marker, text) in STATUS_MARKERS.items():  # filled: measured; estimates are drawn hollow
        if ((failed["status"] == status) & (failed["basis"] == "measured")).any():
            handles.append(Line2D([], [], marker=marker, ls="", color="0.6", markeredgecolor="black", markersize=8))
            labels.append(f"{text} (drawn at the\nbudget it ran under)")
    if (failed["basis"] == "estimated").any():
        handles.append(Line2D([], [], marker="^", ls="", markerfacecolor="white", markeredgecolor="0.3", markersize=8))
        labels.append("estimated not to fit\n(hollow)")
    return handles, labels


def _coincidence_note(found: dict[str, list[str]], n_panels: int) -> str:
    """'The lines of checkpoint and recompute coincide (equal peaks) ...', naming the panels where not in
    all of them."""
    notes = []
    for text, where in found.items():
        place = "" if len(where) == n_panels else f" ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
        notes.append(text[0].upper() + text[1:] + place)
    return "; ".join(notes) + ": drawn one inside the other, the first wider."


def plot_memory_vs_length(source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """Peak memory against seq_len (log2 both), one line per experiment in its policy's colour, a panel per
    (setting, depth), at most four a row.

    Lines: measured ok rows (solid) and estimated rows (dashed); for chunked policies the lowest peak
    over chunk settings. OOM (x) and over-budget (^) trials sit on the budget line they ran under.
    Dotted horizontal lines: the budgets, labelled in the axis unit.
    """
    df = prepare(source)
    valid = df[df["status"] != "error"]
    if valid.empty:
        return Skipped("no rows other than errors")
    budgets, _ = budgets_of(df, budgets)
    order = policy_order(df["policy"])
    layout, _ = panels(valid, by_depth=True)
    w = panel_width(len(layout[0]), 3.6)
    fig, axes = grid(len(layout), len(layout[0]), w, 0.88 * w)
    lines, failed = _lowest_peaks(valid), _failed_points(valid, budgets)
    unit = mem_unit([*lines["peak_gib"], *failed["y"], *budgets])  # one unit: the panels share their y axis
    found: dict[str, list[str]] = {}
    failed_together: dict[str, None] = {}  # ordered set
    for i, row in enumerate(layout):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            ax, (setting, depth) = axes[i][j], panel
            fs = failed[(failed["setting"] == setting) & (failed["depth"] == depth)]
            at = lines[(lines["setting"] == setting) & (lines["depth"] == depth)]
            for text in _draw_memory_lines(ax, at, order):
                found.setdefault(text, []).append(" ".join(filter(None, (setting, f"{depth} layers"))))
            failed_together.update(dict.fromkeys(_draw_failures(ax, fs, order)))
            _draw_budget_lines(ax, budgets, fs["y"].dropna(), unit)
            log2_len_axis(ax, valid["seq_len"].dropna())
            log2_mem_axis(ax, unit)
            title(ax, setting, f"{int(depth)} layers")
            last = is_last_in_column(layout, i, j)
            ax.set_xlabel("sequence length (tokens, log2)" if last else "")
            ax.tick_params(axis="x", labelbottom=last, labelrotation=45)  # shared x: the bottom panel shows it
            ax.set_ylabel(f"peak memory ({unit.name}, log2)" if j == 0 else "")
    hide_empty(axes, layout)
    n_err = int((df["status"] == "error").sum())
    note = f"{units_note(unit)}. Chunked policies: lowest peak over the chunk settings tried."
    if unit.name != "GiB" and budgets:
        note += f" Budgets: {', '.join(f'{b:g} GiB = {unit.text(b)}' for b in budgets)}."
    note += " " + _coincidence_note(found, sum(p is not None for r in layout for p in r)) if found else ""
    if 0 < len(failed_together) <= 2:
        note += f" Drawn one inside the other: {'; '.join(failed_together)}."
    elif failed_together:
        note += (
            " Policies failing at the same length are drawn one inside the other, the first in the legend outermost."
        )
    note += f" {n_err} error row(s) not shown (see the report)." if n_err else ""
    return finish(fig, "Peak memory vs sequence length", *_memory_legend(order, valid, failed), note)


# --- memory breakdown ------------------------------------------------------------------------------


def _component_colors() -> dict[str, tuple]:
    colors = dict(zip(COMPONENTS, sns.color_palette("Set2", len(COMPONENTS))))
    colors["kv_cache_bytes"], colors["other_bytes"] = colors["other_bytes"], colors["kv_cache_bytes"]
    return colors


def _breakdown_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Measured ok rows that carry a breakdown, and the components to stack (kv_cache: when some row has it)."""
    ok = best_ok(df)
    ok = ok[ok[list(COMPONENTS)].notna().any(axis=1)] if len(ok) else ok
    has = lambda c: len(ok) and pd.to_numeric(ok[c]).fillna(0).gt(0).any()  # noqa: E731
    return ok, [c for c in COMPONENTS if c not in OPTIONAL_COMPONENTS or has(c)]


def _stacks(sel: pd.DataFrame, comps: list[str]) -> pd.DataFrame:
    return sel[comps].apply(pd.to_numeric, errors="coerce").fillna(0) / GiB


def _draw_breakdown_panel(ax, s: pd.DataFrame, lengths: list, comps: list[str], colors: dict, unit: MemUnit) -> None:
    s = s.set_index("seq_len").reindex(lengths)
    stack = _stacks(s, comps) * unit.per_gib
    stack.index = [fmt_len(t) for t in lengths]
    stack.plot.bar(stacked=True, ax=ax, color=[colors[c] for c in comps], width=0.8, legend=False)
    for k, t in enumerate(lengths):
        if pd.isna(s.loc[t, "status"]):
            ax.text(k, 0, "not\nok", ha="center", va="bottom", fontsize=8.5, color="0.4")


def plot_memory_breakdown(source: Source, depth: int | None = None) -> Drawn:
    """Stacked params / grads / optimizer / activations / other at the peak, for one depth: a panel per
    (setting, policy), at most four a row.

    Default depth: the one with the most measured ok rows that carry a breakdown (the deepest on ties).
    """
    ok, comps = _breakdown_rows(prepare(source))
    if ok.empty:
        return Skipped("no measured ok rows with a memory breakdown")
    if depth is None:
        counts = ok.groupby("depth").size()
        depth = int(counts[counts == counts.max()].index.max())
    sel = ok[ok["depth"] == depth]
    if sel.empty:
        return Skipped(f"no measured ok rows at depth {depth}")
    lengths = sorted(sel["seq_len"].unique())
    by_setting = {s: policy_order(g["policy"]) for s, g in sel.groupby("setting", sort=True)}  # the pairs run
    n_cols = min(MAX_COLS, max(len(p) for p in by_setting.values()))
    layout = [r for s, pols in by_setting.items() for r in wrap([(s, p) for p in pols], n_cols)]
    layout = [r + [None] * (n_cols - len(r)) for r in layout]
    w = panel_width(n_cols, max(2.2, 0.45 * len(lengths) + 1))
    fig, axes = grid(len(layout), n_cols, w, 3.4, sharex=False)
    colors = _component_colors()
    unit = mem_unit(_stacks(sel, comps).sum(axis=1))
    for i, row in enumerate(layout):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            ax, (setting, pol) = axes[i][j], panel
            at = sel[(sel["setting"] == setting) & (sel["policy"] == pol)]
            _draw_breakdown_panel(ax, at, lengths, comps, colors, unit)
            title(ax, setting, pol)
            ax.set_xlabel("sequence length (tokens)" if is_last_in_column(layout, i, j) else "")
            ax.set_ylabel(f"memory at the peak ({unit.name})" if j == 0 else "")
            ax.tick_params(axis="x", labelrotation=45)
    hide_empty(axes, layout)
    handles = [Patch(color=colors[c]) for c in reversed(comps)]
    labels = [c.removesuffix("_bytes") for c in reversed(comps)]
    note = (
        f"{units_note(unit)}. Measured ok trials at depth {depth}; 'not ok' = no ok trial at that length "
        "(oom, over budget, error or not run). Chunked policies: the chunk setting with the lowest peak."
    )
    return finish(fig, f"What the peak is made of ({depth} layers)", handles, labels, note)
