"""Generation: top-k / top-p filtering, seeded sampling, greedy decoding, the command line; the KV-cache
loop gives the text of the pre-cache loop (kept here as the reference), past the model's context too."""

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.support import cfg, train_tokenizer
from txlab.data.tokenizer import ByteTokenizer, load_tokenizer
from txlab.model.decode import Inference
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


@torch.no_grad()
def old_sample(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eot_id: int | None = None,
    context: int | None = None,
) -> list[int]:
    """The reference: `txlab.train.generate.sample` before it used the KV cache (commit 4257fd3), verbatim.
    Every token reruns the model over the whole context, cropped to its last `context` tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids) or ([eot_id] if eot_id is not None else [0])  # an empty prompt starts a document
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-context:] if context else ids], device=device)
        logits = F.linear(model(x)[0, -1], model.lm_head.weight).float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
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


# --- the KV-cache loop against the pre-cache loop ------------------------------------------------------

SHORT = list(b"The ")
NEAR = list(b"Pack my box with five dozen liquor jugs, and a naive cafe: it ")  # 62 bytes: fills 64 positions
LONG = list(b"Sphinx of black quartz, judge my vow. The quick brown fox jumps over the lazy dog, twice. ")  # 89
SETTINGS = {  # name -> sampling keywords
    "greedy": dict(temperature=0.0),
    "t1-top-k": dict(temperature=1.0, top_k=20),
    "t0.8-top-p": dict(temperature=0.8, top_p=0.9),
    "t1.3": dict(temperature=1.3),
}


@pytest.fixture(scope="module")
def untrained_rope():
    torch.manual_seed(1)
    return GPT(cfg(model__vocab_size=257, model__tie_weights=False, model__pos="rope").model, 64).eval()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("which", ["untrained", "untrained_rope", "trained"])
def test_sample_gives_the_old_loops_tokens_within_and_past_the_context(request, run_dir, which, setting):
    """Same seed, same tokens as the pre-cache loop: a short prompt within the 64 positions, a prompt that
    fills them after 2 tokens (the rest from cropped windows), one longer than them (cropped from the start)."""
    model = load_model(run_dir)[0] if which == "trained" else request.getfixturevalue(which)
    kw = SETTINGS[setting]
    for prompt, n in [(SHORT, 40), (NEAR, 30), (LONG, 12)]:
        for seed in (0, 1):
            old = old_sample(model, prompt, n, seed=seed, eot_id=None, context=64, **kw)
            new = sample(model, prompt, n, seed=seed, eot_id=None, context=64, **kw)
            assert new == old, (which, setting, len(prompt), seed)
            assert len(new) == n
    if which != "trained":  # the untrained models' tokens vary (the trained run's greedy text is all spaces)
        assert len(set(old)) > 3, old


def test_sample_stops_at_end_of_text_as_the_old_loop(run_dir):
    """End-of-text (here a space, the trained run's likeliest byte) ends both loops at the same token,
    within the context and past it; the empty prompt starts from end-of-text in both."""
    model, _ = load_model(run_dir)
    stops = 0
    for prompt in (SHORT, NEAR, []):
        for seed in range(4):
            kw = dict(temperature=1.0, seed=seed, eot_id=ord(" "), context=64)
            old = old_sample(model, prompt, 40, **kw)
            assert sample(model, prompt, 40, **kw) == old, (len(prompt), seed)
            stops += len(old) < 40
    assert stops >= 6  # the stop is exercised, not only the budget


def test_generate_gives_the_old_text(run_dir):
    """`txlab generate`'s text for a fixed seed is the old loop's, short and past the 64-byte context."""
    model, _ = load_model(run_dir)
    tok = ByteTokenizer()
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 2  # 90 bytes
    for prompt, n in [("The ", 30), ("The ", 100), (long_prompt, 20)]:
        for kw in (dict(temperature=0.0, seed=0), dict(temperature=0.8, top_p=0.9, seed=0), dict(top_k=10, seed=3)):
            old = tok.decode(old_sample(model, tok.encode(prompt), n, eot_id=tok.eot_id, context=64, **kw))
            assert generate(str(run_dir), prompt, max_new_tokens=n, **kw) == old, (prompt, n, kw)


@pytest.mark.parametrize(
    "prompt_len,n,prefills,steps",
    [
        (4, 20, 1, 19),  # within the 64 positions: one prefill, then one step per token
        (62, 10, 1 + 7, 2),  # 2 steps fill the window; each of the 7 tokens after it prefills a cropped window
        (89, 5, 5, 0),  # the prompt is over the window: every token sees a cropped window
    ],
)
def test_one_prefill_then_one_step_per_token(untrained, monkeypatch, prompt_len, n, prefills, steps):
    """The generation loop is the decode engine's: the model's whole-sequence forward is never called; a
    prefill, then one cached step per token, until the 64 positions are full."""
    calls = {"prefill": 0, "step": 0, "sizes": []}
    prefill, step = Inference.prefill, Inference.step

    def counted_prefill(self, idx):
        calls["prefill"] += 1
        calls["sizes"].append(idx.shape[1])
        return prefill(self, idx)

    def counted_step(self, tokens):
        calls["step"] += 1
        return step(self, tokens)

    def no_forward(*args, **kwargs):
        raise AssertionError("the whole-sequence forward was called")

    monkeypatch.setattr(Inference, "prefill", counted_prefill)
    monkeypatch.setattr(Inference, "step", counted_step)
    monkeypatch.setattr(GPT, "forward", no_forward)
    prompt = (LONG + LONG)[:prompt_len]
    out = sample(untrained, prompt, n, temperature=0.0, eot_id=None, context=64)
    assert len(out) == n
    assert (calls["prefill"], calls["step"]) == (prefills, steps)
    assert calls["sizes"] == [min(prompt_len, 64)] + [64] * (prefills - 1)
