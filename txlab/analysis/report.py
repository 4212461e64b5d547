"""`txlab report`: one document (HTML, or Markdown with images beside it) with everything about a store.

It opens with the answer, then the evidence, then what the store holds:

1. the feasibility frontier, one table per budget: the longest sequence per policy and depth, and the
   factor the best policy gains over the baseline (sdpa, else naive);
2. every plot, with a caption (or why it was not drawn);
3. each policy against the baseline at shared shapes (memory saving, time overhead), and the time model's
   error on measured rows that carry a prediction (median and worst, per hardware profile);
4. trial counts by sweep, basis and status, the devices, the sweep grids reconstructed from the rows (the
   config keys that vary within each sweep, and their values), the settings every trial shares, and the
   spec files kept in the store directory;
5. the rows with errors.

HTML is one self-contained file (images inline as PNG data URIs); Markdown writes its PNGs beside it.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from txlab.analysis.data import AnalysisError, Source, budgets_of, prepare, require_rows
from txlab.analysis.frontier import (
    baseline_name,
    frontier,
    frontier_tables,
    md_table,
    versus_baseline,
    versus_pivot,
)
from txlab.analysis.time_plots import prediction_error, prediction_note
from txlab.results.columns import GiB, config_columns

CAPTIONS = {
    "memory_vs_length": "Peak memory against sequence length, one line per policy, a panel per depth. "
    "Crosses and triangles on a budget line: trials that ran out of memory or over budget there.",
    "memory_breakdown": "What the peak is made of: parameters, gradients, optimizer state, activations, the rest.",
    "frontier_heatmap": "Longest sequence length that fits each budget, per policy and depth.",
    "frontier_steps": "The same frontier against depth, the policies side by side at each depth: where each "
    "policy stops fitting (with one depth: a dot per policy, its value written above it).",
    "time_vs_memory": "Step time against peak memory at fixed shapes. Beside each policy: its step time relative to "
    "BASE's at that shape (x1.33 = 33% slower than BASE); the Pareto front circled.",
    "chunk_sizes": "Chunked attention: peak memory and step time over q_chunk x k_chunk.",
    "fewest_devices": "The fewest FSDP ranks whose per-rank peak fits each per-device budget, per model and policy.",
    "predicted_throughput": "Predicted tokens/s per device against sequence length on each row's hardware profile "
    "(the time model, not measured), a line per policy, a panel per setting (layout among the keys) and depth.",
    "predicted_cost": "Predicted dollars per million tokens against sequence length, from the time model and the "
    "rows' measure.usd_per_device_hour.",
    "frontier_heatmap_time": "The feasibility frontier with each cell coloured by the predicted step time of the "
    "trial that reached it (written under the length).",
}


def caption(name: str, base: str | None) -> str:
    """A plot's caption, its ratios named after the baseline they are taken against."""
    text = CAPTIONS[name]
    if "BASE" in text and not base:
        return text.split(" Beside each policy")[0] + " (no sdpa or naive rows: no step time ratios)."
    return text.replace("BASE", base or "")


