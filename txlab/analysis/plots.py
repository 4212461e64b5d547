"""Figures of a store, drawn with seaborn on matplotlib's Agg backend. See docs/analysis.md.

Every plot function takes a store path or a DataFrame and returns a matplotlib Figure, or a `Skipped`
saying why the store has nothing that plot can show (e.g. no chunked-attention rows). `draw(name, ...)`
calls one by name, `all_figures` all of them.

Panels are faceted by `setting` (whatever else varies: model size, batch, dtype, kind, device) and depth,
at most four a row (`layout`); colours and markers follow the policy label and are the same in every plot
of every store (`palette`); estimated rows are dashed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from txlab.analysis.data import (
    BUDGET,
    COMPONENTS,
    GIB,
    KIND,
    OPTIONAL_COMPONENTS,
    Source,
    budgets_of,
    fmt_gib,
    fmt_len,
    policy_order,
    prepare,
)
from txlab.analysis.frontier import baseline_name, best_ok, fewest_devices, frontier, is_baseline
from txlab.analysis.layout import (
    MARGIN_W_IN,
    MAX_COLS,
    MAX_WIDTH_IN,
    finish,
    grid,
    hide_empty,
    is_last_in_column,
    panel_width,
    panels,
    title,
    wrap,
)
from txlab.analysis.palette import palette, style

GIB_NOTE = "GiB = 2^30 bytes"
STATUS_MARKERS = {"oom": ("X", "out of memory"), "over_budget": ("^", "over budget")}
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


def _log2_len_axis(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    lengths = sorted({int(t) for t in lengths})
    if len(lengths) > 6:  # every other tick, counted from the longest (both ends when the count is odd)
        lengths = lengths[::-1][::2][::-1]
    ax.xaxis.set_major_locator(mticker.FixedLocator(lengths))
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt_len(v)))
    ax.xaxis.set_minor_locator(mticker.NullLocator())


def _log2_mem_axis(ax) -> None:
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(mticker.LogLocator(base=2, numticks=8))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt_gib(v)))
    ax.yaxis.set_minor_locator(mticker.NullLocator())


def _policy_handles(labels: Iterable[str], lw: float = 2, line: bool = True) -> tuple[list, list]:
    labels = list(labels)
    handles = [
        Line2D([], [], color=style(p).color, marker=style(p).marker, lw=lw if line else 0, markersize=style(p).size(7))
        for p in labels
    ]
    return handles, labels


# --- 1. memory vs sequence length ------------------------------------------------------------------


def _row_cap_gib(r, budgets: list[float]) -> float:
    """Where an oom / over-budget trial is drawn: the budget it ran under, else its device's capacity."""
    for v in (r[BUDGET], (r["device_capacity_bytes"] / GIB) if pd.notna(r["device_capacity_bytes"]) else None):
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


def _draw_memory_lines(ax, sel: pd.DataFrame) -> None:
    """One line per experiment: measured solid; estimated dashed, from the last measured point on."""
    for _, g in sel.groupby("group", sort=False):
        st = style(g["policy"].iloc[0])
        meas = g[g["basis"] == "measured"].sort_values("seq_len")
        est = g[g["basis"] == "estimated"].sort_values("seq_len")
        kw = dict(
            color=st.color, marker=st.marker, markersize=st.size(5.5), markeredgecolor="white", markeredgewidth=0.5
        )
        if len(meas):
            ax.plot(meas["seq_len"].astype(float), meas["peak_gib"], lw=1.8, **kw)
        if len(est):
            est = pd.concat([meas.tail(1), est])  # so the estimate reads as an extension
            ax.plot(est["seq_len"].astype(float), est["peak_gib"], lw=1.5, ls=ESTIMATED_DASHES, **kw)


def _draw_failures(ax, fs: pd.DataFrame, order: list[str]) -> None:
    """Oom (X) / over-budget (^) trials on the budget line they ran under; hollow: an estimate."""
    for status, (marker, _) in STATUS_MARKERS.items():
        for basis in ("measured", "estimated"):
            s = fs[(fs["status"] == status) & (fs["basis"] == basis)]
            if s.empty:
                continue
            # policies failing at the same length sit side by side, not on top of each other
            nudge = [2 ** (0.09 * (order.index(p) - (len(order) - 1) / 2)) for p in s["policy"]]
            x = s["seq_len"].astype(float) * nudge
            colors = [style(p).color for p in s["policy"]]
            if basis == "measured":
                ax.scatter(x, s["y"], marker=marker, s=70, c=colors, edgecolors="black", linewidths=0.8, zorder=5)
            else:
                ax.scatter(
                    x, s["y"], marker=marker, s=70, facecolors="white", edgecolors=colors, linewidths=1.5, zorder=5
                )


