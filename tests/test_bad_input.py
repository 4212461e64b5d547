"""A corpus of bad inputs for every command: exit 2, one line on stderr naming the problem and the key or
path, no traceback, and nothing written (the test's whole directory is compared before and after).

Most cases run in this process through `txlab.cli.main` (fast); a few run as `python -m txlab` to prove the
exit status and stderr end to end. Unexpected internal errors: a one-line message by default (exit 1), the
traceback with `--debug`.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, TINY_BASE
from txlab.cli import main
from txlab.config import build_config
from txlab.results.store import MARKER, Store
from txlab.sweeps.rows import error_row

TINY = {**TINY_BASE, "workload": {**TINY_BASE["workload"], "seq_len": 64}}  # a run config as well as a base
GRID = {"workload.seq_len": [64]}
# An object-store location (fsspec's in-memory filesystem stands in for s3://) whose writer lease another
# sweep holds; made by `make_object_store_assets`.
LOCKED_OBJECT_STORE = "memory://txlab-bad-input/locked"


class _RunsCode:
    """A pickle that runs a shell command when unpickled: what a hostile checkpoint looks like."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_assets(d: Path) -> None:
    """Every file a case points at, made before the snapshot (so only what a command writes shows)."""
    (d / "good.yaml").write_text(yaml.safe_dump(TINY))
    (d / "malformed.yaml").write_text("model: {n_layers: 2\nworkload: [\n")
    (d / "list.yaml").write_text("- model\n- policy\n")
    (d / "scalar.yaml").write_text("just a string\n")
    (d / "binary.yaml").write_bytes(b"model:\n  n_layers: \xff\xfe\x00\x81\n")
    (d / "typo_top.yaml").write_text("modle: {n_layers: 2}\n")
    (d / "typo_nested.yaml").write_text("model: {n_layer: 2}\n")
    (d / "section_scalar.yaml").write_text("model: 3\n")
    (d / "adir.yaml").mkdir()
    (d / "deep.yaml").write_text("model: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n")
    (d / "nested.yaml").write_text("model: " + "[" * 40 + "]" * 40 + "\n")
    (d / "python_tag.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {d / 'PWNED'}']\n")
    big = "[" + ",".join(["[" + ",".join(["'" + "x" * 50 + "'"] * 100) + "]"] * 100) + "]"
    (d / "huge_value.yaml").write_text(f"seed: {big}\n")
    (d / "a_file").write_text("not a directory\n")
    # hardware profiles (measure.hardware: a YAML path): one field missing, a zero, a negative, one dtype only
    gpu = {"name": "g", "peak_tflops": {"bf16": 100.0, "fp32": 10.0}, "memory_gb": 40, "memory_bandwidth_gbps": 1000,
           "link_gbps": 100, "devices_per_node": 8, "network_gbps": 10}  # fmt: skip
    (d / "hw_missing.yaml").write_text(yaml.safe_dump({k: v for k, v in gpu.items() if k != "memory_gb"}))
    (d / "hw_zero.yaml").write_text(yaml.safe_dump({**gpu, "link_gbps": 0}))
    (d / "hw_negative.yaml").write_text(yaml.safe_dump({**gpu, "peak_tflops": {"bf16": -100.0, "fp32": 10.0}}))
    (d / "hw_bf16_only.yaml").write_text(yaml.safe_dump({**gpu, "peak_tflops": {"bf16": 100.0}}))
    (d / "hw_malformed.yaml").write_text("name: [g\n")

    def spec(filename: str, **raw) -> None:
        raw.setdefault("name", "t")
        raw.setdefault("base", TINY)
        raw.setdefault("grid", GRID)
        (d / filename).write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not ...}))

    spec("spec_typo.yaml", gird=GRID)
    spec("spec_empty_grid.yaml", grid={})
    spec("spec_no_grid.yaml", grid=...)
    spec("spec_grid_key.yaml", grid={"model.n_layer": [2, 4]})
    spec("spec_grid_section.yaml", grid={"modle.n_layers": [2, 4]})
    spec("spec_grid_empty_values.yaml", grid={"workload.seq_len": []})
    spec("spec_grid_bad_point.yaml", grid={"model.n_heads": [4, 5]})
    spec("spec_grid_bad_type.yaml", grid={"workload.seq_len": ["long"]})
    spec("spec_skip_arith.yaml", skip_if=["workload.seq_len + 1"])
    spec("spec_skip_code.yaml", skip_if=[f"__import__('os').system('touch {d / 'PWNED'}')"])
    spec("spec_skip_dunder.yaml", skip_if=["().__class__.__bases__[0] == 1"])
    spec("spec_skip_lambda.yaml", skip_if=["(lambda: 1)() == 1"])
    spec("spec_skip_unknown.yaml", skip_if=["workload.seq_lenn > 1"])
    spec("spec_skip_syntax.yaml", skip_if=["workload.seq_len >"])
    spec("spec_base_typo.yaml", base={"model": {"d_modle": 64}})
    spec("spec_base_scalar.yaml", base=[1, 2])
    spec("spec_resources.yaml", resources={"cpu": -1})
    spec("spec_resource_name.yaml", resources={"tpu": 1})
    spec("spec_concurrent.yaml", max_concurrent=0)
    spec("spec_mode.yaml", mode="guess")
    sharded = {**TINY, "workload": {**TINY["workload"], "batch_size": 2}, "parallel": {"fsdp": 2}}
    spec("spec_fsdp_gpu_share.yaml", base=sharded, resources={"gpu": 0.5})
    spec("spec_fsdp_never_fits.yaml", base=sharded, resources={"cpu": 100000})
    spec("spec_never_fits.yaml", resources={"cpu": 100000})
    spec("spec_budget.yaml", grid={"measure.budget_gib": [1, 0]})
    spec("spec_name.yaml", name="a/b")
    spec(
        "spec_huge_grid.yaml",
        grid={
            f"train.{k}": list(range(1, 12))
            for k in ("steps", "warmup", "hold", "eval_every", "eval_batches", "grad_accum")
        },
    )
    (d / "spec_list.yaml").write_text("- grid\n")
    make_checkpoint_assets(d)

    def store(name: str, marker=None, rows: int = 0, truncate: bool = False) -> None:
        s = Store.open(str(d / name), create=True)
        if rows:
            for seq in (64, 128)[:rows]:
                cfg = build_config({**TINY, "workload": {**TINY["workload"], "seq_len": seq}})
                s.write_row(
                    {
                        **error_row(cfg.trial_key, cfg.flat(), "t", "boom"),
                        "status": "ok",
                        "error": None,
                        "peak_bytes": 1000,
                        "measured": True,
                    }
                )
        else:
            s._ensure_created()
        if marker is not None:
            (d / name / MARKER).write_text(marker)
        if truncate:
            f = sorted((d / name).glob("*.parquet"))[0]
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    store("store_ok", rows=2)
    store("store_empty")
    store("store_foreign", marker='{"format": "somebody-else", "schema_version": 1}')
    store("store_newer", marker='{"format": "txlab-store", "schema_version": 999}', rows=1)
    store("store_marker_junk", marker="{not json")
    (d / "plain_parquet").mkdir()
    (d / "plain_parquet" / "x.parquet").write_bytes(b"PAR1")

    (d / "not_a_checkpoint.pt").write_text("hello\n")
    with open(d / "hostile.pt", "wb") as f:
        pickle.dump({"config": _RunsCode(d / "PWNED"), "model": {}}, f)
    (d / "run_dir").mkdir()
    (d / "empty.txt").write_text(" \n\n")


