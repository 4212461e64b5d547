"""The time model's plots and table (docs/time_model.md): `predicted_throughput` (predicted tokens/s per device
against sequence length) and `predicted_cost` (predicted dollars per million tokens), a line per policy, a panel
per setting (layout, model, ... whatever varies), hardware profile and depth; and `prediction_error`, the time
model's error on measured rows (those with both `step_time_s` and `predicted_step_time_s`), per profile.
See docs/analysis.md.

Every figure here is a prediction: rows carry them when they have a hardware profile (`measure.hardware`, or
the `local` profile `txlab calibrate` writes, for measured rows). A line is solid where its predictions are of
measured rows, dashed where of estimates; the two are kept apart as everywhere.
"""

from __future__ import annotations

import matplotlib.ticker as mticker
import pandas as pd

from txlab.analysis.data import Source, policy_order, prepare
from txlab.analysis.layout import MAX_COLS, finish, grid, hide_empty, is_last_in_column, panel_width, panels, title
from txlab.analysis.palette import style
from txlab.analysis.plotting import ESTIMATED_DASHES, Drawn, Skipped, basis_handles, log2_len_axis, policy_handles

STEP, PREDICTED = "step_time_s", "predicted_step_time_s"
LAYOUT_KEYS = ("parallel.fsdp", "parallel.tp", "parallel.cp")  # the mesh's dimensions: devices = their product
NEEDS = "estimates need measure.hardware; measured rows get the local profile's prediction once txlab calibrate has run"
NO_PREDICTION = f"no rows with predicted columns ({NEEDS})"
NO_PRICE = "no rows with a predicted price (measure.usd_per_device_hour is unset: no price is guessed)"


def devices(df: pd.DataFrame) -> pd.Series:
    """Devices each row's step runs on: the product of its layout's degrees (a missing or null degree is 1)."""
    n = pd.Series(1, index=df.index, dtype="int64")
    for key in LAYOUT_KEYS:
        if key in df.columns:
            n *= pd.to_numeric(df[key], errors="coerce").fillna(1).astype("int64")
    return n


def _predicted_rows(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Ok rows with `column`, their panels named by setting and profile, per-device tokens/s added."""
    ok = df[(df["status"] == "ok") & pd.to_numeric(df[column], errors="coerce").notna()].copy()
    if ok.empty:
        return ok
    ok["tokens_per_device"] = pd.to_numeric(ok["predicted_tokens_per_s"], errors="coerce") / devices(ok)
    ok["usd_per_mtok"] = pd.to_numeric(ok["predicted_usd_per_mtok"], errors="coerce")
    on = "predicted on " + ok["hardware"].astype(str)
    ok["setting"] = [f"{s}, {h}" if s else h for s, h in zip(ok["setting"], on)]
    return ok


def _short(v: float) -> str:
    """A tick label: 0.05, 2, 500, 20k, 1.5M."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _line_panel(ax, f: pd.DataFrame, y: str, lens: list[int]) -> None:
    for (pol, basis), g in f.groupby(["policy", "basis"], sort=False):
        st = style(pol)
        g = g.groupby("seq_len", as_index=False)[y].median().sort_values("seq_len")  # repeats of one trial
        ax.plot(g["seq_len"].astype(int), g[y], color=st.color, marker=st.marker, lw=2 if basis == "measured" else 1.4,
                ls="-" if basis == "measured" else ESTIMATED_DASHES, markersize=st.size(6))  # fmt: skip
    log2_len_axis(ax, lens)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1, 2, 5)))  # enough labels that the scale reads as log
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: _short(v)))
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def _plot_predicted(ok: pd.DataFrame, y: str, ylabel: str, title_text: str, note: str) -> Drawn:
    layout, _ = panels(ok, MAX_COLS)
    w = panel_width(len(layout[0]), 4.2)
    fig, axes = grid(len(layout), len(layout[0]), w, 0.8 * w, sharey=False, sharex=False)
    lens = sorted(int(t) for t in ok["seq_len"].dropna().unique())
    for i, row in enumerate(layout):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            ax, (setting, depth) = axes[i][j], panel
            _line_panel(ax, ok[(ok["setting"] == setting) & (ok["depth"] == depth)], y, lens)
            title(ax, setting, f"{int(depth)} layers")
            last = is_last_in_column(layout, i, j)
            ax.set_xlabel("sequence length (tokens, log2)" if last else "")
            ax.tick_params(axis="x", labelrotation=45)
            ax.set_ylabel(ylabel if j == 0 else "")
    hide_empty(axes, layout)
    handles, labels = policy_handles(policy_order(ok["policy"]))
    bh, bl = basis_handles(set(ok["basis"]))
    bl = [f"predictions of {'measured rows' if t == 'measured' else 'estimates'}" for t in bl]
    return finish(fig, title_text, handles + bh, labels + bl, note)


