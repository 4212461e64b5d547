"""The measured trial of `workload.kind` prefill / decode: the model for inference (eval mode, the
policy's attention kernel, int4 projections when asked), the decode engine of `txlab.model.decode`
under the same memory monitor (MemTracker) and timing rules as training, and int4's error against the
full-precision model of the same weights. Called by `txlab.measure.trial`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from txlab.config import TrialConfig, WorkloadConfig
from txlab.measure.budget import BudgetExceeded, GiB, budget_bytes, over_budget, stopped_row
from txlab.measure.device import sync
from txlab.measure.memory import MemoryMonitor, RssWindow
from txlab.measure.progress import log
from txlab.measure.throughput import flops_per_token, mfu
from txlab.model.decode import Inference, generate_tokens
from txlab.model.gpt import GPT
from txlab.model.hf import init_model
from txlab.model.quant import quantize_model, quantized_bytes, weight_bytes
from txlab.policy.apply import apply_policy


def context_length(workload: WorkloadConfig) -> int:
    """Positions a trial's model must hold: the prompt, plus the generated tokens when decoding."""
    return workload.seq_len + (workload.decode_tokens if workload.kind == "decode" else 0)


def build_model(cfg: TrialConfig, device: torch.device, quant: bool = True) -> GPT:
    """The trial's model for inference: eval mode, int4 projections when asked. Run it under no_grad
    (parameters keep requires_grad: torch's memory tracker hooks every parameter's gradient)."""
    torch.manual_seed(cfg.seed)
    model = init_model(cfg.model, context_length(cfg.workload))
    if device.type != "cpu":
        model = model.to(device)
    model.eval()
    # The kernel of policy.attention (prefill); recomputation is a training policy: nothing to recompute
    # without a backward, and the decode engine walks the plain blocks.
    apply_policy(model, dataclasses.replace(cfg.policy, remat="none"))
    if quant and cfg.model.quant == "int4":
        quantize_model(model, cfg.model.quant_group)
    return model


