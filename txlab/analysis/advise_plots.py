"""`txlab advise`'s plot: every estimated candidate's predicted step time against its predicted peak, those
that fit apart from those over the memory, the capacity as a line and the winner marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from txlab.analysis.layout import save_figure
from txlab.analysis.plotting import GIB_NOTE, plt, sns  # noqa: F401 - plotting sets the backend and theme
from txlab.results.columns import GiB


def write_advise_plot(points: list[dict[str, Any]], path: Path, title: str, capacity_bytes: int) -> list[Path]:
    """PATH (.png) and its .svg beside it; `points` as txlab.advise.report.plot_points makes them."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    groups = (
        ("fits", [p for p in points if p["fits"] and not p["winner"]], "tab:blue", "o"),
        ("over the memory", [p for p in points if not p["fits"]], "tab:red", "x"),
    )
    for name, pts, color, marker in groups:
        if pts:
            ax.scatter(
                [p["peak_bytes"] / GiB for p in pts], [p["step_time_s"] for p in pts], c=color, marker=marker,
                s=36, label=f"{name} ({len(pts)})",
            )  # fmt: skip
    for p in points:
        if p["winner"]:
            x, y = p["peak_bytes"] / GiB, p["step_time_s"]
            ax.scatter([x], [y], marker="*", s=260, c="gold", edgecolors="black", zorder=5, label="winner")
            ax.annotate(p["label"], (x, y), xytext=(8, 10), textcoords="offset points", fontsize=8)
    ax.axvline(capacity_bytes / GiB, color="0.3", ls="--", lw=1)
    ax.annotate(f"capacity {capacity_bytes / GiB:.1f} GiB", (capacity_bytes / GiB, 1.0), xycoords=("data", "axes fraction"),
                xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=8, color="0.3")  # fmt: skip
    ax.set_xlabel("predicted peak per device (GiB)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.text(0.01, -0.01, f"{GIB_NOTE}. Every point is an estimate (fake tensors, time model); nothing was run.",
             fontsize=8, color="0.3", ha="left", va="top")  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, path.parent, path.stem)
