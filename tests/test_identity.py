"""Trial keys across versions (docs/design.md, "Trial keys"): the 0.1 keys stay byte for byte, a key added
later with a default that reproduces the old behaviour leaves every key at that default unchanged, and a
trial that sets it gets a new key."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from txlab.config import TrialConfig, build_config, canonical, trial_key
from txlab.config.identity import RUN_ONLY, SINCE, since_keys
from txlab.config.schema import PolicyConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Every config key that entered the trial key in txlab 0.1 (commit f016620). A key not listed here must be
# marked `since` (or run-only): then it enters the hash only when set away from its default.
KEYS_V0_1 = frozenset(
    """data.source data.text_column data.tokenizer data.val_fraction measure.budget_gib measure.device
    model.d_model model.dropout model.mlp model.n_heads model.n_kv_heads model.n_layers model.n_positions
    model.norm model.pos model.quant model.quant_group model.size model.tie_weights model.vocab_size
    policy.attention policy.k_chunk policy.kv policy.loss policy.loss_chunk policy.name policy.q_chunk
    policy.remat policy.remat_every seed train.beta1 train.beta2 train.decay train.eval_batches
    train.eval_every train.grad_accum train.grad_clip train.hold train.lr train.min_lr train.steps train.warmup
    train.weight_decay workload.batch_size workload.compile workload.decode_tokens workload.dtype workload.kind
    workload.seq_len workload.steps workload.warmup_steps""".split()
)


# Keys of 0.1 that changed on purpose because a preset computes something else since (docs/design.md, "Trial
# keys": a different computation, a different key): 0.1 key -> (why, the key now). Nothing else may change.
CHANGED_ON_PURPOSE = {
    "c9d3dc38bbfed241": (
        "0.2, issue 17: the recompute preset resolves to policy.attention sdpa (was chunked)",
        "f84a61d258af59a3",
    ),
}


def test_keys_of_release_0_1_are_unchanged():
    """Keys computed by txlab 0.1 for a spread of configs (training, inference, int4, GQA, custom policy,
    train section, budgets, presets): the current code gives the same 16 hex digits for each, except the
    trials of a preset whose computation changed (CHANGED_ON_PURPOSE), which get the new key pinned there."""
    golden = json.loads((FIXTURES / "trial_keys_v0_1.json").read_text())
    assert len(golden["cases"]) >= 10
    for case in golden["cases"]:
        want = CHANGED_ON_PURPOSE.get(case["trial_key"], (None, case["trial_key"]))[1]
        assert build_config(case["config"]).trial_key == want, case["config"]
    assert set(CHANGED_ON_PURPOSE) <= {c["trial_key"] for c in golden["cases"]}


def test_the_changed_recompute_case_differs_only_in_the_attention_kernel():
    """The one 0.1 case whose key changed: with 0.1's kernel written explicitly (`policy.attention: chunked`)
    the same config resolves to 0.1's values and gets 0.1's key; the two differ in the kernel only."""
    golden = json.loads((FIXTURES / "trial_keys_v0_1.json").read_text())
    (case,) = [c for c in golden["cases"] if c["trial_key"] in CHANGED_ON_PURPOSE]
    now = canonical(build_config(case["config"]))
    raw = json.loads(json.dumps(case["config"]))
    raw["policy"]["attention"] = "chunked"
    then = build_config(raw)
    assert then.trial_key == case["trial_key"]
    assert {k for k in now if now[k] != canonical(then)[k]} == {"policy.attention"}


def test_every_key_added_after_0_1_is_marked_since():
    """At the defaults, exactly the 0.1 keys enter the hash: a new key must carry `since` (or be run-only),
    and a 0.1 key may not be removed, renamed or made run-only (each would change every key)."""
    hashed = set(canonical(build_config({})))
    assert not hashed - KEYS_V0_1, (
        f"keys hashed at their default that 0.1 did not hash: {sorted(hashed - KEYS_V0_1)}; mark them "
        "field(metadata={SINCE: '<version>'}) with a default that reproduces the old behaviour"
    )
    assert not KEYS_V0_1 - hashed, f"0.1 keys no longer hashed (every trial key changes): {sorted(KEYS_V0_1 - hashed)}"


# --- a key added later, in a test ----------------------------------------------------------------------


@dataclass
class PolicyWithNewKey(PolicyConfig):
    """The policy section of a future txlab: one more key, whose default (off) is today's computation."""

    fused_norm: bool = field(default=False, metadata={SINCE: "0.2"})
    tile_order: str = field(default="rows", metadata={SINCE: "0.2"})


