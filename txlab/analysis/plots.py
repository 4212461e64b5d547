"""Figures of a store, drawn with seaborn on matplotlib's Agg backend. See docs/analysis.md.

Every function takes a store path or a DataFrame and returns a matplotlib Figure, or None with a reason
in `SKIPPED` when the store has nothing that plot can show (e.g. no chunked-attention rows).
Rows are faceted by `setting` (whatever else varies: model size, batch, dtype, kind, device) and
columns by depth; colours follow the policy, in the same order in every plot.
"""

from __future__ import annotations

from collections.abc import Iterable

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
from txlab.analysis.frontier import baseline_name, best_ok, frontier, is_baseline

GIB_NOTE = "GiB = 2^30 bytes"
STATUS_MARKERS = {"oom": ("X", "out of memory"), "over_budget": ("^", "over budget")}
SKIPPED: dict[str, str] = {}  # plot name -> why the last call drew nothing

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)


def palette(policies: Iterable[str]) -> dict[str, tuple]:
    order = policy_order(policies)
    colors = sns.color_palette("colorblind", max(len(order), 3))
    return {p: colors[i % len(colors)] for i, p in enumerate(order)}


def _log2_len_axis(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    lengths = sorted({int(t) for t in lengths})
    if len(lengths) > 8:  # every other tick, keeping the ends
        lengths = lengths[::2] if len(lengths) % 2 else lengths[::2] + [lengths[-1]]
    ax.xaxis.set_major_locator(mticker.FixedLocator(lengths))
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt_len(v)))
    ax.xaxis.set_minor_locator(mticker.NullLocator())


def _log2_mem_axis(ax) -> None:
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_locator(mticker.LogLocator(base=2, numticks=8))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt_gib(v)))
    ax.yaxis.set_minor_locator(mticker.NullLocator())


def _panels(df: pd.DataFrame, max_cols: int = 4) -> tuple[list[list[tuple[str, float] | None]], bool]:
    """The (setting, depth) panels that hold rows, laid out setting x depth when the grid is full, else
    wrapped (model sizes with their own depths would leave most of a full grid empty). Returns the
    layout (None: no panel there) and whether it is the full grid."""
    rows = sorted(df["setting"].unique())
    cols = sorted(df["depth"].dropna().unique())
    present = sorted({(s, d) for s, d in zip(df["setting"], df["depth"]) if pd.notna(d)})
    if len(present) == len(rows) * len(cols):
        return [[(s, d) for d in cols] for s in rows], True
    n_cols = min(max_cols, len(present))
    layout = [present[i : i + n_cols] for i in range(0, len(present), n_cols)]
    layout[-1] = layout[-1] + [None] * (n_cols - len(layout[-1]))
    return layout, False


def _grid(n_rows: int, n_cols: int, w: float, h: float, sharey=True, sharex=True):
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(w * n_cols + 1.5, h * n_rows + 0.8), squeeze=False, sharey=sharey, sharex=sharex
    )
    return fig, axes


def _title(ax, setting: str, text: str) -> None:
    ax.set_title(f"{setting}\n{text}" if setting else text, fontsize=10)


def _finish(fig, title: str, handles: list, labels: list, note: str = "") -> plt.Figure:
    fig.suptitle(title, fontsize=12, y=1.0)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    if note:
        fig.text(0.01, -0.01, note, fontsize=8, color="0.3", ha="left", va="top", wrap=True)
    fig.tight_layout()
    return fig


# --- 1. memory vs sequence length ------------------------------------------------------------------


def _row_cap_gib(r, budgets: list[float]) -> float:
    """Where an oom / over-budget trial is drawn: the budget it ran under, else its device's capacity."""
    for v in (r[BUDGET], (r["device_capacity_bytes"] / GIB) if pd.notna(r["device_capacity_bytes"]) else None):
        if v is not None and pd.notna(v):
            return float(v)
    return max(budgets) if budgets else np.nan


