"""Mixture-of-experts models, faithful to the logit: small random Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3
models (latent attention, group-limited sigmoid routing, shared experts, dense first layers, YaRN) built with
transformers' own classes (no download), saved in the hub's per-expert layout, loaded by txlab and held to
transformers' forward (logits, max |diff| / max |logit| <= 1e-5, fp32), parameter count, one training step's
loss and gradients, and the load-balancing loss; the grouped expert matmul against a plain loop; decoding
against the full forward; experts that do not match the config refused; MoE trials under the policies.

Norm weights and DeepSeek's routing correction bias are perturbed before saving, so a norm or bias that
txlab ignored or mapped wrongly shows in the logits (the correction bias changes which experts are chosen).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import txlab
from txlab.config import ConfigError, build_config
from txlab.model import hf as hf_weights
from txlab.model.gpt import GPT
from txlab.model.moe import expert_mm, load_balancing_loss, moe_layers, record_aux, routing_load, routing_stats
from txlab.policy.loss import full_loss

transformers = pytest.importorskip("transformers")

V, T = 61, 24
C = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, vocab_size=V, max_position_embeddings=64,
         rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5}  # fmt: skip


def _families():
    t = transformers
    return {
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(
            **C, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
        # a dense first layer (mlp_only_layers), top-k renormalised
        "qwen3_moe": lambda: t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(
            **C, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0])),
        # every second layer sparse (decoder_sparse_step), top 3 of 4 not renormalised
        "qwen3_moe-step2": lambda: t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(
            **C, num_hidden_layers=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=3,
            moe_intermediate_size=12, norm_topk_prob=False, decoder_sparse_step=2)),
        "olmoe": lambda: t.OlmoeForCausalLM(t.OlmoeConfig(
            **C, num_hidden_layers=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)),
        # latent attention with a q bottleneck, 4 groups of 2 experts (2 kept), a shared expert, a dense first layer
        "deepseek_v3": lambda: t.DeepseekV3ForCausalLM(t.DeepseekV3Config(
            **C, num_hidden_layers=3, num_key_value_heads=4, **MLA, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1)),
        # no q bottleneck, RoPE on halves (rope_interleave false), no groups, YaRN with both mscales
        "deepseek_v3-yarn": lambda: t.DeepseekV3ForCausalLM(t.DeepseekV3Config(
            **{**C, "max_position_embeddings": 64}, num_hidden_layers=2, num_key_value_heads=4,
            **{**MLA, "q_lora_rank": None}, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=2, norm_topk_prob=False,
            routed_scaling_factor=1.5, rope_interleave=False, rope_parameters=YARN)),
    }  # fmt: skip


FAMILIES = list(_families())
SOFTMAX = [f for f in FAMILIES if not f.startswith("deepseek")]  # the families with a load-balancing loss


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights and biases away from their init, and DeepSeek's correction bias away from zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name or name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _families()[request.param]().float().eval()
    _perturb(model)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    return request.param, model, directory


def _ids(seed: int = 1, n: int = T + 1) -> torch.Tensor:
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers(checkpoint):
    family, hf, directory = checkpoint
    ours = txlab.from_pretrained(str(directory), seq_len=T)
    ids = _ids()[:, :T]
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.logits(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, (family, err)
    assert ours.num_params() == hf.num_parameters()
    assert any(m.tokens_per_expert.sum() == 2 * T * m.top_k for m in moe_layers(ours))  # every token routed


def _hf_gradient(name: str, grads: dict[str, torch.Tensor], ours: GPT, family: str, interleave: bool) -> torch.Tensor:
    """transformers' gradient of txlab parameter `name`, in txlab's layout. transformers 5 keeps each layer's
    experts fused in memory (gate_up_proj (E, 2I, d), gate rows first, and down_proj), txlab's layout."""
    layer = name.split(".")[1] if name.startswith("blocks.") else None
    for ours_suffix, theirs in (("mlp.experts.fc.weight", "mlp.experts.gate_up_proj"),
                                ("mlp.experts.proj.weight", "mlp.experts.down_proj"),
                                ("mlp.router.weight", "mlp.gate.weight")):  # fmt: skip
        if name.endswith(ours_suffix):
            return grads[f"model.layers.{layer}.{theirs}"]
    names = hf_weights._llama_names(ours.cfg, family)
    return hf_weights._convert(name, [grads[t] for t in names[name]], ours.cfg, family, interleave)


