"""What the comparison benchmarks share: the contenders (txlab presets and Hugging Face GPT-2 or Llama)
behind one interface, peak memory through txlab's MemoryMonitor (real or fake tensors), interleaved timing
with medians and spread, Parquet output and plot hygiene.

Llama (`family="llama"`): the Hugging Face side is built from a config.json written locally
(`write_hf_checkpoint`; random weights, no download), and txlab's from the same file (`model.hf: DIR`
in the overrides), so both run exactly one architecture; with `model.init: pretrained` txlab loads the
HF contender's own weights (saved beside the config).

Not a library: imported by the scripts in this folder (which put the repository on sys.path).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._subclasses.fake_tensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from txlab.measure.memory import BudgetExceeded, MemoryMonitor, measure_steps  # noqa: F401 - C.MemoryMonitor in the scripts
from txlab.measure.records import Outcome, Records
from txlab.trial.pipeline import fail
from txlab.units import GiB  # noqa: F401 - C.GiB in the scripts

CPU = torch.device("cpu")
TXLAB_PRESETS = ["naive", "sdpa", "checkpoint", "selective", "recompute"]
HF_VARIANTS = ["hf", "hf-gc", "hf-eager"]  # HF default attention, + gradient checkpointing, eager attention


# --- the machine ---------------------------------------------------------------------------------


def machine() -> dict:
    """What a figure came from: CPU count, load, versions, time (UTC)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_1m": round(load[0], 2),
        "load_5m": round(load[1], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line() -> str:
    m = machine()
    return (
        f"# {m['utc']}  {m['cpus']} CPUs ({m['torch_threads']} torch threads), load {m['load_1m']} (1 min) "
        f"{m['load_5m']} (5 min), torch {m['torch']}"
    )


# --- the contenders ------------------------------------------------------------------------------


def label(variant: str) -> str:
    return {"hf": "HF default", "hf-gc": "HF + grad ckpt", "hf-eager": "HF eager"}.get(variant, f"txlab {variant}")


@contextmanager
def fake_mode(hf: bool = False):
    """Fake tensors: shapes, dtypes and storages the tracker counts, no data and no arithmetic.

    `hf`: transformers treats fake tensors as tracing and will not read them, so it cannot rule out packed
    sequences and builds a (T, T) causal mask that the real run skips (one unpadded sequence: SDPA with
    is_causal=True). Inside this window the two checks are answered as the real run answers them, so the
    fake run takes the real run's path (checked: fake and real peaks agree to the byte).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with ExitStack() as stack:
        if hf:
            from unittest import mock

            import transformers.masking_utils as mu

            real_ignore = mu._ignore_causal_mask_sdpa

            def ignore(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs):
                # q_offset is the cache position (a tensor; 0 here, no cache); reading a fake one is refused
                if padding_mask is None and isinstance(q_offset, torch.Tensor):
                    q_offset = 0
                return real_ignore(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs)

            stack.enter_context(mock.patch.object(mu, "_ignore_causal_mask_sdpa", ignore))
            # positions are 0..T-1 (one sequence, no packing): the real run finds no packed sequences
            stack.enter_context(mock.patch.object(mu, "find_packed_sequence_indices", lambda position_ids: None))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
        yield


@dataclass
class Contender:
    """A model and `loss(x, y)`: forward to the mean next-token loss over (B, T) inputs `x`, targets `y`."""

    variant: str
    model: torch.nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    note: str  # what the variant resolved to (HF's attention implementation, txlab's policy)
    # run (untimed) before each of its steps: HF's checkpointing switched on or off where contenders share
    # one HF model (`build_shared`)
    prepare: Callable[[], None] | None = None


def build(
    variant: str,
    seq_len: int,
    size: str = "gpt2-small",
    seed: int = 0,
    overrides: dict | None = None,
    share: dict | None = None,
) -> Contender:
    """gpt2-`size` shapes, dropout off, position table of `seq_len` rows, random weights, train mode; or,
    with `model.hf: DIR` in the overrides, the architecture of DIR's config.json (both sides).
    `share` (txlab presets): an empty dict is filled with this model's parameters, a filled one gives
    this model those parameters (the same tensors; see `build_shared`)."""
    torch.manual_seed(seed)
    if variant.startswith("hf"):
        return _build_hf(variant, seq_len, size, overrides or {})
    return _build_txlab(variant, seq_len, size, overrides or {}, share)


def build_shared(variants, seq_len: int, size: str = "gpt2-small", overrides: dict | None = None):
    """The contenders of one timed length, holding weights once per side: HF default and HF + grad ckpt
    are one HF model (`prepare` switches the checkpointing before each step), the txlab presets one set of
    parameters (each preset its own modules and policy over the same tensors). So one optimizer per side
    serves its contenders (`optimizer_groups`), and the RAM for N contenders is two models, not N."""
    out, hf_model, params = {}, None, {}
    for v in variants:
        if v in ("hf", "hf-gc") and hf_model is not None:
            c = _hf_contender(v, hf_model)
        else:
            c = build(v, seq_len, size, overrides=overrides, share=None if v.startswith("hf") else params)
            if v in ("hf", "hf-gc"):
                hf_model = c.model
        if v in ("hf", "hf-gc"):
            c.prepare = lambda m=c.model, on=v == "hf-gc": set_hf_checkpointing(m, on)
        out[v] = c
    return out


def optimizer_groups(contenders: dict[str, Contender], make) -> dict[str, torch.optim.Optimizer]:
    """variant -> its optimizer, `make(model)` called once per set of shared parameters."""
    made: dict[int, torch.optim.Optimizer] = {}
    out = {}
    for v, c in contenders.items():
        key = id(next(c.model.parameters()))
        if key not in made:
            made[key] = make(c.model)
        out[v] = made[key]
    return out


class OneSideAtATime:
    """The contenders of a timed length where RAM holds one side only (HF's, or txlab's presets): a side is
    built (`build_shared`) when one of its contenders is next and the other side is dropped first; its
    optimizers get their state from one zero-gradient step (learning rate 0: the weights do not move).
    For `interleaved`: `prepare(v)` (untimed) then `step(v, x, y)`. The HF side is rebuilt from the same
    seed, the txlab side reloads the checkpoint, so every build holds the same weights."""

    def __init__(self, variants, seq_len: int, size: str, overrides: dict | None, optimizer: bool):
        self.variants, self.seq_len, self.size, self.overrides = list(variants), seq_len, size, overrides
        self.optimizer, self.side, self.contenders, self.opts = optimizer, None, {}, {}
        self.builds = 0

    @staticmethod
    def side_of(variant: str) -> str:
        return "hf" if variant in ("hf", "hf-gc") else "txlab" if variant in TXLAB_PRESETS else variant

    def prepare(self, variant: str) -> None:
        side = self.side_of(variant)
        if side != self.side:
            self.contenders, self.opts, self.side = {}, {}, None
            import gc

            gc.collect()  # the other side's model, gradients and optimizer state go before this side's come
            mine = [v for v in self.variants if self.side_of(v) == side]
            self.contenders = build_shared(mine, self.seq_len, self.size, self.overrides)
            if self.optimizer:
                self.opts = optimizer_groups(self.contenders, benchmark_adamw)
                for opt in {id(o): o for o in self.opts.values()}.values():
                    params = [p for g in opt.param_groups for p in g["params"]]
                    for p in params:
                        p.grad = torch.zeros_like(p)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            self.side, self.builds = side, self.builds + 1
        c = self.contenders[variant]
        if c.prepare is not None:
            c.prepare()

    def step(self, variant: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return make_step(self.contenders[variant], self.opts.get(variant))(x, y)


def _share_parameters(model: torch.nn.Module, share: dict) -> None:
    """Fill `share` with the model's parameters (by name, tied names included), or give the model those."""
    if not share:
        share.update(model.named_parameters(remove_duplicate=False))
        return
    for name, p in share.items():
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, p)