def plot_memory_vs_length(source: Source, budgets: Iterable[float] | None = None) -> plt.Figure | None:
    """Peak memory against seq_len (log2 both), one line per policy, a panel per depth (x setting).

    Lines: measured ok rows (solid) and estimated rows (dashed); for chunked policies the lowest peak
    over chunk settings. OOM (x) and over-budget (^) trials sit on the budget line they ran under.
    Dotted horizontal lines: the budgets.
    """
    df = prepare(source)
    valid = df[df["status"] != "error"]
    if valid.empty:
        SKIPPED["memory_vs_length"] = "no rows other than errors"
        return None
    budgets, _ = budgets_of(df, budgets)
    pal = palette(df["policy"])
    order = list(pal)
    layout, _ = _panels(valid)
    fig, axes = _grid(len(layout), len(layout[0]), 3.6, 3.2)
    ok = valid[(valid["status"] == "ok") & valid["peak_gib"].notna()]
    ok = ok.loc[ok.groupby(["group", "seq_len", "basis"])["peak_gib"].idxmin().values] if len(ok) else ok
    failed = valid[valid["status"].isin(list(STATUS_MARKERS))].copy()
    failed["y"] = [_row_cap_gib(r, budgets) for _, r in failed.iterrows()]
    for i, panel_row in enumerate(layout):
        for j, panel in enumerate(panel_row):
            ax = axes[i][j]
            if panel is None:
                ax.set_visible(False)
                continue
            setting, depth = panel
            last_row = i == len(layout) - 1 or layout[i + 1][j] is None
            sel = ok[(ok["setting"] == setting) & (ok["depth"] == depth)]
            if len(sel):
                # estimated lines start from the last measured point, so they read as an extension
                est = sel[sel["basis"] == "estimated"]
                meas = sel[sel["basis"] == "measured"]
                bridge = meas[meas["group"].isin(est["group"])].sort_values("seq_len").groupby("group").tail(1)
                plot = pd.concat([meas, bridge.assign(basis="estimated"), est])
                sns.lineplot(
                    data=plot,
                    x="seq_len",
                    y="peak_gib",
                    hue="policy",
                    style="basis",
                    units="group",
                    estimator=None,
                    palette=pal,
                    hue_order=list(pal),
                    style_order=["measured", "estimated"],
                    dashes={"measured": "", "estimated": (4, 2)},
                    markers={"measured": "o", "estimated": "o"},
                    markersize=5,
                    legend=False,
                    ax=ax,
                )
            fs = failed[(failed["setting"] == setting) & (failed["depth"] == depth)]
            for status, (marker, _) in STATUS_MARKERS.items():
                for basis in ("measured", "estimated"):
                    s = fs[(fs["status"] == status) & (fs["basis"] == basis)]
                    if s.empty:
                        continue
                    # policies failing at the same length sit side by side, not on top of each other
                    x = s["seq_len"].astype(float) * [
                        2 ** (0.09 * (order.index(p) - (len(order) - 1) / 2)) for p in s["policy"]
                    ]
                    colors = [pal[p] for p in s["policy"]]
                    if basis == "measured":
                        ax.scatter(
                            x, s["y"], marker=marker, s=70, c=colors, edgecolors="black", linewidths=0.8, zorder=5
                        )
                    else:  # an estimate that does not fit: hollow
                        ax.scatter(
                            x,
                            s["y"],
                            marker=marker,
                            s=70,
                            facecolors="white",
                            edgecolors=colors,
                            linewidths=1.5,
                            zorder=5,
                        )
            for cap in sorted(set(fs["y"].dropna()) - set(budgets)):  # where failures sit, if not a budget
                ax.axhline(cap, color="0.6", ls="-.", lw=0.9, zorder=1)
                ax.annotate(
                    f"{cap:g} GiB (ran under)",
                    xy=(0.01, cap),
                    xycoords=("axes fraction", "data"),
                    fontsize=7.5,
                    color="0.45",
                    va="bottom",
                )
            for b in budgets:
                ax.axhline(b, color="0.35", ls=":", lw=1.2, zorder=1)
                ax.annotate(
                    f"{b:g} GiB",
                    xy=(0.01, b),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    color="0.25",
                    va="bottom",
                )
            _log2_len_axis(ax, valid["seq_len"].dropna())
            _log2_mem_axis(ax)
            _title(ax, setting, f"{int(depth)} layers")
            ax.set_xlabel("sequence length (tokens, log2)" if last_row else "")
            if last_row:  # shared x: the bottom panel of each column shows the ticks
                ax.tick_params(axis="x", labelbottom=True)
            ax.set_ylabel("peak memory (log2)" if j == 0 else "")
            ax.tick_params(axis="x", labelrotation=45)
    handles = [Line2D([], [], color=c, marker="o", lw=2) for c in pal.values()]
    labels = list(pal)
    handles += [
        Line2D([], [], color="0.3", lw=1.5),
        Line2D([], [], color="0.3", lw=1.5, ls="--"),
        Line2D([], [], color="0.35", lw=1.2, ls=":"),
    ]
    labels += ["measured", "estimated", "budget"]
    for status, (marker, text) in STATUS_MARKERS.items():
        if (failed["status"] == status).any():
            handles.append(Line2D([], [], marker=marker, ls="", color="0.6", markeredgecolor="black", markersize=8))
            labels.append(f"{text} (drawn at the\nbudget it ran under)")
    if (failed["basis"] == "estimated").any():
        handles.append(Line2D([], [], marker="^", ls="", markerfacecolor="white", markeredgecolor="0.3", markersize=8))
        labels.append("estimated not to fit\n(hollow)")
    n_err = int((df["status"] == "error").sum())
    note = f"{GIB_NOTE}. Chunked policies: lowest peak over the chunk settings tried."
    note += f" {n_err} error row(s) not shown (see the report)." if n_err else ""
    return _finish(fig, "Peak memory vs sequence length", handles, labels, note)


