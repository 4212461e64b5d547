"""Resolve a policy config into what the trial applies: the attention kernel, recomputation, the loss."""

from __future__ import annotations

import torch.nn as nn

from txlab.config import PolicyConfig
from txlab.model.attention import get_attention
from txlab.model.gpt import Attention
from txlab.policy.loss import LossFn, get_loss
from txlab.policy.remat import apply_remat


def apply_policy(model: nn.Module, policy: PolicyConfig) -> LossFn:
    """Set the attention kernel on every attention module, wrap blocks for recomputation, return the loss."""
    attn_fn = get_attention(policy.attention, policy.q_chunk, policy.k_chunk)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attn_fn = attn_fn
    apply_remat(model, policy.remat, policy.remat_every)
    return get_loss(policy.loss, policy.loss_chunk)