def _build_txlab(preset: str, seq_len: int, size: str, overrides: dict, share: dict | None = None) -> Contender:
    from txlab.config import load_config
    from txlab.model.hf import init_model
    from txlab.policy.apply import apply_policy

    cfg = load_config(
        None,
        {
            # a checkpoint's config.json (model.hf) is the model section, as a size preset would be
            **({} if "model.hf" in overrides else {"model.size": size}),
            "model.dropout": 0.0,
            "workload.seq_len": seq_len,
            "policy.name": preset,  # its chunk sizes (512 tiles, 1024-token loss chunks) clamped to the length
            **overrides,
        },
    )
    model = init_model(cfg.model, seq_len)  # random, or model.hf's weights (model.init: pretrained)
    if share is not None:
        _share_parameters(model, share)  # before the policy wraps the blocks (the names are the model's)
    loss_fn = apply_policy(model, cfg.policy)
    model.train()
    p = cfg.policy
    note = (
        f"attention {p.attention}"
        + (f" {p.q_chunk}x{p.k_chunk}" if p.attention == "chunked" else "")
        + f", remat {p.remat}, loss {p.loss}"
        + (f" {p.loss_chunk}" if p.loss == "chunked" else "")
    )
    if cfg.model.init == "pretrained":
        note += ", weights loaded from the HF checkpoint (model.init pretrained)"
    return Contender(preset, model, lambda x, y: loss_fn(model(x), model.lm_head.weight, y), note)