def _config_cols(df: pd.DataFrame) -> list[str]:
    """The config columns a trial's row carries (train.* configures `txlab train`, which writes no rows)."""
    return [c for c in config_columns() if c in df.columns and not c.startswith("train.")]


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Trials by sweep and status (columns ok, oom, over_budget, error, total)."""
    d = df.assign(sweep=df["sweep"].astype(object).where(df["sweep"].notna(), "(single runs)"), basis=df["basis"])
    t = pd.crosstab([d["sweep"], d["basis"]], d["status"])
    for s in ("ok", "oom", "over_budget", "error"):
        if s not in t.columns:
            t[s] = 0
    t = t[["ok", "oom", "over_budget", "error"]]
    t["total"] = t.sum(axis=1)
    t = t.reset_index()
    t.columns.name = None  # else the HTML table gets an empty first column for it
    return t


def devices(df: pd.DataFrame) -> pd.DataFrame:
    d = df.assign(capacity_gib=(pd.to_numeric(df["device_capacity_bytes"], errors="coerce") / GiB).round(1))
    cols = ["device", "capacity_gib", "host", "torch_version", "txlab_version"]
    d = d[cols].astype(object).where(d[cols].notna(), "")
    return d.value_counts().rename("trials").reset_index()


def _grid_values(col: pd.Series) -> list[str]:
    """The values a config column takes, sorted, null (a key left unset, e.g. no budget) first."""
    vals = list(col.dropna().unique())
    try:
        vals = sorted(vals)
    except TypeError:
        pass
    return (["null"] if col.isna().any() else []) + [str(v) for v in vals]


def reconstructed_grids(df: pd.DataFrame) -> pd.DataFrame:
    """Per sweep: each config key that varies within it and the values seen (what its grid was); null
    counts as a value (`measure.budget_gib: [null, 0.15]` is an axis)."""
    out = []
    for sweep, g in df.groupby(df["sweep"].astype(object).where(df["sweep"].notna(), "(single runs)"), sort=True):
        for c in _config_cols(g):
            vals = _grid_values(g[c])
            if len(vals) > 1:
                out.append({"sweep": sweep, "key": c, "values": ", ".join(vals)})
    return pd.DataFrame(out, columns=["sweep", "key", "values"])


def constant_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Config keys with one value across the whole store (the sweep's base)."""
    out = []
    for c in _config_cols(df):
        v = df[c].dropna().unique()
        if len(v) == 1 and df[c].notna().all():
            out.append({"key": c, "value": str(v[0])})
    return pd.DataFrame(out, columns=["key", "value"])


def error_rows(df: pd.DataFrame) -> pd.DataFrame:
    e = df[df["status"] == "error"]
    cols = ["trial_key", "sweep", "policy", "depth", "seq_len", "setting", "host", "error"]
    e = e[cols].copy()
    if (e["setting"] == "").all():
        e = e.drop(columns="setting")
    return e.reset_index(drop=True)


def spec_files(store: Source) -> dict[str, str]:
    """YAML spec files kept in (or beside, under specs/) a local store directory, if any."""
    if isinstance(store, pd.DataFrame) or "://" in str(store):
        return {}
    root = Path(store)
    out = {}
    for p in sorted([*root.glob("*.yaml"), *root.glob("*.yml"), *root.glob("_*.yaml"), *root.glob("specs/*.yaml")]):
        try:
            out[p.name] = p.read_text()
        except OSError:
            continue
    return out


FRONTIER_NOTE = (
    "Longest sequence length (tokens) with status ok and peak memory <= budget (GiB = 2^30 bytes). "
    "N+: the longest length tried still fits, the limit lies beyond. infeasible at N: not even the shortest "
    "length tried fits. est.: from estimated rows (measured = false). best vs BASE: the longest sequence of "
    "the best policy over the baseline's (≥: the best fits the longest length tried, its limit lies beyond)."
)
ALL_ESTIMATED_NOTE = " Every cell here is an estimate (measured = false)."
VERSUS_NOTE = (
    "Peak memory change and step-time ratio of each policy against BASE at the same shape (both measured, "
    "both ok). -60% mem, x1.30 time: 60% less memory, 30% slower."
)
NO_VERSUS = (
    "No shape was measured (status ok) both under sdpa (or naive) and under another policy, so there is nothing "
    "to compare. Estimated rows take no part: they have no step times."
)

TIME_MODEL_HEAD = "The time model against measured steps"


@dataclass
class Report:
    """Everything a report shows, computed once; the writers only lay it out."""

    title: str
    intro: str
    frontier: dict[float, pd.DataFrame]  # budget -> answer table
    frontier_note: str
    versus: pd.DataFrame
    baseline: str | None
    tables: dict[str, pd.DataFrame]  # what the store holds, in order
    time_model: pd.DataFrame  # the time model's error on measured rows, per hardware profile
    time_model_note: str
    specs: dict[str, str]
    errors: pd.DataFrame
    df: pd.DataFrame = field(repr=False)
    budgets: list[float] = field(default_factory=list)


