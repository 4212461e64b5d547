"""Prefill and decode under every KV policy: same logits and greedy tokens as the cache, KV bytes, trials."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tests.support import INFERENCE, config
from txlab.cli import main
from txlab.model.decode import Inference, generate_greedy, kv_cache_analytic_bytes
from txlab.policy.apply import apply_policy
from txlab.trial import run_trial
from txlab.trial.infer import build_model
from txlab.trial.resolve import resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)

PROMPT, NEW = 40, 6
# Decoding NEW tokens after a PROMPT-token prompt on the CPU.
DECODE = {
    **INFERENCE,
    "workload.kind": "decode",
    "workload.seq_len": PROMPT,
    "workload.decode_tokens": NEW,
    "measure.device": "cpu",
}


def _prompt(cfg, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (batch, cfg.workload.seq_len), generator=g)


MODELS = {
    "mha-learned-gelu": {},
    "gqa-rope-swiglu": {"model.n_kv_heads": 2, "model.pos": "rope", "model.mlp": "swiglu", "model.norm": "rmsnorm"},
    "mqa-learned": {"model.n_kv_heads": 1},
}


@pytest.mark.parametrize("shape", list(MODELS))
def test_every_kv_policy_gives_the_cache_logits_and_greedy_tokens(shape):
    cfg = config(
        {
            **INFERENCE,
            **MODELS[shape],
            "workload.kind": "decode",
            "workload.seq_len": PROMPT,
            "workload.decode_tokens": NEW,
        }
    )
    model = build_model(resolve(cfg))
    prompt = _prompt(cfg)
    ref_tokens, ref_logits, _ = generate_greedy(model, prompt, NEW, kv="cache")
    ref_logits = torch.stack(ref_logits)  # (NEW + 1, B, V)
    # the cache itself against the model's own forward over the whole generated sequence
    full = torch.cat([prompt, ref_tokens], dim=1)
    with torch.no_grad():
        whole = F.linear(model(full), model.lm_head.weight)[:, PROMPT - 1 :].transpose(0, 1)
    torch.testing.assert_close(ref_logits, whole, rtol=1e-4, atol=1e-5)
    cases = [
        ("cache", "math", 7),
        ("cache", "chunked", 7),
        # recompute: tiles of one position, ragged tiles, one tile covering the whole context
        ("recompute", "sdpa", 1),
        ("recompute", "chunked", 7),
        ("recompute", "math", PROMPT + NEW),
    ]
    if cfg.model.n_kv_heads < cfg.model.n_heads:
        cases += [("grouped", "sdpa", 7), ("grouped", "chunked", 7)]
    for kv, attention, k_chunk in cases:
        policy = dataclasses.replace(cfg.policy, kv=kv, attention=attention, q_chunk=16, k_chunk=k_chunk)
        apply_policy(model, policy)  # the prefill kernel is the model's, set from outside as in a trial
        tokens, logits, _ = generate_greedy(model, prompt, NEW, kv=kv, k_chunk=k_chunk)
        assert torch.equal(tokens, ref_tokens), (kv, attention, k_chunk)
        torch.testing.assert_close(torch.stack(logits), ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kv,n_kv_heads", [("cache", 4), ("grouped", 2), ("grouped", 1), ("recompute", 4), ("recompute", 2)]
)
def test_kv_cache_bytes_are_the_analytic_size(kv, n_kv_heads):
    cfg = config({**DECODE, "model.n_kv_heads": n_kv_heads, "policy.kv": kv})
    model = build_model(resolve(cfg))
    _, _, run = generate_greedy(model, _prompt(cfg, batch=1), NEW, kv=kv, k_chunk=cfg.policy.k_chunk)
    m = cfg.model
    T = PROMPT + NEW
    analytic = kv_cache_analytic_bytes(m.n_layers, m.n_kv_heads, m.d_model // m.n_heads, T, 4)
    if kv == "recompute":
        assert run.kv_cache_bytes == 0
        assert run.kv_inputs_bytes == m.n_layers * T * m.d_model * 4  # what it keeps instead
    else:
        assert run.kv_cache_bytes == analytic
        assert run.kv_inputs_bytes == 0


def test_grouped_cache_shrinks_by_the_head_ratio():
    sizes = {}
    for n_kv in (4, 2, 1):
        cfg = config({**DECODE, "model.n_kv_heads": n_kv, "policy.kv": "cache" if n_kv == 4 else "grouped"})
        sizes[n_kv] = Inference(build_model(resolve(cfg)), PROMPT, 1, kv=cfg.policy.kv).kv_cache_bytes
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


def test_step_past_the_end_is_refused():
    cfg = config(DECODE)
    run = Inference(build_model(resolve(cfg)), PROMPT, 1, kv=cfg.policy.kv)
    run.prefill(_prompt(cfg, batch=1))
    with pytest.raises(ValueError, match="all are used"):
        run.step(torch.tensor([1]))


# --- trials -------------------------------------------------------------------------------------


def test_prefill_trial_row():
    cfg = config(
        {
            **DECODE,
            "workload.kind": "prefill",
            "workload.steps": 1,
            "workload.warmup_steps": 0,
            "policy.attention": "chunked",
            "policy.q_chunk": 8,
            "policy.k_chunk": 8,
        }
    )
    row = run_trial(cfg)
    assert row["status"] == "ok", row["error"]
    m = cfg.model
    assert row["kv_cache_bytes"] == kv_cache_analytic_bytes(m.n_layers, m.n_kv_heads, m.d_model // m.n_heads, PROMPT, 4)
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "kv_cache_bytes", "other_bytes")
    assert sum(row[k] for k in parts) == row["peak_bytes"]  # the KV cache is a breakdown column of the peak
    assert row["grads_bytes"] == 0 and row["optimizer_bytes"] == 0
    assert row["params_bytes"] == row["weight_bytes"] == row["weight_bytes_fp"]
    assert row["prefill_time_s"] > 0 and row["step_time_s"] == row["prefill_time_s"]
    assert row["tokens_per_s"] == pytest.approx(PROMPT / row["prefill_time_s"])
    assert row["time_per_token_s"] is None and row["kv_inputs_bytes"] is None and row["logit_rel_error"] is None


def test_decode_trial_rows_and_recompute_holds_less():
    rows = {}
    for kv in ("cache", "recompute"):
        cfg = config(
            {
                **DECODE,
                "model.n_layers": 6,
                "workload.seq_len": 128,
                "workload.decode_tokens": 4,
                "workload.steps": 1,
                "workload.warmup_steps": 0,
                "policy.kv": kv,
                **({"policy.k_chunk": 32} if kv == "recompute" else {}),  # the tile recompute reads
            }
        )
        rows[kv] = row = run_trial(cfg)
        assert row["status"] == "ok", row["error"]
        assert row["time_per_token_s"] > 0 and row["step_time_s"] == row["time_per_token_s"]
        assert row["tokens_per_s"] == pytest.approx(1 / row["time_per_token_s"])
    m = cfg.model
    assert rows["cache"]["kv_cache_bytes"] == kv_cache_analytic_bytes(
        m.n_layers, m.n_kv_heads, m.d_model // m.n_heads, 132, 4
    )
    assert rows["recompute"]["kv_cache_bytes"] == 0
    assert rows["recompute"]["kv_inputs_bytes"] == m.n_layers * 132 * m.d_model * 4
    assert rows["recompute"]["peak_bytes"] < rows["cache"]["peak_bytes"]


def test_decode_bf16_keeps_a_2_byte_cache():
    cfg = config({**DECODE, "workload.dtype": "bf16", "workload.steps": 1, "workload.warmup_steps": 0})
    row = run_trial(cfg)
    assert row["status"] == "ok", row["error"]
    m = cfg.model
    assert row["kv_cache_bytes"] == kv_cache_analytic_bytes(
        m.n_layers, m.n_kv_heads, m.d_model // m.n_heads, PROMPT + NEW, 2
    )


def test_decode_over_budget_is_a_status():
    row = run_trial(config({**DECODE, "measure.budget_gib": 0.0001, "workload.steps": 1, "workload.warmup_steps": 0}))
    assert row["status"] == "over_budget"


def test_training_row_leaves_inference_columns_null():
    row = run_trial(
        config(
            {
                **INFERENCE,
                "workload.seq_len": 16,
                "workload.steps": 1,
                "workload.warmup_steps": 0,
                "measure.device": "cpu",
            }
        )
    )
    assert row["status"] == "ok"
    for k in (
        "kv_cache_bytes",
        "kv_inputs_bytes",
        "prefill_time_s",
        "time_per_token_s",
        "weight_bytes",
        "logit_rel_error",
        "next_token_agreement",
    ):
        assert row[k] is None, k


# --- command line ---------------------------------------------------------------------------------


def _sets(**over):
    out = []
    for k, v in {**INFERENCE, "measure.device": "cpu", "workload.steps": 1, "workload.warmup_steps": 0, **over}.items():
        out += ["--set", f"{k}={v}"]
    return out


def test_cli_runs_prefill_and_decode(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workload: {seq_len: 32}\n")
    assert main(["run", str(cfg), *_sets(**{"workload.kind": "prefill"}), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["workload.kind"] == "prefill" and row["kv_cache_bytes"] > 0
    store = tmp_path / "store"
    assert (
        main(
            [
                "run",
                str(cfg),
                *_sets(**{"workload.kind": "decode", "workload.decode_tokens": 3, "policy.kv": "recompute"}),
                "--store",
                str(store),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "decode    3 tokens" in out
        and "kv recompute (tiles of 32)" in out
        and "kv        K/V held 0.000 GiB, layer inputs kept" in out
    )
    from txlab.results.store import read_store

    df = read_store(str(store))
    assert list(df["workload.kind"]) == ["decode"] and int(df["kv_cache_bytes"].iloc[0]) == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run"], "model.quant: 'int4' is inference only"),
        (["estimate"], "workload.kind: txlab estimate predicts training steps only"),
    ],
)
def test_cli_bad_inference_input_exits_2(tmp_path, capsys, args, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workload: {seq_len: 32}\n")
    extra = {"model.quant": "int4"} if args == ["run"] else {"workload.kind": "decode"}
    assert main([*args, str(cfg), *_sets(**extra)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


# --- analysis of inference rows -------------------------------------------------------------------------

GIB = 2**30


def _row(kind, T, peak, kv="cache", policy="sdpa", status="ok", step=1.0, kv_bytes=None):
    return {
        "trial_key": f"{kind}-{kv}-{policy}-{T}",
        "sweep": "hand",
        "status": status,
        "policy.name": policy,
        "policy.attention": "sdpa",
        "policy.kv": kv,
        "model.n_layers": 2,
        "model.size": "debug",
        "workload.seq_len": T,
        "workload.kind": kind,
        "device": "cpu",
        "measured": True,
        "peak_bytes": int(peak * GIB),
        "step_time_s": step,
        "params_bytes": int(0.1 * GIB),
        "activations_bytes": 0,
        "other_bytes": 0,
        "kv_cache_bytes": kv_bytes,
    }


def _store():
    return pd.DataFrame(
        [
            _row("train", 1024, 0.8),
            _row("train", 2048, 1.6),
            _row("train", 1024, 0.5, policy="checkpoint", step=1.5),
            _row("decode", 1024, 0.3, kv_bytes=int(0.2 * GIB)),
            _row("decode", 4096, 0.9, kv_bytes=int(0.8 * GIB)),
            _row("decode", 8192, 1.7, kv_bytes=int(1.6 * GIB)),
            _row("decode", 1024, 0.2, kv="recompute", step=3.0, kv_bytes=0),
            _row("decode", 8192, 0.9, kv="recompute", step=9.0, kv_bytes=0),
        ]
    )


def test_frontier_and_baseline_handle_decode_rows():
    from txlab.analysis.frontier import frontier, versus_baseline

    fr = frontier(_store(), budgets=[1])
    got = {(r.setting, r.policy): r.longest_feasible_seq_len for r in fr.itertuples()}
    assert got == {  # decode: the longest prompt that fits; the kv policy names the line; train rows unchanged
        ("kind=decode", "sdpa (kv=cache)"): 4096,
        ("kind=decode", "sdpa (kv=recompute)"): 8192,
        ("kind=train", "sdpa"): 1024,
        ("kind=train", "checkpoint"): 1024,
    }
    vs = versus_baseline(_store())
    dec = vs[vs["setting"] == "kind=decode"]
    assert list(dec["policy"]) == ["sdpa (kv=recompute)", "sdpa (kv=recompute)"]
    assert set(dec["baseline"]) == {"sdpa (kv=cache)"}
    assert list(dec["time_overhead"]) == [3.0, 9.0]
    assert set(vs[vs["setting"] == "kind=train"]["baseline"]) == {"sdpa"}


def test_plots_draw_mixed_training_and_inference_rows():
    from txlab.analysis.plots import Skipped, all_figures

    figs = all_figures(_store(), budgets=[1])
    for name in ("memory_vs_length", "memory_breakdown", "frontier_heatmap", "frontier_steps", "time_vs_memory"):
        assert not isinstance(figs[name], Skipped), (name, figs[name])
    labels = [t.get_text() for t in figs["memory_breakdown"].legends[0].get_texts()]
    assert "kv_cache" in labels
    ylabels = {ax.get_ylabel() for ax in figs["time_vs_memory"].axes if ax.get_visible()}
    assert "time per generated token (s)" in ylabels
    train_only = all_figures(_store().query("`workload.kind` == 'train'"), budgets=[1])
    labels = [t.get_text() for t in train_only["memory_breakdown"].legends[0].get_texts()]
    assert "kv_cache" not in labels  # training plots as before
