"""`time_vs_memory`: what the saving costs. Step time against peak memory at a few fixed shapes, each
policy a point labelled with its step time relative to the baseline's (sdpa, else naive) at that shape,
the Pareto front circled. See docs/analysis.md.

Labels are set beside their points by `plotting.place_labels` once the figure is laid out, so none
overlaps another or a marker.
"""

from __future__ import annotations

import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from txlab.analysis.data import KIND, Source, fmt_len, policy_order, prepare
from txlab.analysis.frontier import baseline_name, is_baseline
from txlab.analysis.layout import MAX_COLS, finish, grid, hide_empty, panel_width, title, wrap
from txlab.analysis.palette import palette, style
from txlab.analysis.plotting import (
    Drawn,
    MemUnit,
    Skipped,
    coincide,
    log2_mem_axis,
    mem_unit,
    place_labels,
    policy_handles,
    units_note,
)


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
    # the lowest peak; of equal peaks (one experiment run under two budgets) the fastest, whatever the row order
    s = s.sort_values(["peak_gib", "step_time_s"], kind="stable").drop_duplicates(["policy", "chunks"])
    return s.drop_duplicates("policy"), s[s.duplicated("policy")]


def _covered(s: pd.DataFrame) -> list[int]:
    """For each point, how many later points draw on top of it (equal peak, step time within 3% of the
    panel's time range)."""
    t, peak = s["step_time_s"].to_numpy(float), s["peak_gib"].to_numpy(float)
    span = max(float(t.max() - t.min()), 0.1 * float(t.max()))
    return [
        sum(coincide(peak[i], peak[j]) and abs(t[i] - t[j]) < 0.03 * span for j in range(i + 1, len(s)))
        for i in range(len(s))
    ]


def _draw_tradeoff_points(ax, s: pd.DataFrame, rest: pd.DataFrame) -> pd.DataFrame:
    """The Pareto staircase, the policies' points (circled on the front) and the other chunk settings."""
    front = s[pareto_front(s)].sort_values("peak_gib")
    ax.step(front["peak_gib"], front["step_time_s"], where="post", color="0.5", lw=1.2, ls="--", zorder=1)
    order = policy_order(s["policy"])
    s = s.iloc[sorted(range(len(s)), key=lambda k: order.index(s["policy"].iloc[k]))]  # legend order, the last on top
    for k, wider in enumerate(_covered(s)):  # a point that a later one covers is drawn larger, around it
        r = s.iloc[k]
        st = style(r["policy"])
        ax.scatter(
            r["peak_gib"],
            r["step_time_s"],
            color=st.color,
            marker=st.marker,
            s=(st.size(8) * (1 + 0.6 * wider)) ** 2,
            edgecolors="white",
            zorder=3 + k,
            label=r["policy"],
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


def _ratio_labels(s: pd.DataFrame, ref_t: float) -> tuple[list, list[str], list]:
    """Each point's label: its policy (and chunk setting) and, against the baseline, its step time ratio."""
    points, texts, colors = [], [], []
    for _, r in s.iterrows():
        label = r["policy"] + (f" ({r['chunks']})" if r["chunks"] else "")
        if np.isfinite(ref_t) and not r["is_baseline"]:
            label += f"\nx{r['step_time_s'] / ref_t:.2f}"
        points.append((float(r["peak_gib"]), float(r["step_time_s"])))
        texts.append(label)
        colors.append(style(r["policy"]).color)
    return points, texts, colors


def _tradeoff_axes(ax, both: pd.DataFrame) -> MemUnit:
    unit = mem_unit(both["peak_gib"])
    log2_mem_axis(ax, unit, "x")
    ax.xaxis.set_major_locator(mticker.LogLocator(base=2, numticks=6))
    lo, hi = both["peak_gib"].min(), both["peak_gib"].max()
    ax.set_xlim(lo / 1.35, hi * 1.9)
    tl, th = both["step_time_s"].min(), both["step_time_s"].max()
    ax.set_ylim(max(0, tl - 0.2 * (th - tl + 1e-12) - 0.08 * tl), th + 0.3 * (th - tl + 1e-12) + 0.08 * th)
    ax.set_xlabel(f"peak memory ({unit.name}, log2)")
    kinds = set(both[KIND])
    ax.set_ylabel(
        "time per generated token (s)"
        if kinds == {"decode"}
        else "prefill time (s)"
        if kinds == {"prefill"}
        else "step time (s)"
    )
    return unit


def _tradeoff_panel(ax, ok: pd.DataFrame, shape: tuple, base: str | None) -> tuple[bool, tuple, MemUnit]:
    """Draws one shape; returns whether it shows other chunk settings of a chunked policy, its labels
    (points, texts, colours: placed once the figure is laid out) and its memory unit."""
    setting, depth, t = shape
    s, rest = _shape_points(ok[(ok["setting"] == setting) & (ok["depth"] == depth) & (ok["seq_len"] == t)])
    ref = s[s["is_baseline"]]
    _draw_tradeoff_points(ax, s, rest)
    unit = _tradeoff_axes(ax, pd.concat([s, rest]))
    base_label = f"{base} (kv=cache)" if base and set(s[KIND]) <= {"prefill", "decode"} else base
    missing = f"\n(no ok {base_label} run here: no ratio)" if base and ref.empty else ""
    title(ax, setting, f"{int(depth)} layers, {fmt_len(t)} tokens{missing}")
    return len(rest) > 0, _ratio_labels(s, float(ref["step_time_s"].min()) if len(ref) else np.nan), unit


def _tradeoff_legend(pols: list[str], other_chunks: bool) -> tuple[list, list]:
    handles, labels = policy_handles(pols, line=False)
    handles += [
        Line2D([], [], marker="o", ls="--", color="0.5", markerfacecolor="none", markeredgecolor="black", markersize=11)
    ]
    labels += ["Pareto front (nothing is both\nsmaller and faster)"]
    if other_chunks:
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="0.4", markersize=5))
        labels.append("other chunk settings\n(see chunk_sizes)")
    return handles, labels


def ratio_note(base: str | None) -> str:
    """What the 'x1.33' beside a point is (the plot's footnote and the report's caption say it alike)."""
    if not base:
        return "No sdpa or naive rows, so no step time ratio."
    return (
        f"'x1.33' beside a policy: its step time relative to {base}'s at the same shape "
        f"(x1.33 = 33% slower than {base}, below x1 faster)."
    )


def plot_time_vs_memory(source: Source) -> Drawn:
    """Step time against peak memory at fixed shapes, each point a policy (each chunk setting for
    chunked policies), labelled with its step time relative to the baseline's; Pareto front highlighted.
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
    other_chunks, labels, units = False, [], []
    for i, row in enumerate(layout):
        for j, shape in enumerate(row):
            if shape is not None:
                more, spec, unit = _tradeoff_panel(axes[i][j], ok, shape, base)
                other_chunks |= more
                units.append(unit)
                labels.append((axes[i][j], spec))
    hide_empty(axes, layout)
    note = f"{units_note(*units)}. {ratio_note(base)}"
    title_text = "Time vs memory at fixed shapes (lower left is better)"
    fig = finish(fig, title_text, *_tradeoff_legend(list(palette(df["policy"])), other_chunks), note)
    for ax, spec in labels:  # after the layout: placed where they are drawn
        place_labels(ax, *spec)
    return fig
