"""`txlab report`: one document (HTML, or Markdown with images beside it) with everything about a store.

Sections: what the store holds (sweeps, devices, trial counts by status), the sweep specs it came from
(spec files kept in the store directory when there are any, and always the grid reconstructed from the
rows: the config keys that vary within each sweep and their values), every plot, the frontier tables,
and the rows with errors.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from txlab.analysis.data import GIB, AnalysisError, Source, budgets_of, prepare, require_rows
from txlab.analysis.frontier import frontier, frontier_markdown, frontier_pivot, md_table, versus_baseline, versus_pivot

CAPTIONS = {
    "memory_vs_length": "Peak memory against sequence length, one line per policy, a panel per depth. "
    "Crosses and triangles on a budget line: trials that ran out of memory or over budget there.",
    "memory_breakdown": "What the peak is made of: parameters, gradients, optimizer state, activations, the rest.",
    "frontier_heatmap": "Longest sequence length that fits each budget, per policy and depth.",
    "frontier_steps": "The same frontier against depth: where each policy stops fitting.",
    "time_vs_memory": "Step time against peak memory at fixed shapes; the Pareto front circled.",
    "chunk_sizes": "Chunked attention: peak memory and step time over q_chunk x k_chunk.",
}


def _config_cols(df: pd.DataFrame) -> list[str]:
    return [
        c for c in df.columns if "." in c and c.split(".")[0] in ("model", "policy", "workload", "data", "measure")
    ] + ["seed"]


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Trials by sweep and status (columns ok, oom, over_budget, error, total)."""
    d = df.assign(sweep=df["sweep"].astype(object).where(df["sweep"].notna(), "(single runs)"), basis=df["basis"])
    t = pd.crosstab([d["sweep"], d["basis"]], d["status"])
    for s in ("ok", "oom", "over_budget", "error"):
        if s not in t.columns:
            t[s] = 0
    t = t[["ok", "oom", "over_budget", "error"]]
    t["total"] = t.sum(axis=1)
    return t.reset_index()


def devices(df: pd.DataFrame) -> pd.DataFrame:
    d = df.assign(capacity_gib=(pd.to_numeric(df["device_capacity_bytes"], errors="coerce") / GIB).round(1))
    cols = ["device", "capacity_gib", "host", "torch_version", "txlab_version"]
    d = d[cols].astype(object).where(d[cols].notna(), "")
    return d.value_counts().rename("trials").reset_index()


def reconstructed_grids(df: pd.DataFrame) -> pd.DataFrame:
    """Per sweep: each config key that varies within it and the values seen (what its grid was)."""
    out = []
    for sweep, g in df.groupby(df["sweep"].astype(object).where(df["sweep"].notna(), "(single runs)"), sort=True):
        for c in _config_cols(g):
            vals = g[c].dropna().unique()
            if len(vals) > 1:
                try:
                    vals = sorted(vals)
                except TypeError:
                    pass
                out.append({"sweep": sweep, "key": c, "values": ", ".join(str(v) for v in vals)})
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


def _figures_as(df, budgets, save) -> dict[str, str]:
    """name -> whatever `save(name, fig)` returns, for each plot that has something to draw."""
    import matplotlib.pyplot as plt

    from txlab.analysis.plots import PLOTS, SKIPPED, TAKES_BUDGETS

    out = {}
    for name, fn in PLOTS.items():
        SKIPPED.pop(name, None)
        fig = fn(df, budgets) if name in TAKES_BUDGETS else fn(df)
        if fig is None:
            out[name] = None
            continue
        out[name] = save(name, fig)
        plt.close(fig)
    return out


