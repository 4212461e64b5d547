"""Generation: top-k / top-p filtering, seeded sampling, greedy decoding, the command line."""

import subprocess
import sys

import pytest
import torch

from tests.support import cfg, train_tokenizer
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
    text = generate(str(run_dir), "The ", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=0)
    assert isinstance(text, str) and len(text) > 0 and " " in text  # it learnt that text has spaces


def test_generate_with_an_hf_tokenizer_run(tmp_path):
    tok = train_tokenizer(tmp_path / "tok")
    run = tmp_path / "run"
    train(
        cfg(data__source="corpus", data__tokenizer=f"hf:{tok}", model__vocab_size=320, train__steps=3),
        run,
        progress=False,
    )
    assert (run / "tokenizer").is_dir()  # the run keeps its tokenizer
    assert isinstance(generate(str(run), "The ", max_new_tokens=10, seed=0), str)


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
