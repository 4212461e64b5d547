"""The time model (txlab.timemodel, txlab.hardware): hardware profiles and their bad inputs, the operator trace
of a real step on fake tensors (FLOPs against torch's counter and hand formulas, DTensor shards, collectives),
the timeline's overlap rules on hand-made operators, the predicted row columns of estimates and measured
trials, and `txlab calibrate`."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import yaml

from tests.support import ONE_STEP, REPO, cfg
from txlab.cli import main
from txlab.config import ConfigError
from txlab.hardware import ProfileError, by_device_name, load_profile, local_path, names
from txlab.hardware.catalogue import CATALOGUE, MAIN_NAMES
from txlab.timemodel.cost import Coster
from txlab.timemodel.schedule import schedule
from txlab.timemodel.trace import Op, causal_share, record_step, traffic, wire_bytes
from txlab.trial import estimate_trial, run_trial
from txlab.trial.predict import traced_step_memory
from txlab.trial.resolve import resolve

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {
    "name": "my-gpu",
    "peak_tflops": {"bf16": 100.0, "fp32": 10.0},
    "memory_gb": 40,
    "memory_bandwidth_gbps": 1000,
    "link_gbps": 100,
    "devices_per_node": 4,
    "network_gbps": 10,
}


def write(tmp_path, raw, name="gpu.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# --- profiles ----------------------------------------------------------------------------------------


def test_catalogue_has_the_named_devices_with_sources_and_positive_figures():
    assert set(MAIN_NAMES) <= set(CATALOGUE)
    for name in CATALOGUE:
        p = load_profile(name)
        assert p.source and p.kind == "cuda" and p.peak("bf16") > p.peak("fp32") > 0
        assert p.memory_bytes > 0 and p.memory_bw > 0 and p.link_bw > p.network_bw > 0
        assert by_device_name(p.device_name).name == name  # a device's own name finds its profile


def test_a_user_profile_file_loads_in_si_units(tmp_path):
    p = load_profile(write(tmp_path, GOOD))
    assert (p.name, p.kind, p.peak_flops["bf16"], p.memory_bytes) == ("my-gpu", "cuda", 100e12, 40e9)
    assert (p.memory_bw, p.link_bw, p.network_bw, p.devices_per_node) == (1e12, 1e11, 1e10, 4)
    eff = load_profile(write(tmp_path, {**GOOD, "efficiency": {"matmul": 0.5}}, "eff.yaml")).efficiency
    assert eff.matmul == 0.5


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"memory_gb": None}, "missing field memory_gb"),
        ({"link_gbps": 0}, "link_gbps must be > 0, got 0"),
        ({"network_gbps": -5}, "network_gbps must be > 0, got -5"),
        ({"peak_tflops": {"bf16": -1}}, "peak_tflops.bf16 must be > 0"),
        ({"peak_tflops": {}}, "peak_tflops must be"),
        ({"devices_per_node": 2.5}, "devices_per_node must be devices in one node (an integer)"),
        ({"memory_bandwidth_gbps": "fast"}, "memory_bandwidth_gbps must be"),
        ({"kind": "tpu"}, "kind must be one of cuda, cpu"),
        ({"colour": "green"}, "unknown field colour"),
    ],
)
def test_a_bad_profile_file_is_refused_naming_the_field(tmp_path, change, needle):
    raw = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ProfileError, match=re.escape(needle)):
        load_profile(write(tmp_path, raw))


def test_unknown_names_get_the_closest_and_the_list():
    with pytest.raises(ProfileError) as e:
        load_profile("h100")
    msg = str(e.value)
    assert "unknown profile 'h100'; did you mean" in msg and "h100-sxm" in msg and "local" in msg
    assert set(names()) == {*CATALOGUE, "local"}


def test_a_dtype_without_a_peak_and_a_missing_local_profile_are_refused(tmp_path):
    only_bf16 = write(tmp_path, {**GOOD, "peak_tflops": {"bf16": 100.0}})
    with pytest.raises(ConfigError, match="has no peak for workload.dtype 'fp32'; it has: bf16"):
        cfg(ONE_STEP, measure__hardware=only_bf16)
    with pytest.raises(ConfigError, match="local profile .*local.yaml: no such file; write it with `txlab calibrate`"):
        cfg(ONE_STEP, measure__hardware="local")
    with pytest.raises(ConfigError, match="measure.usd_per_device_hour: must be >= 0"):
        cfg(ONE_STEP, measure__hardware="h100-sxm", measure__usd_per_device_hour=-1.0)
    with pytest.raises(ConfigError, match="measure.usd_per_device_hour: prices the time predicted on measure.hardware"):
        cfg(ONE_STEP, measure__usd_per_device_hour=2.0)
    with pytest.raises(ConfigError, match="the time model predicts training steps"):
        cfg(ONE_STEP, measure__hardware="h100-sxm", workload__kind="prefill")


# --- the trace -----------------------------------------------------------------------------------------


def traced(**over):
    c = cfg(ONE_STEP, **{"workload__seq_len": 64, "measure__hardware": "a100-80g", "measure__device": "auto", **over})
    _, _, ops = traced_step_memory(resolve(c, estimate=True))
    return c, ops


def test_matmul_flops_equal_torchs_counter_and_attention_the_hand_formula():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from txlab.trial.build import build_trial
    from txlab.trial.fake import make_optimizer_state

    c = cfg(ONE_STEP, workload__seq_len=64, workload__batch_size=2, measure__device="cpu")
    setup = resolve(c, estimate=True)
    with FakeTensorMode():
        parts = build_trial(setup)
        make_optimizer_state(parts.optimizer)
        x, y = parts.data.next()
        with FlopCounterMode(display=False) as counter:
            ops = record_step(parts.step, parts.optimizer, x, y)
    counted = counter.get_flop_counts()["Global"]
    matmuls = {"mm", "addmm", "bmm"}
    torch_mm = sum(v for k, v in counted.items() if k.__name__ in matmuls)
    assert torch_mm > 0 and sum(op.flops for op in ops if op.cls == "matmul") == torch_mm
    # torch counts 0 for CPU SDPA (FACTS); ours: 4 B H T^2 D forward, the causal share, 2.5x backward
    attn = [op for op in ops if op.cls == "attention"]
    fwd = [op for op in attn if not op.backward and op.phase == "forward"]
    bwd = [op for op in attn if op.backward]
    B, H, T, D = 2, 4, 64, 16
    assert len(fwd) == len(bwd) == 2  # two layers
    assert fwd[0].flops == pytest.approx(4 * B * H * T * T * D * (T + 1) / (2 * T))
    assert bwd[0].flops == pytest.approx(2.5 * fwd[0].flops)
    assert causal_share(4, 4) == pytest.approx(10 / 16) and causal_share(2, 4) == pytest.approx(3 / 8)


def test_phases_recomputation_and_the_optimizer_are_traced():
    _, plain = traced()
    _, recomputed = traced(policy__name="checkpoint")
    for ops in (plain, recomputed):
        assert {op.phase for op in ops} == {"forward", "backward", "optimizer"}
        assert all(op.cls == "memory" for op in ops if op.phase == "optimizer")
    flops = {name: sum(op.flops for op in ops if op.cls == "matmul") for name, ops in (("p", plain), ("r", recomputed))}
    fwd_blocks = sum(op.flops for op in plain if op.cls == "matmul" and op.phase == "forward")
    assert flops["r"] > flops["p"] and flops["r"] - flops["p"] < fwd_blocks  # the blocks' forward again, not the head
    # a GPU profile's trace is the CUDA step: fused AdamW
    assert any("_fused_adamw" in op.name for op in plain)


def test_fsdp_trace_has_the_collectives_and_local_shards():
    _, one = traced(workload__batch_size=2)
    _, two = traced(workload__batch_size=2, parallel__fsdp=2)
    colls = [op for op in two if op.cls == "collective"]
    assert {op.coll for op in colls} == {"all_gather", "reduce_scatter"} and all(op.group == (0, 1) for op in colls)
    n_params = 2 * (12 * 64 * 64 + 13 * 64) + 64 * 64 + 64 * 64 + 2 * 64  # blocks, tied embedding, positions, norm
    gathered = sum(op.size for op in colls if op.coll == "all_gather" and op.phase == "forward")
    assert gathered == pytest.approx(n_params * 4, rel=0.05)  # every parameter gathered once forward, fp32
    adam = lambda ops: sum(op.read + op.write for op in ops if op.phase == "optimizer")  # noqa: E731
    assert adam(two) == pytest.approx(adam(one) / 2, rel=0.05)  # each rank steps its shard, not the DTensor's size
    assert any(op.waits >= 0 and two[op.waits].coll == "all_gather" for op in two)  # compute reads the gathered
    # the row's traffic: each fp32 gradient reduce-scattered once, a rank sending the half it does not keep
    sent = traffic(two)
    assert sent["reduce_scatter"] == pytest.approx(n_params * 4 / 2, rel=0.05)
    assert sent["all_gather"] >= gathered / 2 and sent["all_reduce"] == sent["all_to_all"] == 0
    assert set(traffic(one).values()) == {0}


# --- costs and the timeline ------------------------------------------------------------------------------


def op(cls, phase="forward", **kw):
    return Op("x", cls, phase, **kw)


def test_collectives_take_the_link_their_group_spans():
    p = load_profile("h100-sxm")
    c = Coster(p, "bf16")
    inside = op("collective", coll="all_gather", group=tuple(range(8)), size=8e9)
    across = dataclasses.replace(inside, group=tuple(range(16)))
    assert c.link(inside.group)[1] == "intra-node" and c.link(across.group)[1] == "network"
    assert wire_bytes(inside) == pytest.approx(7e9) and wire_bytes(across) == pytest.approx(7.5e9)
    reduce = dataclasses.replace(inside, coll="all_reduce")
    assert wire_bytes(reduce) == pytest.approx(14e9)
    # the row's traffic columns sum the same bytes per kind
    assert traffic([inside, across, reduce, op("matmul")]) == {"all_gather": 14_500_000_000, "reduce_scatter": 0,
                                                            "all_reduce": 14_000_000_000, "all_to_all": 0,
                                                            "kv_exchange": 0}  # fmt: skip
    e = p.efficiency
    assert c.collective(inside) == pytest.approx(e.comm_latency_s + 7e9 / (p.link_bw * e.comm))
    # across nodes a ring relays through the node: its 8 members' NICs carry it (no more than NVLink relays)
    assert c.collective(across) == pytest.approx(e.comm_latency_s + 7.5e9 / (min(p.link_bw, 8 * p.network_bw) * e.comm))
    one_per_node = dataclasses.replace(inside, group=tuple(range(0, 128, 8)))  # FSDP x TP 8: one GPU a node
    assert c.link(one_per_node.group) == (p.network_bw, "network")
    assert c.collective(dataclasses.replace(inside, group=(0,))) == 0.0


def test_matmul_efficiency_grows_with_shape_and_memory_bound_ops_cost_bytes():
    p = load_profile("a100-80g")
    c = Coster(p, "bf16")
    small = op("matmul", flops=2 * 64**3, dims=(64, 64, 64), dtype="bf16")
    large = op("matmul", flops=2 * 8192**3, dims=(8192, 8192, 8192), dtype="bf16")
    rate = lambda o: o.flops / c.op_time(o)  # noqa: E731
    assert rate(large) > 2 * rate(small) and rate(large) < p.peak("bf16") * p.efficiency.matmul
    mem = op("memory", read=2e9, write=1e9)
    assert c.op_time(mem) == pytest.approx(3e9 / (p.memory_bw * p.efficiency.memory))


def test_the_timeline_overlaps_gathers_and_scatters_and_waits_where_compute_reads():
    ag = op("collective", coll="all_gather", group=(0, 1), size=1, prefetch=True)
    rs = op("collective", "backward", coll="reduce_scatter", group=(0, 1), size=1, background=True)
    comp = op("memory")
    reads = dataclasses.replace(comp, waits=0)
    # the gather (2 s) is issued with the step; compute (1 s) that does not need it runs beside it; the op that
    # reads it waits: 2 + 1
    line = schedule([ag, comp, reads], [2.0, 1.0, 1.0], overlap=1.0)
    assert (line.step_s, line.compute_s, line.exposed_comm_s) == (3.0, 2.0, 1.0)
    # a CPU (overlap 0): everything in turn
    assert schedule([ag, comp, reads], [2.0, 1.0, 1.0], overlap=0.0).step_s == 4.0
    # a reduce-scatter hides behind the backward compute after it; the optimizer waits for it
    opt = op("memory", "optimizer")
    back = op("memory", "backward")
    line = schedule([rs, back, back, opt], [1.5, 1.0, 1.0, 0.5], overlap=1.0)
    assert (line.step_s, line.exposed_comm_s) == (2.5, 0.0)
    line = schedule([back, rs, opt], [1.0, 1.5, 0.5], overlap=1.0)
    assert (line.step_s, line.exposed_comm_s) == (3.0, 1.5)
    # forward gathers are issued one ahead: the second starts while the compute before the first's reader runs
    ag2 = dataclasses.replace(ag)
    line = schedule([ag, reads, ag2, dataclasses.replace(comp, waits=2)], [1.0, 1.0, 1.0, 1.0], overlap=1.0)
    assert line.step_s == 3.0  # gather 0-1, read 1-2, gather 1-2 (issued at 0, link free at 1), read 2-3


# --- rows ----------------------------------------------------------------------------------------------


def test_an_estimate_row_carries_the_predicted_columns(capsys):
    c = cfg(ONE_STEP, workload__seq_len=64, workload__batch_size=4, parallel__fsdp=2, workload__dtype="bf16",
            measure__hardware="h100-sxm", measure__usd_per_device_hour=3.0, measure__device="auto")  # fmt: skip
    row = estimate_trial(c)
    assert row["status"] == "ok" and row["measured"] is False and row["step_time_s"] is None
    assert row["hardware"] == "h100-sxm" and row["device"] == "NVIDIA H100 80GB HBM3"
    step = row["predicted_step_time_s"]
    assert step > 0 and row["predicted_tokens_per_s"] == pytest.approx(4 * 64 / step)
    peak = load_profile("h100-sxm").peak("bf16")
    assert row["predicted_mfu"] == pytest.approx(row["flops_per_token"] * row["predicted_tokens_per_s"] / (2 * peak))
    assert row["predicted_usd_per_mtok"] == pytest.approx(3.0 * 2 * step / 3600 / (4 * 64) * 1e6)
    assert 0 <= row["predicted_exposed_comm_s"] <= step
    assert row["comm_all_gather_bytes"] > 0 and row["comm_reduce_scatter_bytes"] > 0
    assert row["comm_all_reduce_bytes"] == row["comm_all_to_all_bytes"] == 0
    # a different device changes the prediction, not the memory estimate's inputs
    other = estimate_trial(dataclasses.replace(c, measure=dataclasses.replace(c.measure, hardware="l4")))
    assert other["predicted_step_time_s"] > step
    # without a profile: no prediction columns, the estimate as before
    plain = estimate_trial(cfg(ONE_STEP, workload__seq_len=64))
    assert plain["hardware"] is None and plain["predicted_step_time_s"] is None
    assert plain["comm_all_gather_bytes"] == plain["comm_reduce_scatter_bytes"] == 0  # traced: one device sends none


def test_txlab_estimate_prints_the_time_line(capsys):
    argv = ["estimate", "-", "--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "model.n_heads=4",
            "--set", "workload.seq_len=64", "--set", "measure.hardware=a100-80g"]  # fmt: skip
    assert main([a if a != "-" else str(REPO / "examples" / "debug.yaml") for a in argv]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("time "))
    assert "predicted on a100-80g: step" in line and "tokens/s per device" in line and "MFU" in line
    assert "exposed comm" in line and "no price" in line
    assert not any(x.startswith("comm ") for x in out.splitlines())  # one device sends nothing
    argv += ["--set", "parallel.fsdp=2", "--set", "workload.batch_size=2"]
    assert main([a if a != "-" else str(REPO / "examples" / "debug.yaml") for a in argv]) == 0
    comm = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("comm "))
    assert "sent per device per step (traced): all-gather " in comm and "reduce-scatter " in comm
    assert "all-reduce" not in comm and "all-to-all" not in comm


def local_profile(tmp_path, monkeypatch, rate_gflops=50.0):
    """A local CPU profile with flat measured tables (every matmul at `rate_gflops`)."""
    monkeypatch.setenv("TXLAB_HARDWARE_DIR", str(tmp_path))
    table = {
        "threads": 1,
        "matmul": {d: [[64, 64, 64, rate_gflops], [1024, 1024, 1024, rate_gflops]] for d in ("fp32", "bf16")},
        "attention": {d: [[64, 10.0, 10.0], [1024, 10.0, 10.0]] for d in ("fp32", "bf16")},
        "memory_gbps": {"elementwise": 10.0},
        "dram_gbps": 5.0,
        "fresh_gbps": 2.0,
        "op_overhead_us": 5.0,
        "collectives": {"all_gather": [100.0, 1.0], "reduce_scatter": [100.0, 1.0], "all_reduce": [100.0, 1.0]},
    }
    raw = {**GOOD, "name": "local", "kind": "cpu", "device_name": "cpu", "measured": [table]}
    local_path().parent.mkdir(parents=True, exist_ok=True)
    local_path().write_text(yaml.safe_dump(raw))
    return raw


def test_a_measured_row_gets_the_local_profiles_prediction_beside_its_time(tmp_path, monkeypatch):
    c = cfg(ONE_STEP, workload__seq_len=32)
    assert run_trial(c)["hardware"] is None  # no local profile here (conftest's empty directory)
    local_profile(tmp_path, monkeypatch)
    row = run_trial(c)
    assert row["status"] == "ok" and row["measured"] is True and row["trial_key"] == c.trial_key
    assert row["hardware"] == "local" and row["step_time_s"] > 0 and row["predicted_step_time_s"] > 0
    assert row["predicted_step_time_s"] != row["step_time_s"]
    slower = local_profile(tmp_path / "slow", monkeypatch, rate_gflops=5.0)
    assert slower["measured"][0]["matmul"]["fp32"][0][3] == 5.0
    assert run_trial(c)["predicted_step_time_s"] > row["predicted_step_time_s"]
    # a local profile of another device does not apply to this one
    raw = yaml.safe_load(local_path().read_text())
    local_path().write_text(yaml.safe_dump({**raw, "device_name": "NVIDIA H100 80GB HBM3", "kind": "cuda"}))
    assert run_trial(c)["hardware"] is None


def test_a_local_profiles_tables_price_ops_by_what_was_measured(tmp_path, monkeypatch):
    local_profile(tmp_path, monkeypatch)
    p = load_profile("local")
    c = Coster(p, "fp32", threads=1)
    mm = op("matmul", flops=2e9, dims=(1024, 1024, 1024), dtype="fp32")
    assert c.op_time(mm) == pytest.approx(2e9 / 50e9 + 5e-6)
    big = op("memory", read=2e9, write=1e9, fresh=1e9)
    assert c.op_time(big) == pytest.approx(3e9 / 5e9 + 1e9 / 2e9 + 5e-6)  # large tensors: DRAM, new pages
    ag = op("collective", coll="all_gather", group=(0, 1), size=2e9)
    assert c.op_time(ag) == pytest.approx(1e-4 + 1e9 / 1e9)


def test_tanh_gelu_is_priced_at_its_own_measured_rate_and_older_profiles_fall_back(tmp_path, monkeypatch):
    _, ops = traced()
    gelus = [o for o in ops if "gelu" in o.name]  # GPT-2's gelu_new: the tanh form, forward and backward
    assert {o.phase for o in gelus} == {"forward", "backward"} and {o.family for o in gelus} == {"gelu_tanh"}
    raw = local_profile(tmp_path, monkeypatch)
    gelu = op("memory", read=1e6, write=1e6, family="gelu_tanh")
    for rates, gbps in (({"transcendental": 4.0}, 4.0), ({"transcendental": 4.0, "gelu_tanh": 2.0}, 2.0)):
        raw["measured"][0]["memory_gbps"] = {"elementwise": 10.0, **rates}
        local_path().write_text(yaml.safe_dump(raw))
        assert Coster(load_profile("local"), "fp32", threads=1).op_time(gelu) == pytest.approx(
            2e6 / (gbps * 1e9) + 5e-6
        )


def test_txlab_calibrate_writes_a_profile_that_loads(tmp_path, capsys):
    out = tmp_path / "cal" / "local.yaml"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "matmul GFLOP/s" in text
    p = load_profile(str(out))
    assert p.kind == "cpu" and p.device_name == "cpu" and p.measured
    t = p.tables(1)
    assert t["threads"] == 1 and all(r[3] > 0 for r in t["matmul"]["fp32"]) and t["collectives"]["all_gather"][1] > 0
    assert math.isclose(p.peak("fp32"), max(r[3] for r in p.tables(None)["matmul"]["fp32"]) * 1e9, rel_tol=1e-3)
    assert not list(out.parent.glob(".*tmp*"))  # written whole: no temporary left


def test_mfu_reads_the_catalogue_peaks():
    from txlab.measure.throughput import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == load_profile("h100-sxm").peak("bf16")
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == load_profile("a100-80g").peak("fp32")


# --- the benchmarks' own logic (benchmarks/time_model.py, benchmarks/time_model_anchors.py) ----------------


def _benchmark(name):
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(name)


def test_every_published_anchor_is_a_valid_config_and_the_sets_are_apart():
    from txlab.config import load_config

    bench = _benchmark("time_model_anchors")
    roles = {a["role"] for a in bench.ANCHORS}
    assert roles == {"calibration", "ratio", "check"}
    assert len([a for a in bench.ANCHORS if a["role"] == "check"]) >= 5
    for a in bench.ANCHORS:
        c = load_config(None, bench.config(a))
        assert c.parallel.fsdp * c.parallel.tp == a["gpus"]
        assert c.workload.batch_size == c.parallel.fsdp * a["local_batch"]
        assert "h100_202412" not in a["source"]  # torchtitan's H100 benchmark file stays the independent check


def test_the_ordering_check_counts_only_pairs_apart_beyond_their_spread():
    bench = _benchmark("time_model")
    row = lambda name, s, spread, pred: dict(name=name, layers=2, tokens=1024, ranks=1, cpu_s=s,  # noqa: E731
                                             cpu_spread_s=spread, predicted_s=pred)  # fmt: skip
    rows = [row("a", 1.0, 0.1, 1.0), row("b", 2.0, 0.1, 1.5), row("c", 2.05, 0.1, 0.5)]
    pairs, ok, wrong = bench.ordering(rows, "cpu")
    # a-b and a-c are apart beyond the spread, b-c are not; the prediction orders a-b as measured, a-c not
    assert (pairs, ok, wrong) == (2, 1, ["a vs c (2L 1024 tok, 1 rank)"])


def test_tensor_parallel_collectives_are_on_the_tp_group_and_hold_compute():
    _, ops = traced(workload__batch_size=2, parallel__fsdp=2, parallel__tp=2, workload__dtype="bf16")
    colls = [o for o in ops if o.cls == "collective"]
    tp = [o for o in colls if o.group == (0, 1)]  # tp innermost: ranks 0 and 1
    fsdp = [o for o in colls if o.group == (0, 2)]
    assert tp and fsdp and not any(o.prefetch or o.background for o in tp)
    assert any(o.prefetch for o in fsdp) and any(o.background for o in fsdp)
    assert any(o.waits >= 0 and ops[o.waits] in tp for o in ops)  # compute reads TP's outputs
    # a TP reduce-scatter (sequence parallelism) is waited for, an unprefetched gather is not issued ahead
    rs = op("collective", coll="reduce_scatter", group=(0, 1), size=1)
    ag = op("collective", coll="all_gather", group=(0, 1), size=1)
    reads = op("memory", waits=1)
    assert schedule([op("memory"), rs, reads], [1.0, 2.0, 1.0]).step_s == 4.0
    assert schedule([ag, op("memory"), ag, op("memory", waits=2)], [1.0, 1.0, 1.0, 1.0]).step_s == 3.0


def test_experts_grouped_matmuls_are_matmuls():
    _, ops = traced(model__mlp="moe", model__moe_experts=4, model__moe_top_k=2, model__moe_hidden=32)
    experts = [o for o in ops if "expert_mm" in o.name]
    assert experts and all(o.cls == "matmul" for o in experts)
    fwd = [o for o in experts if o.phase == "forward"]
    # the gate/up GEMM: M = 64 tokens x top-2 rows, N = 2 x 32 (gate and up), K = d_model 64
    assert 2.0 * (64 * 2) * (2 * 32) * 64 in {o.flops for o in fwd}


def _real_traffic(rank: int, world: int, c) -> dict:
    """The comm bytes of one real step of `c` on rank `rank` (gloo): its collectives recorded by the time model's
    Recorder on real tensors, after one warm-up step."""
    import torch
    import torch.distributed as dist

    from txlab.parallel.fsdp import make_ranks
    from txlab.timemodel.trace import record_step, traffic
    from txlab.trial.build import build_trial

    torch.set_num_threads(1)
    setup = resolve(c)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks = make_ranks(rank, setup.layout.fsdp, setup.layout.tp, "cpu", setup.layout.cp)
        parts = build_trial(setup, ranks=ranks)
        parts.step(*parts.data.next())
        # the K/V exchange's group as the real mesh has it (the estimate takes it from the layout's arithmetic)
        cp_group = tuple(dist.get_process_group_ranks(ranks.cp_mesh.get_group())) if ranks.cp > 1 else ()
        return traffic(record_step(parts.step, parts.optimizer, *parts.data.next()), cp_group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "layout", [{"parallel__fsdp": 2}, {"parallel__tp": 2, "parallel__sequence_parallel": False}, {"parallel__cp": 2}]
)
def test_an_estimates_traffic_is_what_the_real_step_sends(layout):
    """The comm_*_bytes an estimate counts on fake tensors equal, to the byte, those of the real step's
    collectives on each rank (FSDP's gathers and reduce-scatters; TP's all-reduces; CP's K/V exchange, and
    FSDP2's collectives over the same two ranks, which are not part of it)."""
    from tests.support import SHARDED
    from txlab.parallel.launch import spawn_ranks

    c = cfg(SHARDED, **layout)
    real = spawn_ranks(_real_traffic, 2, (c,))
    assert all(isinstance(r, dict) for r in real), real
    row = estimate_trial(c)
    counted = {k: row[f"comm_{k}_bytes"] for k in real[0]}
    assert real[0] == real[1] == counted and sum(counted.values()) > 0
    assert (counted["all_reduce"] > 0) == ("parallel__tp" in layout)
    if "parallel__cp" in layout:  # FSDP2's collectives over the same two ranks are not part of the K/V exchange
        assert 0 < counted["kv_exchange"] < counted["all_gather"] + counted["reduce_scatter"]
    else:
        assert counted["kv_exchange"] == 0


def test_a_measured_sharded_row_gets_the_prediction_of_its_layout(tmp_path, monkeypatch):
    from tests.support import SHARDED

    local_profile(tmp_path, monkeypatch)
    c = cfg(SHARDED, parallel__fsdp=2)
    row = run_trial(c)
    assert row["status"] == "ok" and row["measured"] is True and row["step_time_s"] > 0
    assert row["hardware"] == "local" and row["predicted_step_time_s"] > row["predicted_exposed_comm_s"] > 0
    assert row["predicted_tokens_per_s"] == pytest.approx(4 * 32 / row["predicted_step_time_s"])
    estimate = estimate_trial(c)  # the measured row's collectives are its layout's: the estimate's bytes
    traffic_columns = [k for k in row if k.startswith("comm_") and k.endswith("_bytes") and k != "comm_bytes"]
    assert len(traffic_columns) == 5 and row["comm_reduce_scatter_bytes"] > 0 and row["comm_kv_exchange_bytes"] == 0
    assert all(row[k] == estimate[k] for k in traffic_columns)