def _intro(df: pd.DataFrame, budgets: list[float], where: str, n_errors: int) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_est = int((df["basis"] == "estimated").sum())
    basis = f" ({n_est} estimated)" if n_est else ""
    errors = f"; {n_errors} with errors, listed at the end" if n_errors else ""
    return (
        f"{len(df)} trials{basis}{errors}; budgets {', '.join(f'{b:g}' for b in budgets) or 'none'} GiB "
        f"(from {where}); GiB = 2^30 bytes. Generated {when}."
    )


def build_report(store: Source, budgets=None) -> Report:
    df = prepare(store)
    require_rows(df, str(store) if not isinstance(store, pd.DataFrame) else "data")
    budgets, where = budgets_of(df, budgets)
    fr, errors = frontier(df, budgets), error_rows(df)
    vs = versus_baseline(df)
    all_estimated = len(fr) and bool((fr["basis"] == "estimated").all())
    return Report(
        title=f"txlab report: {store if not isinstance(store, pd.DataFrame) else 'data'}",
        intro=_intro(df, budgets, where, len(errors)),
        frontier=frontier_tables(fr, baseline_name(df)),
        frontier_note=FRONTIER_NOTE.replace("BASE", baseline_name(df) or "sdpa")
        + (ALL_ESTIMATED_NOTE if all_estimated else "")
        + f" Budgets from: {where}.",
        versus=vs,
        baseline=vs["baseline"].iloc[0] if len(vs) else None,
        tables={
            "Trials by status": status_counts(df),
            "Devices": devices(df),
            "Sweep grids (config keys that vary, reconstructed from the rows)": reconstructed_grids(df),
            "Settings shared by every trial": constant_settings(df),
        },
        time_model=(tm := prediction_error(df)),
        time_model_note=prediction_note(tm),
        specs=spec_files(store),
        errors=errors,
        df=df,
        budgets=budgets,
    )


def _figures_as(df, budgets, save) -> dict[str, str]:
    """name -> whatever `save(name, fig)` returns for a drawn plot, or the `Skipped` of one not drawn."""
    import matplotlib.pyplot as plt

    from txlab.analysis.plots import PLOTS, Skipped, draw

    out = {}
    for name in PLOTS:
        fig = draw(name, df, budgets)
        if isinstance(fig, Skipped):
            out[name] = fig
            continue
        try:
            out[name] = save(name, fig)
        finally:
            plt.close(fig)
    return out


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"{out.parent}: cannot create directory ({e.strerror})") from None