# Llama 3.2 1B's shape (meta-llama/Llama-3.2-1B's config.json), layers cut by `model.n_layers`; debug: the
# same kinds (GQA, head_dim, tied embeddings, Llama 3.1 RoPE scaling) in miniature
LLAMA_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
LLAMA_SHAPES = {
    "llama-3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                         bos_token_id=128000, eos_token_id=128001),
    "debug": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=131072, bos_token_id=1,
                  eos_token_id=2),
}  # fmt: skip


def llama_config(size: str, overrides: dict):
    from transformers import LlamaConfig

    shape = dict(LLAMA_SHAPES[size])
    if "model.n_layers" in overrides:
        shape["num_hidden_layers"] = overrides["model.n_layers"]
    return LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_scaling=dict(LLAMA_ROPE),
                       hidden_act="silu", attention_dropout=0.0, use_cache=False)  # fmt: skip


def write_hf_checkpoint(directory: Path, size: str, overrides: dict, family: str = "llama") -> Path:
    """config.json of a `family` model of `size` in `directory` (weights: save the HF contender's model
    there, `c.model.save_pretrained(directory)`); returns the directory, for `model.hf`."""
    if family != "llama":
        raise ValueError(f"no checkpoint writer for family {family!r}; known: llama")
    directory.mkdir(parents=True, exist_ok=True)
    llama_config(size, overrides).save_pretrained(directory)
    return directory


