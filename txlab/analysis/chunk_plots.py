"""`chunk_sizes`: choosing q_chunk and k_chunk for chunked attention (`policy.attention: chunked`). Heat
maps of peak memory and step time over q_chunk x k_chunk; skipped, with the reason, when no shape ran
with more than one chunk setting. See docs/analysis.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from txlab.analysis.data import Source, fmt_len, prepare
from txlab.analysis.layout import finish, grid, title
from txlab.analysis.plotting import TICK_PT, Drawn, Skipped, mem_unit, units_note


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
    units = []
    for i, (setting, pol, depth, t) in enumerate(keys):
        s = ch[(ch["setting"] == setting) & (ch["policy"] == pol) & (ch["depth"] == depth) & (ch["seq_len"] == t)]
        s = s.sort_values("status", key=lambda c: c != "ok").drop_duplicates(["q", "k"])
        unit = mem_unit(s.loc[s["status"] == "ok", "peak_gib"])  # the cells of a panel share one unit
        units.append(unit)
        for j, (col, what, fmt) in enumerate(
            (
                ("peak_gib", f"peak memory ({unit.name})", unit.number),
                ("step_time_s", "step time (s)", lambda v: f"{v:.3g}"),
            )
        ):
            _chunk_panel(axes[i][j], s, col, fmt)
            title(axes[i][j], setting, f"{what}: {pol}, {int(depth)} layers, {fmt_len(t)} tokens")
    note = f"{units_note(*units)}. Darker = more (within each panel). Grey cells: the setting did not run ok there, or was not run."
    return finish(fig, "Chunked attention: chunk sizes", [], [], note)