def _draw_budget_lines(ax, budgets: list[float], caps: Iterable[float]) -> None:
    """Dotted: the budgets asked; dash-dotted: a cap failures ran under that is not one of them."""
    for cap in sorted(set(caps) - set(budgets)):
        ax.axhline(cap, color="0.6", ls="-.", lw=0.9, zorder=1)
        ax.annotate(f"{cap:g} GiB (ran under)", xy=(0.01, cap), fontsize=8.5, color="0.45", **LINE_LABEL)
    for b in budgets:
        ax.axhline(b, color="0.35", ls=":", lw=1.2, zorder=1)
        ax.annotate(f"{b:g} GiB", xy=(0.01, b), fontsize=9, color="0.25", **LINE_LABEL)


def _basis_handles(bases: set[str], estimated_text: str = "estimated") -> tuple[list, list]:
    """Solid 'measured' and dashed 'estimated' legend entries, for the bases a plot shows."""
    entries = [("measured", "-", "measured"), ("estimated", "--", estimated_text)]
    shown = [(ls, text) for basis, ls, text in entries if basis in bases]
    return [Line2D([], [], color="0.3", lw=1.5, ls=ls) for ls, _ in shown], [text for _, text in shown]


def _memory_legend(labels: list[str], valid: pd.DataFrame, failed: pd.DataFrame) -> tuple[list, list]:
    handles, labels = _policy_handles(labels)
    basis_h, basis_l = _basis_handles(set(valid["basis"]))
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


