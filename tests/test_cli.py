"""`txlab run`: a summary or the JSON row; bad input exits 2 with one line and no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--set",
    "workload.seq_len=256",
    "--set",
    "workload.steps=1",
    "--set",
    "workload.warmup_steps=0",
    "--set",
    "model.n_layers=2",
    "--set",
    "model.d_model=64",
]


def txlab(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "txlab", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_run_prints_summary():
    r = txlab("run", "examples/debug.yaml", *TINY)
    assert r.returncode == 0, r.stderr
    for needle in ("status ok", "peak", "at peak: params", "activations", "step", "tokens/s"):
        assert needle in r.stdout


def test_run_json_row_and_store(tmp_path):
    store = tmp_path / "store"
    r = txlab("run", "examples/debug.yaml", *TINY, "--json", "--store", str(store))
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    from txlab.results.columns import column_names
    from txlab.results.store import read_store

    assert set(row) == set(column_names())
    assert row["status"] == "ok" and row["measured"] is True and row["peak_bytes"] > 0
    assert row["peak_rss_bytes"] > 0  # a fresh process grows while the trial runs
    df = read_store(str(store))
    assert list(df["trial_key"]) == [row["trial_key"]]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "examples/debug.yaml", "--set", "model.n_layer=2"], "model.n_layer"),
        (["run", "examples/debug.yaml", "--set", "model.n_layers=x"], "model.n_layers"),
        (["run", "examples/debug.yaml", "--set", "model.n_heads=5"], "model.n_heads"),
        (["run", "examples/debug.yaml", "--set", "model.n_kv_heads=3"], "model.n_kv_heads"),
        (["run", "examples/debug.yaml", "--set", "policy.q_chunk=0"], "policy.q_chunk"),
        (
            ["run", "examples/debug.yaml", "--set", "policy.attention=chunked", "--set", "policy.q_chunk=1024"],
            "policy.q_chunk",
        ),
        (["run", "examples/debug.yaml", "--set", "policy.name=turbo"], "policy.name"),
        (["run", "missing.yaml"], "missing.yaml"),
        (["run"], "config"),
        (["frobnicate"], "invalid choice"),
        (["estimate", "examples/debug.yaml", "--capacity-gib", "0"], "--capacity-gib"),
        (["estimate", "examples/debug.yaml", "--set", "policy.name=planned"], "measure.budget_gib"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    r = txlab(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_bad_store_fails_before_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = txlab("run", "examples/debug.yaml", *TINY, "--store", str(f))
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr


def test_rows_record_their_threads_and_rerun_runs_with_the_stored_ones(tmp_path, capsys):
    """A row says how many CPU threads ran its steps (a sweep's trial runs with its resources' CPUs, `txlab
    run` with torch's default), and `txlab rerun` runs with those; an older row, which does not say, is
    rerun with the default and the output says so."""
    import torch

    from txlab.cli import main
    from txlab.config import load_config
    from txlab.results.store import Store
    from txlab.trial import estimate_trial, run_trial

    before = torch.get_num_threads()
    cfg = load_config(ROOT / "examples/debug.yaml", [s for s in TINY if s != "--set"])
    store = Store.open(str(tmp_path / "store"), create=True)
    try:
        torch.set_num_threads(1)
        row = run_trial(cfg)
        assert row["status"] == "ok" and row["threads"] == 1
        assert estimate_trial(cfg)["threads"] is None  # nothing timed
        store.write_row(row)
        torch.set_num_threads(2)
        assert main(["rerun", "--store", str(tmp_path / "store"), "--trial", row["trial_key"]]) == 0
        out = capsys.readouterr().out
        assert "threads: 1, as the stored trial ran" in out and torch.get_num_threads() == 1
        old = tmp_path / "old"
        Store.open(str(old), create=True).write_row({**row, "threads": None})  # a row from before the column
        assert main(["rerun", "--store", str(old), "--trial", row["trial_key"]]) == 0
        assert "the stored row does not say how many it ran with" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