def plot_memory_breakdown(source: Source, depth: int | None = None) -> plt.Figure | None:
    """Stacked params / grads / optimizer / activations / other at the peak, for one depth.

    Default depth: the one with the most measured ok rows that carry a breakdown (the deepest on ties).
    """
    df = prepare(source)
    ok = best_ok(df)
    ok = ok[ok[list(COMPONENTS)].notna().any(axis=1)] if len(ok) else ok
    # the KV cache is a component of inference rows only: drawn when some row has it
    comps = [
        c
        for c in COMPONENTS
        if c not in OPTIONAL_COMPONENTS or (len(ok) and pd.to_numeric(ok[c]).fillna(0).gt(0).any())
    ]
    if ok.empty:
        SKIPPED["memory_breakdown"] = "no measured ok rows with a memory breakdown"
        return None
    if depth is None:
        counts = ok.groupby("depth").size()
        depth = int(counts[counts == counts.max()].index.max())
    sel = ok[ok["depth"] == depth].copy()
    if sel.empty:
        SKIPPED["memory_breakdown"] = f"no measured ok rows at depth {depth}"
        return None
    rows = sorted(sel["setting"].unique())
    pols = policy_order(sel["policy"])
    lengths = sorted(sel["seq_len"].unique())
    fig, axes = _grid(len(rows), len(pols), max(2.2, 0.45 * len(lengths) + 1), 3.4, sharex=False)
    comp_colors = dict(zip(COMPONENTS, sns.color_palette("Set2", len(COMPONENTS))))
    comp_colors["kv_cache_bytes"], comp_colors["other_bytes"] = (
        comp_colors["other_bytes"],
        comp_colors["kv_cache_bytes"],
    )
    for i, setting in enumerate(rows):
        for j, pol in enumerate(pols):
            ax = axes[i][j]
            s = sel[(sel["setting"] == setting) & (sel["policy"] == pol)].set_index("seq_len")
            s = s.reindex(lengths)
            stack = s[comps].apply(pd.to_numeric, errors="coerce").fillna(0) / GIB
            stack.index = [fmt_len(t) for t in lengths]
            stack.plot.bar(stacked=True, ax=ax, color=[comp_colors[c] for c in comps], width=0.8, legend=False)
            for k, t in enumerate(lengths):
                if pd.isna(s.loc[t, "status"]):
                    ax.text(k, 0, "not\nok", ha="center", va="bottom", fontsize=7, color="0.4")
            _title(ax, setting, pol)
            ax.set_xlabel("sequence length (tokens)" if i == len(rows) - 1 else "")
            ax.set_ylabel("memory at the peak (GiB)" if j == 0 else "")
            ax.tick_params(axis="x", labelrotation=45)
    handles = [Patch(color=comp_colors[c]) for c in reversed(comps)]
    labels = [c.removesuffix("_bytes") for c in reversed(comps)]
    note = (
        f"{GIB_NOTE}. Measured ok trials at depth {depth}; 'not ok' = no ok trial at that length "
        "(oom, over budget, error or not run). Chunked policies: the chunk setting with the lowest peak."
    )
    return _finish(fig, f"What the peak is made of ({depth} layers)", handles, labels, note)