def test_a_training_step_has_transformers_loss_and_gradients(checkpoint):
    family, hf, directory = checkpoint
    ours = txlab.from_pretrained(str(directory), seq_len=T).train()
    hf = hf.train()  # no dropout, no router jitter in these configs
    x, y = _ids(2)[:, :-1], _ids(2)[:, 1:]
    ref_loss = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())
    loss = full_loss(ours(x), ours.lm_head.weight, y)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss, ref_loss)
    hf.zero_grad(set_to_none=True)
    ref_loss.backward()
    loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    pad = hf.config.pad_token_id  # OLMoE's embedding has a padding row (1), which transformers never updates
    for name, p in ours.named_parameters():
        interleave = getattr(hf.config, "rope_interleave", True)
        expected, got = _hf_gradient(name, grads, ours, family.split("-")[0], interleave), p.grad
        if name == "wte.weight" and pad is not None:
            keep = torch.arange(V) != pad
            expected, got = expected[keep], got[keep]
        rel = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-4, (family, name, rel)
    hf.zero_grad(set_to_none=True)
    hf.eval()


@pytest.mark.parametrize("family", SOFTMAX)
def test_the_load_balancing_loss_is_transformers_aux_loss(family, tmp_path):
    torch.manual_seed(0)
    hf = _families()[family]().float().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = txlab.from_pretrained(str(tmp_path), seq_len=T)
    ids = _ids(3)[:, :T]
    record_aux(ours)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True).aux_loss
        ours(ids)
    aux = load_balancing_loss(moe_layers(ours))
    assert abs(aux.item() - ref.item()) <= 1e-5 * ref.item(), (aux, ref)
    assert 1.0 <= routing_load(moe_layers(ours)) <= ours.cfg.moe_experts / ours.cfg.moe_top_k
    assert routing_stats(ours) == pytest.approx((routing_load(moe_layers(ours)), aux.item()), rel=1e-6)
    record_aux(ours, False)
    ours(ids)
    detached = load_balancing_loss(moe_layers(ours))  # off by default: the figure, no graph held
    assert not detached.requires_grad and abs(detached.item() - ref.item()) <= 1e-5 * ref.item()


def test_the_checkpoint_fills_the_moe_keys(checkpoint):
    family, hf, directory = checkpoint
    m = build_config({"model": {"hf": str(directory)}, "workload": {"seq_len": 16}}).model
    c = hf.config
    assert m.mlp == "moe" and m.moe_top_k == c.num_experts_per_tok
    sparse = [i for i in range(m.n_layers) if m.moe_layer(i)]
    expected = {
        "mixtral": [0, 1], "qwen3_moe": [1, 2], "qwen3_moe-step2": [1, 3], "olmoe": [0, 1], "deepseek_v3": [1, 2],
        "deepseek_v3-yarn": [0, 1],
    }[family]  # fmt: skip
    assert sparse == expected
    if family.startswith("deepseek"):
        assert (m.attn, m.moe_router, m.moe_shared, m.mla_kv_rank) == ("mla", "sigmoid", c.n_shared_experts, 16)
        assert (m.moe_groups, m.moe_topk_groups, m.moe_scale) == (c.n_group, c.topk_group, c.routed_scaling_factor)
    if family == "deepseek_v3-yarn":
        assert (m.rope_scaling, m.rope_factor, m.rope_original_len, m.rope_mscale_all_dim) == ("yarn", 4.0, 16, 0.5)
    if family == "olmoe":
        assert m.qk_norm and m.qk_norm_scope == "projection" and not m.moe_renorm


def test_active_parameters_leave_out_the_experts_a_token_skips(checkpoint):
    family, hf, directory = checkpoint
    ours = txlab.from_pretrained(str(directory), seq_len=T)
    m = ours.cfg
    per_expert = 3 * m.d_model * m.expert_width()
    skipped = sum(m.moe_layer(i) for i in range(m.n_layers)) * (m.moe_experts - m.moe_top_k) * per_expert
    assert ours.num_active_params() == ours.num_params() - skipped


