"""What `txlab advise` prints and writes: the ranked table (every figure labelled predicted), why each layout
that fits nothing was rejected, the `--json` object, and the winner as a config YAML that `txlab run` loads
and a one-trial sweep spec that `txlab sweep` runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from txlab.advise.search import ASSUMPTIONS, Estimate, Result, leanest, objective_key, ranked
from txlab.advise.space import Layout, raw_config
from txlab.units import GiB


@dataclass(frozen=True)
class Target:
    """What the candidates were held to and priced on."""

    hardware: str
    devices: int
    capacity_bytes: int  # the smaller of the device's memory and measure.budget_gib
    objective: str  # time | cost


def size(b: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point (GiB = 2^30 bytes)."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} bytes"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GiB:.1f}" if abs(b) >= 10 * GiB else f"{b / GiB:.3f}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[Estimate], target: Target, batch_size: int, limit: int | None = None) -> list[str]:
    """One line per estimate: layout, policy, micro-batch, predicted peak and headroom, tokens/s per device,
    MFU, $/Mtok, step time."""
    w = max([10] + [len(e.cand.scheme) for e in rows])  # selective:torchtitan
    head = (
        f"{'#':>3}  {'layout':<26} {'policy':<{w}} {'micro-batch':>11}  {'peak GiB':>8} {'headroom':>8}  "
        f"{'tok/s/dev':>9} {'MFU':>5} {'$/Mtok':>7} {'step s':>7}"
    )
    out = [head]
    for i, e in enumerate(rows[:limit] if limit else rows, 1):
        r, c = e.row, e.cand
        tps = r.get("predicted_tokens_per_s")
        peak = e.peak
        room = None if peak is None else target.capacity_bytes - peak
        mfu = r.get("predicted_mfu")
        status = "" if e.fits else f"  {r.get('status')}"
        unpriced = "  unpriced" if e.fits and r.get("predicted_step_time_s") is None else ""
        out.append(
            f"{i:>3}  {c.layout.label():<26} {c.scheme:<{w}} {f'{c.micro_batch(batch_size)} x {c.grad_accum}':>11}  "
            f"{_gib(peak):>8} {_gib(room):>8}  {_num(tps / target.devices if tps else None, ',.0f'):>9} "
            f"{_num(100 * mfu if mfu is not None else None, '.1f'):>5} "
            f"{_num(r.get('predicted_usd_per_mtok'), '.3f'):>7} {_num(r.get('predicted_step_time_s'), '.3g'):>7}"
            f"{status}{unpriced}"
        )
    return out


def layout_reasons(result: Result, capacity_bytes: int, objective: str = "time") -> list[str]:
    """Why each layout with no fitting estimate is not in the table: over the memory even at its leanest corner
    (nothing in it fits, under the search's assumptions), or cut by the bound (its fastest corner is already no
    better than the winner, so nothing in it can beat the winner; whether something in it fits was not asked)."""
    col = objective_key(objective)
    fit, _ = ranked(result, objective)
    best = fit[0].row.get(col) if fit else None
    out, cut = [], False
    for layout, cands in result.space.families.items():
        ests = result.by_layout(layout)
        if not ests or any(e.fits for e in ests):
            continue
        lean = next(leanest(cands), None)
        priced = [e for e in ests if e.row.get(col) is not None]
        if best is None or lean is None or any(e.cand == lean for e in ests) or not priced:
            out.append(f"{layout.label()}: {reason(ests, capacity_bytes)}")
            continue
        quick = min(priced, key=lambda e: e.row[col])
        unit = "$/Mtok" if objective == "cost" else "s/step"
        over = (
            f": {size(quick.peak)}, over the memory" if quick.peak is not None and quick.peak > capacity_bytes else ""
        )
        out.append(
            f"{layout.label()}: cut after {len(ests)} estimate{'s' * (len(ests) > 1)}: its fastest ({quick.cand.scheme}, "
            f"{quick.cand.grad_accum} micro-step{'s' * (quick.cand.grad_accum > 1)}{over}) is predicted at "
            f"{quick.row[col]:.3g} {unit}, no better than the winner's {best:.3g}"
        )
        cut = True
    if cut:
        out.append(
            "(cut: under the search's assumptions nothing in a layout is faster than its fastest estimate, so a "
            "layout whose fastest is no better than the winner was not searched further, nor asked what fits)"
        )
    return out


def reason(ests: list[Estimate], capacity_bytes: int) -> str:
    peaked = [e for e in ests if e.peak is not None]
    if not peaked:
        return f"estimate failed: {ests[0].row.get('error') or ests[0].row.get('status')}"
    lean = min(peaked, key=lambda e: e.peak)
    return (
        f"over by {size(lean.peak - capacity_bytes)} even at its leanest estimate "
        f"({lean.cand.scheme}, {lean.cand.grad_accum} micro-steps: predicted peak {size(lean.peak)} "
        f"of {size(capacity_bytes)})"
    )


def summary(result: Result, target: Target, batch_size: int, out_dir: Path | None, top: int = 15) -> list[str]:
    fit, rest = ranked(result, target.objective)
    space = result.space
    lines = [
        f"advise: {target.devices} x {target.hardware} ({size(target.capacity_bytes)} each), global batch "
        f"{batch_size}; ranked by predicted {'$/Mtok' if target.objective == 'cost' else 'step time'}",
        "every figure below is PREDICTED (estimated on fake tensors, priced by the time model); nothing was run",
        "",
        *table(fit, target, batch_size, top),
    ]
    if len(fit) > top:
        lines.append(f"     ... {len(fit) - top} more that fit (--json lists them all)")
    if rest:
        lines += [
            "",
            "estimated and over the memory (or failed), leanest first:",
            *table(rest, target, batch_size)[1:6],
        ]
    reasons = layout_reasons(result, target.capacity_bytes, target.objective)
    if reasons or space.rejected:
        lines += ["", "rejected layouts:"]
        lines += [f"  {r}" for r in reasons]
        lines += [f"  {label}: refused by the config: {why}" for label, why in space.rejected]
    estimated = len(result.estimates)
    present = {c.policy for cands in space.families.values() for c in cands}
    saves = sorted({c.save for cands in space.families.values() for c in cands if c.policy == "selective"})
    policies = [  # planned: single-device layouts with a budget only
        f"{p} ({' / '.join(saves)} save lists)" if p == "selective" and len(saves) > 1 else p
        for p in space.policies
        if p in present
    ]
    lines += [
        "",
        f"search: {len(space.families)} layouts, {space.size} candidates ({', '.join(policies)}; micro-steps "
        f"dividing each rank's share of the batch; reshard after forward on/off); {estimated} estimated "
        f"({result.reused} reused from the store or an earlier count), {space.size - estimated} not estimated; {result.wall_s:.0f} s",
        f"assumptions: {ASSUMPTIONS}; communication overlap as the time model prices it (docs/time_model.md)",
    ]
    moe = {e.row.get("routing") for e in fit if e.row.get("routing")}
    if moe:
        lines.append(f"mixture of experts: routing assumed {', '.join(sorted(moe))} in the estimates")
    if fit and out_dir is not None:
        lines += ["", f"winner: {fit[0].cand.label()}: {out_dir / 'winner.yaml'} (txlab run), "
                      f"{out_dir / 'winner_sweep.yaml'} (txlab sweep), plot {out_dir / 'advise.png'}"]  # fmt: skip
    return lines


def as_json(result: Result, objective: str, confirmed: dict[str, Any] | None) -> dict[str, Any]:
    fit, rest = ranked(result, objective)
    rows = [{**e.row, "candidate": e.cand.label(), "fits": e.fits} for e in fit + rest]
    return {"candidates": rows, "confirmed": confirmed}


def winner_config(result: Result, winner: Estimate) -> dict[str, Any]:
    return raw_config(result.space.base, winner.cand)


def write_winner(out_dir: Path, config: dict[str, Any], label: str) -> list[Path]:
    """winner.yaml (a trial config) and winner_sweep.yaml (a one-trial measured sweep of it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, spec_path = out_dir / "winner.yaml", out_dir / "winner_sweep.yaml"
    head = f"# txlab advise's winner: {label} (every figure it was chosen by was predicted)\n"
    cfg_path.write_text(head + yaml.safe_dump(config, sort_keys=False))
    fsdp = config.get("parallel", {}).get("fsdp", 1)
    gpu = 1 if config.get("measure", {}).get("device") == "cuda" else 0  # per rank, for a sharded trial
    spec = {"name": "advise_winner", "description": label, "base": config, "grid": {"parallel.fsdp": [fsdp]},
            "resources": {"cpu": 1, "gpu": gpu}}  # fmt: skip
    spec_path.write_text(head + yaml.safe_dump(spec, sort_keys=False))
    return [cfg_path, spec_path]


def plot_points(result: Result, objective: str) -> list[dict[str, Any]]:
    """What the plot draws (txlab.analysis.advise_plots): one point per estimate with a predicted step time."""
    fit, rest = ranked(result, objective)
    col = objective_key("time")
    return [
        {
            "label": e.cand.label(),
            "peak_bytes": e.peak,
            "step_time_s": e.row.get(col),
            "fits": e.fits,
            "winner": i == 0 and e.fits,
        }  # fmt: skip
        for i, e in enumerate(fit + rest)
        if e.peak is not None and e.row.get(col) is not None
    ]


__all__ = ["Layout", "Target", "as_json", "plot_points", "summary", "table", "winner_config", "write_winner"]