def with_new_keys(cfg: TrialConfig, **values) -> TrialConfig:
    policy = PolicyWithNewKey(**dataclasses.asdict(cfg.policy), **values)
    return dataclasses.replace(cfg, policy=policy)


CONFIGS = [
    {},
    {"model": {"size": "debug"}, "workload": {"seq_len": 512}, "policy": {"name": "recompute"}},
    {"workload": {"kind": "decode"}, "policy": {"kv": "recompute"}, "measure": {"budget_gib": 0.5}},
]


@pytest.mark.parametrize("raw", CONFIGS, ids=["default", "recompute", "decode"])
def test_a_new_key_at_its_default_keeps_every_key_and_setting_it_changes_the_key(raw):
    old = build_config(raw)
    assert with_new_keys(old).trial_key == old.trial_key
    assert canonical(with_new_keys(old)) == canonical(old)  # byte for byte the same JSON
    changed = {with_new_keys(old, fused_norm=True).trial_key, with_new_keys(old, tile_order="columns").trial_key}
    assert old.trial_key not in changed and len(changed) == 2
    assert with_new_keys(old, fused_norm=True, tile_order="columns").trial_key not in changed
    assert "policy.fused_norm" in canonical(with_new_keys(old, fused_norm=True))
    added = set(since_keys(with_new_keys(old))) - set(since_keys(old))
    assert added == {"policy.fused_norm", "policy.tile_order"}


def test_without_the_since_mark_a_new_key_would_change_every_key():
    """Why the mark exists: the 0.1 rule (hash every key) moves every key when a key is added."""

    @dataclass
    class Unmarked(PolicyConfig):
        fused_norm: bool = False

    old = build_config({})
    new = dataclasses.replace(old, policy=Unmarked(**dataclasses.asdict(old.policy)))
    assert new.trial_key != old.trial_key


def test_strict_default_comparison():
    """A since key set to a value equal but not identical to its default (1 for True) is a set value."""

    @dataclass
    class Counted(PolicyConfig):
        repeats: int = field(default=1, metadata={SINCE: "0.2"})

    old = build_config({})
    base = dataclasses.asdict(old.policy)
    assert dataclasses.replace(old, policy=Counted(**base)).trial_key == old.trial_key
    assert dataclasses.replace(old, policy=Counted(**base, repeats=True)).trial_key != old.trial_key


def test_run_only_keys_never_enter_the_key():
    a = build_config({"train": {"log_every": 1, "out_dir": "x"}, "data": {"workers": 2}})
    assert a.trial_key == build_config({}).trial_key
    assert not {"train.log_every", "train.out_dir", "data.workers"} & set(canonical(a))
    assert any(f.metadata.get(RUN_ONLY) for f in dataclasses.fields(a.train))


def test_changing_what_a_preset_resolves_to_changes_the_key(monkeypatch):
    """A preset that computes something else is a different trial: new resolved values, new key."""
    from txlab.config import POLICY_PRESETS

    before = build_config({"policy": {"name": "checkpoint"}, "model": {"n_layers": 4}}).trial_key
    monkeypatch.setitem(POLICY_PRESETS, "checkpoint", {**POLICY_PRESETS["checkpoint"], "remat": "sqrt"})
    after = build_config({"policy": {"name": "checkpoint"}, "model": {"n_layers": 4}}).trial_key
    assert after != before
    assert trial_key(build_config({})) == "22c716ca738b392a"  # the default config is untouched
