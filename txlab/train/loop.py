"""`txlab train`: a real training run with the same config tree as a trial.

AdamW (fused on CUDA) built as trials build it (`txlab.runtime.optim.make_adamw`: decay on every matrix,
embeddings included, none on norms and biases); learning rate: linear warm-up, optional hold, cosine decay to `min_lr`; global-norm gradient
clipping; `grad_accum` micro-batches per optimizer step; `workload.dtype: bf16` autocast; optional
`torch.compile`; the memory policy applied from outside the model exactly as in a trial. A loss or
gradient norm that is not finite stops the run with status `diverged` (nothing is stepped on it).

Evaluation on the held-out split every `eval_every` steps (and before the first and after the last):
loss (nats/token), bits per token, bits per byte (over the bytes the targets cover) and next-token
accuracy. The run directory holds `config.yaml`, `metrics.jsonl` (one JSON object per logged step or
evaluation) and `checkpoint.pt` (model, optimizer, step, data position, RNG state); starting again
with the same directory and config resumes from the checkpoint and continues the same loss curve.
`on_eval`, when given, is called with the run directory after each evaluation and at the end (the
command line passes one that draws the training curves; this module plots nothing)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from txlab.config import ConfigError, TrainConfig, TrialConfig
from txlab.data.batch import Batch
from txlab.data.loader import Data, batches, open_data
from txlab.model.gpt import GPT
from txlab.model.hf import check_pretrained, init_model
from txlab.policy.apply import apply_policy
from txlab.runtime.device import resolve_device
from txlab.runtime.optim import make_adamw
from txlab.train.checkpoint import CHECKPOINT, config_differences, read_checkpoint, save_checkpoint


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): warm-up, hold, cosine decay, then min_lr."""
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    step -= t.warmup
    if step < t.hold:
        return t.lr
    step -= t.hold
    decay = t.decay if t.decay is not None else max(t.steps - t.warmup - t.hold, 1)
    if step >= decay:
        return t.min_lr
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * step / decay))


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


@torch.no_grad()
def evaluate(
    model: GPT, eval_batches: list[Batch], device: torch.device, dtype: str = "fp32"
) -> dict[str, float | None]:
    """Held-out loss (nats/token), bits per token, bits per byte and next-token accuracy."""
    was_training = model.training
    model.eval()
    nats, correct, n, nbytes = 0.0, 0, 0, 0
    for b in eval_batches:
        x, y = b.to(device)
        with _autocast(device, dtype):
            hidden = model(x)
        for i in range(hidden.shape[0]):  # one row of logits at a time: (T, V)
            logits = F.linear(hidden[i], model.lm_head.weight).float()
            nats += float(F.cross_entropy(logits, y[i], reduction="sum"))
            correct += int((logits.argmax(-1) == y[i]).sum())
        n += y.numel()
        nbytes += b.nbytes or 0
    model.train(was_training)
    return {
        "loss": nats / n,
        "bits_per_token": nats / n / math.log(2),
        "bits_per_byte": nats / math.log(2) / nbytes if nbytes else None,
        "accuracy": correct / n,
    }


@dataclass
class RunResult:
    status: str  # done | stopped (time limit or stop_after) | diverged
    step: int  # optimizer steps completed
    out_dir: Path
    message: str = ""
    train_loss: float | None = None  # mean loss of the last step's micro-batches
    first_eval: dict[str, Any] | None = None  # the evaluation before the first step of this run
    last_eval: dict[str, Any] | None = None
    unigram_bits_per_byte: float | None = None  # the context-free baseline on the same held-out batches
    history: list[dict[str, Any]] = field(default_factory=list)  # this run's metrics records


def _write_json_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint's step (a run killed after its last checkpoint redoes them)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


class _Log:
    def __init__(self, progress: bool):
        self.progress = progress

    def __call__(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)


def _fmt_eval(e: dict[str, Any]) -> str:
    bpb = f"  {e['bits_per_byte']:.4f} bits/byte" if e.get("bits_per_byte") is not None else ""
    return f"loss {e['loss']:.4f}  {e['bits_per_token']:.4f} bits/token{bpb}  accuracy {100 * e['accuracy']:.1f}%"


