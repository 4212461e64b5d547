"""Smoke tests of the comparison benchmarks (benchmarks/*.py) on the debug shape, so the scripts do not rot."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tests.support import png_ok

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common as C  # noqa: E402


def test_loglog_slope_and_spread():
    assert C.loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    assert C.loglog_slope([1024, 2048], [1.0, 2.0]) == pytest.approx(1.0)
    s = C.spread([3.0, 1.0, 2.0])
    assert s["time_s"] == 2.0 and s["spread"] == pytest.approx(1.0) and s["reps"] == 3


def test_interleaved_rotates_and_drops_warmup():
    calls = []
    times = C.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2, warmup=1, log=False)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}


def test_longest_search_is_exact_on_a_known_frontier():
    import longest_context as L

    class Known:
        def fits(self, T, budget):
            return T <= budget

    assert L.longest(Known(), 1000, 256, 64, 8192) == (960, False)
    assert L.longest(Known(), 10_000, 256, 256, 4096) == (4096, True)  # the cap
    assert L.longest(Known(), 100, 256, 64, 4096) == (0, False)


def test_longest_context_debug(tmp_path):
    import longest_context as L

    df = L.run([0.03], ["sdpa", "recompute"], 1024, size="debug", start=64, step=64, log=False)
    got = dict(zip(df["variant"], df["longest_seq_len"]))
    assert got["sdpa"] > 0 and got["recompute"] >= got["sdpa"]
    assert (df["peak_at_longest_GiB"] <= 0.03).all()
    assert png_ok(L.plot(df, tmp_path / "lc.png", 1024))


def test_attention_alone_debug(tmp_path):
    import attention_alone as A

    # math at 256 is over the tiny budget: stopped by the tracker and reported as skipped
    df = A.run([64, 128, 256], [64], [32], reps=1, budget_gib=0.0015, ram_cap_gib=1.0, heads=2, head_dim=16, log=False)
    math_256 = df[(df["kernel"] == "math") & (df["seq_len"] == 256)].iloc[0]
    assert math_256["status"] == "over_budget" and "skipped" in math_256["shown"]
    assert df[df["seq_len"] == 64]["time_s"].notna().all()
    ex = A.exponents(df).set_index("kernel")
    assert ex.loc["math", "memory_exponent"] > ex.loc["sdpa", "memory_exponent"]
    assert png_ok(A.plot(df, tmp_path / "aa.png", 0.0015))


def test_vs_hf_debug(tmp_path):
    pytest.importorskip("transformers")
    import vs_hf_gpt2 as V

    df = V.run([64], [64, 128], ["hf", "hf-gc", "sdpa", "recompute"], reps=1, ram_cap_gib=1.0, size="debug", log=False)
    timed = df[df["seq_len"] == 64]
    # fake and real tensors give the same tracked peak, for HF (mask shortcut patched) and txlab alike
    assert (timed["peak_GiB"] == timed["real_peak_GiB"]).all()
    assert timed["time_s"].notna().all()
    assert all(abs(loss - math.log(256)) < 1.0 for loss in timed["loss"])  # random weights: about ln(vocab)
    assert set(df.loc[df["variant"] == "hf", "peak_vs_hf"]) == {1.0}
    assert png_ok(V.plot(df, tmp_path / "vs.png"))


def test_longest_merge_prefers_the_longer_fit():
    import longest_context as L
    import pandas as pd

    first = pd.DataFrame(
        [
            {"variant": "hf", "budget_GiB": 2, "longest_seq_len": 768, "capped": False},
            {"variant": "recompute", "budget_GiB": 2, "longest_seq_len": 8192, "capped": True},
        ]
    )
    ext = pd.DataFrame([{"variant": "recompute", "budget_GiB": 2, "longest_seq_len": 14080, "capped": False}])
    got = L.merge([first, ext]).set_index("variant")
    assert got.loc["recompute", "longest_seq_len"] == 14080 and not got.loc["recompute", "capped"]
    assert got.loc["recompute", "x_hf"] == pytest.approx(14080 / 768)


def test_vs_hf_llama_debug(tmp_path):
    """The Llama peer: both sides from one config.json (txlab by model.hf, on the HF model's own weights),
    AdamW in the step; HF default and HF + grad ckpt share one model, the txlab presets one set of weights."""
    pytest.importorskip("transformers")
    import vs_hf_gpt2 as V

    df = V.run([64], [64], ["hf", "hf-gc", "sdpa", "recompute"], reps=1, ram_cap_gib=1.0, size="debug",
               log=False, family="llama", optimizer=True)  # fmt: skip
    assert (df["peak_GiB"] == df["real_peak_GiB"]).all()  # fake and real tensors, shared weights or not
    assert df["time_s"].notna().all() and (df["family"] == "llama").all()
    assert all(
        "LlamaForCausalLM, attn_implementation sdpa" in n for n in df.loc[df["variant"].str.startswith("hf"), "note"]
    )
    loss = dict(zip(df["variant"], df["loss"]))
    # one set of weights (learning rate 0 keeps it): HF's loss (over T - 1 positions) is txlab's within 1%
    assert loss["hf"] == loss["hf-gc"] and loss["sdpa"] == pytest.approx(loss["recompute"], rel=1e-5)
    assert loss["sdpa"] == pytest.approx(loss["hf"], rel=1e-2) and abs(loss["hf"] - math.log(256)) < 1.0
    assert png_ok(V.plot(df, tmp_path / "llama.png"))


@pytest.mark.parametrize("real_memory, low_ram", [(False, False), (True, True)])
def test_vs_hf_llama_timing_modes(real_memory, low_ram):
    """Without real memory: a warm-up round, the loss from the timed steps. One side at a time (low RAM):
    the tracked steps on contenders of their own, each side rebuilt when its turn comes, same weights."""
    pytest.importorskip("transformers")
    import vs_hf_gpt2 as V

    df = V.run([32], [], ["hf", "hf-gc", "sdpa"], reps=1, ram_cap_gib=1.0, size="debug", log=False,
               family="llama", optimizer=True, real_memory=real_memory, low_ram=low_ram)  # fmt: skip
    assert df["time_s"].notna().all() and df["loss"].notna().all()
    if real_memory:
        assert (df["peak_GiB"] == df["real_peak_GiB"]).all()
    else:
        assert df["real_peak_GiB"].isna().all()
    loss = dict(zip(df["variant"], df["loss"]))
    assert loss["hf"] == loss["hf-gc"] and loss["sdpa"] == pytest.approx(loss["hf"], rel=1e-2)


def test_one_side_at_a_time_holds_one_side_and_keeps_the_weights(tmp_path):
    pytest.importorskip("transformers")
    ckpt = C.write_hf_checkpoint(tmp_path, "debug", {})
    overrides = {"model.hf": str(ckpt), "model.init": "pretrained"}
    C.build("hf", 16, "debug", overrides=overrides).model.save_pretrained(ckpt)
    sides = C.OneSideAtATime(["hf", "hf-gc", "sdpa", "checkpoint"], 16, "debug", overrides, optimizer=True)
    x, y = C.tokens(256, 16)
    losses = {}
    for v in ["hf", "hf-gc", "sdpa", "checkpoint", "hf"]:
        sides.prepare(v)
        assert set(sides.contenders) == ({"hf", "hf-gc"} if v.startswith("hf") else {"sdpa", "checkpoint"})
        losses.setdefault(v, []).append(float(sides.step(v, x, y)))
    assert sides.builds == 3  # hf side, txlab side, hf side again
    assert losses["hf"][0] == losses["hf"][1] == losses["hf-gc"][0]  # rebuilt from the same seed; lr 0
    assert losses["sdpa"][0] == pytest.approx(losses["checkpoint"][0], rel=1e-6)


def test_time_breakdown_sums_the_timelines_operators_and_the_fused_what_if_prices_attention():
    import time_breakdown as B

    debug = str(Path(__file__).resolve().parents[1] / "examples" / "debug.yaml")
    args = [debug, "--set", "parallel.cp=2", "--set", "measure.hardware=h100-sxm", "--top", "3"]
    ops = B.main(args)
    fused = B.main([*args, "--tile-body", "fused"])
    classes = lambda out: {cls for cls, _, _ in out["rows"]}  # noqa: E731
    # the CUDA estimate traces the `ops` tile body (no fused attention), the what-if the fused kernels
    assert "attention" not in classes(ops) and "attention" in classes(fused)
    assert "collective (K/V)" in classes(ops) and fused["step_s"] < ops["step_s"]
    assert sum(r[0] for r in ops["rows"].values()) == ops["ops"]


def test_fewest_devices_debug(tmp_path):
    """benchmarks/fewest_devices.py on the debug model: one advise over a range per model and length, a row each
    (the fewest devices, the winner, its predicted figures) and the plot."""
    import fewest_devices as F
    import pandas as pd

    row = F.advise_row("debug", 64, 256, "h100-sxm", tmp_path, "1-2")
    assert row["rc"] == 0 and row["devices"] == 1 and row["batch_size"] == 4, row
    assert row["winner"].startswith("1 device") and row["peak_gib"] > 0 and row["predicted_step_time_s"] > 0
    assert png_ok(F.plot(pd.DataFrame([row]), tmp_path / "f.png"))