def plot_memory_vs_length(source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """Peak memory against seq_len (log2 both), one line per experiment in its policy's colour, a panel per
    (setting, depth), at most four a row.

    Lines: measured ok rows (solid) and estimated rows (dashed); for chunked policies the lowest peak
    over chunk settings. OOM (x) and over-budget (^) trials sit on the budget line they ran under.
    Dotted horizontal lines: the budgets.
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
    for i, row in enumerate(layout):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            ax, (setting, depth) = axes[i][j], panel
            fs = failed[(failed["setting"] == setting) & (failed["depth"] == depth)]
            _draw_memory_lines(ax, lines[(lines["setting"] == setting) & (lines["depth"] == depth)])
            _draw_failures(ax, fs, order)
            _draw_budget_lines(ax, budgets, fs["y"].dropna())
            _log2_len_axis(ax, valid["seq_len"].dropna())
            _log2_mem_axis(ax)
            title(ax, setting, f"{int(depth)} layers")
            last = is_last_in_column(layout, i, j)
            ax.set_xlabel("sequence length (tokens, log2)" if last else "")
            ax.tick_params(axis="x", labelbottom=last, labelrotation=45)  # shared x: the bottom panel shows it
            ax.set_ylabel("peak memory (log2)" if j == 0 else "")
    hide_empty(axes, layout)
    n_err = int((df["status"] == "error").sum())
    note = f"{GIB_NOTE}. Chunked policies: lowest peak over the chunk settings tried."
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


def _draw_breakdown_panel(ax, s: pd.DataFrame, lengths: list, comps: list[str], colors: dict) -> None:
    s = s.set_index("seq_len").reindex(lengths)
    stack = s[comps].apply(pd.to_numeric, errors="coerce").fillna(0) / GIB
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
    for i, row in enumerate(layout):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            ax, (setting, pol) = axes[i][j], panel
            _draw_breakdown_panel(ax, sel[(sel["setting"] == setting) & (sel["policy"] == pol)], lengths, comps, colors)
            title(ax, setting, pol)
            ax.set_xlabel("sequence length (tokens)" if is_last_in_column(layout, i, j) else "")
            ax.set_ylabel("memory at the peak (GiB)" if j == 0 else "")
            ax.tick_params(axis="x", labelrotation=45)
    hide_empty(axes, layout)
    handles = [Patch(color=colors[c]) for c in reversed(comps)]
    labels = [c.removesuffix("_bytes") for c in reversed(comps)]
    note = (
        f"{GIB_NOTE}. Measured ok trials at depth {depth}; 'not ok' = no ok trial at that length "
        "(oom, over budget, error or not run). Chunked policies: the chunk setting with the lowest peak."
    )
    return finish(fig, f"What the peak is made of ({depth} layers)", handles, labels, note)


# --- 2. feasibility frontier -----------------------------------------------------------------------


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


def _heat_cells(f: pd.DataFrame, pols: list[str], cols: list, all_estimated: bool) -> dict:
    """(row, col) -> (log2 value or nan, main text, second line or None, infeasible), measured first."""
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


def plot_frontier_heatmap(source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """Per budget: policy x depth cells holding the longest feasible seq_len (colour: log2 of it).

    '32k+': the longest length tried fits; 'infeasible at 256': not even the shortest fits (hatched);
    'est. N' below a cell: the frontier estimated rows give, when it differs from the measured one.
    Cell text is the size of the tick labels; cells are as wide as their text; panels wrap into rows to
    keep the figure within the width bound.
    """
    fr = frontier(prepare(source), budgets)
    if fr.empty:
        return Skipped("no budget to judge against, or no rows other than errors")
    pols = policy_order(fr["policy"])
    all_estimated = bool((fr["basis"] == "estimated").all())
    items = frontier_panels(fr)
    cells = {id(p): _heat_cells(_panel_rows(fr, p), pols, p.columns, all_estimated) for p in items}
    lens = pd.concat([fr["longest_feasible_seq_len"], fr["shortest_tried"]]).dropna().astype(int)
    scale = (np.log2(lens.min()), np.log2(lens.max()), sns.color_palette("crest", as_cmap=True))
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
    return finish(fig, "Feasibility frontier: longest sequence that fits", [], [], note)


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


def _draw_step_line(ax, s: pd.DataFrame, p: str, basis: str, floor: float, nudge: float) -> None:
    st = style(p)
    x = s["x"].to_numpy()
    y = s["longest_feasible_seq_len"].astype(float).fillna(floor).to_numpy() * nudge
    measured = basis == "measured"
    ax.step(x, y, where="mid", color=st.color, ls="-" if measured else "--", lw=2 if measured else 1.4)
    censored = s["fits_at_longest_tried"].to_numpy(dtype=bool)
    none = s["longest_feasible_seq_len"].isna().to_numpy()
    plain = ~censored & ~none
    ax.scatter(x[plain], y[plain], color=st.color, marker=st.marker, s=st.size(5.5) ** 2, zorder=4)
    ax.scatter(
        x[censored], y[censored], marker="^", s=60, facecolors="white", edgecolors=st.color, linewidths=1.5, zorder=4
    )
    ax.scatter(x[none], y[none], marker="v", s=50, color=st.color, zorder=4)


def _steps_axes(ax, p: FrontierPanel, floor: float, lens: list[int]) -> None:
    ax.set_yscale("log", base=2)
    ticks = [floor] + (lens if len(lens) <= 8 else lens[::2])
    ax.yaxis.set_major_locator(mticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: "infeasible" if v <= floor * 1.01 else fmt_len(v)))
    ax.yaxis.set_minor_locator(mticker.NullLocator())
    ax.set_ylim(floor / 1.4, max(lens) * 1.5)
    ax.axhspan(floor / 1.4, floor * 1.3, color="0.92", zorder=0)
    ax.set_xticks(range(len(p.columns)), p.ticks)
    ax.set_xlim(-0.5, len(p.columns) - 0.5)
    title(ax, *_panel_title(p))


def _steps_legend(pols: list[str], bases: set[str]) -> tuple[list, list]:
    handles, labels = _policy_handles(pols)
    basis_h, basis_l = _basis_handles(
        bases, "estimated rows included\n(where they differ)" if "measured" in bases else "estimated"
    )
    handles += [
        *basis_h,
        Line2D([], [], marker="^", ls="", markerfacecolor="white", markeredgecolor="0.3", markersize=8),
        Line2D([], [], marker="v", ls="", color="0.3", markersize=7),
    ]
    labels += [
        *basis_l,
        "longest length tried fits\n(limit lies beyond)",
        "infeasible even at the\nshortest length tried",
    ]
    return handles, labels


def plot_frontier_steps(source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """Longest feasible seq_len against depth, one step line per policy, one panel per budget.

    Measured frontier solid, estimated (with estimated rows) dashed; a hollow triangle marks a frontier
    that is the longest length tried (the limit lies beyond); 'infeasible' sits on its own row below.
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
    panel_w = max(3.2, 0.5 * len(items[0].columns) + 1.4)
    layout = _fit_panels(items, panel_w)
    panel_w = min(panel_w, panel_width(len(layout[0]), panel_w))
    fig, axes = grid(len(layout), len(layout[0]), panel_w, 3.6)
    nudge = {p: 2 ** (0.11 * (k - (len(pols) - 1) / 2)) for k, p in enumerate(pols)}  # keep equal lines apart
    for i, row in enumerate(layout):
        for j, p in enumerate(row):
            if p is None:
                continue
            ax, f = axes[i][j], _panel_rows(fr, p)
            for pol in pols:
                for basis in ("measured", "estimated"):
                    s = _step_series(f, pol, basis, p.columns)
                    if s is not None:
                        _draw_step_line(ax, s, pol, basis, floor, nudge[pol])
            _steps_axes(ax, p, floor, lens)
            ax.set_xlabel(_depth_xlabel(p) if is_last_in_column(layout, i, j) else "")
            ax.set_ylabel("longest feasible length (tokens, log2)" if j == 0 else "")
    hide_empty(axes, layout)
    note = f"Feasible: status ok and peak <= budget; {GIB_NOTE}. Lines nudged apart vertically where policies coincide."
    return finish(fig, "Feasibility frontier by depth", *_steps_legend(pols, set(fr["basis"])), note)


# --- 3. time vs memory -----------------------------------------------------------------------------


def pareto_front(points: pd.DataFrame, x: str = "peak_gib", y: str = "step_time_s") -> pd.Series:
    """True for points no other point beats on both x and y (lower is better on both)."""
    pts = points[[x, y]].astype(float).to_numpy()
    mask = []
    for a in pts:
        dominated = ((pts[:, 0] <= a[0]) & (pts[:, 1] <= a[1]) & ((pts[:, 0] < a[0]) | (pts[:, 1] < a[1]))).any()
        mask.append(not dominated)
    return pd.Series(mask, index=points.index)


def tradeoff_shapes(ok: pd.DataFrame, max_panels: int = 3) -> list[tuple]:
    """(setting, depth, seq_len) panels: per setting, at the depth where most policies ran, the longest
    length shared with the baseline and the longest length where most policies ran (up to max_panels)."""
    out = []
    for setting, s in ok.groupby("setting", sort=True):
        n = s.groupby(["depth", "seq_len"])["policy"].nunique()
        depth = max(d for (d, _), v in n.items() if v == n.max())
        at = n.loc[depth]
        picks = []
        base = s[(s["depth"] == depth) & s["is_baseline"]]["seq_len"]
        if len(base):
            picks.append(int(base.max()))
        picks.append(int(max(t for t, v in at.items() if v == at.max())))
        multi = [int(t) for t, v in at.items() if v >= 2]
        if multi:
            picks.append(max(multi))
        for t in sorted(set(picks))[:max_panels]:
            out.append((setting, depth, t))
    return out


def _timed_ok(df: pd.DataFrame, base: str | None) -> pd.DataFrame:
    ok = df[
        (df["status"] == "ok") & (df["basis"] == "measured") & df["peak_gib"].notna() & df["step_time_s"].notna()
    ].copy()
    ok["is_baseline"] = is_baseline(ok, base)
    return ok


def _shape_points(s: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One point per policy (chunked: the lowest-peak chunk setting) and the other chunk settings."""
    # several rows per (policy, chunk setting) would be duplicates of one experiment: keep one
    s = s.assign(
        chunks=np.where(
            s["policy.attention"] == "chunked",
            s["policy.q_chunk"].astype(str) + "x" + s["policy.k_chunk"].astype(str),
            "",
        )
    )
    s = s.sort_values("peak_gib").drop_duplicates(["policy", "chunks"])
    return s.drop_duplicates("policy"), s[s.duplicated("policy")]


def _draw_tradeoff_points(ax, s: pd.DataFrame, rest: pd.DataFrame) -> pd.DataFrame:
    """The Pareto staircase, the policies' points (circled on the front) and the other chunk settings."""
    front = s[pareto_front(s)].sort_values("peak_gib")
    ax.step(front["peak_gib"], front["step_time_s"], where="post", color="0.5", lw=1.2, ls="--", zorder=1)
    for _, r in s.iterrows():
        st = style(r["policy"])
        ax.scatter(
            r["peak_gib"],
            r["step_time_s"],
            color=st.color,
            marker=st.marker,
            s=st.size(8) ** 2,
            edgecolors="white",
            zorder=3,
        )
    if len(rest):
        ax.scatter(
            rest["peak_gib"],
            rest["step_time_s"],
            s=25,
            facecolors="none",
            edgecolors=[style(p).color for p in rest["policy"]],
            linewidths=1,
            zorder=2,
        )
    ax.scatter(
        front["peak_gib"], front["step_time_s"], s=190, facecolors="none", edgecolors="black", linewidths=1.2, zorder=2
    )
    return front


def _annotate_ratios(ax, s: pd.DataFrame, ref_t: float) -> None:
    for _, r in s.iterrows():
        label = r["policy"] + (f" ({r['chunks']})" if r["chunks"] else "")
        if np.isfinite(ref_t) and not r["is_baseline"]:
            label += f"\nx{r['step_time_s'] / ref_t:.2f}"
        ax.annotate(
            label,
            (r["peak_gib"], r["step_time_s"]),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=8.5,
            color=style(r["policy"]).color,
            fontweight="bold",
        )


def _tradeoff_axes(ax, both: pd.DataFrame) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt_gib(v)))
    ax.xaxis.set_major_locator(mticker.LogLocator(base=2, numticks=6))
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    lo, hi = both["peak_gib"].min(), both["peak_gib"].max()
    ax.set_xlim(lo / 1.25, hi * 1.8)
    tl, th = both["step_time_s"].min(), both["step_time_s"].max()
    ax.set_ylim(max(0, tl - 0.15 * (th - tl + 1e-12) - 0.05 * tl), th + 0.3 * (th - tl + 1e-12) + 0.05 * th)
    ax.set_xlabel("peak memory (log2)")
    kinds = set(both[KIND])
    ax.set_ylabel(
        "time per generated token (s)"
        if kinds == {"decode"}
        else "prefill time (s)"
        if kinds == {"prefill"}
        else "step time (s)"
    )


