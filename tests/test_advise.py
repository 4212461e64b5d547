"""txlab advise: the search space, the arithmetic floor, the staircase search against a brute force, the command's
outputs (table, --json, winner.yaml that txlab run and txlab sweep load, the plot, --store reuse) and --confirm on
this CPU. Bad input lives in tests/test_bad_input.py's corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from txlab.advise.prune import STATE_BYTES_PER_PARAM, count_params, state_floor_bytes
from txlab.advise.report import layout_reasons
from txlab.advise.search import InProcess, ranked, search
from txlab.advise.space import CHAIN, Candidate, Layout, build_space, layouts, raw_config, recomputes_no_more
from txlab.cli import main
from txlab.config import build_config, load_config
from txlab.results.store import Store
from txlab.units import GiB

TINY = {
    "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 4},
    "workload": {"seq_len": 64, "batch_size": 8, "steps": 2, "warmup_steps": 1},
    "measure": {"hardware": "h100-sxm", "device": "cuda"},
}


def test_layouts_cover_every_product_and_tp_stays_in_a_node():
    got = layouts(16, per_node=4, moe_experts=None)
    assert all(lo.fsdp * lo.cp * lo.tp == 16 and lo.tp <= 4 for lo in got)
    assert {(lo.fsdp, lo.tp) for lo in got if lo.cp == 1} == {(16, 1), (8, 2), (4, 4)}
    assert len(got) == len(set(got))
    assert {(lo.fsdp, lo.tp, lo.cp) for lo in layouts(1, 8, None)} == {(1, 1, 1)}


def test_space_rejects_with_the_configs_reason_and_splits_each_ranks_share():
    space = build_space(TINY, devices=8, per_node=8)
    rejected = dict(space.rejected)
    assert "tp 8" in rejected and "parallel.tp: 8 must divide" in rejected["tp 8"]  # 4 heads
    fam = space.families[Layout(fsdp=4, tp=2)]  # 8 sequences over 4 data-parallel ranks: 2 each
    assert {c.grad_accum for c in fam} == {1, 2} and {c.layout.reshard for c in fam} == {True, False}
    assert {c.policy for c in fam} == set(CHAIN)  # planned: refused by the config for fsdp > 1
    for c in fam:
        cfg = space.config(c)
        assert (cfg.parallel.fsdp, cfg.parallel.tp, cfg.workload.grad_accum) == (4, 2, c.grad_accum)
        assert c.micro_batch(8) * c.grad_accum * cfg.parallel.fsdp == cfg.workload.batch_size


def test_the_state_floor_is_exact_arithmetic_below_every_estimate():
    from txlab.trial import estimate_trial

    cfg = build_config({**TINY, "measure": {"device": "cpu"}, "parallel": {"fsdp": 4}})  # no allocator rounding
    row = estimate_trial(cfg)
    n = count_params(cfg)
    assert n == row["n_params"]
    floor = state_floor_bytes(n, 4)
    assert floor == -(-STATE_BYTES_PER_PARAM * n // 4)
    # the estimate's own weights and AdamW state at the peak are 12 of those 16 bytes (every dim divides by 4: no
    # padding; the gradients are live at the AdamW step, not necessarily at the peak), plus AdamW's step
    # counters: one 4-byte scalar per parameter tensor (28 here)
    assert row["params_bytes"] + row["optimizer_bytes"] - 12 / 16 * floor == 4 * 28
    assert floor <= row["peak_bytes"]


def _synthetic(raw):
    """A memory and time model monotone as the search assumes, with layouts that trade one for the other."""
    cfg = build_config(raw)
    p, w = cfg.parallel, cfg.workload
    # (memory saved, time spent) by recomputation: selective's other save lists between selective and checkpoint,
    # not comparable with each other (matmuls-only the leaner, torchtitan's the faster)
    mem, spent = {"sdpa": (0, 0), "selective": (1, 1), "checkpoint": (3, 3), "recompute": (3.2, 3.2)}.get(
        cfg.policy.name, (0, 0)
    )
    if cfg.policy.name == "selective" and cfg.policy.selective_save != "txlab":
        mem, spent = {"matmuls": (2.6, 2.2), "torchtitan": (2.2, 1.4)}[cfg.policy.selective_save]
    micro = w.batch_size // p.fsdp // w.grad_accum
    peak = int(
        1000 + micro * (400 - 90 * mem) * (3 if p.tp == 1 else 1.2) + (300 if not p.reshard_after_forward else 0)
    )
    step = (
        10.0
        * (1 + 0.15 * spent)
        * (1 + 0.05 * w.grad_accum)
        * (1.0 if p.tp == 1 else 1.3)
        * (0.9 if not p.reshard_after_forward else 1.0)
    )
    cap = 2600
    status = "ok" if peak <= cap else "over_budget"
    return {"trial_key": cfg.trial_key, "status": status, "peak_bytes": peak, "predicted_step_time_s": step}


def test_the_staircase_finds_the_brute_forces_best_with_fewer_estimates():
    space = build_space({**TINY, "workload": {**TINY["workload"], "batch_size": 16}}, devices=4, per_node=8)
    result = search(space, InProcess(), estimate=_synthetic)
    fit, rest = ranked(result, "time")
    every = [(c, _synthetic(raw_config(space.base, c))) for cands in space.families.values() for c in cands]
    best = min((r["predicted_step_time_s"], c.label()) for c, r in every if r["status"] == "ok")
    assert fit and (fit[0].row["predicted_step_time_s"], fit[0].cand.label()) == best
    # the staircase and the bound: 56 estimates without the bound, 29 with it, 20 best first (of 148 then); with
    # selective's save lists and no-reshard's bisection, 24 of 222
    assert len(result.estimates) <= 24 < len(every) / 9
    assert all(e.fits for e in fit) and not any(e.fits for e in rest)
    keys = [e.row["trial_key"] for e in result.estimates]
    assert len(keys) == len(set(keys))  # nothing estimated twice
    # best first: every layout's fastest corner before anything else, so the bound exists before the staircases;
    # the tp layouts (1.3x slower here) are then cut after that one estimate, and the report says why
    n = len(space.families)
    assert {(e.cand.layout, e.cand.policy, e.cand.grad_accum) for e in result.estimates[:n]} == {
        (lo, "sdpa", 1) for lo in space.families
    }
    slow = [lo for lo in space.families if lo.tp > 1]
    assert slow and all(len(result.by_layout(lo)) == 1 for lo in slow)
    reasons = layout_reasons(result, capacity_bytes=2600)
    assert {r.split(":")[0] for r in reasons if "cut after 1 estimate" in r} == {lo.label() for lo in slow}


def test_the_lean_search_stops_at_the_first_leanest_corner_that_fits():
    space = build_space({**TINY, "workload": {**TINY["workload"], "batch_size": 16}}, devices=4, per_node=8)

    def tight(raw):  # only the tp layouts' leanest corners fit
        row = _synthetic(raw)
        return {**row, "status": "ok" if row["peak_bytes"] <= 1500 else "over_budget"}

    ests = search(space, InProcess(), estimate=tight, lean=True).estimates
    assert [e.fits for e in ests] == [False] * (len(ests) - 1) + [True]
    assert len(ests) < len(space.families)  # the layouts after the first fit were not asked
    assert all(e.cand.policy == "recompute" and e.cand.layout.reshard for e in ests)
    # the same from a store holding every layout's leanest corner: reused rows stop it too
    every = search(space, InProcess(), estimate=tight, lean=True, slots=len(space.families)).estimates
    known = {e.row["trial_key"]: e.row for e in every}
    for cand in (c for cands in space.families.values() for c in cands if c.policy == "recompute"):
        row = tight(raw_config(space.base, cand))
        known.setdefault(row["trial_key"], row)
    again = search(space, InProcess(), known, estimate=tight, lean=True).estimates
    assert [e.row["trial_key"] for e in again] == [e.row["trial_key"] for e in ests] and all(e.reused for e in again)


def test_the_staircase_against_a_brute_force_at_every_memory_cap():
    """Over caps from 'only the leanest fit' to 'almost everything fits', the search's best is the brute force's,
    except where only not resharding makes a policy off resharding's frontier the fastest (the stated
    assumption): then it is still no worse than the best resharding candidate. The save lists win somewhere."""
    space = build_space({**TINY, "workload": {**TINY["workload"], "batch_size": 16}}, devices=4, per_node=8)
    every = {c: _synthetic(raw_config(space.base, c)) for cands in space.families.values() for c in cands}
    winners, misses = set(), []
    for cap in range(1400, 5000, 200):

        def capped(raw, cap=cap):
            row = _synthetic(raw)
            return {**row, "status": "ok" if row["peak_bytes"] <= cap else "over_budget"}

        fit, _ = ranked(search(space, InProcess(), estimate=capped), "time")
        fitting = sorted((r["predicted_step_time_s"], c.label(), c) for c, r in every.items() if r["peak_bytes"] <= cap)
        resharding = [f for f in fitting if f[2].layout.reshard]
        got = (fit[0].row["predicted_step_time_s"], fit[0].cand.label())
        assert got in {f[:2] for f in fitting} and got[0] <= resharding[0][0]
        winners.add(fit[0].cand.scheme)
        if got != fitting[0][:2]:
            misses.append(fitting[0][2])
    assert all(not c.layout.reshard for c in misses) and len(misses) <= 1  # cap 2000: selective:torchtitan
    assert {"selective:matmuls", "sdpa", "checkpoint"} <= winners


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "measure"}))
    return path


def test_advise_json_winner_yaml_sweep_spec_plot_and_store_reuse(tiny_yaml, tmp_path, capsys):
    from txlab.sweeps.spec import expand, load_spec

    out, store = tmp_path / "out", tmp_path / "store"
    argv = ["advise", str(tiny_yaml), "--hardware", "h100-sxm", "--devices", "4", "--json", "--workers", "1",
            "--out", str(out), "--store", str(store), "--set", "measure.usd_per_device_hour=2.5"]  # fmt: skip
    assert main(argv) == 0
    got, err = capsys.readouterr()
    doc = json.loads(got)
    assert set(doc) == {"candidates", "confirmed"} and doc["confirmed"] is None
    rows = doc["candidates"]
    fit = [r for r in rows if r["fits"]]
    assert fit and rows[: len(fit)] == fit  # those that fit first
    times = [r["predicted_step_time_s"] for r in fit]
    assert times == sorted(times) and all(t > 0 for t in times)
    assert all(r["measured"] is False and r["hardware"] == "h100-sxm" and r["predicted_usd_per_mtok"] > 0 for r in fit)
    assert all(r["parallel.fsdp"] * r["parallel.tp"] * r.get("parallel.cp", 1) == 4 for r in rows)
    winner = load_config(out / "winner.yaml")
    assert winner.trial_key == fit[0]["trial_key"]
    trials = expand(load_spec(out / "winner_sweep.yaml")).trials
    assert [t.key for t in trials] == [fit[0]["trial_key"]]
    assert (out / "advise.png").stat().st_size > 10_000 and (out / "advise.svg").exists()
    assert err == ""  # --json: progress lines off, as txlab run --json
    stored = Store.open(str(store)).read().to_pylist()
    assert sorted(r["trial_key"] for r in stored) == sorted(r["trial_key"] for r in rows)
    assert {r["sweep"] for r in stored} == {"advise"}
    # the same search again: every estimate comes from the store (none run, none written again), same answer
    assert main(argv[:-2] + ["--set", "measure.usd_per_device_hour=2.5"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["trial_key"] for r in again["candidates"]] == [r["trial_key"] for r in rows]
    assert len(Store.open(str(store))) == len(stored)


def test_a_killed_advise_keeps_what_it_estimated_and_the_rerun_reuses_it(tiny_yaml, tmp_path, capsys, monkeypatch):
    import txlab.advise.command as command
    from txlab.advise.search import estimate_raw

    done: list[str] = []

    def dying(raw):  # the user's Ctrl-C after three estimates
        if len(done) == 3:
            raise KeyboardInterrupt
        row = estimate_raw(raw)
        done.append(row["trial_key"])
        return row

    real = command.search
    monkeypatch.setattr(command, "search", lambda *a, **k: real(*a, **{**k, "estimate": dying}))
    store = tmp_path / "store"
    argv = ["advise", str(tiny_yaml), "--hardware", "h100-sxm", "--devices", "2", "--json", "--workers", "1",
            "--out", str(tmp_path / "out"), "--store", str(store)]  # fmt: skip
    assert main(argv) == 130
    assert sorted(r["trial_key"] for r in Store.open(str(store)).read().to_pylist()) == sorted(done)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(command, "search", real)
    capsys.readouterr()
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(done) <= {r["trial_key"] for r in doc["candidates"]}
    assert len(Store.open(str(store))) == len(doc["candidates"])  # the three not written twice


def test_advise_table_labels_every_figure_predicted(tiny_yaml, tmp_path, capsys):
    assert main(["advise", str(tiny_yaml), "--hardware", "a100-80g", "--devices", "2", "--workers", "1",
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "PREDICTED" in text and "assumptions:" in text and "winner: " in text
    assert "peak GiB" in text and "step s" in text


def test_confirm_runs_the_winner_under_the_cap(tiny_yaml, tmp_path, capsys, monkeypatch):
    """--hardware local with a memory cap that rules out the fastest corner: the confirmed winner is a leaner
    candidate, measured under the cap; its measured and predicted time are printed (not asserted: a loaded
    machine stretches the measured time; docs/advise.md reports them)."""
    monkeypatch.setenv("TXLAB_HARDWARE_DIR", str(tmp_path / "hardware"))  # not the session's: others expect none
    assert main(["calibrate", "--quick"]) == 0
    capsys.readouterr()
    from txlab.trial import estimate_trial

    base = {**TINY, "workload": {**TINY["workload"], "seq_len": 256}, "measure": {"hardware": "local", "device": "cpu"}}
    corner = estimate_trial(build_config(base))  # sdpa, one micro-step: the fastest candidate on one device
    cap_gib = 0.85 * corner["peak_bytes"] / GiB
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "measure"}))
    argv = ["advise", str(path), "--hardware", "local", "--devices", "1", "--confirm", "--json", "--workers", "1",
            "--out", str(tmp_path / "o"), "--set", f"measure.budget_gib={cap_gib}"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    best, confirmed = doc["candidates"][0], doc["confirmed"]
    assert (best["policy.name"], best["workload.grad_accum"]) != ("sdpa", 1)
    assert confirmed["status"] == "ok" and confirmed["measured"] is True
    assert confirmed["trial_key"] == best["trial_key"]
    assert confirmed["peak_bytes"] <= cap_gib * GiB
    assert confirmed["peak_bytes"] == pytest.approx(best["peak_bytes"], rel=0.05)  # CPU: the estimate is the tracker's
    assert confirmed["step_time_s"] > 0 and best["predicted_step_time_s"] > 0


def test_winner_yaml_runs(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["advise", str(tiny_yaml), "--hardware", "h100-sxm", "--devices", "1", "--workers", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["estimate", str(out / "winner.yaml"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok" and row["hardware"] == "h100-sxm"


def test_candidate_overrides_are_config_keys():
    c = Candidate(Layout(fsdp=2, tp=2, reshard=False), "checkpoint", 2)
    assert c.overrides() == {"parallel.fsdp": 2, "parallel.tp": 2, "parallel.reshard_after_forward": False,
                    "policy.name": "checkpoint", "policy.selective_save": "txlab", "workload.grad_accum": 2}  # fmt: skip
    assert Candidate(Layout(fsdp=1), "sdpa").overrides() == {"parallel.fsdp": 1, "parallel.tp": 1,
                            "policy.name": "sdpa", "policy.selective_save": "txlab", "workload.grad_accum": 1}  # fmt: skip
    sel = Candidate(Layout(fsdp=1), "selective", 1, "torchtitan")
    assert sel.scheme == "selective:torchtitan" and sel.overrides()["policy.selective_save"] == "torchtitan"
    # the save list written out: a user's own list does not leak into another policy's candidate
    raw = raw_config({**TINY, "policy": {"name": "selective", "selective_save": "matmuls"}}, c)
    assert build_config(raw).policy.selective_save == "txlab"
    # the order the staircase assumes: txlab's list saves a superset of the others, which save more than checkpoint
    assert recomputes_no_more("selective", "selective:matmuls") and recomputes_no_more(
        "selective:matmuls", "checkpoint"
    )
    assert not recomputes_no_more("selective:matmuls", "selective:torchtitan")
    assert not recomputes_no_more("selective:torchtitan", "selective:matmuls")
    assert not recomputes_no_more("sdpa", "planned") and recomputes_no_more("sdpa", "recompute")


def test_the_shipped_example_loads_and_its_space_spans_256_h100s():
    from txlab.advise.command import base_config
    from txlab.hardware import load_profile

    path = Path(__file__).resolve().parents[1] / "examples" / "advise_llama70b.yaml"
    profile = load_profile("h100-sxm")
    space = build_space(base_config(str(path), [], "h100-sxm", profile.kind), 256, profile.devices_per_node)
    assert {lo.tp for lo in space.families} == {1, 2, 4, 8}
    assert all(lo.world == 256 for lo in space.families)
    assert all(c.micro_batch(256) * c.grad_accum * c.layout.fsdp == 256 for f in space.families.values() for c in f)


def _table_probe(table, calls):
    """A probe over a table: devices -> (fits, predicted tokens/s, $/Mtok)."""
    from txlab.advise.counts import Count
    from txlab.advise.search import Estimate, Result

    def probe(n, lean):
        calls.append((n, lean))
        fits, tps, usd = table[n]
        row = {"status": "ok" if fits else "over_budget", "peak_bytes": 1, "predicted_step_time_s": 1.0,
               "predicted_tokens_per_s": tps, "predicted_usd_per_mtok": usd}  # fmt: skip
        result = Result(space=None, estimates=[Estimate(Candidate(Layout(fsdp=n), "recompute"), row)])
        return Count(n, result, why_not=None if fits else "over", full=not lean)

    return probe


def test_device_counts_parse_as_doublings_or_lists():
    from txlab.advise.counts import parse_devices

    assert parse_devices("8-256") == (8, 16, 32, 64, 128, 256)
    assert parse_devices("24-100") == (24, 48, 96)
    assert parse_devices("64,8,24") == (8, 24, 64) and parse_devices("7") == (7,)


def test_choosing_a_count_matches_a_brute_force_over_counts():
    """Fewest that fit (leanest corners first, the answer searched in full), the fewest reaching a rate (bisected,
    rates rising with devices), the cheapest (every count): each against the brute force's answer."""
    import random

    from txlab.advise.counts import choose

    rng = random.Random(0)
    counts = (1, 2, 4, 8, 16, 32, 64)
    for _ in range(200):
        first_fit = rng.randrange(len(counts) + 1)
        rates = sorted(rng.uniform(1, 1000) for _ in counts)
        table = {
            n: (i >= first_fit, rates[i] if i >= first_fit else 0.0, rng.uniform(1, 9)) for i, n in enumerate(counts)
        }
        fitting = [n for n in counts if table[n][0]]
        calls = []
        got = choose(counts, _table_probe(table, calls), "time", None)
        assert (got.chosen.devices if got.chosen else None) == (fitting[0] if fitting else None)
        assert [n for n, lean in calls if not lean] == fitting[:1]  # only the answer searched in full
        target = rng.uniform(1, 1200)
        calls = []
        got = choose(counts, _table_probe(table, calls), "time", target)
        want = [n for n in fitting if table[n][1] >= target]
        assert (got.chosen.devices if got.chosen else None) == (want[0] if want else None)
        assert len(calls) <= 3  # bisection over 7 counts
        got = choose(counts, _table_probe(table, []), "cost", None)
        cheapest = min(fitting, key=lambda n: table[n][2]) if fitting else None
        assert (got.chosen.devices if got.chosen else None) == cheapest


