"""Shared test helpers: one forward + backward of a config, returning loss and per-parameter grads."""

from __future__ import annotations

import torch

from txlab.config import TrialConfig, load_config
from txlab.model.gpt import GPT
from txlab.policy.apply import apply_policy


def loss_and_grads(cfg: TrialConfig, x: torch.Tensor, y: torch.Tensor, init_seed: int = 1, rng_seed: int = 2):
    torch.manual_seed(init_seed)
    model = GPT(cfg.model, cfg.workload.seq_len)
    params = dict(model.named_parameters())  # names before wrapping; the objects stay the same
    loss_fn = apply_policy(model, cfg.policy)
    torch.manual_seed(rng_seed)  # same dropout masks for every policy
    loss = loss_fn(model(x), model.lm_head.weight, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in params.items()}


def config(overrides: dict) -> TrialConfig:
    return load_config(None, overrides)
