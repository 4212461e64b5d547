"""Attention distance (txlab.interpret.attention_distance, txlab.analysis.attention, `txlab attention`).

Models whose attention is known in advance: with q and k zeroed every score is equal, so each query
spreads its attention uniformly over its causal past; with constant q and k rotated one position apart
by RoPE, every query attends to the token before it. Also: the table's shape and normalisation, the
capturing kernel against the reference kernel (grouped KV heads, row chunks), a Hugging Face
checkpoint against the attention probabilities transformers itself returns, and the command end to end
on a txlab training run and a Hugging Face checkpoint (with and without its tokenizer).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.support import TEXT, cfg, train_tokenizer
from txlab.cli import main
from txlab.interpret.attention_distance import (
    COLUMNS,
    _Capture,
    attention_distance,
    attention_histograms,
    uniform_mass,
)
from txlab.model.attention import math_attention, sdpa_attention
from txlab.model.gpt import GPT, rope_frequencies

pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def _uniform_by_hand(T: int) -> list[float]:
    """Query i gives 1 / (i + 1) to each of its i + 1 keys; distance d is reached by queries i >= d."""
    return [sum(1.0 / (i + 1) for i in range(d, T)) / T for d in range(T)]


def _zero_qk(model: GPT) -> None:
    with torch.no_grad():
        for block in model.blocks:
            a = block.attn
            a.qkv.weight[: (a.n_heads + a.n_kv_heads) * a.head_dim] = 0
            if a.qkv.bias is not None:
                a.qkv.bias[: (a.n_heads + a.n_kv_heads) * a.head_dim] = 0


def _previous_token(model: GPT, kv_heads: list[int], amplitude: float = 12.0) -> None:
    """Make the query heads of `kv_heads` attend to the previous token, the others uniformly: q and k
    are constant (biases only, weights zero), k = (1, 0) in every rotated pair and q = that pair turned
    back by one position's angle, so under RoPE q_i . k_j = |A|^2 sum_p cos(w_p (1 - (i - j))), largest
    at i - j = 1 (by 0.52 |A|^2 / sqrt(head_dim) over the next best distance, d = 0 or 2)."""
    a = model.blocks[0].attn
    H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
    w = rope_frequencies(model.cfg)
    k = torch.zeros(D)
    k[0::2] = 1.0
    q = torch.empty(D)
    q[0::2], q[1::2] = torch.cos(-w), torch.sin(-w)
    with torch.no_grad():
        a.qkv.weight[: (H + 2 * Hkv) * D] = 0
        a.qkv.bias.zero_()
        for g in kv_heads:
            a.qkv.bias[H * D + g * D : H * D + (g + 1) * D] = amplitude * k
            for h in range(g * (H // Hkv), (g + 1) * (H // Hkv)):
                a.qkv.bias[h * D : (h + 1) * D] = amplitude * q


def _ids(T: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed))


def test_zeroed_queries_and_keys_attend_uniformly_over_the_causal_past():
    T = 40
    torch.manual_seed(0)
    model = GPT(cfg(model__n_layers=1).model, 64)
    _zero_qk(model)
    df = attention_distance(model, _ids(T))
    expected = _uniform_by_hand(T)
    for head in (-1, 0, 1, 2, 3):
        rows = df[df["head"] == head]
        assert rows["distance"].tolist() == list(range(T))
        assert rows["mass"].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-9), head
        # mean distance: query i looks back i / 2 on average, so (1/T) sum_i i / 2 = (T - 1) / 4
        assert rows["mean_distance"].iloc[0] == pytest.approx((T - 1) / 4, rel=1e-6)
    assert uniform_mass(T).tolist() == pytest.approx(expected, rel=1e-12)


def test_a_rope_previous_token_head_puts_its_mass_at_distance_one():
    T = 32
    torch.manual_seed(0)
    c = cfg(model__n_layers=1, model__pos="rope", model__attn_bias=True, workload__seq_len=T)
    model = GPT(c.model, T)
    _previous_token(model, kv_heads=[0, 2])  # query heads 0 and 2 (n_kv_heads = n_heads = 4)
    df = attention_distance(model, _ids(T))
    for head in (0, 2):  # query 0 has only itself; every other query its predecessor
        rows = df[df["head"] == head].set_index("distance")["mass"]
        assert rows[1] == pytest.approx((T - 1) / T, abs=1e-5) and rows[0] == pytest.approx(1 / T, abs=1e-5)
        assert df[df["head"] == head]["mean_distance"].iloc[0] == pytest.approx((T - 1) / T, abs=1e-4)
    for head in (1, 3):  # no bias on their keys: uniform
        assert df[df["head"] == head]["mass"].tolist() == pytest.approx(_uniform_by_hand(T), rel=1e-5)
    every = df[df["head"] == -1].set_index("distance")["mass"]
    assert every[1] == pytest.approx(((T - 1) / T + _uniform_by_hand(T)[1]) / 2, abs=1e-5)


def test_grouped_kv_heads_share_their_keys_attention():
    T = 24
    torch.manual_seed(0)
    c = cfg(model__n_layers=1, model__pos="rope", model__attn_bias=True, model__n_kv_heads=2, workload__seq_len=T)
    model = GPT(c.model, T)
    _previous_token(model, kv_heads=[1])  # query heads 2 and 3 read kv head 1
    df = attention_distance(model, _ids(T))
    mass1 = {h: df[(df["head"] == h) & (df["distance"] == 1)]["mass"].item() for h in range(4)}
    assert mass1[2] == pytest.approx((T - 1) / T, abs=1e-5) and mass1[3] == pytest.approx((T - 1) / T, abs=1e-5)
    assert mass1[0] == pytest.approx(_uniform_by_hand(T)[1], rel=1e-5) == mass1[1]


def test_the_table_is_normalised_per_layer_and_head_and_its_means_are_the_masses():
    T = 50
    torch.manual_seed(1)
    model = GPT(cfg(model__n_layers=3, model__n_kv_heads=2).model, 64)
    df = attention_distance(model, _ids(T))
    assert tuple(df.columns) == COLUMNS
    assert set(df["layer"]) == {0, 1, 2} and set(df["head"]) == {-1, 0, 1, 2, 3} and (df["tokens"] == T).all()
    assert len(df) == 3 * 5 * T and (df["mass"] >= 0).all()
    for key, g in df.groupby(["layer", "head"]):
        assert g["distance"].tolist() == list(range(T))
        assert g["mass"].sum() == pytest.approx(1.0, abs=1e-12), key
        assert g["mean_distance"].nunique() == 1
        assert g["mean_distance"].iloc[0] == pytest.approx((g["distance"] * g["mass"]).sum(), rel=1e-9)
    heads = df[df["head"] >= 0].groupby(["layer", "distance"])["mass"].mean()
    every = df[df["head"] == -1].set_index(["layer", "distance"])["mass"]
    assert every.tolist() == pytest.approx(heads.loc[every.index].tolist(), abs=1e-12)
    assert set(attention_distance(model, _ids(T), per_head=False)["head"]) == {-1}
    # a batch of sequences: the masses of its rows averaged
    two = attention_distance(model, torch.stack([_ids(T, 1), _ids(T, 2)]), per_head=False)["mass"]
    each = [attention_distance(model, _ids(T, s), per_head=False)["mass"] for s in (1, 2)]
    assert two.tolist() == pytest.approx(((each[0] + each[1]) / 2).tolist(), abs=1e-7)


def test_the_capturing_kernel_is_the_reference_kernel_and_row_chunks_change_nothing():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    whole, chunked = _Capture(), _Capture(chunk_bytes=4 * 2 * 4 * 37 * 5)  # 5 query rows a chunk
    ref = math_attention(q, k, v)
    assert torch.allclose(whole(q, k, v), ref, atol=1e-6) and torch.allclose(chunked(q, k, v), ref, atol=1e-6)
    assert torch.allclose(whole.hist, chunked.hist, atol=1e-9)
    # the probabilities by hand, folded by distance
    kk = k.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-2, -1)) / 8**0.5
    p = s.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    by_hand = torch.stack([torch.diagonal(p, -d, -2, -1).sum((0, -1)) for d in range(37)], dim=-1)
    assert torch.allclose(whole.hist.float(), by_hand, atol=1e-5)


def test_the_forward_is_the_models_own_and_its_kernels_are_put_back():
    torch.manual_seed(0)
    model = GPT(cfg(model__n_layers=2).model, 64).eval()
    x = _ids(30)[None]
    with torch.no_grad():
        ref = model(x)
    hist = attention_histograms(model, x, chunk_bytes=4 * 4 * 30 * 3)
    assert hist.shape == (2, 4, 30)
    assert all(b.attn.attn_fn is sdpa_attention for b in model.blocks)
    seen = []

    def spy(q, k, v):  # the capturing forward feeds each layer what the plain forward does
        seen.append(q)
        return sdpa_attention(q, k, v)

    with torch.no_grad():
        for b in model.blocks:
            b.attn.attn_fn = spy
        assert torch.allclose(model(x), ref)
    with pytest.raises(ValueError, match="65 tokens but the model holds 64 positions"):
        attention_histograms(model, _ids(65)[None])


# --- Hugging Face checkpoints ---------------------------------------------------------------------


def _llama(directory, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init gives near-uniform attention: sharpen it so the test means something
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def test_a_hugging_face_checkpoint_has_the_attention_transformers_computes(tmp_path):
    import txlab

    hf = _llama(tmp_path, 257)
    T = 48
    ids = _ids(T)
    with torch.no_grad():
        attentions = hf(ids[None], output_attentions=True).attentions  # per layer (1, H, T, T)
    df = attention_distance(txlab.from_pretrained(str(tmp_path), seq_len=64), ids)
    for layer, p in enumerate(attentions):
        for head in range(4):
            expected = [torch.diagonal(p[0, head], -d).sum().item() / T for d in range(T)]
            got = df[(df["layer"] == layer) & (df["head"] == head)]["mass"].tolist()
            assert got == pytest.approx(expected, abs=1e-5), (layer, head)
    assert min(p.amax(-1).mean().item() for p in attentions) > 0.5  # sharp: a permutation error would show


# --- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from txlab.train.loop import train

    d = tmp_path_factory.mktemp("run")
    train(cfg(train__steps=2, train__warmup=1), d, progress=False)
    return d


def _check_outputs(out, layers: int, tokens: int) -> pd.DataFrame:
    from PIL import Image

    df = pd.read_parquet(out / "attention_distance.parquet")
    assert tuple(df.columns) == COLUMNS and sorted(df["layer"].unique()) == list(range(layers))
    assert (df["tokens"] == tokens).all()
    assert df.groupby(["layer", "head"])["mass"].sum().tolist() == pytest.approx([1.0] * (layers * 5), abs=1e-12)
    with Image.open(out / "attention_distance.png") as im:
        assert im.width > 400 and im.height > 200 and len(np.unique(np.asarray(im.convert("L")))) > 10
    assert (out / "attention_distance.svg").read_text().lstrip().startswith("<?xml")
    return df


def test_cli_on_a_training_run(run_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    assert main(["attention", "--checkpoint", str(run_dir), "--text", str(text), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "the text has" in out and "using the first 64 (the model's positions)" in out
    assert "mean attention distance per layer:" in out and "attention_distance.png" in out
    _check_outputs(tmp_path / "a", layers=2, tokens=64)
    # its checkpoint file, fewer tokens
    args = ["--checkpoint", str(run_dir / "checkpoint.pt"), "--text", str(text), "--max-tokens", "20"]
    assert main(["attention", *args, "--out", str(tmp_path / "b")]) == 0
    assert "using the first 20 (--max-tokens)" in capsys.readouterr().out
    _check_outputs(tmp_path / "b", layers=2, tokens=20)


def test_cli_on_a_hugging_face_checkpoint_with_and_without_its_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    bare, with_tok = tmp_path / "bare", tmp_path / "with_tok"
    _llama(bare, 257)
    main(["attention", "--checkpoint", str(bare), "--text", str(text), "--out", str(tmp_path / "a")])
    n_bytes = len(TEXT.encode("utf-8"))
    assert f"{n_bytes} tokens;" in capsys.readouterr().out  # the byte tokenizer
    _check_outputs(tmp_path / "a", layers=2, tokens=n_bytes)
    train_tokenizer(with_tok)
    _llama(with_tok, 320)
    assert main(["attention", "--checkpoint", str(with_tok), "--text", str(text), "--out", str(tmp_path / "b")]) == 0
    n = len(AutoTokenizer.from_pretrained(str(with_tok))(TEXT)["input_ids"])
    assert n < n_bytes and f"{n} tokens;" in capsys.readouterr().out
    _check_outputs(tmp_path / "b", layers=2, tokens=n)


def test_the_plot_reads_the_table_only(tmp_path):
    from txlab.analysis.attention import bin_of, plot_attention_distance, position, read_table

    assert bin_of([0, 1, 2, 3, 4, 7, 8, 1023]).tolist() == [0, 1, 2, 2, 3, 3, 4, 10]
    assert [position(d) for d in (0, 0.5, 1, 2, 4)] == [-0.5, 0.0, 0.5, 1.5, 2.5]
    torch.manual_seed(0)
    df = attention_distance(GPT(cfg(model__n_layers=6).model, 64), _ids(64))
    df.to_parquet(tmp_path / "t.parquet")
    fig = plot_attention_distance(tmp_path / "t.parquet")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6 and len(fig.axes) == 8  # two rows of four, two left empty
    assert [ax.get_title().split(":")[0] for ax in visible] == [f"layer {i}" for i in range(6)]
    with pytest.raises(ValueError, match="no column mean_distance"):
        read_table(df.drop(columns="mean_distance"))
