"""Panel layout shared by every plot: at most `MAX_COLS` panels a row, a bounded figure width, the legend
beside a narrow figure and below a wide one. See docs/analysis.md ("Layout")."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

MAX_COLS = 4  # panels a row; more wrap into further rows
MAX_WIDTH_IN = 13.0  # widest figure, legend included (~1700 px at `txlab plot`'s 130 dpi)
LEGEND_W_IN = 2.4  # room a legend beside the panels takes
MARGIN_W_IN, MARGIN_H_IN = 1.0, 0.8  # axis labels and titles around the panels


def wrap(items: list, n_cols: int) -> list[list]:
    """`items` in rows of `n_cols`, the last row padded with None."""
    n_cols = max(1, min(n_cols, len(items)))
    rows = [list(items[i : i + n_cols]) for i in range(0, len(items), n_cols)]
    rows[-1] += [None] * (n_cols - len(rows[-1]))
    return rows


def panels(
    df: pd.DataFrame, max_cols: int = MAX_COLS, by_depth: bool = False
) -> tuple[list[list[tuple[str, float] | None]], bool]:
    """The (setting, depth) panels that hold rows.

    Laid out setting x depth when the grid is full (each setting's row wrapped after `max_cols` depths), else
    wrapped `max_cols` a row (model sizes with their own depths would leave most of a full grid empty), in
    setting order or, `by_depth`, shallowest first. Returns the layout (None: no panel there) and whether
    it is the full grid."""
    settings = sorted(df["setting"].unique())
    depths = sorted(df["depth"].dropna().unique())
    present = sorted({(s, d) for s, d in zip(df["setting"], df["depth"]) if pd.notna(d)})
    if by_depth:
        present.sort(key=lambda k: (k[1], k[0]))
    if len(present) == len(settings) * len(depths):
        n_cols = min(max_cols, len(depths))
        return [row for s in settings for row in wrap([(s, d) for d in depths], n_cols)], True
    return wrap(present, min(max_cols, len(present))), False


def panel_width(n_cols: int, widest: float, room: float = 0.0) -> float:
    """The panel width (inches) that keeps `n_cols` panels (plus `room`) within MAX_WIDTH_IN, at most `widest`."""
    return min(widest, (MAX_WIDTH_IN - MARGIN_W_IN - room) / max(n_cols, 1))


def grid(n_rows: int, n_cols: int, w: float, h: float, sharey=True, sharex=True):
    """A figure of n_rows x n_cols panels of w x h inches each."""
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(w * n_cols + MARGIN_W_IN, h * n_rows + MARGIN_H_IN),
        squeeze=False,
        sharey=sharey,
        sharex=sharex,
    )
    return fig, axes


def hide_empty(axes, layout: list[list]) -> None:
    for i, row in enumerate(layout):
        for j, cell in enumerate(row):
            if cell is None:
                axes[i][j].set_visible(False)


def is_last_in_column(layout: list[list], i: int, j: int) -> bool:
    """True where no panel sits below (i, j): that panel shows the shared x axis."""
    return i == len(layout) - 1 or layout[i + 1][j] is None


def title(ax, setting: str, text: str) -> None:
    ax.set_title(f"{setting}\n{text}" if setting else text, fontsize=10.5)


def _legend_below(fig, handles: list, labels: list) -> float:
    """A legend in rows under the panels (the figure grows to hold it); returns the fraction it takes."""
    labels = [str(t).replace("\n", " ") for t in labels]
    ncol = max(1, min(len(labels), int(fig.get_figwidth() // 2.8)))
    height_in = 0.27 * math.ceil(len(labels) / ncol) + 0.1
    fig.set_figheight(fig.get_figheight() + height_in)
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False)
    return height_in / fig.get_figheight()


def finish(fig, title_text: str, handles: list, labels: list, note: str = "") -> plt.Figure:
    """Title, legend (beside the panels when the figure stays within MAX_WIDTH_IN, else below) and a
    footnote, then a tight layout."""
    fig.suptitle(title_text, fontsize=12.5, y=1.0)
    bottom = 0.0
    if handles and fig.get_figwidth() + LEGEND_W_IN > MAX_WIDTH_IN:
        bottom = _legend_below(fig, handles, labels)
    elif handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if note:
        fig.text(0.01, -0.01, note, fontsize=9, color="0.3", ha="left", va="top", wrap=True)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def save_figure(fig, out: str | Path, stem: str, dpi: int = 130) -> list[Path]:
    """`out/stem.png` (at `dpi`) and `out/stem.svg`, then the figure is closed (also when saving fails)."""
    out = Path(out)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    try:
        fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
        fig.savefig(paths[1], bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths
