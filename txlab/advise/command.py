"""`txlab advise CONFIG --hardware NAME --devices N [--objective time|cost] [--confirm] [--json] [--store DIR]`:
the fastest (or cheapest) feasible way to train CONFIG's model and global batch on N devices, predicted.

Order: every input is checked before anything runs or is written (exit 2, one line); the parameters are
counted and the training state's floor rules out N in arithmetic where it can (txlab.advise.prune); the search
estimates what can be the answer (txlab.advise.search) in a process pool, one progress line per estimate; no
feasible candidate is exit 2 with the least memory it would need; then the outputs are written (winner.yaml,
winner_sweep.yaml, the plot) and, with --confirm, the winner runs as a measured trial. With --store each estimate
row lands in the store as it is made (a killed or unanswered search keeps what it estimated, for the next run).
The plot is drawn by a function the caller passes in (the command line hands txlab.analysis's), so this core
package imports no plotting library.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from txlab.advise.counts import (
    COUNT_ASSUMPTION,
    FIT_ASSUMPTION,
    Choice,
    Count,
    Probe,
    choose,
    count_lines,
    no_answer,
    parse_devices,
)
from txlab.advise.prune import count_params, devices_needed, state_floor_bytes
from txlab.advise.report import Target, as_json, count, plot_points, size, summary, winner_config, write_winner
from txlab.advise.search import Estimate, InProcess, Result, ranked, search
from txlab.advise.space import build_space
from txlab.config import ConfigError, build_config, expand_dotted, read_yaml_mapping
from txlab.config.loading import parse_override, set_dotted
from txlab.hardware import ProfileError, load_profile
from txlab.units import GiB

Plot = Callable[[list[dict[str, Any]], Path, str, int], list[Path]]  # points, path, title, capacity bytes
Remote = Callable[[Path, str], dict[str, Any]]  # (winner_sweep.yaml, trial key) -> the measured row (a cluster's)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def base_config(path: str, overrides: list[str], hardware: str, kind: str) -> dict[str, Any]:
    """The user's config with --set applied and the profile set (measure.hardware, the device kind it models)."""
    raw = expand_dotted(read_yaml_mapping(path))
    for text in overrides:
        set_dotted(raw, *parse_override(text))
    workload = raw.get("workload")
    given = workload.get("kind", "train") if isinstance(workload, dict) else "train"
    if given != "train":  # before the profile's own refusal, which would name measure.hardware
        raise ConfigError(f"workload.kind: txlab advise searches training layouts, got {given!r}; allowed: train")
    set_dotted(raw, "measure.hardware", hardware)
    set_dotted(raw, "measure.device", kind)
    build_config(raw)  # bad keys and values: exit 2 here
    return raw


def check_confirm(kind: str, devices: int, hardware: str) -> None:
    """--confirm runs the winner here: the profile's device kind must be this machine's, with N devices."""
    if kind == "cpu":
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < devices:
        raise ConfigError(
            f"--confirm: runs the winner on this machine, which has {have} CUDA devices for {devices} x {hardware}; "
            "allowed: --hardware local (after txlab calibrate) or a GPU machine with the devices"
        )


def _progress(quiet: bool, t0: float, objective: str):
    def line(result: Result, est: Estimate) -> None:
        fit, _ = ranked(result, objective)
        best = fit[0] if fit else None
        what = "over budget" if est.row.get("status") == "over_budget" else est.row.get("status")
        peak = size(est.peak) if est.peak is not None else "-"
        step = est.row.get("predicted_step_time_s")
        peak += f", step {step:.2f} s" if step is not None else ""
        lead = (
            f"; best so far {best.cand.label()} ({best.row.get('predicted_step_time_s') or float('nan'):.2f} s/step)"
            if best
            else ""
        )
        _say(
            quiet,
            f"[advise] {len(result.estimates)} estimated, {len(fit)} fit, {time.monotonic() - t0:.0f} s: "
            f"{est.cand.label()}: {what}, peak {peak} (predicted){' (reused)' * est.reused}{lead}",
        )

    return line


def no_feasible(result: Result, capacity: int, devices: int, floor: int, n_needed: int) -> ConfigError:
    peaked = [e for e in result.estimates if e.peak is not None]
    if not peaked:
        errs = {e.row.get("error") for e in result.estimates}
        return ConfigError(f"no feasible candidate: no estimate succeeded ({'; '.join(sorted(map(str, errs)))[:300]})")
    lean = min(peaked, key=lambda e: e.peak)
    return ConfigError(
        f"no feasible candidate on {devices} devices of {size(capacity)}: the smallest predicted peak is "
        f"{size(lean.peak)} (over by {size(lean.peak - capacity)}), the knobs that get closest: "
        f"{lean.cand.label()}; weights, gradients and AdamW state alone take {size(floor)} a device "
        f"(at least {n_needed} devices for them); allowed: more devices, a larger device or measure.budget_gib, "
        "a shorter workload.seq_len or smaller workload.batch_size"
    )


