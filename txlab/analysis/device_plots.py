"""`fewest_devices`: for sharded trials (`parallel.fsdp` > 1), the fewest FSDP ranks whose per-rank peak
fits each per-device budget, against sequence length. See docs/analysis.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib.ticker as mticker
import pandas as pd
from matplotlib.lines import Line2D

from txlab.analysis.data import Source, policy_order
from txlab.analysis.frontier import fewest_devices
from txlab.analysis.layout import MAX_COLS, finish, grid, hide_empty, is_last_in_column, panel_width, title, wrap
from txlab.analysis.palette import style
from txlab.analysis.plotting import GIB_NOTE, Drawn, Skipped, log2_len_axis, policy_handles


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
    log2_len_axis(ax, lens)
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
    handles, labels = policy_handles(policy_order(fd["policy"]))
    handles.append(Line2D([], [], color="0.3", marker="^", lw=0))
    labels.append("none of the degrees tried fits")
    note = f"{GIB_NOTE}. Ranks: parallel.fsdp (FSDP2); a rank's peak is its shard plus what it gathers."
    return finish(fig, "Fewest devices that fit", handles, labels, note)