def make_checkpoint_assets(d: Path) -> None:
    """Hugging Face checkpoints that are not: no config.json, not JSON, another family, no weights, and
    weights of another shape than the config (a real tiny Llama written by transformers, then its
    config made wider)."""
    import json

    (d / "plain.yaml").write_text(yaml.safe_dump({"workload": {"seq_len": 16, "steps": 1, "warmup_steps": 0}}))
    (d / "hf_empty").mkdir()
    (d / "hf_notjson").mkdir()
    (d / "hf_notjson" / "config.json").write_text("{not json")
    (d / "hf_bert").mkdir()
    (d / "hf_bert" / "config.json").write_text('{"model_type": "bert", "hidden_size": 64}')
    from transformers import LlamaConfig, LlamaForCausalLM

    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(d / "hf_llama", safe_serialization=True)
    (d / "hf_noweights").mkdir()
    (d / "hf_noweights" / "config.json").write_text((d / "hf_llama" / "config.json").read_text())
    (d / "hf_mismatch").mkdir()
    wider = {**json.loads((d / "hf_llama" / "config.json").read_text()), "intermediate_size": 64}
    (d / "hf_mismatch" / "config.json").write_text(json.dumps(wider))
    (d / "hf_mismatch" / "model.safetensors").write_bytes((d / "hf_llama" / "model.safetensors").read_bytes())
    # a tiny Mixtral (4 experts a layer) whose config.json then says 6 experts: its experts do not match
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = dict(small, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(MixtralConfig(**moe)).save_pretrained(d / "hf_moe", safe_serialization=True)
    (d / "hf_moe_mismatch").mkdir()
    six = {**json.loads((d / "hf_moe" / "config.json").read_text()), "num_local_experts": 6}
    (d / "hf_moe_mismatch" / "config.json").write_text(json.dumps(six))
    (d / "hf_moe_mismatch" / "model.safetensors").write_bytes((d / "hf_moe" / "model.safetensors").read_bytes())


def make_object_store_assets() -> None:
    """A memory:// store whose lease a live sweep elsewhere holds, and a memory:// path that is a file."""
    import json
    import time

    import fsspec

    from txlab.results.store import LEASE

    mem = fsspec.filesystem("memory")
    Store.open(LOCKED_OBJECT_STORE, create=True)._ensure_created()
    lease = {
        "format": "txlab-writer-lease",
        "holder": "pid 4242 on elsewhere",
        "token": "theirs",
        "renewed_at": time.time(),
        "expires_at": time.time() + 3600,
    }
    mem.pipe_file(f"/txlab-bad-input/locked/{LEASE}", json.dumps(lease).encode())
    mem.pipe_file("/txlab-bad-input/a_file", b"not a store")


def case(*argv: str, needle: str, id: str):
    return pytest.param(list(argv), needle, id=id)


# `{d}` in an argument is the test's directory.
CASES = [
    # --- run: config files ------------------------------------------------------------------------
    case("run", "{d}/malformed.yaml", needle="malformed.yaml: malformed YAML at line", id="run-malformed-yaml"),
    # model.hf: Hugging Face checkpoints
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_missing",
        needle="hf_missing: no such checkpoint",
        id="run-hf-missing-dir",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_empty",
        needle="hf_empty: no config.json",
        id="run-hf-no-config",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_notjson",
        needle="config.json: not a JSON config",
        id="run-hf-not-json",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_bert",
        needle="model_type 'bert' is not supported; supported: gpt2, llama",
        id="run-hf-family",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf=nobody/no-such-model-offline",
        needle="the hub could not be read",
        id="run-hf-hub-offline",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_noweights",
        "--set",
        "model.init=pretrained",
        needle="model.safetensors: weights file not found",
        id="run-hf-no-weights",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_mismatch",
        "--set",
        "model.init=pretrained",
        needle="tensor 'model.layers.0.mlp.gate_proj.weight' has shape (48, 32)",
        id="run-hf-weights-mismatch",
    ),
    # mixture of experts (issue 25): experts that do not match, top-k past the experts, MoE keys on a dense model
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_moe_mismatch",
        "--set",
        "model.init=pretrained",
        needle="layer 0 of the checkpoint holds 4 experts, but the config gives it 6 (model.moe_experts)",
        id="run-hf-moe-experts-mismatch",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.mlp=moe",
        "--set",
        "model.moe_experts=4",
        "--set",
        "model.moe_top_k=5",
        needle="model.moe_top_k: 5 is larger than model.moe_experts (4)",
        id="run-moe-top-k-over-experts",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.mlp=moe",
        needle="model.moe_experts: model.mlp 'moe' needs it",
        id="run-moe-no-experts",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.moe_experts=8",
        needle="model.moe_experts: applies to model.mlp 'moe' only; leave it at its default with model.mlp 'gelu'",
        id="run-moe-key-on-dense",
    ),
    case(
        "estimate",
        "{d}/plain.yaml",
        "--set",
        "model.moe_shared=1",
        needle="model.moe_shared: applies to model.mlp 'moe' only",
        id="estimate-moe-key-on-dense",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.mlp=moe",
        "--set",
        "model.moe_experts=6",
        "--set",
        "model.moe_top_k=2",
        "--set",
        "model.moe_groups=4",
        needle="model.moe_groups: must divide model.moe_experts (6 % 4 != 0)",
        id="run-moe-groups",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.mla_kv_rank=16",
        needle="model.mla_kv_rank: applies to model.attn 'mla' only",
        id="run-mla-key-on-mha",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.mlp=moe",
        "--set",
        "model.moe_experts=6",
        "--set",
        "model.moe_top_k=2",
        "--set",
        "parallel.fsdp=4",
        "--set",
        "parallel.ep=4",
        needle="parallel.ep: 4 must divide model.moe_experts (6 % 4 != 0: expert-parallel ranks are drawn from the fsdp ranks",
        id="run-ep-not-dividing-experts",
    ),
    case(
        "estimate",
        "{d}/plain.yaml",
        "--set",
        "model.mlp=moe",
        "--set",
        "model.moe_experts=4",
        "--set",
        "model.moe_top_k=2",
        "--set",
        "parallel.fsdp=2",
        "--set",
        "parallel.ep=4",
        needle="parallel.ep: 4 must divide parallel.fsdp (2 % 4 != 0",
        id="estimate-ep-not-dividing-fsdp",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "parallel.fsdp=2",
        "--set",
        "parallel.ep=2",
        needle="parallel.ep: 2 spreads routed experts, but model.mlp is 'gelu'; allowed: 1",
        id="run-ep-on-dense",
    ),
    case(
        "estimate",
        "{d}/plain.yaml",
        "--set",
        "model.mlp=moe",
        "--set",
        "model.moe_experts=4",
        "--set",
        "model.moe_top_k=2",
        "--set",
        "workload.routing_imbalance=3.0",
        needle="workload.routing_imbalance: 3.0 must be in 1.0..2 (balanced .. every token to the same",
        id="estimate-routing-imbalance-over-experts-per-k",
    ),
    case(
        "estimate",
        "{d}/plain.yaml",
        "--set",
        "workload.routing_imbalance=1.5",
        needle="workload.routing_imbalance: 1.5 applies to model.mlp 'moe' only; allowed: 1.0",
        id="estimate-routing-imbalance-on-dense",
    ),
    case(
        "run",
        "{d}/plain.yaml",
        "--set",
        "model.init=pretrained",
        needle="model.init: 'pretrained' loads the weights of model.hf",
        id="run-pretrained-without-hf",
    ),
    case(
        "estimate",
        "{d}/plain.yaml",
        "--set",
        "model.hf={d}/hf_bert",
        needle="model_type 'bert' is not supported",
        id="estimate-hf-family",
    ),
    case("run", "{d}/list.yaml", needle="list.yaml: the config must be a YAML mapping, got list", id="run-yaml-list"),
    case("run", "{d}/scalar.yaml", needle="must be a YAML mapping, got str", id="run-yaml-scalar"),
    case("run", "{d}/missing.yaml", needle="missing.yaml: config file not found", id="run-missing-file"),
    case("run", "{d}/adir.yaml", needle="adir.yaml: is a directory", id="run-config-is-dir"),
    case("run", "{d}/binary.yaml", needle="binary.yaml: cannot read config file", id="run-unreadable-bytes"),
    case("run", "{d}/typo_top.yaml", needle="unknown key 'modle' (did you mean 'model'?)", id="run-typo-section"),
    case(
        "run",
        "{d}/typo_nested.yaml",
        needle="unknown key 'model.n_layer' (did you mean 'model.n_layers'?)",
        id="run-typo-key-file",
    ),
    case("run", "{d}/section_scalar.yaml", needle="model: must be a mapping", id="run-section-scalar"),
    case("run", "{d}/deep.yaml", needle="deep.yaml: config nested too deeply", id="run-yaml-too-deep"),
    case("run", "{d}/nested.yaml", needle="nested.yaml: config nested deeper than 16 levels", id="run-yaml-nested"),
    case(
        "run",
        "{d}/python_tag.yaml",
        needle="could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
        id="run-yaml-python-tag",
    ),
    case(
        "run", "{d}/huge_value.yaml", needle="seed: expected an integer, got [[", id="run-huge-value-one-bounded-line"
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_layers=" + "[" * 3000,
        needle="model.n_layers: expected an integer",
        id="run-set-deep-value",
    ),
    # --- run: overrides -----------------------------------------------------------------------------
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.nmae=sdpa",
        needle="unknown key 'policy.nmae' (did you mean 'policy.name'?)",
        id="run-typo-set",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "polcy.name=sdpa",
        needle="no section 'polcy' (did you mean 'policy'?)",
        id="run-typo-set-section",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "workload.seq_len",
        needle="--set 'workload.seq_len': expected KEY=VALUE",
        id="run-set-no-equals",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_layers=two",
        needle="model.n_layers: expected an integer, got 'two'",
        id="run-type-int",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_layers=2.5",
        needle="model.n_layers: expected an integer",
        id="run-type-float-for-int",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.tie_weights=1",
        needle="model.tie_weights: expected true or false",
        id="run-type-bool",
    ),
    case("run", "{d}/good.yaml", "--set", "model.size=[1]", needle="model.size: expected a string", id="run-type-list"),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.budget_gib=.nan",
        needle="measure.budget_gib: expected a finite number",
        id="run-nan",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_layers=0",
        needle="model.n_layers: must be > 0, got 0",
        id="run-zero-layers",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.d_model=-64",
        needle="model.d_model: must be > 0, got -64",
        id="run-negative-width",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "workload.batch_size=0",
        needle="workload.batch_size: must be > 0",
        id="run-zero-batch",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "workload.seq_len=-1",
        needle="workload.seq_len: must be > 0",
        id="run-negative-seq",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.vocab_size=0",
        needle="model.vocab_size: must be > 0",
        id="run-zero-vocab",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_heads=3",
        needle="model.n_heads: must divide model.d_model (64 % 3 != 0)",
        id="run-heads-divide",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_kv_heads=3",
        needle="model.n_kv_heads: must divide model.n_heads",
        id="run-kv-heads-divide",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_kv_heads=8",
        needle="model.n_kv_heads: must be <= model.n_heads",
        id="run-kv-heads-over",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.attention=chunked",
        "--set",
        "policy.q_chunk=0",
        needle="policy.q_chunk: must be > 0, got 0",
        id="run-chunk-zero",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.k_chunk=-8",
        needle="policy.k_chunk: must be > 0",
        id="run-chunk-negative",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.attention=chunked",
        "--set",
        "policy.q_chunk=128",
        needle="policy.q_chunk: 128 is larger than workload.seq_len (64)",
        id="run-chunk-over-seq",
    ),
    case(  # recompute resolves to fused (sdpa) attention: a tile size it never reads would be a second trial key
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.name=recompute",
        "--set",
        "policy.k_chunk=4096",
        needle="policy.k_chunk: 4096 is not used: policy.attention is 'sdpa', not chunked",
        id="run-chunk-unused-by-policy",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "policy.loss_chunk=32",
        needle="policy.loss_chunk: 32 is not used: policy.loss is 'full', not chunked",
        id="estimate-loss-chunk-unused",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.loss=chunked",
        "--set",
        "policy.loss_chunk=65",
        needle="policy.loss_chunk: 65 is larger than workload.seq_len (64)",
        id="run-loss-chunk-over-seq",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_positions=32",
        needle="workload.seq_len: 64 is over model.n_positions (32)",
        id="run-seq-over-positions",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.size=gpt2-smal",
        needle="model.size: unknown size 'gpt2-smal' (did you mean 'gpt2-small'?)",
        id="run-unknown-size",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.name=recompte",
        needle="policy.name: unknown value 'recompte' (did you mean 'recompute'?)",
        id="run-unknown-preset",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.attention=flash",
        needle="policy.attention: unknown value 'flash'",
        id="run-unknown-attention",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.remat=blocks",
        needle="policy.remat: unknown value 'blocks' (did you mean 'block'?)",
        id="run-unknown-remat",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.loss=fused",
        needle="policy.loss: unknown value 'fused'",
        id="run-unknown-loss",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.kv=paged",
        needle="policy.kv: unknown value 'paged'",
        id="run-unknown-kv",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.budget_gib=0",
        needle="measure.budget_gib: must be > 0, got 0",
        id="run-budget-zero",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.budget_gib=-2",
        needle="measure.budget_gib: must be > 0",
        id="run-budget-negative",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.device=tpu",
        needle="measure.device: unknown device 'tpu'",
        id="run-unknown-device",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "parallel.fsdp=2",
        "--set",
        "workload.batch_size=2",
        "--set",
        "measure.device=cuda:1",
        needle="measure.device: 'cuda:1' names one GPU, but the 2 ranks of parallel.fsdp run on cuda:0..1",
        id="run-fsdp-one-named-gpu",
    ),
    # --- run: tensor-parallel layouts (issue 23) --------------------------------------------------------
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "parallel.tp=3",
        needle="parallel.tp: 3 must divide model.n_heads (4 % 3 != 0: each rank takes whole heads); allowed here: 1, 2, 4",
        id="run-tp-heads",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.n_kv_heads=1",
        "--set",
        "parallel.tp=2",
        needle="parallel.tp: 2 must divide model.n_kv_heads (1 % 2 != 0: KV heads are split over the ranks, not "
        "replicated); allowed here: 1",
        id="run-tp-kv-heads",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "model.mlp_hidden=65",
        "--set",
        "parallel.tp=2",
        needle="parallel.tp: 2 must divide MLP width (65 % 2 != 0",
        id="run-tp-mlp-width",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "parallel.tp=8",
        needle="parallel.tp: 8 must divide model.n_heads (4 % 8 != 0",
        id="estimate-tp-heads",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.device=cpu",
        "--set",
        "parallel.fsdp=1024",
        "--set",
        "workload.batch_size=1024",
        "--set",
        "parallel.tp=2",
        needle="parallel.fsdp x parallel.tp: 2048 CPU ranks on",
        id="run-layout-more-ranks-than-this-machine-starts",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "parallel.pp=2",
        needle="unknown key 'parallel.pp'",
        id="run-layout-unknown-key",
    ),
    # --- context-parallel layouts (issue 23) ----------------------------------------------------------------
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "parallel.cp=3",
        needle="parallel.cp: 2 x 3 chunks must divide workload.seq_len (64 % 6 != 0: causal load balancing gives "
        "each rank two equal chunks); allowed here: 1, 2, 4, 8, 16, 32",
        id="run-cp-seq-len",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "parallel.cp=4",
        "--set",
        "parallel.tp=4",
        "--set",
        "workload.seq_len=40",
        needle="parallel.tp: 4 must divide workload.seq_len / parallel.cp (10 % 4 != 0: sequence parallelism splits "
        "a CP rank's share of the sequence evenly (or parallel.sequence_parallel: false)); allowed here: 1, 2",
        id="estimate-cp-x-tp-sequence-share",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.device=cpu",
        "--set",
        "parallel.cp=512",
        "--set",
        "workload.seq_len=1024",
        needle="parallel.cp: 512 CPU ranks on",
        id="run-cp-more-ranks-than-this-machine-starts",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "parallel.sequence_parallel=false",
        needle="parallel.sequence_parallel: splits the sequence inside tensor-parallel regions, but parallel.tp is 1",
        id="run-sequence-parallel-without-tp",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "policy.selective_save=torchtitan",
        needle="policy.selective_save: 'torchtitan' says what a selective recomputation keeps, but policy.remat is",
        id="run-selective-save-without-selective",
    ),
    # --- run: stores --------------------------------------------------------------------------------
    case(
        "run", "{d}/good.yaml", "--store", "{d}/a_file", needle="a_file: store path is a file", id="run-store-is-file"
    ),
    case("run", "{d}/good.yaml", "--store", "{d}/store_foreign", needle="foreign store format", id="run-store-foreign"),
    case(
        "run",
        "{d}/good.yaml",
        "--store",
        "{d}/store_newer",
        needle="store schema version 999 is newer",
        id="run-store-newer",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--store",
        "{d}/store_marker_junk",
        needle="unreadable store marker",
        id="run-store-marker-junk",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--store",
        "{d}/plain_parquet",
        needle="plain_parquet: directory holds Parquet files but no",
        id="run-store-not-txlab",
    ),
    case("run", needle="txlab run: the following arguments are required: config", id="run-no-config"),
    case("frobnicate", needle="invalid choice: 'frobnicate'", id="unknown-command"),
    # --- sweep (and --dry-run) ------------------------------------------------------------------
    case("sweep", "{d}/malformed.yaml", needle="malformed.yaml: malformed YAML", id="sweep-malformed-yaml"),
    case(
        "sweep",
        "{d}/spec_list.yaml",
        "--dry-run",
        needle="spec_list.yaml: the sweep spec must be a YAML mapping",
        id="sweep-yaml-list",
    ),
    case("sweep", "{d}/missing.yaml", needle="missing.yaml: sweep spec file not found", id="sweep-missing-file"),
    case("sweep", "{d}/binary.yaml", needle="binary.yaml: cannot read sweep spec file", id="sweep-unreadable-bytes"),
    case(
        "sweep",
        "{d}/spec_typo.yaml",
        "--dry-run",
        needle="unknown spec key 'gird' (did you mean 'grid'?)",
        id="sweep-typo-spec-key",
    ),
    case(
        "sweep",
        "{d}/spec_empty_grid.yaml",
        "--dry-run",
        needle="spec_empty_grid.yaml: grid: expected a non-empty mapping",
        id="sweep-empty-grid",
    ),
    case(
        "sweep",
        "{d}/spec_no_grid.yaml",
        needle="spec_no_grid.yaml: grid: expected a non-empty mapping",
        id="sweep-no-grid",
    ),
    case(
        "sweep",
        "{d}/spec_grid_key.yaml",
        "--dry-run",
        needle="'model.n_layer' is not a config key (did you mean 'model.n_layers'?)",
        id="sweep-grid-unknown-key",
    ),
    case(
        "sweep",
        "{d}/spec_grid_section.yaml",
        needle="'modle.n_layers' is not a config key (did you mean 'model.n_layers'?)",
        id="sweep-grid-typo-section",
    ),
    case(
        "sweep",
        "{d}/spec_grid_empty_values.yaml",
        needle="grid.workload.seq_len: empty list of values",
        id="sweep-grid-empty-values",
    ),
    case(
        "sweep",
        "{d}/spec_grid_bad_point.yaml",
        "--dry-run",
        needle="model.n_heads: must divide model.d_model",
        id="sweep-grid-bad-point",
    ),
    case(
        "sweep",
        "{d}/spec_grid_bad_type.yaml",
        needle="workload.seq_len: expected an integer, got 'long'",
        id="sweep-grid-bad-type",
    ),
    case(
        "sweep",
        "{d}/spec_budget.yaml",
        "--dry-run",
        needle="measure.budget_gib: must be > 0",
        id="sweep-grid-budget-zero",
    ),
    case(
        "sweep",
        "{d}/spec_skip_arith.yaml",
        "--dry-run",
        needle="skip_if[0]: 'workload.seq_len + 1': BinOp is not a comparison",
        id="sweep-skip-not-comparison",
    ),
    case("sweep", "{d}/spec_skip_code.yaml", "--dry-run", needle="skip_if[0]", id="sweep-skip-runs-code"),
    case("sweep", "{d}/spec_skip_dunder.yaml", needle="skip_if[0]", id="sweep-skip-dunder"),
    case("sweep", "{d}/spec_skip_lambda.yaml", needle="function calls are not allowed", id="sweep-skip-lambda"),
    case(
        "sweep",
        "{d}/spec_skip_unknown.yaml",
        needle="unknown config key 'workload.seq_lenn'",
        id="sweep-skip-unknown-key",
    ),
    case("sweep", "{d}/spec_skip_syntax.yaml", needle="is not a valid expression", id="sweep-skip-syntax"),
    case(
        "sweep",
        "{d}/spec_base_typo.yaml",
        "--dry-run",
        needle="unknown key 'model.d_modle' (did you mean 'model.d_model'?)",
        id="sweep-base-typo",
    ),
    case("sweep", "{d}/spec_base_scalar.yaml", needle="base: expected a mapping", id="sweep-base-not-mapping"),
    case(
        "sweep",
        "{d}/spec_resources.yaml",
        needle="resources.cpu: expected a number > 0, got -1",
        id="sweep-negative-cpu",
    ),
    case("sweep", "{d}/spec_resource_name.yaml", needle="unknown resource 'tpu'", id="sweep-unknown-resource"),
    case(
        "sweep",
        "{d}/spec_concurrent.yaml",
        needle="max_concurrent: expected a positive integer",
        id="sweep-zero-concurrency",
    ),
    case("sweep", "{d}/spec_mode.yaml", needle="mode: unknown mode 'guess'", id="sweep-unknown-mode"),
    case(
        "sweep",
        "{d}/spec_fsdp_gpu_share.yaml",
        "--dry-run",
        needle="resources.gpu: 0.5 per rank, but trial {workload.seq_len=64} has parallel.fsdp 2",
        id="sweep-fsdp-gpu-share",
    ),
    case(
        "sweep",
        "{d}/spec_fsdp_never_fits.yaml",
        "--store",
        "{d}/new_store",
        needle="trials with parallel.fsdp 2 need 2 x {100000 CPU, 0 GPU} (resources per rank; 200000 CPU and 0 GPU",
        id="sweep-fsdp-never-placed",
    ),
    case(
        "sweep",
        "{d}/spec_never_fits.yaml",
        "--store",
        "{d}/new_store",
        needle="each trial needs {100000 CPU, 0 GPU}; this machine has 1 x {",
        id="sweep-never-placed",
    ),
    case("sweep", "{d}/spec_name.yaml", needle="name: expected a non-empty name without '/'", id="sweep-bad-name"),
    case(
        "sweep",
        "{d}/spec_huge_grid.yaml",
        "--dry-run",
        needle="grid: 1771561 grid points, more than 100000",
        id="sweep-huge-grid",
    ),
    case("sweep", "{d}/python_tag.yaml", needle="could not determine a constructor", id="sweep-yaml-python-tag"),
    case(
        "sweep", "{d}/good.yaml", needle="good.yaml: model: unknown spec key 'model'", id="sweep-config-given-as-spec"
    ),
    case(
        "sweep",
        "{d}/spec_grid_key.yaml",
        "--store",
        "{d}/store_ok",
        needle="is not a config key",
        id="sweep-bad-spec-good-store",
    ),
    case(
        "sweep",
        "{d}/spec_empty_grid.yaml",
        "--store",
        "{d}/new_store",
        needle="grid: expected a non-empty mapping",
        id="sweep-no-half-made-store",
    ),
    case("sweep", "{d}/spec_typo.yaml", needle="gird", id="sweep-default-store-not-made"),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--dry-run",
        "--store",
        "{d}/a_file",
        needle="a_file: store path is a file",
        id="sweep-store-is-file",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--store",
        "{d}/store_foreign",
        needle="foreign store format",
        id="sweep-store-foreign",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--dry-run",
        "--store",
        "{d}/store_newer",
        needle="store schema version 999 is newer",
        id="sweep-store-newer",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--store",
        "{d}/plain_parquet",
        needle="not a txlab store",
        id="sweep-store-not-txlab",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--address",
        "http://127.0.0.1:8265",
        "--store",
        "{d}/new_store",
        needle="dashboard (job server) address",
        id="sweep-dashboard-address",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--address",
        "127.0.0.1:1",
        "--store",
        "{d}/new_store",
        needle="'127.0.0.1:1': cannot connect",
        id="sweep-unreachable-address",
    ),
    # --- rerun ----------------------------------------------------------------------------------
    case(
        "rerun",
        "--store",
        "{d}/store_ok",
        "--trial",
        "ffffffffffffffff",
        needle="--trial ffffffffffffffff: no such trial key in",
        id="rerun-unknown-key",
    ),
    case("rerun", "--store", "{d}/store_ok", "--trial", "", needle="--trial", id="rerun-empty-key"),
    case(
        "rerun", "--store", "{d}/nowhere", "--trial", "abc", needle="nowhere: store not found", id="rerun-missing-store"
    ),
    case(
        "rerun",
        "--store",
        "{d}/a_file",
        "--trial",
        "abc",
        needle="a_file: store path is a file",
        id="rerun-store-is-file",
    ),
    case("rerun", "--store", "{d}/store_empty", "--trial", "abc", needle="no such trial key", id="rerun-empty-store"),
    case(
        "rerun",
        "--store",
        "{d}/store_newer",
        "--trial",
        "abc",
        needle="newer than this txlab reads",
        id="rerun-store-newer",
    ),
    case(
        "rerun",
        "--store",
        "{d}/store_foreign",
        "--trial",
        "abc",
        needle="foreign store format",
        id="rerun-store-foreign",
    ),
    case(
        "rerun",
        "--store",
        "{d}/store_ok",
        "--trial",
        "{key}",
        "--set",
        "model.nope=1",
        needle="unknown key 'model.nope'",
        id="rerun-bad-set",
    ),
    case(
        "rerun",
        "--store",
        "{d}/store_ok",
        "--trial",
        "{key}",
        "--set",
        "model.n_heads=5",
        needle="model.n_heads: must divide",
        id="rerun-set-invalid",
    ),
    case("rerun", "--trial", "abc", needle="the following arguments are required: --store", id="rerun-no-store"),
    # --- estimate -------------------------------------------------------------------------------
    case("estimate", "{d}/malformed.yaml", needle="malformed YAML", id="estimate-malformed-yaml"),
    case("estimate", "{d}/missing.yaml", needle="missing.yaml: config file not found", id="estimate-missing-file"),
    # measure.hardware and measure.usd_per_device_hour (the time model)
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.hardware=h100",
        needle="measure.hardware: unknown profile 'h100'; did you mean h200 or h100-sxm? allowed: a100-80g, h100-sxm",
        id="estimate-hardware-unknown",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.hardware={d}/hw_missing.yaml",
        needle="hw_missing.yaml: missing field memory_gb",
        id="estimate-hardware-missing-field",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.hardware={d}/hw_zero.yaml",
        needle="hw_zero.yaml: link_gbps must be > 0, got 0",
        id="run-hardware-zero",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.hardware={d}/hw_negative.yaml",
        needle="hw_negative.yaml: peak_tflops.bf16 must be > 0, got -100.0",
        id="estimate-hardware-negative",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.hardware={d}/hw_bf16_only.yaml",
        needle="profile 'g' has no peak for workload.dtype 'fp32'; it has: bf16",
        id="estimate-hardware-dtype",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.hardware={d}/hw_malformed.yaml",
        needle="hw_malformed.yaml: malformed YAML",
        id="estimate-hardware-malformed",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.hardware={d}/hw_absent.yaml",
        needle="hw_absent.yaml: no such file",
        id="estimate-hardware-no-file",
    ),
    case(
        "run",
        "{d}/good.yaml",
        "--set",
        "measure.hardware=local",
        needle="local.yaml: no such file; write it with `txlab calibrate`",
        id="run-hardware-local-missing",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.hardware=h100-sxm",
        "--set",
        "measure.usd_per_device_hour=-2",
        needle="measure.usd_per_device_hour: must be >= 0 (dollars per device-hour), got -2",
        id="estimate-price-negative",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "measure.usd_per_device_hour=2",
        needle="measure.usd_per_device_hour: prices the time predicted on measure.hardware",
        id="estimate-price-alone",
    ),
    case("calibrate", "--out", "{d}/adir.yaml", needle="adir.yaml: is a directory", id="calibrate-out-directory"),
    case("calibrate", "--device", "tpu", needle="--device: unknown device 'tpu'", id="calibrate-device"),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "model.n_heads=5",
        needle="model.n_heads: must divide",
        id="estimate-heads",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--capacity-gib",
        "0",
        needle="--capacity-gib: must be > 0",
        id="estimate-capacity-zero",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--capacity-gib",
        "-3",
        needle="--capacity-gib: must be > 0",
        id="estimate-capacity-negative",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--capacity-gib",
        "lots",
        needle="--capacity-gib: invalid float value: 'lots'",
        id="estimate-capacity-type",
    ),
    case(
        "estimate",
        "{d}/good.yaml",
        "--set",
        "policy.name=planned",
        needle="set measure.budget_gib",
        id="estimate-planned-needs-budget",
    ),
    # --- train ----------------------------------------------------------------------------------
    case("train", "{d}/malformed.yaml", needle="malformed YAML", id="train-malformed-yaml"),
    case("train", "{d}/good.yaml", "--set", "train.lr=0", needle="train.lr: must be > 0", id="train-zero-lr"),
    case(
        "train",
        "{d}/good.yaml",
        "--set",
        "train.steps=-5",
        needle="train.steps: must be > 0",
        id="train-negative-steps",
    ),
    case("train", "{d}/good.yaml", "--set", "train.stpes=5", needle="did you mean 'train.steps'?", id="train-typo"),
    case(
        "train",
        "{d}/good.yaml",
        "--out",
        "{d}/a_file",
        needle="a_file exists and is not a directory",
        id="train-out-is-file",
    ),
    case(
        "train",
        "{d}/good.yaml",
        "--set",
        "data.source=text:{d}/missing.txt",
        "--out",
        "{d}/run_new",
        needle="missing.txt",
        id="train-missing-data",
    ),
    # --- generate -------------------------------------------------------------------------------
    case(
        "generate",
        "--checkpoint",
        "{d}/missing.pt",
        "--prompt",
        "x",
        needle="missing.pt: no checkpoint there",
        id="generate-missing",
    ),
    case(
        "generate",
        "--checkpoint",
        "{d}/run_dir",
        "--prompt",
        "x",
        needle="run_dir: no checkpoint there",
        id="generate-empty-run-dir",
    ),
    case(
        "generate",
        "--checkpoint",
        "{d}/not_a_checkpoint.pt",
        "--prompt",
        "x",
        needle="not a txlab checkpoint",
        id="generate-not-checkpoint",
    ),
    case(
        "generate",
        "--checkpoint",
        "{d}/hostile.pt",
        "--prompt",
        "x",
        needle="hostile.pt: not a txlab checkpoint",
        id="generate-hostile-pickle",
    ),
    case(
        "generate",
        "--checkpoint",
        "{d}/run_dir",
        "--prompt",
        "x",
        "--temperature",
        "-1",
        needle="--temperature: must be >= 0",
        id="generate-temperature",
    ),
    case(
        "generate",
        "--checkpoint",
        "{d}/run_dir",
        "--prompt",
        "x",
        "--top-p",
        "2",
        needle="--top-p: must be in (0, 1]",
        id="generate-top-p",
    ),
    case(
        "generate",
        "--checkpoint",
        "{d}/run_dir",
        "--prompt",
        "x",
        "--top-k",
        "0",
        needle="--top-k: must be > 0",
        id="generate-top-k",
    ),
    case(
        "generate",
        "--checkpoint",
        "{d}/run_dir",
        "--prompt",
        "x",
        "--max-new-tokens",
        "0",
        needle="--max-new-tokens: must be > 0",
        id="generate-zero-tokens",
    ),
    case("generate", "--prompt", "x", needle="required: --checkpoint", id="generate-no-checkpoint"),
    # --- attention ------------------------------------------------------------------------------
    *[
        case(
            "attention", "--checkpoint", ckpt, "--text", text, "--out", out, *more, needle=needle, id=f"attention-{id}"
        )
        for ckpt, text, out, more, needle, id in [
            ("{d}/missing.pt", "{d}/a_file", "{d}/attn", [], "missing.pt: no such file or directory", "missing"),
            ("{d}/run_dir", "{d}/a_file", "{d}/attn", [], "run_dir: no checkpoint there", "empty-run-dir"),
            ("{d}/not_a_checkpoint.pt", "{d}/a_file", "{d}/attn", [], "not a txlab checkpoint", "not-checkpoint"),
            ("{d}/hostile.pt", "{d}/a_file", "{d}/attn", [], "hostile.pt: not a txlab checkpoint", "hostile"),
            ("{d}/hf_mismatch", "{d}/a_file", "{d}/attn", [], "gate_proj.weight' has shape (48, 32)", "hf-weights"),
            ("{d}/hf_llama", "{d}/a_file", "{d}/attn", [], "token id 121 is outside the model's 64 ids", "vocab"),
            ("{d}/hf_llama", "{d}/missing.txt", "{d}/attn", [], "--text: {d}/missing.txt: no such file", "no-text"),
            ("{d}/hf_llama", "{d}/run_dir", "{d}/attn", [], "run_dir: no such file (a directory)", "text-dir"),
            ("{d}/hf_llama", "{d}/empty.txt", "{d}/attn", [], "empty.txt: the file is empty", "empty-text"),
            ("{d}/hf_llama", "{d}/binary.yaml", "{d}/attn", [], "binary.yaml: not UTF-8 text", "binary-text"),
            ("{d}/hf_llama", "{d}/a_file", "{d}/store_ok/attn", [], "inside the txlab store", "out-in-store"),
            ("{d}/hf_llama", "{d}/a_file", "{d}/a_file", [], "a_file: exists and is not a directory", "out-file"),
            ("{d}/hf_llama", "{d}/a_file", "{d}/attn", ["--max-tokens", "1"], "must be >= 2, got 1", "max-tokens"),
            ("{d}/hf_llama", "{d}/a_file", "{d}/attn", ["--max-tokens", "9999"], "above the model's 2048", "max-above"),
        ]
    ],
    case("attention", "--checkpoint", "{d}/hf_llama", "--out", "x", needle="required: --text", id="attention-no-text"),
    # --- plot -----------------------------------------------------------------------------------
    case(
        "plot",
        "--store",
        "{d}/nowhere",
        "--out",
        "{d}/plots",
        needle="nowhere: store not found",
        id="plot-missing-store",
    ),
    case(
        "plot",
        "--store",
        "{d}/a_file",
        "--out",
        "{d}/plots",
        needle="a_file: store path is a file",
        id="plot-store-is-file",
    ),
    case(
        "plot",
        "--store",
        "{d}/store_empty",
        "--out",
        "{d}/plots",
        needle="store_empty: the store has no rows yet",
        id="plot-empty-store",
    ),
    case(
        "plot",
        "--store",
        "{d}/store_foreign",
        "--out",
        "{d}/plots",
        needle="foreign store format",
        id="plot-store-foreign",
    ),
    case(
        "plot",
        "--store",
        "{d}/store_newer",
        "--out",
        "{d}/plots",
        needle="store schema version 999",
        id="plot-store-newer",
    ),
    case(
        "plot",
        "--store",
        "{d}/plain_parquet",
        "--out",
        "{d}/plots",
        needle="plain_parquet: directory holds Parquet files",
        id="plot-not-txlab",
    ),
    case("plot", "--store", "{d}/store_ok", "--out", "{d}/a_file", needle="a_file", id="plot-out-is-file"),
    case(
        "plot",
        "--store",
        "{d}/store_ok",
        "--out",
        "{d}/plots",
        "--budget-gib",
        "0",
        needle="--budget-gib: must be > 0",
        id="plot-budget-zero",
    ),
    case(
        "plot",
        "--store",
        "{d}/store_ok",
        "--out",
        "{d}/plots",
        "--budget-gib",
        "-1",
        needle="--budget-gib: must be > 0",
        id="plot-budget-negative",
    ),
    # --- report ---------------------------------------------------------------------------------
    case(
        "report",
        "--store",
        "{d}/store_ok",
        "--out",
        "{d}/report.pdf",
        needle="report.pdf: report must end in .html or .md",
        id="report-bad-suffix",
    ),
    case(
        "report",
        "--store",
        "{d}/nowhere",
        "--out",
        "{d}/r.html",
        needle="nowhere: store not found",
        id="report-missing-store",
    ),
    case(
        "report",
        "--store",
        "{d}/store_newer",
        "--out",
        "{d}/r.html",
        needle="store schema version 999",
        id="report-store-newer",
    ),
    case(
        "report",
        "--store",
        "{d}/store_empty",
        "--out",
        "{d}/r.md",
        needle="the store has no rows yet",
        id="report-empty-store",
    ),
    case(
        "report", "--store", "{d}/store_ok", "--out", "{d}/a_file/r.html", needle="a_file", id="report-out-under-file"
    ),
    case(
        "report",
        "--store",
        "{d}/store_ok",
        "--out",
        "{d}/r.html",
        "--budget-gib",
        "0",
        needle="--budget-gib: must be > 0",
        id="report-budget-zero",
    ),
    # --- stores hold rows only; object-store locations and locks (issue 14) ------------------------
    case(
        "plot",
        "--store",
        "{d}/store_ok",
        "--out",
        "{d}/store_ok/plots",
        needle="--out {d}/store_ok/plots: inside the txlab store {d}/store_ok, which holds result rows only",
        id="plot-out-inside-the-store",
    ),
    case(
        "plot",
        "--store",
        "{d}/store_ok",
        "--out",
        "{d}/store_empty/deep/plots",
        needle="inside the txlab store {d}/store_empty",
        id="plot-out-inside-another-store",
    ),
    case(
        "report",
        "--store",
        "{d}/store_ok",
        "--out",
        "{d}/store_ok/report.html",
        needle="e.g. --out plots/store_ok",
        id="report-out-inside-the-store",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--dry-run",
        "--store",
        "nosuchscheme://bucket/x",
        needle="nosuchscheme://bucket/x: cannot open store location",
        id="sweep-store-unknown-scheme",
    ),
    case(
        "plot",
        "--store",
        "nosuchscheme://bucket/x",
        "--out",
        "{d}/plots",
        needle="nosuchscheme://bucket/x: cannot open store location",
        id="plot-store-unknown-scheme",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--store",
        LOCKED_OBJECT_STORE,
        needle=f"{LOCKED_OBJECT_STORE}: another txlab sweep is writing to this store (pid 4242 on elsewhere; lease",
        id="sweep-object-store-locked",
    ),
    case(
        "sweep",
        "{d}/good_spec.yaml",
        "--store",
        "memory://txlab-bad-input/a_file",
        needle="memory://txlab-bad-input/a_file: store path is a file",
        id="sweep-object-store-path-is-a-file",
    ),
    # --- advise ------------------------------------------------------------------------------------
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100",
        "--devices",
        "8",
        needle="--hardware: unknown profile 'h100'; did you mean",
        id="advise-unknown-hardware",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "2",
        "--objective",
        "cost",
        needle="--objective cost: ranks by predicted $/Mtok, which needs a price",
        id="advise-cost-no-price",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "3",
        needle="--devices: no layout of 3 devices is valid",
        id="advise-devices-unreachable",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "0",
        needle="--devices: must be >= 1",
        id="advise-devices-zero",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "1",
        "--set",
        "measure.budget_gib=0.00001",
        needle="alone need 1.8 MiB a device",
        id="advise-state-floor-over",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "1",
        "--workers",
        "1",
        "--json",  # quiet: no progress lines before the one line (without it they come first, on stderr)
        "--set",
        "measure.budget_gib=0.00195",
        needle="no feasible candidate on 1 devices of 2.0 MiB: the smallest predicted peak",
        id="advise-no-feasible-candidate",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "1",
        "--confirm",
        needle="--confirm: runs the winner on this machine",
        id="advise-confirm-absent-hardware",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "1",
        "--set",
        "workload.kind=prefill",
        needle="workload.kind: txlab advise searches training",
        id="advise-inference",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "8-4",
        needle="--devices: range '8-4' must run from a count >= 1 up to one no smaller",
        id="advise-devices-range-backwards",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "eight",
        needle="--devices: 'eight' is not a device count; allowed: a count (64), a range",
        id="advise-devices-not-a-count",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "1",
        "--workers",
        "1",
        "--json",
        "--target-tokens-per-s",
        "1e15",
        needle="--target-tokens-per-s: 1,000,000,000,000,000 tokens/s is not reached on 1 x h100-sxm",
        id="advise-target-not-met",
    ),  # fmt: skip
    case(
        "advise",
        "{d}/good.yaml",
        "--hardware",
        "h100-sxm",
        "--devices",
        "1-2",
        "--target-tokens-per-s",
        "-5",
        needle="--target-tokens-per-s: must be > 0, got -5.0",
        id="advise-target-negative",
    ),  # fmt: skip
]


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            st = p.stat()
            out[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns if p.is_file() else 0)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    make_assets(d)
    make_object_store_assets()
    (d / "good_spec.yaml").write_text(yaml.safe_dump({"name": "t", "base": TINY, "grid": GRID}))
    key = Store.open(str(d / "store_ok")).read().to_pylist()[0]["trial_key"]
    return d, key