# --- 2. feasibility frontier -----------------------------------------------------------------------


def plot_frontier_heatmap(source: Source, budgets: Iterable[float] | None = None) -> plt.Figure | None:
    """Per budget: policy x depth cells holding the longest feasible seq_len (colour: log2 of it).

    '32768+': the longest length tried fits; 'infeasible at 256': not even the shortest fits (hatched);
    'est. N' below a cell: the frontier estimated rows give, when it differs from the measured one.
    """
    df = prepare(source)
    fr = frontier(df, budgets)
    if fr.empty:
        SKIPPED["frontier_heatmap"] = "no budget to judge against, or no rows other than errors"
        return None
    rows = sorted(fr["setting"].unique())
    bud = sorted(fr["budget_gib"].unique())
    depths = sorted(fr["depth"].dropna().unique())
    pols = policy_order(fr["policy"])
    lens = pd.concat([fr["longest_feasible_seq_len"], fr["shortest_tried"]]).dropna().astype(int)
    lo, hi = np.log2(lens.min()), np.log2(lens.max())
    cmap = sns.color_palette("crest", as_cmap=True)
    fig, axes = _grid(len(rows), len(bud), 1.25 * len(depths) + 1.6, 0.6 * len(pols) + 1.4, sharex=False, sharey=False)
    for i, setting in enumerate(rows):
        for j, b in enumerate(bud):
            ax = axes[i][j]
            f = fr[(fr["setting"] == setting) & (fr["budget_gib"] == b)]
            meas = f[f["basis"] == "measured"].set_index(["policy", "depth"])
            est = f[f["basis"] == "estimated"].set_index(["policy", "depth"])
            val = np.full((len(pols), len(depths)), np.nan)
            for r, p in enumerate(pols):
                for c, d in enumerate(depths):
                    src = meas if (p, d) in meas.index else est
                    if (p, d) in src.index and pd.notna(src.loc[(p, d), "longest_feasible_seq_len"]):
                        val[r, c] = np.log2(float(src.loc[(p, d), "longest_feasible_seq_len"]))
            ax.grid(False)
            sns.heatmap(
                val,
                ax=ax,
                cmap=cmap,
                vmin=lo,
                vmax=max(hi, lo + 1),
                cbar=False,
                linewidths=1.5,
                linecolor="white",
                xticklabels=[str(int(d)) for d in depths],
                yticklabels=pols,
            )
            for r, p in enumerate(pols):
                for c, d in enumerate(depths):
                    m = meas.loc[(p, d)] if (p, d) in meas.index else None
                    e = est.loc[(p, d)] if (p, d) in est.index else None
                    first = m if m is not None else e
                    if first is None:
                        ax.text(c + 0.5, r + 0.5, "not run", ha="center", va="center", fontsize=8, color="0.5")
                        continue
                    infeasible = pd.isna(first["longest_feasible_seq_len"])
                    if infeasible:
                        ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor="0.93", hatch="///", edgecolor="0.75", lw=0))
                    text = first["label"].replace("infeasible at ", "infeasible\nat ")
                    if m is None:
                        text = "est. " + text
                    bright = not infeasible and (val[r, c] - lo) / max(hi - lo, 1) > 0.55
                    color = "white" if bright else "0.1"
                    ax.text(
                        c + 0.5,
                        r + 0.42 if (e is not None and m is not None and e["label"] != m["label"]) else r + 0.5,
                        text,
                        ha="center",
                        va="center",
                        fontsize=8.5,
                        color=color,
                        fontweight="bold",
                    )
                    if e is not None and m is not None and e["label"] != m["label"]:
                        ax.text(
                            c + 0.5,
                            r + 0.78,
                            "est. " + e["label"].replace("infeasible at ", "none ≥"),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color=color,
                            style="italic",
                        )
            _title(ax, setting, f"budget {b:g} GiB")
            ax.set_xlabel("depth (layers)")
            ax.set_ylabel("policy" if j == 0 else "")
            ax.tick_params(axis="y", rotation=0)
    note = (
        f"Cell: longest sequence length (tokens) with status ok and peak <= budget; {GIB_NOTE}. "
        "'N+': the longest length tried fits, the limit lies beyond. Hatched 'infeasible at N': not even the "
        "shortest length tried fits. Italic 'est.': the frontier with estimated rows (measured = false) "
        "included, where it differs."
    )
    return _finish(fig, "Feasibility frontier: longest sequence that fits", [], [], note)