def test_greedy_decoding_gives_the_full_forward_logits(checkpoint):
    from txlab.model.decode import generate_greedy

    family, hf, directory = checkpoint
    ours = txlab.from_pretrained(str(directory), seq_len=32)
    prompt = _ids(4)[:, :9]
    tokens, logits, run = generate_greedy(ours, prompt, 5)
    with torch.no_grad():
        ref = ours.logits(torch.cat([prompt, tokens], dim=1))
    for i, got in enumerate(logits):
        assert ((got - ref[:, 8 + i]).abs().max() / ref.abs().max()).item() <= 1e-5, (family, i)
    if family.startswith("deepseek"):  # the latent cache: kv_rank + rope numbers a token and layer
        assert run.kv_cache_bytes == 3 * 4 * 2 * 14 * (16 + 8) * (ours.cfg.n_layers / 3)


# --- experts that do not match the config --------------------------------------------------------------


def _saved(tmp_path, family="qwen3_moe"):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    _families()[family]().save_pretrained(tmp_path, safe_serialization=True)
    return load_file(str(tmp_path / "model.safetensors"))


def test_a_layer_with_fewer_or_more_experts_is_refused_naming_it(tmp_path):
    from safetensors.torch import save_file

    tensors = _saved(tmp_path)
    cut = {k: v for k, v in tensors.items() if ".layers.2.mlp.experts.7." not in k}
    save_file(cut, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="layer 2 of the checkpoint holds 7 experts, but the config gives it 8"):
        txlab.from_pretrained(str(tmp_path))
    extra = dict(tensors)  # a dense layer's MLP saved as one expert too
    for k, v in tensors.items():
        if ".layers.0.mlp." in k:
            extra[k.replace(".layers.0.mlp.", ".layers.0.mlp.experts.0.")] = v.clone()
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ConfigError, match=r"layer 0 of the checkpoint holds 1 experts, but the config gives it 0 \(a dense"
    ):
        txlab.from_pretrained(str(tmp_path))


def test_a_config_that_does_not_match_the_experts_is_refused(tmp_path):
    _saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 6, "num_experts": 6}))
    with pytest.raises(ConfigError, match="holds 8 experts, but the config gives it 6 .model.moe_experts."):
        txlab.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 24}))
    with pytest.raises(ConfigError, match=r"experts.0.gate_proj.weight' has shape \(16, 32\), which does not fit"):
        txlab.from_pretrained(str(tmp_path))


def test_deepseek_multi_token_prediction_layers_are_skipped_and_quantized_checkpoints_refused(tmp_path):
    from safetensors.torch import save_file

    tensors = _saved(tmp_path, "deepseek_v3")
    mtp = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in tensors.items() if "layers.2." in k}
    save_file(
        {**tensors, **mtp, "model.layers.3.eh_proj.weight": torch.zeros(32, 64)}, str(tmp_path / "model.safetensors")
    )
    txlab.from_pretrained(str(tmp_path))  # loads: layer 3 is the MTP module, past num_hidden_layers
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ConfigError, match=r"a quantized checkpoint \(fp8\) is not read"):
        txlab.from_pretrained(str(tmp_path))


# --- the grouped expert matmul ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, K, N", [(torch.float32, 16, 24), (torch.float32, 10, 6), (torch.bfloat16, 16, 24)])
def test_expert_mm_is_one_matmul_per_expert_with_its_gradients(dtype, K, N):
    """Rows of each expert times its matrix, empty experts included; gradients of x and of every expert's
    matrix equal autograd's through a plain loop. (K, N) = (10, 6) in fp32 (40 and 24 bytes a row) is one the
    grouped kernel does not take: the per-expert fallback."""
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1, 0]
    x = torch.randn(sum(counts), K, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(len(counts), N, K, generator=gen).to(dtype).requires_grad_()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = expert_mm(x, w, offs)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.cat([xs @ w2[e].T for e, xs in enumerate(x2.split(counts))])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out, ref, atol=tol, rtol=tol)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=tol, rtol=tol) and torch.allclose(w.grad, w2.grad, atol=tol, rtol=tol)
    assert w.grad[1].abs().max() == 0 and w.grad[4].abs().max() == 0  # experts without rows: no gradient


