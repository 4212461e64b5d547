"""Frontier and baseline numbers against a hand-computed fixture (txlab/analysis/frontier.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from txlab.analysis.frontier import frontier, frontier_label, frontier_markdown, frontier_tables, versus_baseline
from txlab.results.columns import GiB


def row(policy, T, status="ok", peak=None, depth=2, q=512, k=512, step=None, measured=True, budget=None):
    attention = {"naive": "math", "recompute": "chunked"}.get(policy, "sdpa")
    return {
        "trial_key": f"{policy}-{depth}-{T}-{q}-{k}-{measured}",
        "sweep": "hand",
        "status": status,
        "policy.name": policy,
        "policy.attention": attention,
        "policy.q_chunk": q,
        "policy.k_chunk": k,
        "model.n_layers": depth,
        "model.size": "debug",
        "workload.seq_len": T,
        "workload.kind": "train",
        "device": "cpu",
        "measured": measured,
        "measure.budget_gib": budget,
        "peak_bytes": None if peak is None else int(peak * GiB),
        "step_time_s": step,
    }


@pytest.fixture
def hand() -> pd.DataFrame:
    rows = [
        # sdpa, depth 2: fits 1 GiB up to 512; 1024 is ok but 1.5 GiB (fits 2 GiB only); 2048 runs out of memory
        row("sdpa", 256, peak=0.25, step=1.0),
        row("sdpa", 512, peak=0.5, step=2.0),
        row("sdpa", 1024, peak=1.5, step=4.0),
        row("sdpa", 2048, "oom"),
        # naive, depth 2: over 1 GiB already at the shortest length
        row("naive", 256, peak=1.2, step=1.5),
        row("naive", 512, "oom"),
        # recompute, depth 2: several chunk settings; over_budget and error rows never count
        row("recompute", 256, peak=0.1, q=128, k=128, step=1.2),
        row("recompute", 1024, peak=0.9, q=256, k=256, step=6.0),
        row("recompute", 1024, peak=1.1, q=512, k=512, step=5.0),
        row("recompute", 2048, "over_budget", peak=1.2, q=256, k=256),
        row("recompute", 2048, "error", q=512, k=512),
        # checkpoint, depth 2: the longest length tried fits; an estimate goes further
        row("checkpoint", 256, peak=0.2, step=1.3),
        row("checkpoint", 4096, peak=0.8, step=20.0),
        row("checkpoint", 8192, peak=0.95, measured=False),
        # depth 4: sdpa out of memory at the only length tried; naive only errored
        row("sdpa", 256, "oom", depth=4),
        row("naive", 256, "error", depth=4),
    ]
    return pd.DataFrame(rows)


def get(fr, policy, depth, budget, basis="measured"):
    sel = fr[(fr["policy"] == policy) & (fr["depth"] == depth) & (fr["budget_gib"] == budget) & (fr["basis"] == basis)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


def test_frontier_matches_hand_computation(hand):
    fr = frontier(hand, budgets=[1, 2])
    expect = {  # (policy, depth, budget) -> (longest feasible, label)
        ("sdpa", 2, 1): (512, "512"),
        ("sdpa", 2, 2): (1024, "1024"),
        ("naive", 2, 1): (None, "infeasible at 256"),
        ("naive", 2, 2): (256, "256"),
        ("recompute", 2, 1): (1024, "1024"),
        ("recompute", 2, 2): (1024, "1024"),
        ("checkpoint", 2, 1): (4096, "4096+"),
        ("checkpoint", 2, 2): (4096, "4096+"),
        ("sdpa", 4, 1): (None, "infeasible at 256"),
        ("sdpa", 4, 2): (None, "infeasible at 256"),
    }
    for (p, d, b), (longest, label) in expect.items():
        r = get(fr, p, d, b)
        assert (
            pd.isna(r["longest_feasible_seq_len"]) if longest is None else r["longest_feasible_seq_len"] == longest
        ), (p, d, b)
        assert r["label"] == label, (p, d, b)
    # infeasible is null, never zero
    assert not (fr["longest_feasible_seq_len"] == 0).any()
    # the best chunk setting at the frontier is the lowest peak among the feasible ones
    r = get(fr, "recompute", 2, 2)
    assert (r["q_chunk"], r["k_chunk"]) == (256, 256) and math.isclose(r["peak_gib_at_frontier"], 0.9, rel_tol=1e-6)
    # errors are not "tried": recompute's longest tried is 2048 (over_budget), naive@4 has no frontier row
    assert r["longest_tried"] == 2048 and not r["fits_at_longest_tried"]
    assert fr[(fr["policy"] == "naive") & (fr["depth"] == 4)].empty
    # estimated frontier includes the estimate beyond the measured lengths, and says so
    e = get(fr, "checkpoint", 2, 1, basis="estimated")
    assert e["longest_feasible_seq_len"] == 8192 and e["label"] == "8192+" and e["point_estimated"]
    assert fr[(fr["basis"] == "estimated") & (fr["policy"] != "checkpoint")].empty


def test_frontier_budgets_default_to_store(hand):
    hand["measure.budget_gib"] = 1.0
    fr = frontier(hand)
    assert set(fr["budget_gib"]) == {1.0}
    assert get(fr, "sdpa", 2, 1)["longest_feasible_seq_len"] == 512


def test_frontier_groups_by_batch_size(hand):
    other = hand[hand["policy.name"] == "sdpa"].assign(
        **{"workload.batch_size": 4, "trial_key": lambda d: d["trial_key"] + "b4"}
    )
    other.loc[other["workload.seq_len"] == 512, "status"] = "oom"
    fr = frontier(pd.concat([hand.assign(**{"workload.batch_size": 1}), other]), budgets=[1])
    sd = fr[(fr["policy"] == "sdpa") & (fr["depth"] == 2)].set_index("workload.batch_size")
    assert sd.loc[1, "longest_feasible_seq_len"] == 512 and sd.loc[4, "longest_feasible_seq_len"] == 256
    assert set(sd["setting"]) == {"batch_size=1", "batch_size=4"}


def test_versus_baseline_matches_hand_computation(hand):
    vs = versus_baseline(hand).set_index(["policy", "depth", "seq_len"])
    n = vs.loc[("naive", 2, 256)]
    assert n["baseline"] == "sdpa"
    assert math.isclose(n["memory_saving"], 1 - 1.2 / 0.25, rel_tol=1e-6) and math.isclose(
        n["time_overhead"], 1.5, rel_tol=1e-6
    )
    c = vs.loc[("checkpoint", 2, 256)]
    assert math.isclose(c["memory_saving"], 1 - 0.2 / 0.25, rel_tol=1e-6) and math.isclose(
        c["time_overhead"], 1.3, rel_tol=1e-6
    )
    # recompute at 1024: the lowest-peak chunk setting (0.9 GiB, 6 s) against sdpa (1.5 GiB, 4 s)
    r = vs.loc[("recompute", 2, 1024)]
    assert (
        math.isclose(r["memory_saving"], 0.4, rel_tol=1e-6)
        and math.isclose(r["time_overhead"], 1.5, rel_tol=1e-6)
        and r["q_chunk"] == 256
    )
    # only shared shapes: checkpoint at 4096 has no sdpa partner
    assert ("checkpoint", 2, 4096) not in vs.index


def test_markdown_tables(hand):
    md = frontier_markdown(frontier(hand, [1, 2]), versus_baseline(hand), "asked")
    assert "| policy | depth | 1 GiB | 2 GiB |" in md
    assert "| naive | 2 | infeasible at 256 | 256 |" in md
    assert "| checkpoint | 2 | 4096+ / est. 8192+ | 4096+ / est. 8192+ |" in md
    assert "-20% mem, x1.30 time" in md  # checkpoint at 256 against sdpa


def test_single_policy_has_no_baseline(hand):
    only = hand[hand["policy.name"] == "checkpoint"]
    assert versus_baseline(only).empty
    assert "nothing to compare" in frontier_markdown(frontier(only, [1]), versus_baseline(only))


def test_labels():
    assert frontier_label(2048, 256, 4096) == "2048"
    assert frontier_label(4096, 256, 4096) == "4096+"
    assert frontier_label(pd.NA, 256, 4096) == "infeasible at 256"


def test_answer_tables_per_budget(hand):
    tables = frontier_tables(frontier(hand, [1, 2]), "sdpa")
    assert list(tables) == [1.0, 2.0]
    one = tables[1.0].set_index("policy")
    assert list(one.columns) == ["2 layers", "4 layers"]  # no setting column: one setting
    assert list(one.index) == ["naive", "sdpa", "checkpoint", "recompute", "best vs sdpa"]
    assert one.loc["naive", "2 layers"] == "infeasible at 256" and one.loc["naive", "4 layers"] == ""
    assert one.loc["checkpoint", "2 layers"] == "4096+ / est. 8192+"
    # best vs sdpa at 1 GiB: checkpoint's estimate fits 8192, the longest tried, against sdpa's 512
    assert one.loc["best vs sdpa", "2 layers"] == "≥ x16 checkpoint (est.)"
    assert one.loc["best vs sdpa", "4 layers"] == "none fits"  # sdpa oom, naive only errored
    assert tables[2.0].set_index("policy").loc["best vs sdpa", "2 layers"] == "≥ x8 checkpoint (est.)"
    # measured only: the factor of measured frontiers, no "(est.)"
    measured = frontier_tables(frontier(hand[hand["measured"]], [1]), "sdpa")[1.0].set_index("policy")
    assert measured.loc["best vs sdpa", "2 layers"] == "≥ x8 checkpoint"
    # no baseline in the store: no gain row
    assert "best vs" not in " ".join(frontier_tables(frontier(hand, [1]), None)[1.0]["policy"])


def _sharded_rows(peaks: dict[tuple[int, int, str], float | None]) -> pd.DataFrame:
    """Estimate rows of a sharded sweep: (fsdp, seq_len, policy) -> per-rank peak GiB (None: error row)."""
    from txlab.config import load_config
    from txlab.results.store import rows_to_table

    rows = []
    for (n, seq, pol), gib in peaks.items():
        cfg = load_config(None, {"parallel.fsdp": n, "workload.batch_size": n, "workload.seq_len": seq,
                                 "policy.name": pol, "measure.budget_gib": 10.0})  # fmt: skip
        rows.append({**cfg.flat(), "trial_key": cfg.trial_key, "sweep": "s", "measured": False, "device": "cuda",
                     "status": "error" if gib is None else "ok", "error": "boom" if gib is None else None,
                     "peak_bytes": None if gib is None else int(gib * 2**30)})  # fmt: skip
    return rows_to_table(rows).to_pandas()


def test_fewest_devices_is_the_smallest_shard_degree_that_fits():
    from txlab.analysis.frontier import fewest_devices, fewest_devices_markdown

    df = _sharded_rows({
        (1, 1024, "sdpa"): 30.0, (2, 1024, "sdpa"): 16.0, (4, 1024, "sdpa"): 9.0, (8, 1024, "sdpa"): 5.0,
        (1, 4096, "sdpa"): 60.0, (2, 4096, "sdpa"): 31.0, (4, 4096, "sdpa"): None, (8, 4096, "sdpa"): 12.0,
        (1, 1024, "checkpoint"): 9.5, (2, 1024, "checkpoint"): 5.0,
    })  # fmt: skip
    fd = fewest_devices(df)
    got = {
        (r.policy, r.seq_len): (r.label, None if pd.isna(r.fewest_ranks) else r.fewest_ranks) for r in fd.itertuples()
    }
    assert got[("sdpa", 1024)] == ("4", 4)  # 9 GiB fits 10, 16 does not
    assert got[("sdpa", 4096)] == ("> 8", None)  # the error row at 4 is not evidence; 8 is still 12 GiB
    assert got[("checkpoint", 1024)] == ("1", 1)
    assert (fd["budget_gib"] == 10.0).all() and (fd["rank_batch"] == 1).all() and (fd["basis"] == "estimated").all()
    assert set(fd["model"]) == {"debug, 4 layers"}
    assert fd.loc[(fd["policy"] == "sdpa") & (fd["seq_len"] == 1024), "peak_gib_at_fewest"].item() == pytest.approx(9.0)
    md = fewest_devices_markdown(fd)
    assert (
        "10 GiB per device, 1 sequence(s) per rank (estimates)" in md and "| debug, 4 layers | sdpa | 4 | > 8 |" in md
    )
    assert fewest_devices(_sharded_rows({(1, 1024, "sdpa"): 3.0})).empty  # no sharded rows: no table


def test_the_fewest_devices_plot_draws_a_panel_per_model_and_budget():
    from txlab.analysis.plots import Skipped, draw

    df = _sharded_rows({(1, 1024, "sdpa"): 30.0, (4, 1024, "sdpa"): 9.0, (4, 2048, "sdpa"): 19.0})
    fig = draw("fewest_devices", df, [10.0, 20.0])
    assert not isinstance(fig, Skipped)
    assert len([ax for ax in fig.axes if ax.get_visible() and ax.get_title()]) == 2
    assert isinstance(draw("fewest_devices", _sharded_rows({(1, 1024, "sdpa"): 3.0})), Skipped)


@pytest.mark.parametrize("order", [1, -1])
def test_equal_peaks_the_faster_run_counts_whatever_the_row_order(order):
    """One experiment run under two budgets (the smoke grid's 2048 tokens): equal peaks, two step times."""
    rows = [
        row("sdpa", 512, peak=0.5, step=1.0),
        dict(row("checkpoint", 512, peak=0.3, step=3.0), trial_key="slow"),
        dict(row("checkpoint", 512, peak=0.3, step=1.5, budget=0.4), trial_key="fast"),
    ]
    vs = versus_baseline(pd.DataFrame(rows[:1] + rows[1:][::order]))
    assert len(vs) == 1 and vs["time_overhead"].iloc[0] == pytest.approx(1.5)