def advise(args, plot: Plot | None = None, progress: bool | None = None, remote: Remote | None = None) -> int:
    """The command (module docstring); `progress`: the progress lines on stderr (default: not with --json);
    `remote`: --confirm runs the winner's sweep through it (a Ray cluster: txlab.sweeps.confirm) instead of here."""
    quiet = bool(args.json) if progress is None else not progress
    counts = parse_devices(args.devices)
    target = getattr(args, "target_tokens_per_s", None)
    if target is not None and not target > 0:
        raise ConfigError(f"--target-tokens-per-s: must be > 0, got {target}")
    try:
        profile = load_profile(args.hardware)
    except ProfileError as e:
        raise ConfigError(str(e).replace("measure.hardware:", "--hardware:", 1)) from None
    base = base_config(args.config, args.overrides, args.hardware, profile.kind)
    cfg = build_config(base)
    if args.objective == "cost" and cfg.measure.usd_per_device_hour is None:
        raise ConfigError(
            "--objective cost: ranks by predicted $/Mtok, which needs a price; set measure.usd_per_device_hour "
            "(e.g. --set measure.usd_per_device_hour=2.5), or use --objective time"
        )
    capacity = profile.memory_bytes
    if cfg.measure.budget_gib is not None:
        capacity = min(capacity, int(cfg.measure.budget_gib * GiB))
    if args.confirm and remote is None:  # a cluster (remote) is checked by the sweep driver's placement
        check_confirm(profile.kind, counts[0], args.hardware)
    out_dir = (
        Path(args.out) if args.out else Path("advise") / f"{Path(args.config).stem}_{args.hardware}_{args.devices}"
    )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out: {out_dir}: exists and is not a directory")
    known = _stored_estimates(args.store)
    n_params = count_params(cfg)
    t0 = time.monotonic()
    workers = max(1, int(args.workers or os.cpu_count() or 1))
    with contextlib.ExitStack() as stack:
        if workers == 1:
            pool: cf.Executor = InProcess()
        else:  # fresh workers (spawn: no forked torch or thread state), shared by every count searched
            ctx = multiprocessing.get_context("spawn")
            pool = stack.enter_context(cf.ProcessPoolExecutor(workers, mp_context=ctx))
        line = _progress(quiet, t0, args.objective)
        keep = _keeper(args.store, stack)

        def on_estimate(result: Result, est: Estimate) -> None:
            keep(est)
            line(result, est)

        probe = _prober(base, profile, capacity, n_params, known, pool, workers, args.objective, on_estimate, quiet)
        if len(counts) == 1:
            one = probe(counts[0], False)
            if one.why_not is not None:
                raise ConfigError(one.why_not)
            choice = Choice("", {counts[0]: one}, one, counts)
            if target is not None and one.tokens_per_s() < target:
                choice.chosen = None
        else:
            choice = choose(counts, probe, args.objective, target)
    if choice.chosen is None:
        raise no_answer(choice, args.objective, target, profile.name)
    chosen = choice.chosen
    assert chosen.result is not None
    result, n = chosen.result, chosen.devices
    if args.confirm and remote is None and n != counts[0]:
        check_confirm(profile.kind, n, args.hardware)
    fit, _ = ranked(result, args.objective)
    winner = fit[0]
    written = write_winner(out_dir, winner_config(result, winner), winner.cand.label())
    if plot is not None:
        title = f"{Path(args.config).stem} on {n} x {profile.name}: predicted"
        written += plot(plot_points(result, args.objective), out_dir / "advise.png", title, capacity)
    confirmed = None
    if args.confirm and remote is not None:
        _say(quiet, f"[advise] confirming {winner.cand.label()}: a measured trial on the cluster ({written[1]})")
        confirmed = remote(written[1], winner.row["trial_key"])
    elif args.confirm:
        confirmed = confirm(written[0], winner, quiet)
    if args.json:
        doc = as_json(result, args.objective, confirmed)
        if len(counts) > 1:
            doc["devices"] = counts_json(choice, args.objective)
        print(json.dumps(doc, default=str))
    else:
        if len(counts) > 1:
            print("\n".join([*count_lines(choice, args.objective), "", f"at {n} devices:"]))
        print(
            "\n".join(
                summary(result, Target(profile.name, n, capacity, args.objective), cfg.workload.batch_size, out_dir)
            )
        )
        if len(counts) > 1 and args.objective == "time":  # the cost objective searches every count: no assumption
            print(f"assumption over counts: {FIT_ASSUMPTION if target is None else COUNT_ASSUMPTION}")
        if confirmed is not None:
            print("\n".join(confirm_lines(winner, confirmed)))
    return 1 if confirmed is not None and confirmed.get("status") != "ok" else 0