def plot_frontier_steps(source: Source, budgets: Iterable[float] | None = None) -> plt.Figure | None:
    """Longest feasible seq_len against depth, one step line per policy, one panel per budget.

    Measured frontier solid, estimated (with estimated rows) dashed; a hollow triangle marks a frontier
    that is the longest length tried (the limit lies beyond); 'infeasible' sits on its own row below.
    """
    df = prepare(source)
    fr = frontier(df, budgets)
    if fr.empty:
        SKIPPED["frontier_steps"] = "no budget to judge against, or no rows other than errors"
        return None
    rows = sorted(fr["setting"].unique())
    bud = sorted(fr["budget_gib"].unique())
    depths = sorted(fr["depth"].dropna().unique())
    pal = palette(df["policy"])
    pols = [p for p in pal if p in set(fr["policy"])]
    shortest = int(fr["shortest_tried"].dropna().min())
    floor = shortest / 2  # the "infeasible" row, below every real length
    lens = sorted(
        set(fr["longest_feasible_seq_len"].dropna().astype(int)) | set(fr["longest_tried"].dropna().astype(int))
    )
    fig, axes = _grid(len(rows), len(bud), max(3.2, 0.9 * len(depths) + 1.5), 3.6)
    nudge = {p: 2 ** (0.11 * (k - (len(pols) - 1) / 2)) for k, p in enumerate(pols)}  # keep equal lines apart
    for i, setting in enumerate(rows):
        for j, b in enumerate(bud):
            ax = axes[i][j]
            f = fr[(fr["setting"] == setting) & (fr["budget_gib"] == b)]
            for p in pols:
                for basis, ls in (("measured", "-"), ("estimated", "--")):
                    s = f[(f["policy"] == p) & (f["basis"] == basis)].sort_values("depth")
                    if s.empty:
                        continue
                    if basis == "estimated":  # drawn only where estimates move the frontier
                        m = f[(f["policy"] == p) & (f["basis"] == "measured")].set_index("depth")["label"]
                        if len(m) and all(m.get(d) == lab for d, lab in zip(s["depth"], s["label"])):
                            continue
                    x = [depths.index(d) for d in s["depth"]]
                    y = s["longest_feasible_seq_len"].astype(float).fillna(floor).to_numpy() * nudge[p]
                    ax.step(
                        x,
                        y,
                        where="mid",
                        color=pal[p],
                        ls=ls,
                        lw=2 if basis == "measured" else 1.4,
                        alpha=1 if basis == "measured" else 0.8,
                    )
                    censored = s["fits_at_longest_tried"].to_numpy(dtype=bool)
                    none = s["longest_feasible_seq_len"].isna().to_numpy()
                    plain = ~censored & ~none
                    xs = np.array(x)
                    ax.scatter(xs[plain], y[plain], color=pal[p], s=22, zorder=4)
                    ax.scatter(
                        xs[censored],
                        y[censored],
                        marker="^",
                        s=60,
                        facecolors="white",
                        edgecolors=pal[p],
                        linewidths=1.5,
                        zorder=4,
                    )
                    ax.scatter(xs[none], y[none], marker="v", s=50, color=pal[p], zorder=4)
            ax.set_yscale("log", base=2)
            ticks = [floor] + lens
            if len(ticks) > 9:
                ticks = [floor] + lens[::2]
            ax.yaxis.set_major_locator(mticker.FixedLocator(ticks))
            ax.yaxis.set_major_formatter(
                mticker.FuncFormatter(lambda v, _: "infeasible" if v <= floor * 1.01 else fmt_len(v))
            )
            ax.yaxis.set_minor_locator(mticker.NullLocator())
            ax.set_ylim(floor / 1.4, max(lens) * 1.5)
            ax.axhspan(floor / 1.4, floor * 1.3, color="0.92", zorder=0)
            ax.set_xticks(range(len(depths)), [str(int(d)) for d in depths])
            ax.set_xlim(-0.5, len(depths) - 0.5)
            _title(ax, setting, f"budget {b:g} GiB")
            ax.set_xlabel("depth (layers)" if i == len(rows) - 1 else "")
            ax.set_ylabel("longest feasible length (tokens, log2)" if j == 0 else "")
    handles = [Line2D([], [], color=pal[p], lw=2) for p in pols]
    labels = list(pols)
    handles += [
        Line2D([], [], color="0.3", lw=2),
        Line2D([], [], color="0.3", lw=1.4, ls="--"),
        Line2D([], [], marker="^", ls="", markerfacecolor="white", markeredgecolor="0.3", markersize=8),
        Line2D([], [], marker="v", ls="", color="0.3", markersize=7),
    ]
    labels += [
        "measured",
        "estimated rows included\n(where they differ)",
        "longest length tried fits\n(limit lies beyond)",
        "infeasible even at the\nshortest length tried",
    ]
    note = f"Feasible: status ok and peak <= budget; {GIB_NOTE}. Lines nudged apart vertically where policies coincide."
    return _finish(fig, "Feasibility frontier by depth", handles, labels, note)


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