def write_report(store: Source, out: str | Path, budgets=None) -> Path:
    """Write the report to `out` (.html: self-contained, images inline; .md: images in OUT_files/)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        raise AnalysisError(f"{out}: report must end in .html or .md")
    rep = build_report(store, budgets)
    _make_parent(out)
    text = _markdown(rep, out) if out.suffix.lower() == ".md" else _html(rep)
    out.write_text(text)
    return out


# --- Markdown ---------------------------------------------------------------------------------------


def _markdown(rep: Report, out: Path) -> str:
    img_dir = out.parent / f"{out.stem}_files"
    img_dir.mkdir(exist_ok=True)

    def save(name, fig):
        fig.savefig(img_dir / f"{name}.png", dpi=110, bbox_inches="tight")  # txlab plot writes the SVGs
        return f"{img_dir.name}/{name}.png"

    md = [f"# {rep.title}\n", rep.intro + "\n", "## Feasibility frontier: longest sequence that fits\n"]
    md.append(rep.frontier_note + "\n")
    for b, t in rep.frontier.items():
        md += [f"### Budget {b:g} GiB\n", md_table(t)]
    md.append("## Plots\n")
    for name, src in _figures_as(rep.df, rep.budgets, save).items():
        md.append(f"### {name.replace('_', ' ')}\n\n{caption(name, baseline_name(rep.df))}\n")
        md.append(f"_Not drawn: {src.reason}._\n" if not isinstance(src, str) else f"![{name}]({src})\n")
    md.append(f"## Against {rep.baseline or 'the baseline'} at shared shapes\n")
    md.append((VERSUS_NOTE.replace("BASE", f"`{rep.baseline}`") if rep.baseline else NO_VERSUS) + "\n")
    md.append(md_table(versus_pivot(rep.versus)))
    md += [f"## {TIME_MODEL_HEAD}\n", rep.time_model_note + "\n", md_table(rep.time_model)]
    for head, t in rep.tables.items():
        md += [f"## {head}\n", md_table(t)]
    for name, text in rep.specs.items():
        md += [f"## Spec file `{name}`\n", "```yaml\n" + text.rstrip() + "\n```\n"]
    md += [f"## Rows with errors ({len(rep.errors)})\n", md_table(rep.errors)]
    return "\n".join(md)


# --- HTML -------------------------------------------------------------------------------------------

CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222}"
    "table.t{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
    "table.t td,table.t th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
    "table.t th{background:#f3f3f3}table.t tr.gain td{background:#eef6ee;font-weight:600}"
    ".scroll{max-width:100%;overflow-x:auto}"
    "img{display:block;max-width:100%;height:auto;border:1px solid #eee}"
    "pre{background:#f6f6f6;padding:.8em;overflow:auto;white-space:pre-wrap}p.note{color:#555;font-size:14px}"
)


def _html_table(t: pd.DataFrame) -> str:
    """A table (no index, no column-name header cell) in a div that scrolls rather than widen the page."""
    if not len(t):
        return "<p><em>(none)</em></p>"
    t = t.copy()
    t.columns.name = None
    body = t.to_html(index=False, border=0, classes="t", na_rep="")
    body = re.sub(r"<tr>(\s*<td>(?:[^<]*</td>\s*<td>)?best vs )", r"<tr class='gain'>\1", body)  # the gain rows
    return f"<div class='scroll'>{body}</div>"


def _html_frontier(rep: Report) -> list[str]:
    e = html.escape
    parts = [
        "<h2>Feasibility frontier: longest sequence that fits</h2>",
        f"<p class='note'>{e(rep.frontier_note)}</p>",
    ]
    for b, t in rep.frontier.items():
        parts.append(f"<h3>Budget {b:g} GiB</h3>{_html_table(t)}")
    if not rep.frontier:
        parts.append("<p><em>No budget to judge against, or no rows other than errors.</em></p>")
    return parts


def _html_plots(rep: Report) -> list[str]:
    def save(name, fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    e = html.escape
    parts = ["<h2>Plots</h2>"]
    for name, src in _figures_as(rep.df, rep.budgets, save).items():
        parts.append(
            f"<h3>{e(name.replace('_', ' '))}</h3><p class='note'>{e(caption(name, baseline_name(rep.df)))}</p>"
        )
        parts.append(
            f"<img src='{src}' alt='{name}'>"
            if isinstance(src, str)
            else f"<p><em>Not drawn: {e(src.reason)}.</em></p>"
        )
    return parts


def _html_store(rep: Report) -> list[str]:
    e = html.escape
    base = rep.baseline
    parts = [f"<h2>Against {e(base or 'sdpa')} at shared shapes</h2>"]
    parts.append(
        f"<p class='note'>{e(VERSUS_NOTE.replace('BASE', base))}</p>{_html_table(versus_pivot(rep.versus))}"
        if base
        else f"<p>{e(NO_VERSUS)}</p>"
    )
    parts.append(f"<h2>{e(TIME_MODEL_HEAD)}</h2><p class='note'>{e(rep.time_model_note)}</p>")
    parts.append(_html_table(rep.time_model))
    for head, t in rep.tables.items():
        parts.append(f"<h2>{e(head)}</h2>{_html_table(t)}")
    for name, text in rep.specs.items():
        parts.append(f"<h2>Spec file <code>{e(name)}</code></h2><pre>{e(text)}</pre>")
    parts.append(f"<h2>Rows with errors ({len(rep.errors)})</h2>{_html_table(rep.errors)}")
    return parts


def _html(rep: Report) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>{e(rep.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(rep.title)}</h1><p>{e(rep.intro)}</p>",
        *_html_frontier(rep),
        *_html_plots(rep),
        *_html_store(rep),
        "</body></html>",
    ]
    return "\n".join(parts)
