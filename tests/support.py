"""Plain helpers shared by the test files (fixtures live in tests/conftest.py).

Configs for the tiny models the tests train and measure, a tokenizer trained on the fly, a forward and
backward of one config, and the subprocess plumbing of the sweep tests (spec files, environment, killing
what a local Ray leaves behind).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from txlab.config import TrialConfig, load_config
from txlab.model.gpt import GPT
from txlab.policy.apply import apply_policy

REPO = Path(__file__).resolve().parents[1]

# --- tiny models: data, training, generation ------------------------------------------------------------

TINY = {
    "model.n_layers": 2,
    "model.d_model": 64,
    "model.n_heads": 4,
    "workload.seq_len": 64,
    "workload.batch_size": 8,
    "measure.device": "cpu",
    "train.log_every": 1,
    "train.eval_batches": 4,
}

TEXT = (
    "Fünf Boxkämpfer jagen Eva quer über den Sylter Deich. The quick brown fox jumps over the lazy dog.\n\n"
    "Pack my box with five dozen liquor jugs — and a naïve café. 😀 Sphinx of black quartz, judge my vow.\n"
)


def cfg(**over):
    """TINY with overrides given as keyword arguments, `__` for the dot: cfg(train__steps=3)."""
    return load_config(None, {**TINY, **{k.replace("__", "."): v for k, v in over.items()}})


def config(overrides: dict) -> TrialConfig:
    """The default config with dotted overrides."""
    return load_config(None, overrides)


def train_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE trained on the fly with `tokenizers`, saved the way `transformers` loads it."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:10]] + [TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(directory))
    return directory


def loss_and_grads(cfg: TrialConfig, x: torch.Tensor, y: torch.Tensor, init_seed: int = 1, rng_seed: int = 2):
    """One forward + backward of a config: the loss and every parameter's gradient, by name."""
    torch.manual_seed(init_seed)
    model = GPT(cfg.model, cfg.workload.seq_len)
    params = dict(model.named_parameters())  # names before wrapping; the objects stay the same
    loss_fn = apply_policy(model, cfg.policy)
    torch.manual_seed(rng_seed)  # same dropout masks for every policy
    loss = loss_fn(model(x), model.lm_head.weight, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in params.items()}


# --- sweeps: spec files, the driver's environment, its processes ----------------------------------------

TINY_BASE = {"model": {"n_layers": 2, "d_model": 64}, "workload": {"steps": 1, "warmup_steps": 0}}


def write_spec(path: Path, grid: dict, **extra) -> Path:
    raw = {"name": "t", "base": TINY_BASE, "grid": grid, "resources": {"cpu": 1}, **extra}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def txlab_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


def kill_session(leader_pid: int) -> None:
    """SIGKILL every process of the session started with `leader_pid` (a local Ray leaves agents behind
    when its driver is killed)."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == leader_pid:
                proc.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def row_files(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("*.parquet"))


def trial_processes(session: int) -> list:
    """The trial processes (`txlab.sweeps.worker`) of the session led by `session`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(proc.pid) == session and "txlab.sweeps.worker" in (proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            pass
    return found