def plot_time_vs_memory(source: Source) -> plt.Figure | None:
    """Step time against peak memory at fixed shapes, each point a policy (each chunk setting for
    chunked policies), labelled with its step time over the baseline's; Pareto front highlighted."""
    df = prepare(source)
    ok = df[
        (df["status"] == "ok") & (df["basis"] == "measured") & df["peak_gib"].notna() & df["step_time_s"].notna()
    ].copy()
    if ok.empty:
        SKIPPED["time_vs_memory"] = "no measured ok rows with a step time"
        return None
    base = baseline_name(df)
    ok["is_baseline"] = is_baseline(ok, base)
    shapes = tradeoff_shapes(ok)
    pal = palette(df["policy"])
    n_rows = len({s for s, _, _ in shapes})
    n_cols = max(sum(1 for s2, _, _ in shapes if s2 == s) for s, _, _ in shapes)
    fig, axes = _grid(n_rows, n_cols, 4.4, 3.8, sharex=False, sharey=False)
    for ax in axes.flat:
        ax.set_visible(False)
    row_of = {s: k for k, s in enumerate(sorted({s for s, _, _ in shapes}))}
    col = {}
    for setting, depth, t in shapes:
        ax = axes[row_of[setting]][col.setdefault(setting, 0)]
        col[setting] += 1
        ax.set_visible(True)
        s = ok[(ok["setting"] == setting) & (ok["depth"] == depth) & (ok["seq_len"] == t)].copy()
        # several rows per (policy, chunk setting) would be duplicates of one experiment: keep one
        s["chunks"] = np.where(
            s["policy.attention"] == "chunked",
            s["policy.q_chunk"].astype(str) + "x" + s["policy.k_chunk"].astype(str),
            "",
        )
        s = s.sort_values("peak_gib").drop_duplicates(["policy", "chunks"])
        rest = s[s.duplicated("policy")]  # other chunk settings of a chunked policy: see the chunk plot
        s = s.drop_duplicates("policy")  # the lowest-peak setting represents the policy, as in the tables
        ref = s[s["is_baseline"]]
        ref_t = float(ref["step_time_s"].min()) if len(ref) else np.nan
        front = pareto_front(s)
        sf = s[front].sort_values("peak_gib")
        ax.step(sf["peak_gib"], sf["step_time_s"], where="post", color="0.5", lw=1.2, ls="--", zorder=1)
        sns.scatterplot(
            data=s,
            x="peak_gib",
            y="step_time_s",
            hue="policy",
            palette=pal,
            hue_order=[p for p in pal if p in set(s["policy"])],
            s=60,
            legend=False,
            ax=ax,
            zorder=3,
            edgecolor="white",
        )
        if len(rest):
            ax.scatter(
                rest["peak_gib"],
                rest["step_time_s"],
                s=25,
                facecolors="none",
                edgecolors=[pal[p] for p in rest["policy"]],
                linewidths=1,
                zorder=2,
            )
        ax.scatter(
            sf["peak_gib"], sf["step_time_s"], s=190, facecolors="none", edgecolors="black", linewidths=1.2, zorder=2
        )
        for _, r in s.iterrows():
            label = r["policy"] + (f" ({r['chunks']})" if r["chunks"] else "")
            if np.isfinite(ref_t) and not r["is_baseline"]:
                label += f"\nx{r['step_time_s'] / ref_t:.2f}"
            ax.annotate(
                label,
                (r["peak_gib"], r["step_time_s"]),
                xytext=(6, 4),
                textcoords="offset points",
                fontsize=7.5,
                color=pal[r["policy"]],
                fontweight="bold",
            )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: fmt_gib(v)))
        ax.xaxis.set_major_locator(mticker.LogLocator(base=2, numticks=6))
        ax.xaxis.set_minor_locator(mticker.NullLocator())
        both = pd.concat([s, rest])
        lo, hi = both["peak_gib"].min(), both["peak_gib"].max()
        ax.set_xlim(lo / 1.25, hi * 1.8)
        tl, th = both["step_time_s"].min(), both["step_time_s"].max()
        ax.set_ylim(max(0, tl - 0.15 * (th - tl + 1e-12) - 0.05 * tl), th + 0.3 * (th - tl + 1e-12) + 0.05 * th)
        base_label = f"{base} (kv=cache)" if base and set(s[KIND]) <= {"prefill", "decode"} else base
        missing = f"\n(no ok {base_label} run here: no ratio)" if base and ref.empty else ""
        _title(ax, setting, f"{int(depth)} layers, {fmt_len(t)} tokens{missing}")
        ax.set_xlabel("peak memory (log2)")
        kinds = set(s[KIND])
        ax.set_ylabel(
            "time per generated token (s)"
            if kinds == {"decode"}
            else "prefill time (s)"
            if kinds == {"prefill"}
            else "step time (s)"
        )
    handles = [Line2D([], [], marker="o", ls="", color=c, markersize=7) for c in pal.values()]
    labels = list(pal)
    handles += [
        Line2D([], [], marker="o", ls="--", color="0.5", markerfacecolor="none", markeredgecolor="black", markersize=11)
    ]
    labels += ["Pareto front (nothing is both\nsmaller and faster)"]
    if any(ok.duplicated(["group", "seq_len"])):
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="0.4", markersize=5))
        labels.append("other chunk settings\n(see chunk_sizes)")
    note = (
        f"{GIB_NOTE}. 'x1.33': step time / step time of {base} at the same shape (recompute overhead)."
        if base
        else f"{GIB_NOTE}. No sdpa or naive rows, so no overhead ratio."
    )
    return _finish(fig, "Time vs memory at fixed shapes (lower left is better)", handles, labels, note)