def _run_dir(cfg: TrialConfig, out_dir: str | Path | None) -> tuple[Path, dict[str, Any] | None]:
    """The run directory and the checkpoint to resume from (None for a new run); bad input raises."""
    out = Path(out_dir or cfg.train.out_dir or Path("runs") / cfg.trial_key)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.exists():
        return out, None
    resume = read_checkpoint(ckpt_path, f"--out: {ckpt_path}")
    diff = config_differences(cfg, resume["config"])
    if diff:
        raise ConfigError(
            f"--out: {out} holds a run of a different config (differs in {', '.join(diff[:6])}); "
            "use another --out or the same config"
        )
    return out, resume


def _write_run_files(out: Path, cfg: TrialConfig, data: Data) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if data.tokenizer is not None and hasattr(data.tokenizer, "save"):
        data.tokenizer.save(out / "tokenizer")  # so that `txlab generate` finds it wherever the run moves


def _restore(resume: dict[str, Any], params: dict[str, torch.Tensor], optimizer) -> tuple[int, int]:
    """Weights, optimizer state and RNG from a checkpoint; returns (step, data position)."""
    with torch.no_grad():
        for k, v in resume["model"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(resume["optimizer"])
    torch.set_rng_state(resume["rng"])
    if resume.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["cuda_rng"])
    return resume["step"], resume["data_pos"]


@dataclass
class _Accumulated:
    """One optimizer step's micro-batches: mean loss, gradient norm, bytes and tokens its targets cover."""

    loss: float
    grad_norm: float
    nbytes: int
    tokens: int


def _accumulate(model, loss_fn, it, t: TrainConfig, device: torch.device, autocast, trainable) -> _Accumulated:
    """Forward and backward over `grad_accum` micro-batches, then clip; the optimizer is not stepped."""
    loss_sum = torch.zeros((), device=device)
    nbytes = tokens = 0
    for _ in range(t.grad_accum):
        b = next(it)
        x, y = b.to(device)
        with autocast:
            loss = loss_fn(model(x), model.lm_head.weight, y)
        (loss / t.grad_accum).backward()
        loss_sum += loss.detach()
        nbytes += b.nbytes or 0
        tokens += y.numel()
    norm = torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip if t.grad_clip > 0 else float("inf"))
    return _Accumulated(float(loss_sum) / t.grad_accum, float(norm), nbytes, tokens)


def _train_record(step: int, acc: _Accumulated, lr: float, cfg: TrialConfig, tokens: int, elapsed: float) -> dict:
    n_targets = cfg.train.grad_accum * cfg.workload.batch_size * cfg.workload.seq_len
    bpb = acc.loss * n_targets / math.log(2) / acc.nbytes if acc.nbytes else None
    return {
        "step": step,
        "split": "train",
        "loss": acc.loss,
        "bits_per_byte": bpb,
        "lr": lr,
        "grad_norm": acc.grad_norm,
        "tokens_per_s": tokens / elapsed,
        "elapsed_s": elapsed,
    }