def write_report(store: Source, out: str | Path, budgets=None) -> Path:
    """Write the report to `out` (.html: self-contained, images inline; .md: images in OUT_files/)."""
    from txlab.analysis.plots import SKIPPED

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        raise AnalysisError(f"{out}: report must end in .html or .md")
    df = prepare(store)
    require_rows(df, str(store) if not isinstance(store, pd.DataFrame) else "data")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"{out.parent}: cannot create directory ({e.strerror})") from None
    budgets, where = budgets_of(df, budgets)
    fr, vs = frontier(df, budgets), versus_baseline(df)
    title = f"txlab report: {store if not isinstance(store, pd.DataFrame) else 'data'}"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (
        f"{len(df)} trials; budgets {', '.join(f'{b:g}' for b in budgets) or 'none'} GiB (from {where}); "
        f"GiB = 2^30 bytes. Generated {when}."
    )
    tables = {
        "Trials by status": status_counts(df),
        "Devices": devices(df),
        "Sweep grids (config keys that vary, reconstructed from the rows)": reconstructed_grids(df),
        "Settings shared by every trial": constant_settings(df),
    }
    specs = spec_files(store)
    errors = error_rows(df)

    if out.suffix.lower() == ".md":
        img_dir = out.parent / f"{out.stem}_files"
        img_dir.mkdir(exist_ok=True)

        def save(name, fig):
            fig.savefig(img_dir / f"{name}.png", dpi=110, bbox_inches="tight")  # txlab plot writes the SVGs
            return f"{img_dir.name}/{name}.png"

        figs = _figures_as(df, budgets, save)
        md = [f"# {title}\n", intro + "\n"]
        for head, t in tables.items():
            md += [f"## {head}\n", md_table(t)]
        for name, text in specs.items():
            md += [f"## Spec file `{name}`\n", "```yaml\n" + text.rstrip() + "\n```\n"]
        md.append("## Plots\n")
        for name, src in figs.items():
            md.append(f"### {name.replace('_', ' ')}\n\n{CAPTIONS[name]}\n")
            md.append(f"![{name}]({src})\n" if src else f"_Not drawn: {SKIPPED.get(name, 'nothing to draw')}._\n")
        md.append(
            frontier_markdown(fr, vs, where).replace("\n## ", "\n### ").replace("## Feasibility", "## Feasibility", 1)
        )
        md += ["\n## Rows with errors\n", md_table(errors)]
        out.write_text("\n".join(md))
        return out

    def save(name, fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    figs = _figures_as(df, budgets, save)

    def table(t: pd.DataFrame) -> str:
        return t.to_html(index=False, border=0, classes="t", na_rep="") if len(t) else "<p><em>(none)</em></p>"

    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
        "table.t{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}"
        "table.t td,table.t th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "table.t th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}"
        "pre{background:#f6f6f6;padding:.8em;overflow:auto}td{vertical-align:top}</style></head><body>",
        f"<h1>{e(title)}</h1><p>{e(intro)}</p>",
    ]
    for head, t in tables.items():
        parts.append(f"<h2>{e(head)}</h2>{table(t)}")
    for name, text in specs.items():
        parts.append(f"<h2>Spec file <code>{e(name)}</code></h2><pre>{e(text)}</pre>")
    parts.append("<h2>Plots</h2>")
    for name, src in figs.items():
        parts.append(f"<h3>{e(name.replace('_', ' '))}</h3><p>{e(CAPTIONS[name])}</p>")
        parts.append(
            f"<img src='{src}' alt='{name}'>"
            if src
            else f"<p><em>Not drawn: {e(SKIPPED.get(name, 'nothing to draw'))}.</em></p>"
        )
    parts.append(
        "<h2>Feasibility frontier: longest feasible sequence length (tokens)</h2>"
        "<p>Feasible: status ok and peak memory &lt;= budget. <code>N+</code>: the longest length tried still fits. "
        "<code>infeasible at N</code>: not even the shortest length tried fits. <code>est.</code>: with estimated rows.</p>"
    )
    parts.append(table(frontier_pivot(fr)))
    base = vs["baseline"].iloc[0] if len(vs) else None
    parts.append(f"<h2>Against {e(base or 'sdpa')} at shared shapes</h2>")
    parts.append(
        table(versus_pivot(vs)) if base else "<p>No shape ran under both sdpa (or naive) and another policy.</p>"
    )
    parts.append(f"<h2>Rows with errors ({len(errors)})</h2>{table(errors)}</body></html>")
    out.write_text("\n".join(parts))
    return out