# --- 4. chunk sizes --------------------------------------------------------------------------------


def plot_chunk_sizes(source: Source, max_shapes: int = 2) -> plt.Figure | None:
    """Chunked attention: peak memory and step time over q_chunk x k_chunk, at the shapes with the most
    chunk settings (longest first). Cells that did not run ok say why (oom, over budget, error)."""
    df = prepare(source)
    ch = df[(df["policy.attention"] == "chunked") & (df["basis"] == "measured")].copy()
    if ch.empty:
        SKIPPED["chunk_sizes"] = "no measured chunked-attention rows"
        return None
    ch["q"] = pd.to_numeric(ch["policy.q_chunk"]).astype(int)
    ch["k"] = pd.to_numeric(ch["policy.k_chunk"]).astype(int)
    n = ch.groupby(["setting", "policy", "depth", "seq_len"]).apply(lambda g: len(set(zip(g["q"], g["k"]))))
    n = n[n >= 2]
    if n.empty:
        SKIPPED["chunk_sizes"] = "no shape was run with more than one chunk setting"
        return None
    keys = sorted(n.index, key=lambda k: (n[k], k[3], k[2]), reverse=True)[:max_shapes]
    fig, axes = _grid(len(keys), 2, 3.6, 3.0, sharex=False, sharey=False)
    for i, (setting, pol, depth, t) in enumerate(keys):
        s = ch[(ch["setting"] == setting) & (ch["policy"] == pol) & (ch["depth"] == depth) & (ch["seq_len"] == t)]
        s = s.sort_values("status", key=lambda c: c != "ok").drop_duplicates(["q", "k"])
        for j, (col, what, fmt) in enumerate(
            (("peak_gib", "peak memory", fmt_gib), ("step_time_s", "step time (s)", lambda v: f"{v:.3g}"))
        ):
            ax = axes[i][j]
            vals = s.assign(v=pd.to_numeric(s[col]).where(s["status"] == "ok")).pivot(
                index="q", columns="k", values="v"
            )
            stat = s.pivot(index="q", columns="k", values="status").reindex_like(vals)
            annot = np.where(
                vals.notna(),
                vals.map(lambda v: fmt(v) if pd.notna(v) else ""),
                stat.map(lambda v: {"oom": "OOM", "over_budget": "over\nbudget", "error": "error"}.get(v, "not run")),
            )
            sns.heatmap(
                vals,
                ax=ax,
                annot=annot,
                fmt="",
                cmap="rocket_r",
                cbar=False,
                linewidths=1,
                linecolor="white",
                annot_kws={"fontsize": 8.5},
            )
            for r, c in zip(*np.where(vals.isna().to_numpy())):  # heatmap leaves masked cells unlabelled
                ax.text(c + 0.5, r + 0.5, annot[r, c], ha="center", va="center", fontsize=8.5, color="0.35")
            ax.set_facecolor("0.9")
            ax.grid(False)
            _title(ax, setting, f"{what}: {pol}, {int(depth)} layers, {fmt_len(t)} tokens")
            ax.set_xlabel("k_chunk (tokens)")
            ax.set_ylabel("q_chunk (tokens)", labelpad=10)
            ax.tick_params(axis="y", rotation=0)
    note = (
        f"{GIB_NOTE}. Darker = more (within each panel). Grey cells: the setting did not run ok there, or was not run."
    )
    return _finish(fig, "Chunked attention: chunk sizes", [], [], note)


PLOTS = {
    "memory_vs_length": plot_memory_vs_length,
    "memory_breakdown": plot_memory_breakdown,
    "frontier_heatmap": plot_frontier_heatmap,
    "frontier_steps": plot_frontier_steps,
    "time_vs_memory": plot_time_vs_memory,
    "chunk_sizes": plot_chunk_sizes,
}
TAKES_BUDGETS = {"memory_vs_length", "frontier_heatmap", "frontier_steps"}


def all_figures(source: Source, budgets: Iterable[float] | None = None) -> dict[str, plt.Figure | None]:
    df = prepare(source)
    return {name: (f(df, budgets) if name in TAKES_BUDGETS else f(df)) for name, f in PLOTS.items()}