def set_hf_checkpointing(model, on: bool) -> None:
    """HF's gradient checkpointing on or off (5.x: the old names are deprecated aliases, same effect)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if on:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()


def hf_config(seq_len: int, size: str, overrides: dict):
    from transformers import GPT2Config

    shapes = {
        "gpt2-small": (12, 768, 12),
        "gpt2-medium": (24, 1024, 16),
        "gpt2-large": (36, 1280, 20),
        "gpt2-xl": (48, 1600, 25),
        "debug": (4, 256, 4),
    }
    n_layer, n_embd, n_head = shapes[size]
    vocab = 256 if size == "debug" else 50257
    return GPT2Config(
        vocab_size=overrides.get("model.vocab_size", vocab),
        n_positions=seq_len,
        n_layer=overrides.get("model.n_layers", n_layer),
        n_embd=overrides.get("model.d_model", n_embd),
        n_head=overrides.get("model.n_heads", n_head),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        loss_type="ForCausalLM",
    )


def _build_hf(variant: str, seq_len: int, size: str, overrides: dict) -> Contender:
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if variant not in HF_VARIANTS:
        raise ValueError(f"unknown HF variant {variant!r}; known: {', '.join(HF_VARIANTS)}")
    if "model.hf" in overrides:  # the checkpoint's config.json (txlab reads the same file)
        cfg = AutoConfig.from_pretrained(overrides["model.hf"])
        cfg.use_cache = False
        cfg._attn_implementation = "eager" if variant == "hf-eager" else "sdpa"
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg = hf_config(seq_len, size, overrides)
        if variant == "hf-eager":
            cfg._attn_implementation = "eager"
        model = GPT2LMHeadModel(cfg)
    model.train()  # gradient checkpointing is active only in training mode; dropout is 0 anyway
    if variant == "hf-gc":
        set_hf_checkpointing(model, True)
    return _hf_contender(variant, model)


def _hf_contender(variant: str, model) -> Contender:
    import transformers

    note = (
        f"transformers {transformers.__version__}, {type(model).__name__}, "
        f"attn_implementation {model.config._attn_implementation}"
        + (", gradient_checkpointing_enable()" if variant == "hf-gc" else "")
    )

    # What a user writes: labels = input ids, HF shifts them inside (so T-1 predicted positions, not T).
    def loss(x, y):
        return model(input_ids=x, labels=x).loss

    return Contender(variant, model, loss, note)


def tokens(vocab: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (1, T) inputs and next-token targets for every contender."""
    t = torch.randint(0, vocab, (1, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def vocab_of(c: Contender) -> int:
    return c.model.config.vocab_size if c.variant.startswith("hf") else c.model.lm_head.weight.shape[0]


def benchmark_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """txlab's AdamW (unfused on CPU) at learning rate 0: every op of the step runs (the moments, weight
    decay, the update), but the weights stay put, so contenders that share weights, and every repetition,
    see the same model and report comparable losses."""
    from txlab.runtime.optim import make_adamw

    return make_adamw(model, CPU, lr=0.0, fused=False)


def make_step(c: Contender, optimizer: torch.optim.Optimizer | None):
    """One training step: forward + backward (+ the optimizer step when given); grads freed after."""

    def step(x, y):
        loss = c.loss(x, y)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        (optimizer or c.model).zero_grad(set_to_none=True)
        return loss.detach()

    return step


def tracked_steps(c: Contender, optimizer, batches, budget_bytes: int | None = None) -> dict:
    """Run the steps under txlab's MemoryMonitor: the peak and its breakdown (status over_budget, and the
    peak a lower bound, when the tracker stopped the step at the budget)."""
    if c.prepare is not None:
        c.prepare()
    rec, loss = Records(outcome=Outcome()), None
    try:  # txlab's measured window and its over-budget outcome, as a trial's
        rec.memory, loss = measure_steps(CPU, c.model, optimizer, batches, make_step(c, optimizer), budget_bytes)
    except BudgetExceeded as e:
        fail(rec, e)
    m = rec.memory
    row = {"status": rec.outcome.status, "loss": None, "peak_bytes": m.peak_bytes}
    if rec.outcome.status == "ok":
        row.update(params_bytes=m.params_bytes, grads_bytes=m.grads_bytes, optimizer_bytes=m.optimizer_bytes,
                   activations_bytes=m.activations_bytes, other_bytes=m.other_bytes)  # fmt: skip
        if not isinstance(loss, torch._subclasses.fake_tensor.FakeTensor):
            row["loss"] = float(loss)
    return row


def measure_memory(
    variant: str,
    seq_len: int,
    *,
    fake: bool,
    budget_bytes: int | None = None,
    optimizer: bool = False,
    size: str = "gpt2-small",
    overrides: dict | None = None,
) -> dict:
    """Peak tracked bytes of one step (two with an optimizer: the first creates its state) under txlab's
    MemoryMonitor, on fake tensors (exact accounting, no arithmetic) or real ones. With a budget the
    tracker stops the step as soon as live tensors pass it (status over_budget, peak a lower bound).
    """
    t0 = time.perf_counter()
    with fake_mode(hf=variant.startswith("hf")) if fake else nullcontext():
        c = build(variant, seq_len, size, overrides=overrides)
        opt = benchmark_adamw(c.model) if optimizer else None
        batches = [tokens(vocab_of(c), seq_len, seed=i) for i in range(2 if optimizer else 1)]
        row = {
            "variant": variant,
            "seq_len": seq_len,
            "fake": fake,
            "note": c.note,
            "n_params": sum(p.numel() for p in c.model.parameters()),
            "vocab_size": vocab_of(c),
        }
        row.update(tracked_steps(c, opt, batches, budget_bytes))
    row["measure_s"] = time.perf_counter() - t0
    return row


# --- timing --------------------------------------------------------------------------------------


def interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    log: bool = True,
    prepare: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of each callable, `warmup` untimed rounds then `reps` timed rounds; within a round every
    contender runs once and the order rotates per round, so a change in machine load hits all alike.
    `prepare[name]`, where given, runs untimed just before each call of `name`."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            if prepare and prepare.get(n) is not None:
                prepare[n]()
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
            if log:
                print(
                    f"  {'warm-up' if r < warmup else f'rep {r - warmup + 1}/{reps}'}  {n}: {dt:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return times


def spread(ts: list[float]) -> dict:
    """Median, min, max and the spread (max - min) / median of repeated timings."""
    if not ts:
        return {"time_s": None, "time_min_s": None, "time_max_s": None, "spread": None, "reps": 0}
    med = statistics.median(ts)
    return {
        "time_s": med,
        "time_min_s": min(ts),
        "time_max_s": max(ts),
        "spread": (max(ts) - min(ts)) / med,
        "reps": len(ts),
    }


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x (the growth exponent: 1 linear, 2 quadratic)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")


# --- output --------------------------------------------------------------------------------------


def print_table(df, floatfmt: str = "{:.3f}") -> None:
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", floatfmt.format):
        print(df.to_string(index=False))


def write_parquet(df, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.parquet"
    df.to_parquet(path, index=False)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", font_scale=0.9)
    return plt


def save_fig(fig, path: Path, dpi: int = 100, rect=(0, 0, 1, 1)) -> Path:
    """PNG small enough to commit (the docs show it). `rect`: the part of the figure the axes may fill
    (room for a figure-level legend)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def log2_axis(ax, values) -> None:
    """x axis in powers of two, labelled with the token counts."""
    ax.set_xscale("log", base=2)
    vals = sorted(set(int(v) for v in values))
    ax.set_xticks(vals)
    ax.set_xticklabels([f"{v // 1024}k" if v >= 1024 and v % 1024 == 0 else str(v) for v in vals])
    ax.minorticks_off()