def fill(argv: list[str], d: Path, key: str) -> list[str]:
    return [a.replace("{d}", str(d)).replace("{key}", key) for a in argv]


def test_corpus_is_large_and_covers_every_command():
    commands = {p.values[0][0] for p in CASES}
    assert len(CASES) >= 40
    assert {"run", "sweep", "rerun", "estimate", "train", "generate", "plot", "report", "attention"} <= commands
    assert any("--dry-run" in p.values[0] for p in CASES)


@pytest.mark.parametrize("argv, needle", CASES)
def test_bad_input(argv, needle, assets, capsys, monkeypatch):
    d, key = assets
    monkeypatch.chdir(d)  # a relative default (results/<sweep name>, runs/<key>) would land here
    before = snapshot(d)
    rc = main(fill(argv, d, key))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and len(lines[0]) < 1100, err[:2000]
    assert needle.replace("{d}", str(d)) in lines[0], err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert snapshot(d) == before, "bad input wrote something"
    assert not (d / "PWNED").exists()


# --- end to end: the real process, its exit status and stderr -------------------------------------


def txlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "txlab", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "{d}/good.yaml", "--set", "model.n_heads=3"], "model.n_heads: must divide"),
        (["sweep", "{d}/spec_skip_code.yaml", "--store", "{d}/s"], "skip_if[0]"),
        (["plot", "--store", "{d}/store_ok", "--out", "{d}/store_ok/plots"], "inside the txlab store"),
        (["generate", "--checkpoint", "{d}/hostile.pt", "--prompt", "x"], "not a txlab checkpoint"),
    ],
    ids=["run", "sweep-skip-code", "plot-out-inside-store", "generate-hostile"],
)
def test_bad_input_end_to_end(argv, needle, assets):
    d, key = assets
    before = snapshot(d)
    r = txlab(*fill(argv, d, key), cwd=d)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
    assert snapshot(d) == before and not (d / "PWNED").exists()