def train(
    cfg: TrialConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    data: Data | None = None,
    on_eval: Callable[[Path], None] | None = None,
) -> RunResult:
    """Train per `cfg` into `out_dir` (default train.out_dir, else runs/<trial key>), resuming from its
    checkpoint when one is there. `stop_after` ends this call after that many steps in total (with a
    checkpoint), as an interruption would. `on_eval(run_dir)` runs after each evaluation and once more at
    the end when records were written since. ConfigError on bad input, before any training."""
    t, w = cfg.train, cfg.workload
    log = _Log(progress)
    if w.kind != "train":
        raise ConfigError(f"workload.kind: txlab train needs 'train', got {w.kind!r}")
    out, resume = _run_dir(cfg, out_dir)
    ckpt_path, metrics = out / CHECKPOINT, out / "metrics.jsonl"
    device = resolve_device(cfg.measure.device)
    data = data or open_data(cfg)  # every data error is raised here, before any training
    if cfg.model.init == "pretrained":
        check_pretrained(cfg.model, w.seq_len)  # and every weights error
    _write_run_files(out, cfg, data)

    torch.manual_seed(cfg.seed)
    model = init_model(cfg.model, w.seq_len).to(device)
    params = model.state_dict(keep_vars=True)  # names before the policy wraps blocks; same tensors
    loss_fn = apply_policy(model, cfg.policy)
    optimizer = make_adamw(model, device, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    step, data_pos = 0, 0
    if resume is not None:
        step, data_pos = _restore(resume, params, optimizer)
        _truncate_metrics(metrics, step)
        log(f"resuming {out} at step {step}/{t.steps}")
    elif metrics.exists():
        metrics.unlink()
    if w.compile:
        model.compile()
    model.train()

    log(
        f"train {cfg.trial_key}: {cfg.model.size} {cfg.model.n_layers} x {cfg.model.d_model}, "
        f"{model.num_params() / 1e6:.2f}M params, policy {cfg.policy.name}, on {device.type}; {data.description}"
    )
    log(f"  {t.steps} steps x {t.grad_accum} x {w.batch_size} sequences x {w.seq_len} tokens; run directory {out}")
    eval_set = data.val.eval_batches(t.eval_batches)
    result = RunResult("done", step, out, unigram_bits_per_byte=data.unigram_bits_per_byte(eval_set))
    if result.unigram_bits_per_byte is not None:
        log(f"  unigram baseline on the held-out batches: {result.unigram_bits_per_byte:.4f} bits/byte")

    def record(rec: dict[str, Any]) -> None:
        result.history.append(rec)
        _write_json_line(metrics, rec)

    notified_at = -1  # len(result.history) when on_eval last ran

    def notify() -> None:
        nonlocal notified_at
        if on_eval is not None and notified_at != len(result.history):
            notified_at = len(result.history)
            on_eval(out)

    def run_eval() -> dict[str, Any]:
        e = {"step": step, "split": "val", **evaluate(model, eval_set, device, w.dtype)}
        record(e)
        log(f"eval  step {step:>6}  {_fmt_eval(e)}")
        notify()
        return e

    earlier = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if resume is not None else []
    done = [e for e in earlier if e.get("split") == "val" and e.get("step") == step]
    result.first_eval = result.last_eval = done[-1] if done else run_eval()  # a resumed run has it already
    it = batches(data.train, data_pos, cfg.data.workers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    tokens = 0
    last_ckpt = step
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    autocast = _autocast(device, w.dtype)
    try:
        while step < end:
            lr = lr_at(step, t)
            for g in optimizer.param_groups:
                g["lr"] = lr
            acc = _accumulate(model, loss_fn, it, t, device, autocast, trainable)
            data_pos += t.grad_accum
            tokens += acc.tokens
            if not (math.isfinite(acc.loss) and math.isfinite(acc.grad_norm)):
                result.status = "diverged"
                result.message = (
                    f"step {step + 1}: loss {acc.loss}, gradient norm {acc.grad_norm}: not finite; stopped "
                    "without applying it (lower train.lr, raise train.warmup or use workload.dtype fp32)"
                )
                record(
                    {"step": step + 1, "split": "train", "loss": acc.loss, "grad_norm": acc.grad_norm, "diverged": True}
                )
                log(f"diverged: {result.message}")
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.train_loss = acc.loss
            elapsed = time.perf_counter() - t0
            if step % t.log_every == 0 or step == end:
                record(_train_record(step, acc, lr, cfg, tokens, elapsed))
                log(
                    f"train step {step:>6}/{t.steps}  loss {acc.loss:.4f}  lr {lr:.2e}  |g| {acc.grad_norm:.3f}  "
                    f"{tokens / elapsed:,.0f} tokens/s"
                )
            if step % t.eval_every == 0 and step < end:
                result.last_eval = run_eval()
            timed_out = t.time_limit_s is not None and elapsed >= t.time_limit_s
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or timed_out:
                save_checkpoint(ckpt_path, cfg, params, optimizer, step, data_pos)
                last_ckpt = step
            if timed_out and step < end:
                result.status, result.message = "stopped", f"time limit of {t.time_limit_s} s reached at step {step}"
                log(result.message)
                break
    finally:
        del it  # stop data-loader workers
    if result.status != "diverged":
        if step == end and end < t.steps:
            result.status, result.message = "stopped", f"stopped after step {step} of {t.steps}"
        if result.last_eval is None or result.last_eval["step"] != step:
            result.last_eval = run_eval()
        if last_ckpt != step or not ckpt_path.exists():
            save_checkpoint(ckpt_path, cfg, params, optimizer, step, data_pos)
    notify()
    result.step = step
    return result
