"""The one place a memory policy is applied to a built model, from outside it: the attention kernel on
every attention module, recomputation over `model.blocks`, and the loss to train with.

Trials, the estimator, the planner's block profile, inference and `txlab train` all call `apply_policy`,
so a policy means the same thing everywhere.
"""

from __future__ import annotations

import torch.nn as nn

from txlab.config import PolicyConfig
from txlab.model.attention import get_attention
from txlab.model.gpt import Attention
from txlab.policy.loss import LossFn, get_loss
from txlab.policy.remat import apply_plan, apply_remat


def apply_policy(model: nn.Module, policy: PolicyConfig, plan: list[tuple[int, int, str]] | None = None) -> LossFn:
    """Set the attention kernel on every attention module of `model` (a GPT, or one block), wrap its
    blocks for recomputation (`policy.remat`, or the planner's `plan` when remat is `planned`), and
    return the loss function."""
    attn_fn = get_attention(policy.attention, policy.q_chunk, policy.k_chunk)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attn_fn = attn_fn
    if policy.remat == "planned":
        if plan is None:
            raise ValueError("policy.remat = planned needs a plan (txlab.trial.plan.plan_trial)")
        apply_plan(model, plan, policy.selective_save)
    else:
        apply_remat(model, policy.remat, policy.remat_every, policy.selective_save)
    return get_loss(policy.loss, policy.loss_chunk)
