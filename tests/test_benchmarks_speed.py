"""Smoke tests of the memory and planner benchmarks (memory_for_free, planned_vs_uniform, attention_alone's kernel
bodies) on the debug shape, and the GPU check's plan on the CPU: the scripts must not rot. Timing goals are
the benchmarks' business, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import png_ok

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_memory_for_free_debug(tmp_path):
    pytest.importorskip("transformers")
    import memory_for_free as M

    variants = ["hf", "hf-gc", "recompute", "recompute-chunked", "recompute-0.2"]
    df = M.run([64], variants, reps=1, ram_cap_gib=1.0, size="debug", log=False)
    assert list(df["variant"]) == variants
    assert (df["peak_GiB"] == df["real_peak_GiB"]).all()  # fake and real tensors: the same tracked peak
    assert df["time_s"].notna().all() and df["loss"].notna().all()
    by = df.set_index("variant")
    assert by.loc["hf-gc", "peak_vs_hf_gc"] == 1.0 and by.loc["hf-gc", "time_vs_hf_gc"] == 1.0
    # the three recompute variants train the same model on the same tokens: the same loss
    losses = by.loc[["recompute", "recompute-chunked", "recompute-0.2"], "loss"]
    assert losses.max() - losses.min() < 1e-4
    assert "attention sdpa" in by.loc["recompute", "note"] and "chunked" in by.loc["recompute-0.2", "note"]
    M.show(df)
    assert png_ok(M.plot(df, tmp_path / "mff.png"))


def test_memory_for_free_without_hf(tmp_path, capsys):
    """The selective comparison runs no HF contender: ratios, table, goal lines and plot are sdpa's."""
    import memory_for_free as M

    variants = ["sdpa", "selective", "selective-matmuls", "selective-torchtitan"]
    # 512 tokens: long enough for the blocks' activations, not the loss, to make the peak
    df = M.run([512], variants, reps=1, ram_cap_gib=1.0, size="debug", log=False)
    by = df.set_index("variant")
    assert "time_vs_hf_gc" not in df and by.loc["sdpa", "time_vs_sdpa"] == 1.0
    assert (by.loc[variants[1:], "activations_vs_sdpa"] < 1.0).all()  # every save list holds less than sdpa
    M.show(df)
    assert capsys.readouterr().out.count("x sdpa (<= 1.10)") == 3
    assert png_ok(M.baseline(df) == "sdpa" and M.plot(df, tmp_path / "mff.png"))


def test_planned_vs_uniform_debug(tmp_path):
    import planned_vs_uniform as P

    rows = P.run(seq_len=512, vocab=256, n_layers=4, n_budgets=2, reps=1, size="debug", log=False)
    assert set(P.UNIFORM) <= set(rows["contender"]) and (rows["policy"] == "planned").sum() == 2
    assert rows["time_s"].notna().all()
    tab = P.per_budget(rows)
    assert len(tab) == 2 and tab["planned_fits"].all()  # the planner's plan fits each budget, measured
    assert (tab["fastest_uniform"].notna()).all()  # block fits every budget between its peak and none's
    assert png_ok(P.plot(rows, tab, tmp_path / "p.png"))


def test_uniform_runs_are_the_remat_policies():
    import planned_vs_uniform as P

    assert P.uniform_runs("none", 4) == [(0, 4, "keep")]
    assert P.uniform_runs("block", 3) == [(0, 1, "full"), (1, 2, "full"), (2, 3, "full")]
    assert P.uniform_runs("every2", 4) == [(0, 1, "full"), (1, 2, "keep"), (2, 3, "full"), (3, 4, "keep")]
    assert P.uniform_runs("selective", 2) == [(0, 1, "selective"), (1, 2, "selective")]
    assert P.uniform_runs("sqrt", 4) == [(0, 2, "full"), (2, 4, "full")]


def test_attention_alone_times_both_chunked_bodies():
    import attention_alone as A

    df = A.run([64], [64], [32], reps=1, budget_gib=1.0, ram_cap_gib=1.0, heads=2, head_dim=16, log=False)
    kernels = set(df["kernel"])
    assert {"chunked 32", "chunked 32 (ops)"} <= kernels
    assert df[df["seq_len"] == 64]["time_s"].notna().all()


def _gpu_check(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_gpu_check_plan_on_the_cpu():
    """--dry-run prints every check (presets at each length, fp32, the oom cap and the trial after it,
    compile, the HF peers) and runs nothing; the plan is the one the GPU run executes."""
    import gpu_check as G

    got = _gpu_check("--dry-run")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    checks = G.plan([1024, 4096, 16384])
    assert lines[0].startswith(f"gpu_check plan: {len(checks)} checks") and len(lines) == len(checks) + 1
    kinds = [c.kind for c in checks]
    assert {"preset", "fp32", "oom", "after_oom", "compile", "hf"} == set(kinds)
    assert kinds.index("after_oom") == kinds.index("oom") + 1  # the next trial in the same process
    assert {c.name for c in checks if c.kind == "preset"} == set(G.PRESETS)
    assert all(c.overrides.get("workload.dtype") == "bf16" for c in checks if c.kind == "preset")
    assert [c.expect for c in checks if c.kind == "oom"] == ["oom"]
    assert not any(c.name == "naive" and c.seq_len > 8192 for c in checks)
    quick = G.plan([1024], quick=True)
    assert {c.kind for c in quick} == {"preset", "fp32", "oom", "after_oom"}


def test_gpu_check_refuses_on_the_cpu_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    got = _gpu_check()
    assert got.returncode == 2 and got.stdout == ""
    assert len(got.stderr.strip().splitlines()) == 1 and "no CUDA device" in got.stderr


def test_gpu_check_markdown_and_verdicts():
    import gpu_check as G

    rows = [
        {"kind": "preset", "check": "sdpa", "seq_len": 1024, "expect": "ok", "status": "ok", "step_time_s": 0.2},
        {"kind": "oom", "check": "naive capped", "seq_len": 8192, "expect": "oom", "status": "oom"},
        {
            "kind": "compile",
            "check": "sdpa compiled",
            "seq_len": 1024,
            "expect": "ok",
            "status": "ok",
            "step_time_s": 0.1,
        },
        {"kind": "after_oom", "check": "sdpa after", "seq_len": 1024, "expect": "ok", "status": "error"},
    ]
    rows = G.verdicts(rows)
    assert [r["passed"] for r in rows] == [True, True, True, False]
    assert rows[2]["speedup_vs_eager"] == pytest.approx(2.0)
    md = G.markdown(rows, "test device")
    assert "| kind | check |" in md and "failed: sdpa after" in md


def test_compile_gain_debug():
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor needs a C++ compiler")
    import compile_gain as G

    df = G.run(["sdpa"], seq_len=32, steps=1, warmup=0, size="debug", log=False)
    assert list(df["compiled"]) == [False, True] and (df["status"] == "ok").all()
    eager, compiled = df.iloc[0], df.iloc[1]
    assert eager["compile_s"] is None or eager["compile_s"] != eager["compile_s"]  # null: not compiled
    assert compiled["compile_s"] >= 0 and compiled["speedup_vs_eager"] > 0
