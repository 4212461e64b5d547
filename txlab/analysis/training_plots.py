"""Training curves of `txlab train` run directories: loss and bits per byte (train and held-out) and the
learning rate, against optimizer steps and tokens seen, several runs overlaid. See docs/analysis.md
("Training curves").

Drawn from the files a run directory holds, never from a model: `metrics.jsonl` (one JSON object per
logged step, `split: train`, with `loss`, `bits_per_byte`, `lr`; or per evaluation, `split: val`, with
`loss`, `bits_per_byte`) and `config.yaml` (the tokens an optimizer step takes: `train.grad_accum` x
`workload.batch_size` x `workload.seq_len`). `txlab train` redraws `RUN_DIR/training_curves.png` at each
evaluation and at the end; `txlab plot --train RUN_DIR ...` draws any runs side by side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
import yaml
from matplotlib.lines import Line2D

from txlab.analysis.data import AnalysisError
from txlab.analysis.layout import finish, grid, panel_width, save_figure
from txlab.analysis.plotting import TICK_PT

METRICS, CONFIG = "metrics.jsonl", "config.yaml"
STEM = "training_curves"  # RUN_DIR/training_curves.png, .svg


@dataclass(frozen=True)
class Run:
    """One run directory's records and the tokens an optimizer step takes (None: unknown)."""

    name: str
    records: pd.DataFrame  # step, split, loss, bits_per_byte, lr (and whatever else a record holds)
    tokens_per_step: int | None


def _tokens_per_step(config: Path) -> int | None:
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
        w, t = cfg.get("workload", {}), cfg.get("train", {})
        return int(t.get("grad_accum", 1)) * int(w["batch_size"]) * int(w["seq_len"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError):
        return None


def read_run(run_dir: str | Path, name: str | None = None) -> Run:
    """A run directory's metrics; AnalysisError (bad input) when it has none."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not path.is_file():
        raise AnalysisError(f"{run_dir}: not a txlab train run directory (no {METRICS})")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{path}: unreadable ({e})") from None
    df = pd.DataFrame(records, columns=sorted({"step", "split", "loss", "bits_per_byte", "lr"}.union(*records)))
    for c in ("step", "loss", "bits_per_byte", "lr"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return Run(name or run_dir.resolve().name, df, _tokens_per_step(run_dir / CONFIG))


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Labels from the directory names, with as many parent names as it takes to tell them apart."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]


def _fmt_tokens(v: float, _=None) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}"


def _curves(ax, run: Run, column: str, color, x: str) -> bool:
    """Train (solid) and held-out (dashed, dots) curves of one column; False when the run has none."""
    drawn = False
    for split, kw in (("train", dict(lw=1.6, ls="-")), ("val", dict(lw=1.4, ls="--", marker="o", ms=4.5))):
        s = run.records[run.records["split"] == split]
        s = s[np.isfinite(s[column].astype(float))].sort_values("step")  # a diverged step's loss: not drawn
        if len(s):
            ax.plot(s[x], s[column], color=color, label=f"{run.name} {split}", **kw)
            drawn = True
    return drawn


def plot_training_curves(run_dirs: Sequence[str | Path]):
    """Loss and bits per byte (train solid, held-out dashed with dots) and the learning rate against steps,
    with tokens seen on the top axis; against tokens when the runs differ in tokens per step. A colour per
    run, labelled with its directory name."""
    if not run_dirs:
        raise AnalysisError("--train: name at least one run directory")
    runs = [read_run(d, n) for d, n in zip(run_dirs, run_names(run_dirs))]
    per_step = {r.tokens_per_step for r in runs}
    by_tokens = len(per_step) > 1 and None not in per_step  # steps of different sizes: compare tokens
    x = "tokens" if by_tokens else "step"
    runs = [
        Run(r.name, r.records.assign(tokens=r.records["step"] * (r.tokens_per_step or math.nan)), r.tokens_per_step)
        for r in runs
    ]
    colors = sns.color_palette("colorblind", len(runs))
    fig, axes = grid(1, 3, panel_width(3, 3.3, room=2.8), 2.9, sharey=False, sharex=True)
    panels = (("loss", "loss (nats / token)"), ("bits_per_byte", "bits per byte"), ("lr", "learning rate"))
    missing = []
    for ax, (column, label) in zip(axes[0], panels):
        drawn = [_curves(ax, r, column, c, x) for r, c in zip(runs, colors)]
        if not any(drawn):
            missing.append(label)
            ax.text(
                0.5, 0.5, f"no {label} recorded", transform=ax.transAxes, ha="center", fontsize=TICK_PT, color="0.4"
            )
        ax.set_ylabel(label)
        ax.set_xlabel("tokens seen" if by_tokens else "optimizer step")
        if by_tokens:
            ax.xaxis.set_major_formatter(mticker.FuncFormatter(_fmt_tokens))
    axes[0][2].yaxis.set_major_formatter(
        mticker.FuncFormatter(lambda v, _: f"{v:.1e}".replace("e-0", "e-") if v else "0")
    )
    (tps,) = per_step if len(per_step) == 1 else (None,)
    if not by_tokens and tps:
        for ax in axes[0]:  # the same steps as tokens seen
            top = ax.secondary_xaxis("top", functions=(lambda s: s * tps, lambda t: t / tps))
            top.xaxis.set_major_formatter(mticker.FuncFormatter(_fmt_tokens))
            top.set_xlabel("tokens seen", fontsize=9)
            top.tick_params(labelsize=8.5)
    handles = [Line2D([], [], color=c, lw=2.5) for c in colors] + [
        Line2D([], [], color="0.3", lw=1.6),
        Line2D([], [], color="0.3", lw=1.4, ls="--", marker="o", ms=4.5),
    ]
    labels = [r.name + _ending(r) for r in runs] + ["train (logged steps)", "held-out (each evaluation)"]
    note = _note(runs, by_tokens, tps, missing)
    return finish(fig, "Training curves", handles, labels, note)


def _ending(run: Run) -> str:
    """' (diverged at step 37)' for a run stopped on a loss that was not finite."""
    if "diverged" in run.records and run.records["diverged"].fillna(False).astype(bool).any():
        step = int(run.records.loc[run.records["diverged"].fillna(False).astype(bool), "step"].iloc[0])
        return f"\n(diverged at step {step})"
    return ""


def _note(runs: list[Run], by_tokens: bool, tps: int | None, missing: list[str]) -> str:
    parts = ["Train: the mean loss of the logged optimizer step's micro-batches; held-out: the evaluation batches."]
    if by_tokens:
        parts.append("The runs differ in tokens per step, so they are compared by tokens seen.")
    elif tps:
        parts.append(f"{tps:,} tokens per optimizer step (top axis: tokens seen).")
    if "bits per byte" in missing:
        parts.append("No bits per byte: the data records no byte counts (synthetic tokens).")
    return " ".join(parts)


def write_training_curves(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """`out/training_curves.png` and `.svg` (default `out`: the one run directory); the figure is closed."""
    if out is None:
        if len(run_dirs) != 1:
            raise AnalysisError("--out: name an output directory when plotting several runs")
        out = run_dirs[0]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"{out}: cannot create output directory ({e.strerror})") from None
    return save_figure(plot_training_curves(run_dirs), out, STEM)
