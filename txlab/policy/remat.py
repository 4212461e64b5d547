"""Activation recomputation applied from outside the model, over `model.blocks` (torchtitan's way).

Each policy re-registers the blocks it covers inside a `Recomputed` wrapper that runs them under
non-reentrant `torch.utils.checkpoint` with the RNG state preserved, so dropout masks are identical
when a block is recomputed in backward and gradients stay exact.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from txlab.model.moe import expert_mm

aten = torch.ops.aten

# What `selective` keeps: outputs of the projections (matmuls with weights) and of the fused attention
# kernels, the expensive ops. Everything else (norms, GELU/SiLU, adds, dropout, reshapes) is cheap and
# recomputed. Batched matmuls (materialized T x T scores of `math` attention, tiles inside `chunked`)
# are recomputed too: saving them would keep exactly the T x T memory these policies exist to avoid.
# A mixture of experts' grouped expert matmuls (txlab::expert_mm) are projections with weights: kept.
EXPERT_MM = expert_mm._opoverload
SELECTIVE_SAVE = frozenset(
    getattr(aten, name).default
    for name in (
        "mm",
        "addmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(aten, name)
) | {EXPERT_MM}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


_MATMULS = frozenset(op for op in SELECTIVE_SAVE if op._overloadpacket in (aten.mm, aten.addmm)) | {EXPERT_MM}


def _matmuls_policy():
    """Save the matmul outputs only (torch's documented example of op-level selective checkpointing,
    `create_selective_checkpoint_contexts([aten.mm.default])`, with GPT-2's biased projections' addmm):
    attention is recomputed in backward too."""
    return lambda ctx, op, *a, **k: CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def _torchtitan_policy():
    """torchtitan's op-level selective checkpointing: save every compute op of its list (matmuls, attention)
    except every second matmul, counted per checkpointed region and pass (forward, recomputation)."""
    counts = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if op in _MATMULS:
            counts[ctx.is_recompute] += 1
            if counts[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


# What a selective run saves, by name: txlab's (the `selective` remat), and two of the op-level policies
# users meet elsewhere, compared in benchmarks/memory_for_free.py. Each entry makes a fresh policy per
# checkpointed region (torchtitan's counts matmuls per region).
SELECTIVE_POLICIES = {
    "txlab": lambda: _selective_policy,
    "matmuls": _matmuls_policy,
    "torchtitan": _torchtitan_policy,
}


def _selective_context(save: str = "txlab"):
    return create_selective_checkpoint_contexts(SELECTIVE_POLICIES[save]())


class Recomputed(nn.Module):
    """Runs a run of blocks under checkpoint: only its input is kept; the inside is recomputed in backward."""

    def __init__(self, blocks: list[nn.Module], selective: bool = False, save: str = "txlab"):
        super().__init__()
        self.inner = nn.ModuleList(blocks)
        self.selective = selective
        if save not in SELECTIVE_POLICIES:
            raise ValueError(f"unknown selective save policy {save!r}; known: {', '.join(SELECTIVE_POLICIES)}")
        self.save = save  # which SELECTIVE_POLICIES entry a selective run keeps

    def _run(self, x, *args):
        for block in self.inner:
            x = block(x, *args)
        return x

    def forward(self, x, *args):
        kwargs = {"context_fn": functools.partial(_selective_context, self.save)} if self.selective else {}
        return checkpoint(self._run, x, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def segments(n_layers: int, policy: str, every: int = 1) -> list[tuple[int, int, bool]]:
    """The model's blocks as (start, stop, recomputed) runs for a policy."""
    match policy:
        case "none":
            return [(0, n_layers, False)]
        case "block" | "selective":
            return [(i, i + 1, True) for i in range(n_layers)]
        case "every":
            return [(i, i + 1, i % every == 0) for i in range(n_layers)]
        case "sqrt":
            # Chen et al. 2016: about sqrt(L) segments, each recomputed as a whole, so only segment
            # boundaries are kept and one segment's activations exist at a time in backward.
            n_seg = max(1, round(math.sqrt(n_layers)))
            bounds = [round(i * n_layers / n_seg) for i in range(n_seg + 1)]
            return [(a, b, True) for a, b in zip(bounds, bounds[1:]) if b > a]
        case _:
            raise ValueError(f"unknown remat {policy!r}; known: none, block, every, sqrt, selective")


def apply_remat(model: nn.Module, policy: str, every: int = 1, save: str = "txlab") -> nn.Module:
    """Wrap `model.blocks` in place for `policy`; parameters stay the same objects. `save`: what a selective
    run keeps (a SELECTIVE_POLICIES name)."""
    if policy == "none":
        return model
    if policy == "planned":
        raise ValueError("remat 'planned' needs a plan: txlab.policy.planner chooses it and apply_plan applies it")
    mode = "selective" if policy == "selective" else "full"
    runs = [(a, b, mode if r else "keep") for a, b, r in segments(len(model.blocks), policy, every)]
    return apply_plan(model, runs, save)


# Modes of a run of blocks in a plan: keep everything, recompute the whole run from its input, or keep
# the matmul and attention outputs and recompute the cheap ops (one block per run).
PLAN_MODES = ("keep", "full", "selective")


def apply_plan(model: nn.Module, runs: list[tuple[int, int, str]], save: str = "txlab") -> nn.Module:
    """Wrap `model.blocks` in place by (start, stop, mode) runs covering every block in order; selective runs
    keep what the `save` policy names."""
    blocks = list(model.blocks)
    if [r[0] for r in runs] != [0] + [r[1] for r in runs[:-1]] or runs[-1][1] != len(blocks):
        raise ValueError(f"plan runs {runs} do not cover blocks 0..{len(blocks)} in order")
    wrapped: list[nn.Module] = []
    for start, stop, mode in runs:
        match mode:
            case "keep":
                wrapped.extend(blocks[start:stop])
            case "full" | "selective":
                wrapped.append(Recomputed(blocks[start:stop], selective=mode == "selective", save=save))
            case _:
                raise ValueError(f"unknown plan mode {mode!r}; known: {', '.join(PLAN_MODES)}")
    model.blocks = nn.ModuleList(wrapped)
    return model
