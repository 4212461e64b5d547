"""Generation: top-k / top-p filtering, seeded sampling, greedy decoding, the command line."""

import shutil
import subprocess
import sys

import pytest
import torch

from tests.support import cfg, train_tokenizer
from txlab.data.tokenizer import ByteTokenizer, load_tokenizer
from txlab.model.gpt import GPT
from txlab.train.checkpoint import load_model
from txlab.train.generate import filter_logits, generate, sample
from txlab.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.76)).tolist() == [True, True, True, False]
    assert torch.isfinite(filter_logits(logits[[3, 1, 0, 2]], top_p=0.5)).tolist() == [False, False, True, False]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    train(cfg(data__source="corpus", train__steps=30, train__warmup=3, train__lr=3e-3), d, progress=False)
    return d


def greedy_by_hand(model, prompt: list[int], n: int, context: int, eot_id: int | None = None) -> list[int]:
    """Argmax decoding written out: the model's last hidden state through lm_head, the context cropped."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            hidden = model(torch.tensor([ids[-context:]]))
            nxt = int(model.lm_head(hidden[0, -1]).argmax())
            if nxt == eot_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_sampling_is_seeded_and_greedy_is_deterministic(run_dir):
    model, c = load_model(run_dir)
    prompt = list(b"The ")
    a = sample(model, prompt, 30, temperature=1.0, top_k=20, seed=3, eot_id=256, context=64)
    b = sample(model, prompt, 30, temperature=1.0, top_k=20, seed=3, eot_id=256, context=64)
    other = sample(model, prompt, 30, temperature=1.0, top_k=20, seed=4, eot_id=256, context=64)
    assert a == b and a != other and len(a) <= 30 and all(0 <= i < 256 for i in a)
    g1 = sample(model, prompt, 20, temperature=0.0, seed=1, eot_id=256, context=64)
    g2 = sample(model, prompt, 20, temperature=0.0, seed=2, eot_id=256, context=64)
    assert g1 == g2


@pytest.fixture(scope="module")
def untrained():
    """A freshly initialised model with its own output matrix: its argmax changes from token to token (the
    30-step run's greedy text is all spaces, and a tied untrained model repeats its last token), so greedy
    decoding is tested on more than one repeated token."""
    torch.manual_seed(0)
    return GPT(cfg(model__vocab_size=257, model__tie_weights=False).model, 64).eval()


def test_temperature_zero_top_k_1_and_a_tiny_nucleus_are_argmax_through_the_model(untrained):
    model, context = untrained, 64
    short = list(b"The ")
    long = list(b"Pack my box with five dozen liquor jugs, and a naive cafe: it ")  # 62 bytes: crops at 64
    for prompt, n in [(short, 20), (long, 12)]:
        greedy = greedy_by_hand(model, prompt, n, context)
        assert len(greedy) == n and len(set(greedy)) > 3, greedy
        assert sample(model, prompt, n, temperature=0.0, seed=5, eot_id=256, context=context) == greedy
        for seed in (0, 1):  # one token left to draw: the seed cannot matter
            assert sample(model, prompt, n, temperature=1.0, top_k=1, seed=seed, eot_id=256, context=context) == greedy
            assert sample(model, prompt, n, temperature=0.7, top_p=1e-6, seed=seed, context=context) == greedy
    # a sampled continuation is not the greedy one (the checks above would pass for a sampler stuck on argmax)
    assert sample(model, short, 20, temperature=1.0, seed=0, eot_id=256, context=context) != greedy_by_hand(
        model, short, 20, context
    )


def test_max_new_tokens_bounds_the_sample_and_end_of_text_stops_it(untrained, run_dir):
    model = untrained
    prompt = list(b"The ")
    for n in (1, 7):  # no end-of-text id: exactly max_new_tokens
        assert len(sample(model, prompt, n, temperature=1.0, seed=0, eot_id=None, context=64)) == n
    # greedy: make its k-th token the end-of-text id; it stops just before, the token not emitted
    greedy = greedy_by_hand(model, prompt, 20, 64)
    k = max(i for i, t in enumerate(greedy) if t not in greedy[:i])  # the last token that is new there
    assert k >= 3, greedy
    assert sample(model, prompt, 20, temperature=0.0, eot_id=greedy[k], context=64) == greedy[:k]
    # sampling: the same draws up to the end-of-text token (a space: the trained run's likeliest), which ends
    # it unemitted
    model, _ = load_model(run_dir)
    eot = ord(" ")
    for seed in range(4):
        free = sample(model, prompt, 40, temperature=1.0, seed=seed, eot_id=None, context=64)
        stopped = sample(model, prompt, 40, temperature=1.0, seed=seed, eot_id=eot, context=64)
        assert eot not in stopped and stopped == free[: len(stopped)]
        assert len(stopped) == 40 or free[len(stopped)] == eot, (seed, stopped, free)


def test_generate_decodes_the_seeded_sample(run_dir):
    model, _ = load_model(run_dir)
    text = generate(str(run_dir), "The ", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=0)
    ids = sample(model, list(b"The "), 100, temperature=0.8, top_p=0.9, seed=0, eot_id=256, context=64)
    assert text == ByteTokenizer().decode(ids)  # the continuation only, through the run's tokenizer
    assert len(text) > 0 and " " in text  # it learnt that text has spaces
    assert generate(str(run_dir), "The ", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=0) == text
    assert generate(str(run_dir), "The ", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=1) != text
    greedy = ByteTokenizer().decode(greedy_by_hand(model, list(b"The "), 30, 64))
    assert generate(str(run_dir), "The ", max_new_tokens=30, temperature=0.0, seed=7) == greedy
    assert 0 < len(generate(str(run_dir), "The ", max_new_tokens=5, seed=0)) <= 5  # one byte per token


def test_generate_with_an_hf_tokenizer_run(tmp_path):
    tok = train_tokenizer(tmp_path / "tok")
    run = tmp_path / "run"
    train(
        cfg(data__source="corpus", data__tokenizer=f"hf:{tok}", model__vocab_size=320, train__steps=3),
        run,
        progress=False,
    )
    assert (run / "tokenizer").is_dir()  # the run keeps its tokenizer
    shutil.rmtree(tok)  # ... and generates with it: the tokenizer it was trained from is gone
    saved = load_tokenizer(f"hf:{run / 'tokenizer'}")
    model, _ = load_model(run)
    ids = sample(model, saved.encode("The "), 10, seed=0, eot_id=saved.eot_id, context=64)
    assert all(0 <= i < 320 for i in ids) and any(i >= 256 for i in ids + saved.encode("The "))
    assert generate(str(run), "The ", max_new_tokens=10, seed=0) == saved.decode(ids)


def test_cli_generate(run_dir):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "txlab",
            "generate",
            "--checkpoint",
            str(run_dir),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "20",
            "--temperature",
            "0.7",
            "--top-k",
            "10",
            "--top-p",
            "0.9",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.startswith("def "), r.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "txlab", "generate", "--checkpoint", str(run_dir / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no checkpoint there" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