def test_advise_over_a_range_answers_the_fewest_devices_that_fit(tmp_path, capsys):
    """A cap one device cannot meet at its leanest but two can: --devices 1-4 answers 2 (4 is never searched)."""
    from txlab.trial import estimate_trial

    small = {**TINY, "workload": {**TINY["workload"], "batch_size": 2}}  # few micro-batch splits: few estimates
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in small.items() if k != "measure"}))
    lean = {**small, "policy": {"name": "recompute"}, "workload": {**small["workload"], "grad_accum": 2}}
    one = estimate_trial(build_config(lean))["peak_bytes"]
    two = estimate_trial(
        build_config({**lean, "parallel": {"fsdp": 2}, "workload": {**lean["workload"], "grad_accum": 1}})
    )
    assert two["peak_bytes"] < one
    cap_gib = (one + two["peak_bytes"]) / 2 / GiB
    argv = ["advise", str(path), "--hardware", "h100-sxm", "--devices", "1-4", "--json", "--workers", "1",
            "--out", str(tmp_path / "o"), "--set", f"measure.budget_gib={cap_gib}"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    counts = {c["devices"]: c for c in doc["devices"]["counts"]}
    assert doc["devices"]["chosen"] == 2 and counts[1]["fits"] is False and counts[4]["searched"] == "no"
    assert counts[2]["searched"] == "full" and counts[2]["trial_key"] == doc["candidates"][0]["trial_key"]
    assert all(r["parallel.fsdp"] * r["parallel.tp"] * r.get("parallel.cp", 1) == 2 for r in doc["candidates"])
    assert doc["candidates"][0]["peak_bytes"] <= cap_gib * GiB
    assert load_config(tmp_path / "o" / "winner.yaml").trial_key == doc["candidates"][0]["trial_key"]
