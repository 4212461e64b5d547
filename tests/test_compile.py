"""`workload.compile: true`: the model compiled (torch.compile) under every policy keeps the reference's loss
and gradients, and a compiled trial reports its compile time apart from its step time."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.support import NARROW, REFERENCE, config
from txlab.model.gpt import GPT
from txlab.policy.apply import apply_policy

# grouped KV (one K/V head) and RoPE, no dropout
MODEL = {**NARROW, "model.n_kv_heads": 1, "model.pos": "rope", "model.dropout": 0.0, "workload.seq_len": 24}
PLAN = [(0, 1, "selective"), (1, 2, "full")]


def _loss_and_grads(over: dict, backend: str | None):
    cfg = config({**MODEL, **over})
    torch.manual_seed(1)
    model = GPT(cfg.model, cfg.workload.seq_len)
    params = dict(model.named_parameters())
    loss_fn = apply_policy(model, cfg.policy, plan=PLAN if cfg.policy.remat == "planned" else None)
    if backend is not None:
        model.compile(backend=backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (1, 24), generator=g), torch.randint(0, 50, (1, 24), generator=g)
    loss = loss_fn(model(x), model.lm_head.weight, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("preset", ["naive", "sdpa", "checkpoint", "selective", "recompute", "planned"])
def test_every_policy_compiles_exactly(preset):
    """Traced by dynamo and AOTAutograd (the `aot_eager` backend: inductor's inputs without its code
    generation, seconds instead of minutes): same loss and gradients as the eager reference."""
    torch._dynamo.reset()
    ref_loss, ref_grads = _loss_and_grads(REFERENCE, None)
    over = {"policy.name": preset, **({"policy.loss_chunk": 7} if preset == "recompute" else {})}  # chunks it reads
    if preset == "planned":
        over["measure.budget_gib"] = 1.0
    loss, grads = _loss_and_grads(over, "aot_eager")
    assert abs(loss - ref_loss).item() <= 1e-5 * abs(ref_loss).item()
    for name, g in grads.items():
        assert ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() <= 1e-4, name


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_a_compiled_trial_reports_compile_time_apart():
    """Inductor on the CPU: the trial is ok, the compiling first step is reported as compile_s and kept
    out of the step time (the median of the timed steps)."""
    from txlab.trial import run_trial

    torch._dynamo.reset()
    over = {
        **{k: v for k, v in MODEL.items() if k != "workload.seq_len"},
        "workload.seq_len": 32,
        "workload.steps": 2,
        "workload.warmup_steps": 1,
        "policy.name": "recompute",
        "measure.device": "cpu",
    }
    row = run_trial(config({**over, "workload.compile": True}))
    assert row["status"] == "ok", row["error"]
    assert row["compile_s"] is not None and row["compile_s"] >= 0
    assert row["step_time_s"] > 0 and row["duration_s"] > row["compile_s"] + row["step_time_s"]
    # the compiling step is the first warm-up step: eager takes the same steps on the same batches, so
    # the two report the same training's loss (6e-8 apart here; one step more or less moves it 1e-5)
    eager = run_trial(config(over))
    assert eager["status"] == "ok" and eager["compile_s"] is None
    assert eager["loss"] == pytest.approx(row["loss"], rel=1e-6)