def _tradeoff_panel(ax, ok: pd.DataFrame, shape: tuple, base: str | None) -> bool:
    """Draws one shape; True when it shows other chunk settings of a chunked policy."""
    setting, depth, t = shape
    s, rest = _shape_points(ok[(ok["setting"] == setting) & (ok["depth"] == depth) & (ok["seq_len"] == t)])
    ref = s[s["is_baseline"]]
    _draw_tradeoff_points(ax, s, rest)
    _annotate_ratios(ax, s, float(ref["step_time_s"].min()) if len(ref) else np.nan)
    _tradeoff_axes(ax, pd.concat([s, rest]))
    base_label = f"{base} (kv=cache)" if base and set(s[KIND]) <= {"prefill", "decode"} else base
    missing = f"\n(no ok {base_label} run here: no ratio)" if base and ref.empty else ""
    title(ax, setting, f"{int(depth)} layers, {fmt_len(t)} tokens{missing}")
    return len(rest) > 0


def _tradeoff_legend(pols: list[str], other_chunks: bool) -> tuple[list, list]:
    handles, labels = _policy_handles(pols, line=False)
    handles += [
        Line2D([], [], marker="o", ls="--", color="0.5", markerfacecolor="none", markeredgecolor="black", markersize=11)
    ]
    labels += ["Pareto front (nothing is both\nsmaller and faster)"]
    if other_chunks:
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="0.4", markersize=5))
        labels.append("other chunk settings\n(see chunk_sizes)")
    return handles, labels


