"""The attention-distance plot of `txlab attention`, drawn from its table alone (a Parquet path or a
DataFrame with the columns of `txlab.interpret.attention_distance`), never from a model.

One panel per layer (wrapped four a row, `layout`): the probability mass in distance bins that double
in width (0, 1, 2-3, 4-7, ...), all heads together as bars, each head as a grey dot, the mass uniform
attention over the causal past would put there as a dashed step, and the layer's mean distance as a
vertical line. See docs/analysis.md ("Attention distance").
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from txlab.analysis.layout import (  # noqa: E402
    MAX_COLS,
    finish,
    grid,
    hide_empty,
    is_last_in_column,
    panel_width,
    save_figure,
    wrap,
)

COLUMNS = ("layer", "head", "distance", "mass", "mean_distance", "tokens")
ALL_HEADS = -1
BAR_COLOR, MEAN_COLOR = "#0173b2", "#d55e00"  # Okabe-Ito blue and vermillion; grey for references


def read_table(source) -> pd.DataFrame:
    """The table from a Parquet path or a DataFrame; ValueError naming what is missing."""
    df = source if isinstance(source, pd.DataFrame) else pd.read_parquet(source)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"not an attention-distance table: no column {', '.join(missing)}")
    if df.empty:
        raise ValueError("the attention-distance table has no rows")
    return df


def bin_of(distance: np.ndarray) -> np.ndarray:
    """Bin k of each distance: 0 for 0, else k with 2^(k-1) <= d < 2^k."""
    d = np.asarray(distance, dtype=np.int64)
    return np.where(d > 0, np.floor(np.log2(np.maximum(d, 1))).astype(np.int64) + 1, 0)


def position(d: float) -> float:
    """Where a (real-valued) distance sits on the bin axis, bar k centred at k: d - 0.5 below 1, else
    log2(d) + 0.5, so a bin's distances fill its bar's width."""
    return d - 0.5 if d < 1 else float(np.log2(d)) + 0.5


def uniform_mass(T: int) -> np.ndarray:
    """(T,) the mass at each distance of attention spread uniformly over the causal past of T tokens."""
    inv = 1.0 / np.arange(1, T + 1, dtype=np.float64)
    return np.cumsum(inv[::-1])[::-1] / T


def _binned(mass: pd.Series, distance: pd.Series, n_bins: int) -> np.ndarray:
    return np.bincount(bin_of(distance.to_numpy()), weights=mass.to_numpy(), minlength=n_bins)


def _top_bin(g: pd.DataFrame, n_bins: int) -> float:
    return float(_binned(g["mass"], g["distance"], n_bins).max())


def _tick_label(k: int) -> str:
    return "0" if k == 0 else f"{2 ** (k - 1)}"


def plot_attention_distance(source, title_text: str | None = None) -> plt.Figure:
    """One panel per layer of the table's distance distribution (see the module docstring)."""
    df = read_table(source)
    T = int(df["tokens"].max())
    n_bins = int(bin_of(np.array([T - 1]))[0]) + 1
    uniform = np.bincount(bin_of(np.arange(T)), weights=uniform_mass(T), minlength=n_bins)
    layers = sorted(int(x) for x in df["layer"].unique())
    layout = wrap(layers, MAX_COLS)
    w = panel_width(len(layout[0]), 3.6)
    fig, axes = grid(len(layout), len(layout[0]), w, 2.6)
    x = np.arange(n_bins)
    step = 1 if n_bins <= 9 else 2
    for i, row in enumerate(layout):
        for j, layer in enumerate(row):
            if layer is None:
                continue
            ax = axes[i][j]
            rows = df[df["layer"] == layer]
            every = rows[rows["head"] == ALL_HEADS]
            ax.bar(x, _binned(every["mass"], every["distance"], n_bins), width=0.8, color=BAR_COLOR, zorder=2)
            for _, head in rows[rows["head"] != ALL_HEADS].groupby("head"):
                ax.plot(x, _binned(head["mass"], head["distance"], n_bins), "o", ms=2.5, color="0.35", zorder=3)
            ax.step(x, uniform, where="mid", color="0.5", lw=1.2, ls="--", zorder=4)
            mean = float(every["mean_distance"].iloc[0])
            ax.axvline(position(mean), color=MEAN_COLOR, lw=1.5, zorder=5)
            ax.set_title(f"layer {layer}: mean distance {mean:.1f}", fontsize=10)
            ax.set_xticks(x[::step], [_tick_label(k) for k in x[::step]], fontsize=8)
            ax.set_xlim(-0.6, n_bins - 0.4)
            ax.grid(axis="y", color="0.9", zorder=0)
            if j == 0:
                ax.set_ylabel("probability mass")
            if is_last_in_column(layout, i, j):
                ax.set_xlabel("distance i − j (bins from 2^k)")
                ax.tick_params(axis="x", labelbottom=True)
    top = max(float(df.groupby(["layer", "head"]).apply(_top_bin, n_bins, include_groups=False).max()), uniform.max())
    axes[0][0].set_ylim(0, min(1.0, 1.12 * top))  # shared by every panel
    hide_empty(axes, layout)
    handles = [
        Patch(color=BAR_COLOR),
        Line2D([], [], marker="o", ls="", ms=4, color="0.35"),
        Line2D([], [], color="0.5", ls="--"),
        Line2D([], [], color=MEAN_COLOR, lw=1.5),
    ]
    labels = ["all heads", "each head", "uniform over\nthe causal past", "mean distance"]
    note = (
        f"{T} tokens. Mass: attention probability at query - key distance d, summed over queries, divided "
        "by their number (each layer's bars sum to 1); bin k holds distances 2^(k-1) .. 2^k - 1."
    )
    return finish(fig, title_text or f"Attention distance per layer ({T} tokens)", handles, labels, note)


def write_attention_plot(source, out: str | Path, stem: str = "attention_distance", title_text=None) -> list[Path]:
    """The plot as `out/stem.png` (130 dpi) and `.svg`; returns the paths."""
    return save_figure(plot_attention_distance(source, title_text), out, stem)
