"""Building one training step: the model on its device with the policy applied, AdamW, the step function
and the batches. The measured trial (`txlab.measure.trial`) and the estimator (`txlab.measure.fake`)
build the same parts, so what is estimated is what is run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from txlab.config import TrialConfig
from txlab.data.batch import TrialBatches
from txlab.data.loader import Data
from txlab.data.synthetic import Synthetic
from txlab.model.gpt import GPT
from txlab.model.hf import init_model
from txlab.parallel.fsdp import Ranks, apply_fsdp
from txlab.policy.apply import apply_policy

MEMORY_STEPS = 2


def make_adamw(
    model: torch.nn.Module,
    device: torch.device,
    lr: float = 3e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW for trials and `txlab train` alike; fused (one kernel, no per-parameter temporaries) on CUDA
    unless `fused` says otherwise.

    Weight decay on every matrix (parameters of 2 or more dimensions), embeddings included; none on
    norms and biases (GPT-2's and nanoGPT's rule). Embeddings decay because with tied weights (the
    default) the token embedding is also the output projection, a matrix that every position's logits
    train at every step; and because trials have always built AdamW this way, so stored figures (the
    optimizer's temporaries are grouped by decay) reproduce.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]  # each parameter once: a tied lm_head is wte
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda" if fused is None else fused)


def make_step(
    model, loss_fn, optimizer, device: torch.device, dtype: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            hidden = model(x)
            loss = loss_fn(hidden, model.lm_head.weight, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def compile_step(step, data, device: torch.device) -> float:
    """With `workload.compile`: one untimed step before any measurement, in which torch.compile (inductor)
    compiles the model's forward and backward graphs. Returns its wall seconds (device synchronized), from
    which the trial reports `compile_s`: this step's time less the median timed step's."""
    from txlab.measure.device import sync

    x, y = data.next()
    sync(device)
    t0 = time.perf_counter()
    step(x, y)
    sync(device)
    return time.perf_counter() - t0


def trial_batches(
    cfg: TrialConfig, device: torch.device, real_data: Data | None, ranks: Ranks | None = None
) -> TrialBatches:
    """The trial's (x, y) stream: real text when the config reads some, else synthetic tokens (same shapes).
    A rank of a sharded trial takes its share of the rows of the same global batches."""
    m, w = cfg.model, cfg.workload
    split = real_data.train if real_data is not None else Synthetic(m.vocab_size, w.seq_len, w.batch_size, cfg.seed)
    return TrialBatches(split, device, *((ranks.rank, ranks.world) if ranks else ()))


@dataclass
class TrialParts:
    """What one trial trains: built once, shared by the measured run and the estimator."""

    model: GPT
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    data: TrialBatches


def build_trial(
    cfg: TrialConfig,
    device: torch.device,
    fused_optimizer: bool | None = None,
    plan: list[tuple[int, int, str]] | None = None,
    data=None,
    ranks: Ranks | None = None,
) -> TrialParts:
    """Model on `device` with the policy applied, AdamW, the step function and the data.

    Works under a FakeTensorMode too (the estimator): the model is built on the CPU and moved only
    when `device` is not the CPU. `fused_optimizer` lets the estimator build CUDA's fused AdamW on
    fake CPU tensors (None: fused on CUDA only). `plan`: the runs chosen by the planner, required
    with policy.remat = planned. `data`: the batches to train on (default: synthetic tokens).
    """
    m, w = cfg.model, cfg.workload
    torch.manual_seed(cfg.seed)
    model = init_model(m, w.seq_len)
    if device.type != "cpu":  # a no-op on the CPU, and one fake tensors cannot take (Module._apply swaps)
        model = model.to(device)
    loss_fn = apply_policy(model, cfg.policy, plan)
    if ranks is not None:  # after recomputation wrapped the blocks: each wrapped block is sharded as a unit
        apply_fsdp(model, cfg, ranks)
    if w.compile:
        model.compile()
    optimizer = make_adamw(model, device, fused=fused_optimizer)
    if data is None:
        data = trial_batches(cfg, device, None, ranks)
    return TrialParts(model, loss_fn, optimizer, make_step(model, loss_fn, optimizer, device, w.dtype), data)