def plot_time_vs_memory(source: Source) -> Drawn:
    """Step time against peak memory at fixed shapes, each point a policy (each chunk setting for
    chunked policies), labelled with its step time over the baseline's; Pareto front highlighted.
    A row of up to three panels per setting."""
    df = prepare(source)
    base = baseline_name(df)
    ok = _timed_ok(df, base)
    if ok.empty:
        return Skipped("no measured ok rows with a step time")
    shapes = tradeoff_shapes(ok)
    settings = sorted({s for s, _, _ in shapes})
    layout = [r for st in settings for r in wrap([k for k in shapes if k[0] == st], MAX_COLS)]
    n_cols = max(len([c for c in r if c is not None]) for r in layout)
    layout = [r[:n_cols] + [None] * (n_cols - len(r)) for r in layout]
    w = panel_width(n_cols, 4.4)
    fig, axes = grid(len(layout), n_cols, w, 0.86 * w, sharex=False, sharey=False)
    other_chunks = False
    for i, row in enumerate(layout):
        for j, shape in enumerate(row):
            if shape is not None:
                other_chunks |= _tradeoff_panel(axes[i][j], ok, shape, base)
    hide_empty(axes, layout)
    note = (
        f"{GIB_NOTE}. 'x1.33': step time / step time of {base} at the same shape (recompute overhead)."
        if base
        else f"{GIB_NOTE}. No sdpa or naive rows, so no overhead ratio."
    )
    title_text = "Time vs memory at fixed shapes (lower left is better)"
    return finish(fig, title_text, *_tradeoff_legend(list(palette(df["policy"])), other_chunks), note)


