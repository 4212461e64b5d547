"""Building one training step: the model on its device with the policy applied (and sharded, for a rank of
a sharded trial), AdamW, the step function and the batches. The measured trial (`txlab.trial.train`) and
the estimator (`txlab.trial.fake`) build the same parts, so what is estimated is what is run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from txlab.data.batch import TrialBatches
from txlab.data.synthetic import Synthetic
from txlab.measure.formula import formula_activation_bytes
from txlab.measure.records import Facts
from txlab.measure.throughput import flops_per_token
from txlab.model.gpt import GPT
from txlab.model.hf import init_model
from txlab.parallel.cp import SequenceShard, apply_cp
from txlab.parallel.ep import apply_ep, expert_mesh
from txlab.parallel.fsdp import Ranks, apply_fsdp
from txlab.parallel.tp import apply_tp, loss_context, tp_loss
from txlab.policy.apply import apply_policy
from txlab.policy.planner import Plan
from txlab.runtime.device import sync
from txlab.runtime.optim import make_adamw
from txlab.trial.resolve import Setup

MEMORY_STEPS = 2  # the first step makes AdamW's state, the second is the steady state: the peak is over both


def make_step(
    model, loss_fn, optimizer, device: torch.device, dtype: str, context: Callable = nullcontext, accum: int = 1
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step. `context()`: what forward and backward run under (TP's loss_parallel). `accum`:
    micro-batches the rows are split into, each forward and backward in turn, their gradients accumulated
    (each loss scaled by 1/accum, so the gradient is the whole batch's mean) before the optimizer's step."""
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with context():
            with autocast:
                hidden = model(x)
                loss = loss_fn(hidden, model.lm_head.weight, y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def accumulated(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = None
        for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
            with context():
                with autocast:
                    hidden = model(xs)
                    loss = loss_fn(hidden, model.lm_head.weight, ys)
                (loss / accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
            del hidden, loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / accum

    return step if accum == 1 else accumulated


def compile_step(step, data, device: torch.device) -> float:
    """With `workload.compile`: one untimed step before any measurement, in which torch.compile (inductor)
    compiles the model's forward and backward graphs. Returns its wall seconds (device synchronized), from
    which the trial reports `compile_s`: this step's time less the median timed step's."""
    x, y = data.next()
    sync(device)
    t0 = time.perf_counter()
    step(x, y)
    sync(device)
    return time.perf_counter() - t0


def trial_batches(setup: Setup, ranks: Ranks | None = None) -> TrialBatches:
    """The trial's (x, y) stream on its device: real text when the config reads some, else synthetic tokens
    (same shapes). A rank of a sharded trial takes its data-parallel share of the rows of the same global
    batches (the ranks of a TP group take the same rows)."""
    m, w = setup.model, setup.workload
    split = setup.data.train if setup.data is not None else Synthetic(m.vocab_size, w.seq_len, w.batch_size, setup.seed)
    batches = TrialBatches(split, setup.device, *((ranks.dp_rank, ranks.fsdp) if ranks else ()))
    if ranks is not None and ranks.cp > 1:  # a CP rank's two chunks of the sequence of its rows
        return SequenceShard(batches, ranks.cp, ranks.cp_mesh.get_local_rank())
    return batches


@dataclass
class TrialParts:
    """What one trial trains: built once, shared by the measured run and the estimator."""

    model: GPT
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    data: TrialBatches


def build_trial(
    setup: Setup,
    fused_optimizer: bool | None = None,
    plan: list[tuple[int, int, str]] | None = None,
    ranks: Ranks | None = None,
    fake_mode=None,
) -> TrialParts:
    """Model on `setup.device` with the policy applied, AdamW, the step function and the data.

    Works under a FakeTensorMode too (the estimator): the model is built on the CPU and moved only
    when the device is not the CPU. `fused_optimizer` lets the estimator build CUDA's fused AdamW on
    fake CPU tensors (None: fused on CUDA only). `plan`: the runs chosen by the planner, required
    with policy.remat = planned. `ranks`: this process's place in a sharded trial: tensor parallelism
    over its TP mesh, then the policy, then FSDP2 over its data-parallel mesh (torchtitan's order).
    `fake_mode` (the estimator of a TP layout; FACTS: FSDP2 cannot shard a TP module inside
    FakeTensorMode): call this outside the mode; the model is built and sharded on the meta device, then
    given fake storage, and AdamW and the data made, inside `fake_mode`.
    """
    w, device = setup.workload, setup.device
    torch.manual_seed(setup.seed)
    model = build_model(setup, ranks, meta=fake_mode is not None)
    loss_fn = apply_policy(model, setup.policy, plan)  # recomputation wraps the (tensor-parallel) blocks
    context = nullcontext
    if ranks is not None and ranks.tp > 1:  # the loss over vocabulary-sharded logits (TP's own)
        loss_fn = tp_loss(setup.policy.loss, setup.policy.loss_chunk, ranks.tp_mesh)
        context = loss_context
    if ranks is not None and ranks.cp > 1:  # the policy's attention in its CP form; the tokens' global positions
        apply_cp(model, ranks.cp_mesh, setup.policy, w.seq_len)
    if ranks is not None and ranks.shards > 1:  # after recomputation: each wrapped block is sharded as a unit
        apply_fsdp(model, ranks, w.dtype, setup.layout.reshard_after_forward)
    with fake_mode if fake_mode is not None else nullcontext():
        if fake_mode is not None:  # storage for the model built and sharded on the meta device
            model.to_empty(device=device)
        if w.compile:
            model.compile()
        optimizer = make_adamw(model, device, fused=fused_optimizer)
        step = make_step(model, loss_fn, optimizer, device, w.dtype, context, w.grad_accum)
        return TrialParts(model, loss_fn, optimizer, step, trial_batches(setup, ranks))


def build_model(setup: Setup, ranks: Ranks | None, meta: bool = False) -> GPT:
    """The model on `setup.device`, tensor-parallel over `ranks.tp_mesh` when the layout has TP; `meta`: on
    the meta device (shapes only: the estimator of a TP layout, which reads no weights)."""
    m, w, device = setup.model, setup.workload, setup.device
    if meta:
        with torch.device("meta"):
            model = GPT(m, w.seq_len)
    else:
        model = init_model(m, w.seq_len)
        if device.type != "cpu":  # a no-op on the CPU, and one fake tensors cannot take (Module._apply swaps)
            model = model.to(device)
    if ranks is not None and ranks.tp > 1:
        apply_tp(model, ranks.tp_mesh, setup.layout.sequence_parallel)
    if ranks is not None and setup.layout.ep > 1:  # the experts spread over EP ranks (FSDP2 shards them later)
        apply_ep(model, expert_mesh(ranks, setup.layout.ep))
    return model


def training_facts(setup: Setup, model, plan: Plan | None) -> Facts:
    """What a training trial computes: parameters (all, and those one token uses), model FLOPs per token from
    the active parameters, the closed-form activations (the dense model's formula: none for MoE or MLA, nor
    under context parallelism, whose gathered keys and values it does not model)."""
    m = setup.model
    dense = m.mlp != "moe" and m.attn != "mla" and setup.layout.cp == 1
    return Facts(
        n_params=model.num_params(),
        n_active_params=model.num_active_params(),
        flops_per_token=active_flops_per_token(model, m, setup.workload.seq_len),
        formula_activation_bytes=None
        if not dense
        else formula_activation_bytes(
            m,
            setup.policy,
            setup.workload,
            setup.layout.fsdp,
            plan.runs if plan is not None else None,
            setup.layout.tp,
            setup.layout.sequence_parallel,
        ),
        plan=plan.describe() if plan is not None else None,
    )


def active_flops_per_token(model, m, seq_len: int) -> float:
    """6 N + 12 L H Q T with N the non-embedding parameters one token uses (a mixture of experts: its k routed
    experts, not E) and Q the mean of the q/k and value head widths (latent attention's differ)."""
    return flops_per_token(
        model.num_non_embedding_params() - model.num_inactive_params(),
        m.n_layers,
        m.n_heads,
        (m.attn_head_dim() + m.value_head_dim()) / 2,
        seq_len,
    )
