"""Loading a store into one frame, and the labels every plot and table shares.

A store (docs/design.md, "Store") is one row per trial with dotted config columns. Analysis needs three things on top:

- **Grouping** (`GROUP_KEYS`): two rows describe the same experiment at different lengths when they agree
  on every config column except `workload.seq_len`, the chunk sizes (`policy.q_chunk`, `policy.k_chunk`,
  `policy.loss_chunk`: a frontier takes the best feasible chunk setting), the budget the trial ran under
  (`measure.budget_gib`: feasibility is judged against each budget asked), and measurement-only knobs
  (`measure.device`, `workload.steps`, `workload.warmup_steps`, `seed`); the device a trial actually ran
  on (`device`) joins the key instead. Presets clamp chunk sizes to short sequences, which is one more
  reason they cannot be part of the key.
- **Labels**: `policy` is `policy.name`, plus any other policy key that varies within one preset name
  (e.g. `custom (remat=every)`), plus the KV policy on prefill/decode rows (`sdpa (kv=recompute)`); `setting` names whatever else varies between groups (model size, batch,
  dtype, workload kind, device ...), empty when one setting covers the whole store. Plots facet by
  `setting` (rows) and depth (columns).
- **Basis**: `measured` (from a run) or `estimated` (`measured == false`); kept apart everywhere.

Only `txlab.results.store` and `txlab.results.columns` are imported from txlab (docs/design.md, "Layers and dependency direction").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from txlab.results.columns import GiB, column_names, config_columns
from txlab.results.store import StoreError, read_store

POLICY, DEPTH, SIZE, SEQ, KIND = "policy.name", "model.n_layers", "model.size", "workload.seq_len", "workload.kind"
BUDGET = "measure.budget_gib"
KV = "policy.kv"
INFERENCE_KINDS = ("prefill", "decode")  # rows whose policy label names the KV policy (policy.kv)
CHUNK_KEYS = ("policy.q_chunk", "policy.k_chunk", "policy.loss_chunk")
# Config columns that do not define the experiment a length belongs to (see module docstring).
NOT_GROUPING = {SEQ, *CHUNK_KEYS, BUDGET, "measure.device", "workload.steps", "workload.warmup_steps", "seed"}
# Presets in a fixed order so colours and rows match across plots.
POLICY_ORDER = ("naive", "sdpa", "checkpoint", "selective", "recompute", "planned", "custom")
# Policies a recompute overhead is measured against, first present wins.
BASELINES = ("sdpa", "naive")
COMPONENTS = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "kv_cache_bytes", "other_bytes")
OPTIONAL_COMPONENTS = ("kv_cache_bytes",)  # only inference rows have it; plots leave it out when no row does

Source = str | Path | pd.DataFrame


class AnalysisError(StoreError):
    """Bad input to analysis (an empty store, no usable rows): a txlab ConfigError, so the CLI exits 2."""


def group_keys() -> list[str]:
    """Columns that identify an experiment up to its sequence length (and chunk sizes, budget)."""
    return [c for c in config_columns() if c not in NOT_GROUPING] + ["device"]


def load(source: Source) -> pd.DataFrame:
    """A store path (or URI) or a DataFrame -> a frame with every schema column present."""
    if isinstance(source, pd.DataFrame):
        df = source.copy()
    else:
        df = read_store(str(source))
    missing = [c for c in column_names() if c not in df.columns]
    if missing:
        df = pd.concat(
            [df, pd.DataFrame({c: pd.Series([pd.NA] * len(df), index=df.index, dtype=object) for c in missing})], axis=1
        )
    return df.reset_index(drop=True)


def require_rows(df: pd.DataFrame, where: str = "store") -> None:
    if df.empty:
        raise AnalysisError(
            f"{where}: the store has no rows yet; run a sweep into it first (txlab sweep SPEC --store DIR)"
        )


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _nunique(s: pd.Series) -> int:
    return s.astype(object).where(s.notna(), "<null>").nunique()


def _varies_within(df: pd.DataFrame, by: str, col: str) -> bool:
    keyed = df[[by, col]].astype(object).where(df[[by, col]].notna(), "<null>")
    return bool((keyed.groupby(by)[col].nunique() > 1).any())


def setting_keys(df: pd.DataFrame) -> list[str]:
    """Non-policy grouping columns that vary in `df` (besides depth), minus those implied by model size."""
    keys = [k for k in group_keys() if not k.startswith("policy.") and k != DEPTH and _nunique(df[k]) > 1]
    if SIZE in keys:  # d_model, n_heads ... follow the size preset: naming the size is enough
        keys = [k for k in keys if k == SIZE or not k.startswith("model.") or _varies_within(df, SIZE, k)]
    return keys


def policy_keys(df: pd.DataFrame) -> list[str]:
    """Policy columns (besides the name, chunk sizes and the KV policy) that vary within one preset name.
    The KV policy is always named on prefill/decode rows and never on training rows (see `prepare`)."""
    return [
        k for k in group_keys() if k.startswith("policy.") and k not in (POLICY, KV) and _varies_within(df, POLICY, k)
    ]


def is_inference(df: pd.DataFrame) -> pd.Series:
    return df[KIND].isin(INFERENCE_KINDS)


def prepare(source: Source) -> pd.DataFrame:
    """`load`, then add the shared derived columns:

    policy, setting, depth, seq_len (ints), basis (measured|estimated), peak_gib, group (experiment id
    up to length), shape (group minus the policy keys: what a baseline comparison matches on).
    """
    df = load(source)
    if df.empty:
        for c in ("policy", "setting", "basis", "group", "shape"):
            df[c] = pd.Series(dtype=object)
        for c in ("depth", "seq_len"):
            df[c] = pd.Series(dtype="Int64")
        df["peak_gib"] = pd.Series(dtype=float)
        return df
    pkeys, skeys = policy_keys(df), setting_keys(df)

    def policy_label(r) -> str:
        extra = ", ".join(
            ([f"kv={_fmt(r[KV])}"] if r[KIND] in INFERENCE_KINDS else []) + [f"{short(k)}={_fmt(r[k])}" for k in pkeys]
        )
        return f"{r[POLICY]} ({extra})" if extra else str(r[POLICY])

    def setting_label(r) -> str:
        return ", ".join(_fmt(r[k]) if k == SIZE else f"{short(k)}={_fmt(r[k])}" for k in skeys)

    df["policy"] = df.apply(policy_label, axis=1).astype(object)
    df["setting"] = df.apply(setting_label, axis=1).astype(object) if skeys else ""
    df["depth"] = pd.to_numeric(df[DEPTH]).astype("Int64")
    df["seq_len"] = pd.to_numeric(df[SEQ]).astype("Int64")
    measured = df["measured"].astype(object).where(df["measured"].notna(), True).astype(bool)
    df["basis"] = np.where(measured, "measured", "estimated")
    df["peak_gib"] = pd.to_numeric(df["peak_bytes"], errors="coerce").astype(float) / GiB
    gk = group_keys()
    keyed = df[gk].astype(object).where(df[gk].notna(), "<null>").astype(str)
    df["group"] = keyed.agg("|".join, axis=1)
    df["shape"] = keyed[[k for k in gk if not k.startswith("policy.")]].agg("|".join, axis=1)
    return df


def parse_label(label: str) -> tuple[str, dict[str, str]]:
    """'sdpa (kv=cache, remat=every)' -> ('sdpa', {'kv': 'cache', 'remat': 'every'}) (see `prepare`)."""
    name, sep, rest = str(label).partition(" (")
    if not sep or not rest.endswith(")"):
        return str(label), {}
    keys = {}
    for part in rest[:-1].split(", "):
        k, _, v = part.partition("=")
        keys[k] = v
    return name, keys


def policy_order(labels: Iterable[str]) -> list[str]:
    """Preset order first (naive, sdpa, checkpoint ...), then variants alphabetically."""
    labels = sorted(set(labels))
    rank = {name: i for i, name in enumerate(POLICY_ORDER)}
    return sorted(labels, key=lambda s: (rank.get(s.split(" ")[0], len(rank)), s))


def budgets_of(df: pd.DataFrame, asked: Iterable[float] | None = None) -> tuple[list[float], str]:
    """Budgets to judge feasibility against, and where they came from.

    Asked budgets win; else the distinct `measure.budget_gib` values in the store; else each device's
    capacity (so a store without budgets still gets a frontier: "fits on this device"); else none.
    """
    if asked:
        return sorted({float(b) for b in asked}), "asked"
    stored = pd.to_numeric(df[BUDGET], errors="coerce").dropna().unique()
    if len(stored):
        return sorted(float(b) for b in stored), "store"
    cap = pd.to_numeric(df["device_capacity_bytes"], errors="coerce").dropna().unique()
    if len(cap):
        return sorted({round(float(c) / GiB, 2) for c in cap}), "device capacity"
    return [], "none"


def fmt_len(t) -> str:
    """Sequence length for tick labels: 512, 1k, 32k (k = 1024)."""
    t = int(t)
    return f"{t // 1024}k" if t >= 8192 and t % 1024 == 0 else str(t)


def fmt_gib(v: float) -> str:
    """Memory for tick labels and annotations: GiB above 1 GiB, MiB below, KiB below that."""
    if v >= 1:
        return f"{v:.3g} GiB"
    if v * 1024 >= 1:
        return f"{v * 1024:.3g} MiB"
    return f"{v * 1024 * 1024:.3g} KiB"