# --- 4. chunk sizes --------------------------------------------------------------------------------


def _chunk_rows(df: pd.DataFrame) -> pd.DataFrame | Skipped:
    ch = df[(df["policy.attention"] == "chunked") & (df["basis"] == "measured")].copy()
    if ch.empty:
        return Skipped("no measured chunked-attention rows")
    ch["q"] = pd.to_numeric(ch["policy.q_chunk"]).astype(int)
    ch["k"] = pd.to_numeric(ch["policy.k_chunk"]).astype(int)
    return ch


def _chunk_panel(ax, s: pd.DataFrame, col: str, fmt) -> None:
    vals = s.assign(v=pd.to_numeric(s[col]).where(s["status"] == "ok")).pivot(index="q", columns="k", values="v")
    stat = s.pivot(index="q", columns="k", values="status").reindex_like(vals)
    annot = np.where(
        vals.notna(),
        vals.map(lambda v: fmt(v) if pd.notna(v) else ""),
        stat.map(lambda v: {"oom": "OOM", "over_budget": "over\nbudget", "error": "error"}.get(v, "not run")),
    )
    kw = {"fontsize": TICK_PT * 0.95}
    sns.heatmap(
        vals, ax=ax, annot=annot, fmt="", cmap="rocket_r", cbar=False, linewidths=1, linecolor="white", annot_kws=kw
    )
    for r, c in zip(*np.where(vals.isna().to_numpy())):  # heatmap leaves masked cells unlabelled
        ax.text(c + 0.5, r + 0.5, annot[r, c], ha="center", va="center", color="0.35", **kw)
    ax.set_facecolor("0.9")
    ax.grid(False)
    ax.set_xlabel("k_chunk (tokens)")
    ax.set_ylabel("q_chunk (tokens)", labelpad=10)
    ax.tick_params(axis="y", rotation=0)


def plot_chunk_sizes(source: Source, max_shapes: int = 2) -> Drawn:
    """Chunked attention: peak memory and step time over q_chunk x k_chunk, at the shapes with the most
    chunk settings (longest first). Cells that did not run ok say why (oom, over budget, error)."""
    ch = _chunk_rows(prepare(source))
    if isinstance(ch, Skipped):
        return ch
    n = ch.groupby(["setting", "policy", "depth", "seq_len"]).apply(lambda g: len(set(zip(g["q"], g["k"]))))
    n = n[n >= 2]
    if n.empty:
        return Skipped("no shape was run with more than one chunk setting")
    keys = sorted(n.index, key=lambda k: (n[k], k[3], k[2]), reverse=True)[:max_shapes]
    fig, axes = grid(len(keys), 2, 3.8, 3.2, sharex=False, sharey=False)
    for i, (setting, pol, depth, t) in enumerate(keys):
        s = ch[(ch["setting"] == setting) & (ch["policy"] == pol) & (ch["depth"] == depth) & (ch["seq_len"] == t)]
        s = s.sort_values("status", key=lambda c: c != "ok").drop_duplicates(["q", "k"])
        for j, (col, what, fmt) in enumerate(
            (("peak_gib", "peak memory", fmt_gib), ("step_time_s", "step time (s)", lambda v: f"{v:.3g}"))
        ):
            _chunk_panel(axes[i][j], s, col, fmt)
            title(axes[i][j], setting, f"{what}: {pol}, {int(depth)} layers, {fmt_len(t)} tokens")
    note = (
        f"{GIB_NOTE}. Darker = more (within each panel). Grey cells: the setting did not run ok there, or was not run."
    )
    return finish(fig, "Chunked attention: chunk sizes", [], [], note)