def plot_predicted_throughput(source: Source) -> Drawn:
    """Predicted tokens/s per device against sequence length: a line per policy, a panel per setting, profile
    and depth."""
    ok = _predicted_rows(prepare(source), "predicted_tokens_per_s")
    if ok.empty:
        return Skipped(NO_PREDICTION)
    note = (
        "Predicted by the time model (docs/time_model.md) on each row's hardware profile, not measured: "
        "predicted_tokens_per_s over the devices of the row's layout (fsdp x tp x cp); log scale."
    )
    return _plot_predicted(ok, "tokens_per_device", "predicted tokens/s per device (log)",
                           "Predicted throughput per device", note)  # fmt: skip


def plot_predicted_cost(source: Source) -> Drawn:
    """Predicted dollars per million tokens against sequence length (rows with measure.usd_per_device_hour)."""
    df = prepare(source)
    if _predicted_rows(df, "predicted_tokens_per_s").empty:
        return Skipped(NO_PREDICTION)
    ok = _predicted_rows(df, "predicted_usd_per_mtok")
    if ok.empty:
        return Skipped(NO_PRICE)
    note = (
        "Predicted step time x devices x measure.usd_per_device_hour per million tokens, on each row's hardware "
        "profile (docs/time_model.md); the price is the row's own; log scale."
    )
    return _plot_predicted(ok, "usd_per_mtok", "predicted $ per million tokens (log)",
                           "Predicted cost per million tokens", note)  # fmt: skip


def prediction_error(source: Source) -> pd.DataFrame:
    """The time model against measured steps, per hardware profile: rows with both a measured step time and a
    predicted one, the median and the worst error (predicted / measured - 1; worst: the largest in size) and
    the trial it was."""
    df = prepare(source)
    cols = ["hardware", "rows", "median error", "median |error|", "worst error", "worst trial"]
    step, pred = (pd.to_numeric(df[c], errors="coerce") for c in (STEP, PREDICTED))
    both = df[(df["status"] == "ok") & (df["basis"] == "measured") & (step > 0) & (pred > 0)].copy()
    if both.empty:
        return pd.DataFrame(columns=cols)
    both["error"] = pred[both.index] / step[both.index] - 1
    out = []
    for hw, g in both.groupby("hardware", sort=True):
        worst = g.loc[g["error"].abs().idxmax()]
        trial = f"{worst['policy']}, {int(worst['depth'])} layers, {int(worst['seq_len'])} tokens"
        if worst["setting"]:
            trial = f"{worst['setting']}: {trial}"
        out.append([hw, len(g), f"{g['error'].median():+.0%}", f"{g['error'].abs().median():.0%}",
                    f"{worst['error']:+.0%}", trial])  # fmt: skip
    return pd.DataFrame(out, columns=cols)


def prediction_note(table: pd.DataFrame) -> str:
    """What the table says and where its rows come from (for the report)."""
    if not len(table):
        return (
            "No row has both a measured and a predicted step time (measured rows are predicted on the local "
            "profile after txlab calibrate, or on measure.hardware)."
        )
    return (
        "Error = predicted_step_time_s / step_time_s - 1 over measured rows that have both (the prediction on the "
        "row's hardware profile: `local` is this machine, calibrated). A measured step on a shared CPU is "
        "stretched by the other processes' load, which the model does not predict (docs/time_model.md)."
    )
