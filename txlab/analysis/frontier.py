"""Feasibility frontiers and the comparison against the fused-attention baseline, as tables.

Feasible (docs/design.md, "Result row"): `status == "ok"` and `peak_bytes <= budget_gib * 2**30`. Everything else is not:
`oom`, `over_budget`, `error`, and an ok trial whose peak is over the budget asked.

The frontier of one experiment (a `group`, see `analysis.data`) at one budget is the longest sequence
length with a feasible row, over all chunk settings tried at that length. Each experiment gets a
`measured` frontier from its measured rows and, when it has estimated rows (`measured == false`), an
`estimated` frontier from measured and estimated rows together (estimates extend a measurement to
lengths too costly to run; `point_estimated` says whether the frontier point itself is an estimate).
Error rows are not evidence either way: they
are left out of "lengths tried" and listed by the report instead.

Inference rows (`workload.kind` prefill / decode) are experiments of their own (the kind is part of
the group); for decode the frontier is the longest prompt (`seq_len`) that still fits with its
`decode_tokens` generated: the longest context that fits the budget. Their baseline is the baseline
policy with `policy.kv: cache`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from txlab.analysis.data import (
    BASELINES,
    KV,
    POLICY,
    Source,
    budgets_of,
    is_inference,
    parse_label,
    policy_order,
    prepare,
    setting_keys,
)
from txlab.results.columns import GiB

FRONTIER_COLUMNS = [
    "setting",
    "policy",
    "depth",
    "budget_gib",
    "basis",
    "longest_feasible_seq_len",
    "label",
    "point_estimated",
    "fits_at_longest_tried",
    "shortest_tried",
    "longest_tried",
    "n_trials",
    "peak_gib_at_frontier",
    "predicted_step_time_s_at_frontier",  # the time model's step time of the frontier's trial (null: no profile)
    "q_chunk",
    "k_chunk",
    "device",
]


def frontier_label(longest, shortest_tried, longest_tried) -> str:
    """'2048'; '32768+' when the longest length tried still fits; 'infeasible at 256' (never 0)."""
    if pd.isna(shortest_tried):
        return "no valid trials"
    if pd.isna(longest):
        return f"infeasible at {int(shortest_tried)}"
    return f"{int(longest)}+" if longest == longest_tried else str(int(longest))


def feasible_mask(df: pd.DataFrame, budget_gib: float) -> pd.Series:
    peak = pd.to_numeric(df["peak_bytes"], errors="coerce")
    return (df["status"] == "ok") & peak.notna() & (peak <= budget_gib * GiB)


def frontier(source: Source, budgets: Iterable[float] | None = None) -> pd.DataFrame:
    """One row per (group, basis, budget): the longest feasible seq_len and how it was reached.

    `budgets` in GiB; default: the budgets in the store (else device capacities, see `budgets_of`).
    Columns: FRONTIER_COLUMNS plus each varying setting key (e.g. `model.size`) so the CSV is
    self-describing. `longest_feasible_seq_len` is null (never 0) when even the shortest length fails.
    """
    df = prepare(source)
    budgets, _ = budgets_of(df, budgets) if not df.empty else ([], "none")
    skeys = setting_keys(df) if not df.empty else []
    out_cols = FRONTIER_COLUMNS + skeys
    valid = df[df["status"] != "error"]
    if valid.empty or not budgets:
        return pd.DataFrame(columns=out_cols)
    rows = []
    for _, grp in valid.groupby("group", sort=False):
        bases = []
        if (grp["basis"] == "measured").any():
            bases.append(("measured", grp[grp["basis"] == "measured"]))
        if (grp["basis"] == "estimated").any():
            bases.append(("estimated", grp))  # estimates extend what was measured
        for basis, g in bases:
            rows += _frontier_rows(g, basis, budgets, skeys)
    out = pd.DataFrame(rows, columns=out_cols)
    for c in ("depth", "longest_feasible_seq_len", "shortest_tried", "longest_tried", "q_chunk", "k_chunk"):
        out[c] = pd.to_numeric(out[c]).astype("Int64")
    order = {p: i for i, p in enumerate(policy_order(out["policy"]))}
    out = out.sort_values(
        ["setting", "budget_gib", "depth", "policy", "basis"],
        key=lambda s: s.map(order) if s.name == "policy" else s,
    )
    return out.reset_index(drop=True)


def _frontier_rows(g: pd.DataFrame, basis: str, budgets: list[float], skeys: list[str]) -> list[dict]:
    first = g.iloc[0]
    rows = []
    for b in budgets:
        fe = g[feasible_mask(g, b)]
        longest = fe["seq_len"].max() if len(fe) else pd.NA
        best = None
        if len(fe):
            at = fe[fe["seq_len"] == longest]
            at = at[at["basis"] == "measured"] if (at["basis"] == "measured").any() else at
            best = at.loc[pd.to_numeric(at["peak_bytes"]).idxmin()]
        chunked = best is not None and best["policy.attention"] == "chunked"
        rows.append(
            {
                "setting": first["setting"],
                "policy": first["policy"],
                "depth": first["depth"],
                "budget_gib": b,
                "basis": basis,
                "longest_feasible_seq_len": longest,
                "label": frontier_label(longest, g["seq_len"].min(), g["seq_len"].max()),
                "point_estimated": best is not None and best["basis"] == "estimated",
                "fits_at_longest_tried": bool(len(fe)) and longest == g["seq_len"].max(),
                "shortest_tried": g["seq_len"].min(),
                "longest_tried": g["seq_len"].max(),
                "n_trials": len(g),
                "peak_gib_at_frontier": float(best["peak_bytes"]) / GiB if best is not None else np.nan,
                "predicted_step_time_s_at_frontier": _float(best["predicted_step_time_s"])
                if best is not None
                else np.nan,
                "q_chunk": best["policy.q_chunk"] if chunked else pd.NA,
                "k_chunk": best["policy.k_chunk"] if chunked else pd.NA,
                "device": first["device"],
                **{k: first[k] for k in skeys},
            }
        )
    return rows


def _float(v) -> float:
    return float(v) if pd.notna(v) else np.nan


def baseline_name(df: pd.DataFrame) -> str | None:
    """The policy overheads are measured against: sdpa if the store has it, else naive, else none."""
    names = set(df[POLICY].dropna())
    return next((b for b in BASELINES if b in names), None)


def is_baseline(df: pd.DataFrame, base: str | None) -> pd.Series:
    """Rows of the baseline policy: its preset name, and on prefill/decode rows the full KV cache."""
    return (df[POLICY] == base) & (~is_inference(df) | (df[KV] == "cache"))


def best_ok(df: pd.DataFrame) -> pd.DataFrame:
    """Measured ok rows, one per (group, seq_len): the lowest peak when several chunk settings ran; of equal
    peaks (one experiment run under two budgets) the fastest, whatever order the store lists them in."""
    ok = df[(df["status"] == "ok") & (df["basis"] == "measured") & df["peak_bytes"].notna()].copy()
    if ok.empty:
        return ok
    ok["_peak"], ok["_time"] = pd.to_numeric(ok["peak_bytes"]), pd.to_numeric(ok["step_time_s"])
    ok = ok.sort_values(["_peak", "_time"], kind="stable").drop_duplicates(["group", "seq_len"])
    return ok.sort_index().drop(columns=["_peak", "_time"])


def versus_baseline(source: Source) -> pd.DataFrame:
    """Memory saving and time overhead of each policy against the baseline at every shared shape.

    A shared shape: same experiment except the policy (`shape`), same seq_len, both measured and ok.
    memory_saving = 1 - peak / baseline peak; time_overhead = step time / baseline step time.
    For chunked policies the chunk setting with the lowest peak represents the policy.
    """
    df = prepare(source)
    cols = [
        "setting",
        "depth",
        "seq_len",
        "policy",
        "baseline",
        "peak_gib",
        "baseline_peak_gib",
        "memory_saving",
        "step_time_s",
        "baseline_step_time_s",
        "time_overhead",
        "q_chunk",
        "k_chunk",
    ]
    base = baseline_name(df) if not df.empty else None
    if base is None:
        return pd.DataFrame(columns=cols)
    ok = best_ok(df)
    if ok.empty:
        return pd.DataFrame(columns=cols)
    base_rows = is_baseline(ok, base)
    b = ok[base_rows][["shape", "seq_len", "peak_gib", "step_time_s", "policy"]]
    # several baseline rows per shape (e.g. a grid over chunk sizes that sdpa ignores): the lowest peak
    b = b.sort_values("peak_gib").drop_duplicates(["shape", "seq_len"])
    b = b.rename(columns={"peak_gib": "baseline_peak_gib", "step_time_s": "baseline_step_time_s", "policy": "baseline"})
    m = ok[~base_rows].merge(b, on=["shape", "seq_len"], how="inner")
    if m.empty:
        return pd.DataFrame(columns=cols)
    m["memory_saving"] = 1 - m["peak_gib"] / m["baseline_peak_gib"]
    m["time_overhead"] = pd.to_numeric(m["step_time_s"]) / pd.to_numeric(m["baseline_step_time_s"])
    chunked = m["policy.attention"] == "chunked"
    m["q_chunk"] = pd.to_numeric(m["policy.q_chunk"].where(chunked)).astype("Int64")
    m["k_chunk"] = pd.to_numeric(m["policy.k_chunk"].where(chunked)).astype("Int64")
    order = {p: i for i, p in enumerate(policy_order(m["policy"]))}
    m = m.sort_values(
        ["setting", "depth", "seq_len", "policy"], key=lambda s: s.map(order) if s.name == "policy" else s
    )
    return m[cols].reset_index(drop=True)


# --- Markdown ------------------------------------------------------------------------------------


def md_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    if df.empty:
        return "_(none)_\n"
    cells = [[str(c) for c in df.columns]] + [
        ["" if pd.isna(v) else str(v) for v in r] for r in df.itertuples(index=False)
    ]
    cells = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in cells]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join(" --- " for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines) + "\n"


def frontier_pivot(fr: pd.DataFrame) -> pd.DataFrame:
    """(setting, policy, depth) x budget -> label; an estimated frontier follows as 'est. N'."""
    if fr.empty:
        return pd.DataFrame()
    f = fr.copy()
    # an estimated frontier is news only where it differs from the measured one
    key = ["setting", "policy", "depth", "budget_gib"]
    measured = f[f["basis"] == "measured"].set_index(key)["label"]
    same = f.set_index(key).index.map(lambda k: measured.get(k)).to_numpy() == f["label"].to_numpy()
    f = f[(f["basis"] == "measured") | ~same]
    f["cell"] = np.where(f["basis"] == "estimated", "est. " + f["label"], f["label"])
    f["budget"] = f["budget_gib"].map(lambda b: f"{b:g} GiB")
    piv = f.pivot_table(
        index=["setting", "policy", "depth"],
        columns="budget",
        values="cell",
        aggfunc=lambda s: " / ".join(sorted(s, key=lambda x: x.startswith("est."))),
        sort=False,
    )
    piv = piv[sorted(piv.columns, key=lambda c: float(c.split()[0]))]
    piv = piv.reset_index()
    if (piv["setting"] == "").all():
        piv = piv.drop(columns="setting")
    piv.columns.name = None
    return piv


def versus_pivot(vs: pd.DataFrame) -> pd.DataFrame:
    if vs.empty:
        return pd.DataFrame()
    v = vs.copy()
    v["cell"] = [
        f"{s:+.0%} mem, x{t:.2f} time" if pd.notna(t) else f"{s:+.0%} mem"
        for s, t in zip(-v["memory_saving"], v["time_overhead"])
    ]
    piv = v.pivot_table(
        index=["setting", "depth", "seq_len"], columns="policy", values="cell", aggfunc="first", sort=False
    )
    piv = piv[policy_order(piv.columns)].reset_index()
    if (piv["setting"] == "").all():
        piv = piv.drop(columns="setting")
    piv.columns.name = None
    return piv


def frontier_markdown(fr: pd.DataFrame, vs: pd.DataFrame, budget_source: str = "") -> str:
    parts = [
        "## Feasibility frontier: longest feasible sequence length (tokens)\n",
        "Decode rows: the longest prompt that fits with its generated tokens. "
        "Feasible: status ok and peak memory <= budget (GiB = 2^30 bytes). `N+`: the longest length tried "
        "still fits, so the limit lies beyond it. `infeasible at N`: even the shortest length tried does not "
        "fit. `est.`: from estimated rows (measured = false)."
        + (f" Budgets from: {budget_source}." if budget_source else "")
        + "\n",
        md_table(frontier_pivot(fr)),
    ]
    base = ", ".join(dict.fromkeys(vs["baseline"])) if len(vs) else None
    parts.append(f"\n## Against {base or 'the baseline'} at shared shapes\n")
    if base:
        parts.append(
            f"Peak memory change and step-time ratio of each policy against `{base}` at the same shape "
            "(both measured, both ok). `-60% mem, x1.30 time`: 60% less memory, 30% slower.\n"
        )
    else:
        parts.append(
            "No shape was measured (status ok) both under sdpa (or naive) and under another policy, so there is "
            "nothing to compare. Estimated rows take no part: they have no step times.\n"
        )
    parts.append(md_table(versus_pivot(vs)))
    return "\n".join(parts)


# --- the answer, per budget (the report opens with it) ---------------------------------------------


def settings_share_depths(fr: pd.DataFrame) -> bool:
    """True when every setting was run at every depth (a setting x depth grid); False when settings come
    with depths of their own (gpt2 sizes), so a depth column would be empty for all but one of them."""
    pairs = {(s, d) for s, d in zip(fr["setting"], fr["depth"]) if pd.notna(d)}
    return len(pairs) == fr["setting"].nunique() * fr["depth"].dropna().nunique()


def is_baseline_label(label: str, base: str | None) -> bool:
    """`sdpa`, or `sdpa (kv=cache)` on prefill/decode rows: the label of the baseline policy."""
    name, keys = parse_label(label)
    return base is not None and name == base and keys in ({}, {"kv": "cache"})


def _cell(m, e, all_estimated: bool) -> str:
    if m is None:
        return ("" if all_estimated else "est. ") + e["label"]
    return m["label"] + (f" / est. {e['label']}" if e is not None and e["label"] != m["label"] else "")


def _gain(rows: dict, base: str | None, all_estimated: bool = False) -> str:
    """The best policy's frontier over the baseline's, e.g. 'x8 recompute', '≥ x16 recompute' when the
    best fits the longest length tried (its limit lies beyond); '(est.)' when estimated rows take part."""
    if not rows:
        return ""
    est = any(r["basis"] == "estimated" for r in rows.values()) and not all_estimated
    return _gain_text(rows, base) + (" (est.)" if est else "")


def _gain_text(rows: dict, base: str | None) -> str:
    value = {
        p: (float(r["longest_feasible_seq_len"]) if pd.notna(r["longest_feasible_seq_len"]) else 0.0)
        for p, r in rows.items()
    }
    order = policy_order(rows)
    best = max(order, key=lambda p: value[p])  # ties: the first in policy order
    ref = next((p for p in order if is_baseline_label(p, base)), None)
    if ref is None:
        return f"no {base} row" if base else ""
    if value[best] == 0:
        return "none fits"
    if value[ref] == 0:
        return f"{best} fits {int(value[best])}, {ref} none"
    if rows[ref]["fits_at_longest_tried"]:
        return f"x1 ({ref} fits every length tried)"
    tied = [p for p in order if value[p] == value[best] and p != ref]
    if value[best] == value[ref]:
        beyond = [p for p in tied if rows[p]["fits_at_longest_tried"]]  # may go further than the baseline
        return f"≥ x1 {', '.join(beyond)}" if beyond else f"x1 ({ref} is as good as any)"
    ratio = value[best] / value[ref]
    return f"{'≥ ' if rows[best]['fits_at_longest_tried'] else ''}x{ratio:g} {', '.join(tied)}"


def _answer_rows(f: pd.DataFrame, cols: list[str], base: str | None, all_estimated: bool, setting: str) -> list:
    meas = {(r["policy"], r["column"]): r for _, r in f[f["basis"] == "measured"].iterrows()}
    est = {(r["policy"], r["column"]): r for _, r in f[f["basis"] == "estimated"].iterrows()}
    rows, best = [], {c: {} for c in cols}
    for p in policy_order(f["policy"]):
        rec = {"setting": setting, "policy": p}
        for c in cols:
            m, e = meas.get((p, c)), est.get((p, c))
            rec[c] = "" if m is None and e is None else _cell(m, e, all_estimated)
            if m is not None or e is not None:  # estimates extend what was measured: the fuller answer
                best[c][p] = e if e is not None else m
        rows.append(rec)
    if base is not None:
        gains = {c: _gain(best[c], base, all_estimated) for c in cols}
        rows.append({"setting": setting, "policy": f"best vs {base}", **gains})
    return rows


def frontier_tables(fr: pd.DataFrame, base: str | None) -> dict[float, pd.DataFrame]:
    """Per budget: longest feasible sequence per policy (rows) and depth (columns; 'SETTING, N layers' when
    settings come with depths of their own), then per setting a row 'best vs BASE': the factor the best
    policy gains over the baseline (`baseline_name`). A cell is the measured frontier label; 'est. N' from
    estimated rows only (no prefix when every cell is an estimate); 'M / est. N' where the estimate differs."""
    if fr.empty:
        return {}
    all_estimated = bool((fr["basis"] == "estimated").all())
    shared = settings_share_depths(fr)
    f = fr[fr["depth"].notna()]
    f = f.assign(
        column=[
            f"{int(d)} layers" if shared or not s else f"{s}, {int(d)} layers" for s, d in zip(f["setting"], f["depth"])
        ]
    )
    out = {}
    for b, fb in f.groupby("budget_gib", sort=True):
        order = fb.sort_values(["depth", "setting"])["column"]
        cols = list(dict.fromkeys(order))
        groups = fb.groupby("setting", sort=True) if shared else [("", fb)]
        records = [r for setting, g in groups for r in _answer_rows(g, cols, base, all_estimated, setting)]
        t = pd.DataFrame(records, columns=["setting", "policy", *cols])
        out[float(b)] = t.drop(columns="setting") if (t["setting"] == "").all() else t
    return out


# --- sharded trials: the fewest devices that fit ----------------------------------------------------

FSDP, BATCH = "parallel.fsdp", "workload.batch_size"
FEWEST_COLUMNS = ["model", "policy", "seq_len", "rank_batch", "budget_gib", "fewest_ranks", "label", "basis",
                  "ranks_tried", "peak_gib_at_fewest"]  # fmt: skip


def _model_label(df: pd.DataFrame) -> pd.Series:
    """What a device count answers for: the model size and depth, and whatever else varies, without the
    shard degree and the global batch (which grows with it)."""
    label = df["model.size"].astype(str) + ", " + df["depth"].astype(str) + " layers"
    for k in setting_keys(df):
        if k not in (FSDP, BATCH, "model.size"):
            label = label + f", {k.split('.')[-1]}=" + df[k].astype(str)
    return label


def fewest_devices(source: Source, budgets: Iterable[float] | None = None) -> pd.DataFrame:
    """Per (model, policy, seq_len, sequences per rank) and per-device budget: the fewest `parallel.fsdp`
    ranks whose per-rank peak fits (`label` '> N' when none of the degrees tried fits, N the most tried).
    Only rows of stores that vary the shard degree; estimates count (basis says which)."""
    df = prepare(source)
    if df.empty or FSDP not in df or pd.to_numeric(df[FSDP], errors="coerce").fillna(1).max() <= 1:
        return pd.DataFrame(columns=FEWEST_COLUMNS)
    budgets, _ = budgets_of(df, budgets)
    valid = df[df["status"] != "error"].copy()
    valid["ranks"] = pd.to_numeric(valid[FSDP], errors="coerce").fillna(1).astype(int)
    valid["rank_batch"] = pd.to_numeric(valid[BATCH]).astype(int) // valid["ranks"]
    valid["model"] = _model_label(valid)
    rows = []
    for (model, policy, seq, rb), g in valid.groupby(["model", "policy", "seq_len", "rank_batch"], sort=False):
        for b in budgets:
            fits = g[feasible_mask(g, b)]
            best = fits.loc[fits["ranks"].idxmin()] if len(fits) else None
            rows.append({
                "model": model, "policy": policy, "seq_len": int(seq), "rank_batch": int(rb), "budget_gib": b,
                "fewest_ranks": None if best is None else int(best["ranks"]),
                "label": f"> {g['ranks'].max()}" if best is None else str(int(best["ranks"])),
                "basis": (best if best is not None else g.iloc[0])["basis"],
                "ranks_tried": ",".join(str(r) for r in sorted(g["ranks"].unique())),
                "peak_gib_at_fewest": None if best is None else float(best["peak_gib"]),
            })  # fmt: skip
    out = pd.DataFrame(rows, columns=FEWEST_COLUMNS)
    out["fewest_ranks"] = pd.to_numeric(out["fewest_ranks"]).astype("Int64")
    return out.sort_values(["budget_gib", "model", "policy", "seq_len"]).reset_index(drop=True)


def fewest_devices_markdown(fd: pd.DataFrame) -> str:
    """One table per budget and sequences per rank: models x policies by sequence length."""
    if fd.empty:
        return ""
    out = ["## Fewest devices that fit (parallel.fsdp ranks, per-device budget)", ""]
    for (b, rb), f in fd.groupby(["budget_gib", "rank_batch"], sort=True):
        pivot = f.pivot_table(index=["model", "policy"], columns="seq_len", values="label", aggfunc="first")
        pivot.columns = [f"{int(c)} tokens" for c in pivot.columns]
        est = " (estimates)" if (f["basis"] == "estimated").all() else ""
        out += [f"### {b:g} GiB per device, {rb} sequence(s) per rank{est}", "", md_table(pivot.reset_index()), ""]
    return "\n".join(out)