def state_dtype(cfg: TrialConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.workload.dtype == "bf16" else torch.float32


# --- the measured trial ---------------------------------------------------------------------------


@dataclass
class _Run:
    state: Inference
    prefill_s: float
    token_s: list[float]
    tokens: list[torch.Tensor] | None  # with keep_tokens: the greedy token after the prompt, then after each step


def _run_once(
    model: GPT,
    cfg: TrialConfig,
    prompt: torch.Tensor,
    device: torch.device,
    timed: bool,
    end_step=lambda: None,
    keep_tokens: bool = False,
) -> _Run:
    """Prefill, and for decode `decode_tokens` greedy steps; times (device synchronized) when `timed`.
    `end_step` is called after the prefill and after every step (the monitor's per-forward reset).
    `keep_tokens`: return the generated tokens (off in measured runs: nothing extra is held)."""
    w, p = cfg.workload, cfg.policy
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if w.dtype == "bf16" else nullcontext()
    times, tokens = [], ([] if keep_tokens else None)
    with torch.no_grad(), autocast:
        if timed:
            sync(device)
        t0 = time.perf_counter()
        run = Inference(model, context_length(w), w.batch_size, p.kv, p.k_chunk, state_dtype(cfg))
        steps = generate_tokens(run, prompt)  # greedy; lazy: the prefill runs at the first next()
        for i in range(1 + (w.decode_tokens if w.kind == "decode" else 0)):  # the prefill's token, then steps
            if i:  # a step's clock starts here (the prefill's before the state is allocated)
                if timed:
                    sync(device)
                t0 = time.perf_counter()
            nxt = next(steps)[1]  # the logits are not kept
            if timed:
                sync(device)
            times.append(time.perf_counter() - t0)
            if keep_tokens:
                tokens.append(nxt)
            end_step()
    return _Run(run, times[0], times[1:], tokens)


@torch.no_grad()
def quant_error(
    cfg: TrialConfig, model: GPT, prompt: torch.Tensor, device: torch.device, chunk: int = 512
) -> tuple[float, float]:
    """Logit relative error and next-token agreement of the int4 model against the same weights at full
    precision, over every position of `prompt` (the trial's tokens), `chunk` positions of logits at a time."""
    ref = build_model(cfg, device, quant=False)
    hq, hr = model(prompt), ref(prompt)  # (B, T, d_model) each
    diff2 = ref2 = 0.0
    agree = n = 0
    for s in range(0, prompt.shape[1], chunk):
        lq = F.linear(hq[:, s : s + chunk], model.lm_head.weight).float()
        lr = F.linear(hr[:, s : s + chunk], ref.lm_head.weight).float()
        diff2 += float(((lq - lr) ** 2).sum())
        ref2 += float((lr**2).sum())
        agree += int((lq.argmax(-1) == lr.argmax(-1)).sum())
        n += lq.shape[0] * lq.shape[1]
    del ref
    return math.sqrt(diff2 / ref2), agree / n


def measure_inference(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool, data) -> None:
    """Fill `row` for a prefill / decode trial: peak memory (KV cache as its own column), times."""
    m, w = cfg.model, cfg.workload
    budget = budget_bytes(cfg.measure.budget_gib)  # CUDA: capped by txlab.measure.trial._measure
    model = build_model(cfg, device, quant=False)
    row["n_params"] = model.num_params()
    row["weight_bytes_fp"] = weight_bytes(model)
    # model FLOPs of one forward token at the longest context it sees (training's 6N + 12LHQT, over 3)
    row["flops_per_token"] = (
        flops_per_token(
            model.num_non_embedding_params(), m.n_layers, m.n_heads, m.attn_head_dim(), context_length(cfg.workload)
        )
        / 3
    )
    if m.quant == "int4":
        quantize_model(model, m.quant_group)
    row["weight_bytes"] = weight_bytes(model)
    prompt = data.next()[0]  # (B, seq_len)

    with RssWindow() as rss:
        try:
            with MemoryMonitor(device, model, None, [prompt], budget) as monitor:
                r = _run_once(model, cfg, prompt, device, timed=False, end_step=monitor.end_step)
        except BudgetExceeded as e:
            stopped_row(row, e)
            return
        stats = monitor.stats().as_row()
        kv, kept = r.state.kv_cache_bytes, r.state.kv_inputs_bytes
        # The K/V (or kept inputs) are allocated before any compute and live to the end, so all of them
        # are in the peak; the tracker files them under activations: take the K/V out as their own column.
        stats["activations_bytes"] = max(0, stats["activations_bytes"] - kv)
        q = quantized_bytes(
            model
        )  # int4 weights are buffers to the tracker (filed under other): count them as parameters
        stats["params_bytes"] += q
        stats["other_bytes"] = max(0, stats["other_bytes"] - q)
        row.update(stats, kv_cache_bytes=kv, kv_inputs_bytes=kept if cfg.policy.kv == "recompute" else None)
        del r
        log(progress, f"  measured run: peak {row['peak_bytes'] / GiB:.3f} GiB, KV cache {kv / GiB:.3f} GiB")
        for i in range(w.warmup_steps):
            _run_once(model, cfg, prompt, device, timed=False)
            log(progress, f"  warm-up run {i + 1}/{w.warmup_steps}")
        prefill_s, token_s = [], []
        for i in range(w.steps):
            r = _run_once(model, cfg, prompt, device, timed=True)
            prefill_s.append(r.prefill_s)
            token_s += r.token_s
            del r
            per_tok = f", {statistics.median(token_s[-w.decode_tokens :]):.4f} s/token" if token_s else ""
            log(progress, f"  timed run {i + 1}/{w.steps}: prefill {prefill_s[-1]:.3f} s{per_tok}")
    row["peak_rss_bytes"] = rss.peak if device.type == "cpu" else None
    row["prefill_time_s"] = statistics.median(prefill_s)
    if w.kind == "decode":
        row["time_per_token_s"] = statistics.median(token_s)
        row["step_time_s"] = row["time_per_token_s"]  # a decode step generates one token (per sequence)
        row["tokens_per_s"] = w.batch_size / row["time_per_token_s"]
    else:
        row["step_time_s"] = row["prefill_time_s"]
        row["tokens_per_s"] = w.batch_size * w.seq_len / row["prefill_time_s"]
    row["mfu"] = (
        mfu(row["flops_per_token"], row["tokens_per_s"], row["device"], w.dtype) if device.type == "cuda" else None
    )
    if m.quant == "int4":
        row["logit_rel_error"], row["next_token_agreement"] = quant_error(cfg, model, prompt, device)
        log(
            progress,
            f"  int4 vs full precision: logit relative error {row['logit_rel_error']:.4f}, "
            f"next-token agreement {row['next_token_agreement']:.1%}",
        )
    if not over_budget(row, budget):
        row["status"] = "ok"