def _prober(base, profile, capacity, n_params, known, pool, workers, objective, progress, quiet) -> Probe:
    """probe(n, lean): one device count's search (txlab.advise.counts.Count), ruled out in arithmetic where the
    training state alone overflows; `known` (trial key -> row) is shared by every count and grows with each."""

    def probe(n: int, lean: bool) -> Count:
        floor = state_floor_bytes(n_params, n)
        if floor > capacity:  # arithmetic: no layout of n devices holds the training state
            return Count(n, why_not=(
                f"no feasible candidate on {n} x {profile.name}: weights, gradients and AdamW state of "
                f"{count(n_params)} parameters alone need {size(floor)} a device, over by {size(floor - capacity)} "
                f"at the AdamW step for every layout; allowed: at least {devices_needed(n_params, capacity)} devices "
                f"of {size(capacity)} (--devices), or a larger device (--hardware) or measure.budget_gib"
            ), note=f"the training state alone needs {size(floor)} a device")  # fmt: skip
        try:
            space = build_space(base, n, profile.devices_per_node)
        except ConfigError as e:
            return Count(n, why_not=str(e), note="no valid layout")
        _say(quiet, f"[advise] {n} devices: {space.size} candidates in {len(space.families)} layouts "
                    f"({count(n_params)} parameters; state floor {size(floor)} a device of {size(capacity)}); "
                    + ("estimating each layout's leanest corner" if lean else "estimating"))  # fmt: skip
        result = search(space, pool, known, progress, objective=objective, lean=lean, slots=workers)
        known.update({e.row["trial_key"]: e.row for e in result.estimates if e.row.get("trial_key")})
        fit, _ = ranked(result, objective)
        if fit:
            return Count(n, result, full=not lean)
        err = no_feasible(result, capacity, n, floor, devices_needed(n_params, capacity))
        peaked = [e for e in result.estimates if e.peak is not None]
        lean_est = min(peaked, key=lambda e: e.peak) if peaked else None
        note = (
            f"smallest predicted peak {size(lean_est.peak)} ({lean_est.cand.label()})"
            if lean_est
            else "no estimate succeeded"
        )
        return Count(n, result, why_not=str(err), note=note, full=not lean)

    return probe


def counts_json(choice: Choice, objective: str) -> dict[str, Any]:
    rows = []
    for n in choice.tried:
        c = choice.counts.get(n)
        b = c.best(objective) if c is not None else None
        rows.append({
            "devices": n,
            "searched": "no" if c is None else "full" if c.full else "leanest corners" if c.result else "arithmetic",
            "fits": None if c is None else c.why_not is None,
            "why_not": None if c is None else c.why_not,
            "best": None if b is None else b.cand.label(),
            **{k: (b.row.get(k) if b is not None else None) for k in
               ("trial_key", "peak_bytes", "predicted_step_time_s", "predicted_tokens_per_s", "predicted_usd_per_mtok")},
        })  # fmt: skip
    return {
        "question": choice.question,
        "chosen": None if choice.chosen is None else choice.chosen.devices,
        "counts": rows,
    }


def _stored_estimates(uri: str | None) -> dict[str, dict[str, Any]]:
    """Estimate rows already in the store (trial key -> row): reused, not estimated again."""
    if not uri:
        return {}
    from txlab.results.store import Store

    if not Path(uri).exists():
        return {}
    rows = Store.open(uri).read().to_pylist()
    return {r["trial_key"]: r for r in rows if r.get("measured") is False and r.get("status") in ("ok", "over_budget")}


def _keeper(uri: str | None, stack: contextlib.ExitStack) -> Callable[[Estimate], None]:
    """keep(est): write a new estimate's row to the store at `uri` (sweep `advise`) at once; the store is opened,
    and its writer lock taken for the rest of the run, at the first row (no row, nothing written)."""
    held: list[Any] = []

    def keep(est: Estimate) -> None:
        if uri is None or est.reused or not est.row.get("trial_key"):
            return
        if not held:
            from txlab.results.store import Store

            held.append(stack.enter_context(Store.open(uri, create=True).writer_lock()))
        held[0].write_row({**est.row, "sweep": "advise"})

    return keep


def confirm(winner_yaml: Path, winner: Estimate, quiet: bool) -> dict[str, Any]:
    """The winner as a measured trial on this machine (its row)."""
    from txlab.config import load_config
    from txlab.trial import run_trial

    _say(quiet, f"[advise] confirming {winner.cand.label()}: a measured trial on this machine")
    return run_trial(load_config(winner_yaml), progress=not quiet)


def confirm_lines(winner: Estimate, row: dict[str, Any]) -> list[str]:
    p, m = winner.row, row
    lines = ["", f"confirmed (measured trial {m.get('trial_key')}, status {m.get('status')}):"]
    if m.get("peak_bytes") is not None:
        lines.append(f"  peak      measured {m['peak_bytes'] / GiB:.3f} GiB, predicted {p['peak_bytes'] / GiB:.3f} GiB")
    if m.get("step_time_s") is not None and p.get("predicted_step_time_s"):
        ratio = m["step_time_s"] / p["predicted_step_time_s"]
        lines.append(
            f"  step time measured {m['step_time_s']:.3f} s, predicted {p['predicted_step_time_s']:.3f} s "
            f"(measured / predicted {ratio:.2f}; load average {os.getloadavg()[0]:.1f} after the run: other work on "
            f"the machine stretches the measured time)"
        )
    if m.get("error"):
        lines.append(f"  error     {m['error']}")
    return lines
