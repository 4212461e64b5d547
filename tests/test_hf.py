"""Real models, faithful to the logit: small random models of each supported family, built with
transformers' own classes (no download), saved as safetensors, loaded by txlab (`model.hf`,
`model.init: pretrained`) and held to transformers' forward: logits (max |diff| / max |logit| <= 1e-5,
fp32), the parameter count, and one training step's loss and gradients.

Norm weights and biases are perturbed before saving, so a norm or bias that txlab ignored or mapped
wrongly shows in the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import txlab
from txlab.config import ConfigError, build_config
from txlab.model import hf as hf_weights
from txlab.policy.loss import full_loss

transformers = pytest.importorskip("transformers")

V, T = 101, 24
# Llama 3.1's RoPE scaling with a short original context, so the scaled band reaches the tested positions
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}  # fmt: skip
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
              max_position_embeddings=128, rms_norm_eps=1e-5)  # fmt: skip


def _families():
    t = transformers
    return {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**COMMON, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
                                                          tie_word_embeddings=False)),
        "llama-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**COMMON, num_key_value_heads=4, tie_word_embeddings=True)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**COMMON, num_key_value_heads=2, head_dim=24,
                                                                sliding_window=None)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**COMMON, num_key_value_heads=2)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32)),
    }  # fmt: skip


FAMILIES = list(_families())


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights and biases away from their init (ones, zeros), so an ignored one changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _families()[request.param]().float().eval()
    _perturb(model)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    return request.param, model, directory


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers(checkpoint):
    family, hf, directory = checkpoint
    ours = txlab.from_pretrained(str(directory), seq_len=T)
    ids = _ids()[:, :T]
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.logits(ids)
    assert got.shape == ref.shape == (2, T, V)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, (family, err)
    assert ours.num_params() == hf.num_parameters()


def test_a_training_step_has_transformers_loss_and_gradients(checkpoint):
    family, hf, directory = checkpoint
    ours = txlab.from_pretrained(str(directory), seq_len=T).train()
    hf = hf.train()  # dropout is 0 in every config above
    ids = _ids(2)
    x, y = ids[:, :-1], ids[:, 1:]
    ref_loss = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())
    loss = full_loss(ours(x), ours.lm_head.weight, y)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss, ref_loss)
    hf.zero_grad(set_to_none=True)
    ref_loss.backward()
    loss.backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    names = hf_weights._gpt2_names(ours.cfg) if family == "gpt2" else hf_weights._llama_names(ours.cfg)
    for name, p in ours.named_parameters():
        parts = [theirs[t] for t in names[name]]  # the same layout change as the weights'
        expected = hf_weights._convert(name, parts, ours.cfg, "gpt2" if family == "gpt2" else "llama")
        rel = ((p.grad - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-4, (family, name, rel)
    hf.zero_grad(set_to_none=True)


def test_config_from_a_checkpoint_fills_the_model_section_and_explicit_keys_win(checkpoint):
    family, hf, directory = checkpoint

    def config(**model):
        return build_config({"model": {"hf": str(directory), **model}, "workload": {"seq_len": 16}})

    cfg = config()
    c = hf.config
    assert cfg.model.size == "hf" and cfg.model.vocab_size == V and cfg.model.init == "random"
    if family == "gpt2":
        assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.pos, cfg.model.norm) == (2, 64, "learned", "layernorm")
    else:
        assert cfg.model.n_kv_heads == c.num_key_value_heads and cfg.model.mlp_hidden == c.intermediate_size
        assert cfg.model.qk_norm == (family == "qwen3") and cfg.model.attn_bias == (family == "qwen2")
        assert cfg.model.tie_weights == c.tie_word_embeddings
    assert config(n_layers=1).model.n_layers == 1
    # the path enters the trial key (a new key set); the same checkpoint gives the same key
    assert cfg.trial_key == config().trial_key
    assert cfg.trial_key != build_config({"workload": {"seq_len": 16}}).trial_key


def test_a_pretrained_trial_runs_on_the_checkpoints_weights(checkpoint):
    from txlab.trial import run_trial

    family, hf, directory = checkpoint
    cfg = build_config(
        {"model": {"hf": str(directory), "init": "pretrained"}, "workload": {"seq_len": 16, "steps": 1},
         "policy": {"name": "recompute"}, "measure": {"device": "cpu"}}
    )  # fmt: skip
    row = run_trial(cfg)
    assert row["status"] == "ok", row["error"]
    assert row["n_params"] == hf.num_parameters() and row["loss"] > 0


def test_weights_that_do_not_fit_are_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = _families()["llama"]()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    cut = dict(tensors)
    del cut["model.layers.1.mlp.up_proj.weight"]
    save_file(cut, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.layers.1.mlp.up_proj.weight.*missing"):
        txlab.from_pretrained(str(tmp_path))
    extra = {**tensors, "model.layers.9.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"].clone()}
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.layers.9.mlp.up_proj.weight.*not in the config"):
        txlab.from_pretrained(str(tmp_path))
    wrong = {**tensors, "model.norm.weight": torch.ones(7)}
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model.norm.weight.*shape \(7,\)"):
        txlab.from_pretrained(str(tmp_path))


def test_sharded_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    model = _families()["qwen3"]().eval()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = _ids()[:, :T]
    with torch.no_grad():
        assert torch.allclose(txlab.from_pretrained(str(tmp_path), seq_len=T).logits(ids), model(ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "no config.json"),
        ("{not json", "not a JSON config"),
        ('{"model_type": "bert"}', "model_type 'bert' is not supported; supported: gpt2, llama, mistral, qwen2, qwen3"),
        ('{"model_type": "llama"}', "lacks 'num_attention_heads'"),
        ('["a list"]', "must hold a JSON object"),
    ],
)
def test_bad_checkpoint_configs_are_one_line_errors(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_config({"model": {"hf": str(tmp_path)}})


def test_a_size_preset_and_a_checkpoint_cannot_both_name_the_model(checkpoint):
    family, hf, directory = checkpoint
    with pytest.raises(ConfigError, match="model.size: 'debug' and model.hf both give the model's shape"):
        build_config({"model": {"hf": str(directory), "size": "debug"}, "workload": {"seq_len": 16}})
    assert build_config({"model": {"hf": str(directory), "size": "hf"}, "workload": {"seq_len": 16}}).model.size == "hf"


def test_sliding_window_checkpoints_are_refused(tmp_path):
    cfg = transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4096)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="sliding-window attention \\(window 4096\\) is not supported"):
        build_config({"model": {"hf": str(tmp_path)}, "workload": {"seq_len": 16}})


def test_missing_paths_and_offline_hub_ids_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        build_config({"model": {"hf": str(tmp_path / "nope")}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="is not a local checkpoint and the hub could not be read"):
        build_config({"model": {"hf": "meta-llama/Llama-3.2-1B"}})
    with pytest.raises(ConfigError, match="model.init: 'pretrained' loads the weights of model.hf"):
        build_config({"model": {"init": "pretrained"}})


def test_rope_keys_come_from_old_and_new_config_layouts(tmp_path):
    old = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
           "intermediate_size": 40, "vocab_size": 11, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(old))
    m = build_config({"model": {"hf": str(tmp_path)}}).model
    assert (m.rope_theta, m.rope_scaling, m.rope_factor, m.rope_original_len) == (500000.0, "llama3", 32.0, 8192)
