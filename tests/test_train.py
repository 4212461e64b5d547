"""Trainer: schedule, decay groups, learning, memorisation, resume, policies, accumulation, divergence."""

import json
import math

import pytest
import torch

from tests.support import cfg
from txlab.config import ConfigError, TrainConfig
from txlab.model.gpt import GPT
from txlab.runtime.optim import make_adamw
from txlab.train import loop as train_mod
from txlab.train.loop import lr_at, train

pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def _curve(result) -> list[float]:
    return [r["loss"] for r in result.history if r["split"] == "train"]


def test_schedule_warms_up_holds_and_decays_to_min_lr():
    t = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup=10, hold=20)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:30])
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:])) and lrs[99] == pytest.approx(0.1, abs=1e-3)
    assert lrs[30 + 35] == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(500, t) == 0.1


def test_weight_decay_on_matrices_embeddings_included_not_on_norms_or_biases():
    model = GPT(cfg().model, 64)
    opt = make_adamw(model, torch.device("cpu"), weight_decay=0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert names == matrices and {"wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight"} <= names
    assert not any(
        id(p) in decayed for p in (model.norm_f.weight, model.blocks[0].norm1.bias, model.blocks[0].mlp.fc.bias)
    )
    # every parameter exactly once (the tied lm_head is the token embedding), in one of the two groups
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.1


def test_trials_and_training_build_the_same_adamw():
    """One builder: `txlab train` passes its schedule's values, a trial the defaults; same groups."""
    model = GPT(cfg().model, 64)
    t = TrainConfig(weight_decay=0.05, lr=1e-3, beta1=0.8, beta2=0.9)
    trained = make_adamw(model, torch.device("cpu"), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    trial = make_adamw(model, torch.device("cpu"))
    for a, b in zip(trained.param_groups, trial.param_groups, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
    assert trained.param_groups[0]["weight_decay"] == 0.05 and trained.param_groups[0]["betas"] == (0.8, 0.9)
    assert trial.param_groups[0]["lr"] == 3e-4 and trial.param_groups[0]["betas"] == (0.9, 0.95)


def test_a_short_run_learns_real_text(tmp_path):
    r = train(cfg(data__source="corpus", train__steps=40, train__warmup=5, train__lr=3e-3), tmp_path, progress=False)
    assert r.status == "done" and r.step == 40
    first, last = r.first_eval, r.last_eval
    assert first["loss"] > 5.0 and last["loss"] < first["loss"] - 1.5, (first, last)
    assert last["bits_per_byte"] < first["bits_per_byte"] - 2.0 and last["accuracy"] > first["accuracy"] + 0.05
    assert r.unigram_bits_per_byte == pytest.approx(4.7, abs=0.4)  # the context-free baseline of this text
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, 41))
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.yaml").exists()


def test_memorises_a_handful_of_short_sequences(tmp_path):
    lines = [
        "the cat sat on the mat.",
        "a stitch in time saves nine.",
        "all that glitters is not gold.",
        "to be or not to be, that is the question.",
    ]
    (tmp_path / "m.txt").write_text("\n".join(lines))
    c = cfg(
        data__source=f"text:{tmp_path}/m.txt",
        data__val_fraction=0.0,
        workload__seq_len=32,
        workload__batch_size=4,
        train__steps=150,
        train__warmup=10,
        train__lr=3e-3,
        train__min_lr=3e-4,
        train__weight_decay=0.0,
    )
    r = train(c, tmp_path / "run", progress=False)
    assert r.first_eval["accuracy"] < 0.2 and r.last_eval["accuracy"] >= 0.9, r.last_eval


def test_a_resumed_run_continues_the_same_loss_curve(tmp_path):
    c = cfg(data__source="corpus", train__steps=8, train__warmup=2, train__lr=3e-3, model__dropout=0.1)
    straight = _curve(train(c, tmp_path / "a", progress=False))
    first = train(c, tmp_path / "b", progress=False, stop_after=4)
    assert first.status == "stopped" and first.step == 4
    second = train(c, tmp_path / "b", progress=False)
    assert second.status == "done" and second.step == 8
    assert _curve(first) + _curve(second) == straight  # bit for bit: weights, AdamW, data position, dropout RNG
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "train"
    ]
    assert steps == list(range(1, 9))
    evals = [
        json.loads(x)["step"]
        for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "val"
    ]
    assert evals == [0, 4, 8]  # the resumed run does not evaluate step 4 twice
    with pytest.raises(ConfigError, match="holds a run of a different config"):
        train(cfg(data__source="corpus", train__steps=8, train__lr=1e-3), tmp_path / "b", progress=False)


@pytest.mark.parametrize(
    "policy",
    [
        {"policy.name": "checkpoint"},
        {"policy.name": "recompute", "policy.loss_chunk": 32},
    ],
)
def test_every_memory_policy_trains_the_same_curve(tmp_path, policy):
    base = dict(data__source="corpus", train__steps=6, train__warmup=2, train__lr=3e-3)
    ref = _curve(train(cfg(**base), tmp_path / "sdpa", progress=False))
    got = _curve(
        train(cfg(**base, **{k.replace(".", "__"): v for k, v in policy.items()}), tmp_path / "p", progress=False)
    )
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5) and ref[-1] < ref[0]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    base = dict(data__source="corpus", train__steps=4, train__warmup=1, train__lr=3e-3)
    big = _curve(train(cfg(**base, workload__batch_size=8), tmp_path / "big", progress=False))
    acc = _curve(train(cfg(**base, workload__batch_size=4, train__grad_accum=2), tmp_path / "acc", progress=False))
    assert acc == pytest.approx(big, rel=1e-5)


def test_a_non_finite_loss_stops_the_run_without_stepping(tmp_path, monkeypatch):
    real = train_mod.apply_policy
    calls = {"n": 0}

    def poisoned(model, policy):
        loss_fn = real(model, policy)

        def fn(hidden, weight, targets):
            calls["n"] += 1
            loss = loss_fn(hidden, weight, targets)
            return loss * float("nan") if calls["n"] == 3 else loss

        return fn

    monkeypatch.setattr(train_mod, "apply_policy", poisoned)
    r = train(cfg(data__source="corpus", train__steps=10, train__warmup=1), tmp_path, progress=False)
    assert r.status == "diverged" and r.step == 2 and "not finite" in r.message
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing saved from the poisoned step
    assert math.isfinite(r.last_eval["loss"])


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("examples/train_*.yaml")))
def test_shipped_training_configs_load(path):
    from txlab.config import load_config

    c = load_config(path)
    assert c.workload.kind == "train" and c.data.source != "synthetic"