# --- unexpected internal errors: short by default, the traceback with --debug ----------------------


def _boom(args):
    raise RuntimeError("the planets are misaligned")


def test_internal_error_is_one_line_without_debug(monkeypatch, capsys, assets):
    d, _ = assets
    monkeypatch.setattr("txlab.cli.cmd_run", _boom)
    assert main(["run", str(d / "good.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "internal error: RuntimeError: the planets are misaligned (rerun with --debug for the traceback)"
    ]


def test_internal_error_shows_traceback_with_debug(monkeypatch, capsys, assets):
    d, _ = assets
    monkeypatch.setattr("txlab.cli.cmd_run", _boom)
    assert main(["--debug", "run", str(d / "good.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_boom" in err and "the planets are misaligned" in err


def test_internal_error_end_to_end(assets):
    """A real process with an injected fault: exit 1 and one line; the traceback only with --debug."""
    d, _ = assets
    code = (
        "import sys, txlab.cli as c\n"
        "def boom(a): raise RuntimeError('injected')\n"
        "c.cmd_run = boom\n"
        "sys.exit(c.main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for debug in (False, True):
        argv = [sys.executable, "-c", code, *(["--debug"] if debug else []), "run", str(d / "good.yaml")]
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 1, r.stderr
        if debug:
            assert "Traceback" in r.stderr and "RuntimeError: injected" in r.stderr
        else:
            assert r.stderr.strip().splitlines() == [
                "internal error: RuntimeError: injected (rerun with --debug for the traceback)"
            ]