# --- sharded trials: fewest devices ------------------------------------------------------------------


def _fewest_panel(ax, f: pd.DataFrame, lens: list[int]) -> None:
    for pol, g in f.groupby("policy", sort=False):
        st, g = style(pol), g.sort_values("seq_len")
        fits = g[g["fewest_ranks"].notna()]
        ax.plot(fits["seq_len"], fits["fewest_ranks"].astype(float), color=st.color, marker=st.marker, lw=2,
                ls="--" if (fits["basis"] == "estimated").all() else "-")  # fmt: skip
        over = g[g["fewest_ranks"].isna()]
        if len(over):  # none of the degrees tried fits: a triangle above the most tried
            most = over["ranks_tried"].map(lambda t: max(int(x) for x in t.split(",")))
            ax.scatter(over["seq_len"], 2.0 * most, marker="^", color=st.color, s=60, zorder=3)
    _log2_len_axis(ax, lens)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{int(v)}" if v >= 1 else ""))
    ax.grid(True, which="major", alpha=0.3)


def plot_fewest_devices(source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """The fewest FSDP ranks whose per-rank peak fits each per-device budget, against sequence length: a
    panel per (model, budget), a line per policy (dashed: from estimates); a triangle: none of the shard
    degrees tried fits (drawn above the most tried)."""
    fd = fewest_devices(source, budgets)
    if fd.empty:
        return Skipped("no sharded trials (parallel.fsdp > 1) in the store")
    items = sorted({(m, b) for m, b in zip(fd["model"], fd["budget_gib"])}, key=lambda k: (k[1], k[0]))
    layout = wrap(items, MAX_COLS)
    w = panel_width(len(layout[0]), 3.6)
    fig, axes = grid(len(layout), len(layout[0]), w, 0.88 * w)
    for i, row in enumerate(layout):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            ax, (model, b) = axes[i][j], panel
            _fewest_panel(ax, fd[(fd["model"] == model) & (fd["budget_gib"] == b)], sorted(fd["seq_len"].unique()))
            title(ax, model, f"{b:g} GiB per device")
            last = is_last_in_column(layout, i, j)
            ax.set_xlabel("sequence length (tokens, log2)" if last else "")
            ax.tick_params(axis="x", labelbottom=last, labelrotation=45)
            ax.set_ylabel("fewest ranks (log2)" if j == 0 else "")
    hide_empty(axes, layout)
    handles, labels = _policy_handles(policy_order(fd["policy"]))
    handles.append(Line2D([], [], color="0.3", marker="^", lw=0))
    labels.append("none of the degrees tried fits")
    note = f"{GIB_NOTE}. Ranks: parallel.fsdp (FSDP2); a rank's peak is its shard plus what it gathers."
    return finish(fig, "Fewest devices that fit", handles, labels, note)


PLOTS = {
    "memory_vs_length": plot_memory_vs_length,
    "memory_breakdown": plot_memory_breakdown,
    "frontier_heatmap": plot_frontier_heatmap,
    "frontier_steps": plot_frontier_steps,
    "time_vs_memory": plot_time_vs_memory,
    "chunk_sizes": plot_chunk_sizes,
    "fewest_devices": plot_fewest_devices,
}
TAKES_BUDGETS = {"memory_vs_length", "frontier_heatmap", "frontier_steps", "fewest_devices"}


def draw(name: str, source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """One plot by name: its Figure, or a `Skipped` saying why the store has nothing it can show."""
    fn = PLOTS[name]
    return fn(source, budgets) if name in TAKES_BUDGETS else fn(source)


def all_figures(source: Source, budgets: Iterable[float] | None = None) -> dict[str, Drawn]:
    """name -> Figure or Skipped, for every plot (the store read once)."""
    df = prepare(source)
    return {name: draw(name, df, budgets) for name in PLOTS}