def test_expert_mm_runs_on_fake_tensors_in_fp32_and_counts_its_flops():
    """The estimator's fake tensors in fp32 (torch's own _grouped_mm takes only bf16 there), and
    FlopCounterMode's count: 2 M N K forward, twice that backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        x = torch.randn(12, 16, requires_grad=True)
        w = torch.randn(4, 24, 16, requires_grad=True)
        offs = torch.tensor([3, 6, 9, 12], dtype=torch.int32)
        with FlopCounterMode(display=False) as counter:
            out = expert_mm(x, w, offs)
            out.backward(torch.ones_like(out))
        assert out.shape == (12, 24) and w.grad.shape == (4, 24, 16)
    assert counter.get_total_flops() == 3 * 2 * 12 * 16 * 24


# --- trials --------------------------------------------------------------------------------------------------

SMALL = {"n_layers": 3, "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 128, "norm": "rmsnorm",
         "pos": "rope", "mlp": "moe", "moe_experts": 4, "moe_top_k": 2, "moe_hidden": 32, "mlp_bias": False,
         "attn_bias": False, "attn_out_bias": False}  # fmt: skip
SMALL_MLA = {**SMALL, "attn": "mla", "mla_q_rank": 32, "mla_kv_rank": 16, "mla_nope_dim": 16, "mla_rope_dim": 8,
             "mla_v_dim": 16, "moe_router": "sigmoid", "moe_groups": 2, "moe_topk_groups": 1, "moe_shared": 1,
             "moe_first_dense": 1}  # fmt: skip


def _trial(model: dict, **sections):
    from txlab.trial import run_trial

    raw = {"model": model, "workload": {"seq_len": 32, "steps": 1, "warmup_steps": 0, **sections.pop("workload", {})},
           "measure": sections.pop("measure", {"device": "cpu"}), **sections}  # fmt: skip
    return run_trial(build_config(raw))


@pytest.mark.parametrize("policy", ["naive", "sdpa", "checkpoint", "selective", "recompute", "planned"])
@pytest.mark.parametrize("model", [SMALL, SMALL_MLA], ids=["moe", "moe-mla"])
def test_a_moe_training_trial_runs_under_every_policy(model, policy):
    """Every memory policy; planned profiles a dense and a sparse layer apart (SMALL_MLA's first is dense)."""
    row = _trial(model, policy={"name": policy}, measure={"device": "cpu", "budget_gib": 1.0})
    assert row["status"] == "ok", row["error"]
    assert row["loss"] > 0 and row["n_params"] > row["n_active_params"] > 0
    with torch.device("meta"):
        gpt = GPT(build_config({"model": model, "workload": {"seq_len": 32}}).model, 32)
    assert row["n_active_params"] == gpt.num_active_params()


def test_selective_recomputation_keeps_the_expert_matmuls():
    """`selective` keeps projections' outputs: the grouped expert matmuls are projections (more kept than by
    `checkpoint`, which keeps only block inputs)."""
    from txlab.trial import estimate_trial

    def peak(policy):
        raw = {"model": {**SMALL, "moe_hidden": 256}, "workload": {"seq_len": 256}, "policy": {"name": policy}}
        return estimate_trial(build_config(raw))["activations_bytes"]

    assert peak("checkpoint") < peak("selective") < peak("sdpa")


def test_the_same_moe_step_has_the_same_loss_under_every_policy():
    """Latent attention's values (16 wide) are padded to the keys' width (24) for every kernel: the fused one,
    the materialized reference and the chunked tiles give one loss."""
    losses = {p: _trial(SMALL_MLA, policy={"name": p})["loss"] for p in ("naive", "sdpa", "checkpoint", "selective")}
    losses["chunked"] = _trial(SMALL_MLA, policy={"name": "custom", "attention": "chunked", "q_chunk": 16,
                                                  "k_chunk": 8})["loss"]  # fmt: skip
    assert max(losses.values()) - min(losses.values()) <= 1e-5 * losses["sdpa"], losses


@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("model", [SMALL, SMALL_MLA], ids=["moe", "moe-mla"])
def test_moe_inference_trials_run(model, kind):
    row = _trial(model, workload={"kind": kind, "decode_tokens": 4})
    assert row["status"] == "ok", row["error"]
    assert row["kv_cache_bytes"] > 0


def test_flops_per_token_count_the_active_parameters():
    from txlab.measure.throughput import flops_per_token

    row = _trial(SMALL)
    with torch.device("meta"):
        gpt = GPT(build_config({"model": SMALL, "workload": {"seq_len": 32}}).model, 32)
    # 6 N + 12 L H Q T with N the parameters a token uses (RoPE: no position table to leave out)
    assert row["flops_per_token"] == flops_per_token(gpt.num_active_params(), 3, 4, 16, 32)
    assert row["flops_per_token"] < flops_per_token(gpt.num_params(), 3, 4, 16, 32)
