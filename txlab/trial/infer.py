"""The measured inference stage (`workload.kind` prefill / decode): the model for inference (eval mode,
the policy's attention kernel, int4 projections when asked), the decode engine of `txlab.model.decode`
under the same memory monitor (MemTracker) and timing rules as training, and int4's error against the
full-precision model of the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from txlab.measure.memory import MemoryMonitor, RssWindow
from txlab.measure.records import Facts, Memory, Quality, Records, Timing
from txlab.measure.throughput import mfu
from txlab.model.decode import Inference, generate_tokens
from txlab.model.gpt import GPT
from txlab.model.hf import init_model
from txlab.model.quant import quantize_model, quantized_bytes, weight_bytes
from txlab.policy.apply import apply_policy
from txlab.runtime.device import device_info, sync
from txlab.runtime.progress import log
from txlab.trial.build import active_flops_per_token, trial_batches
from txlab.trial.resolve import Setup
from txlab.trial.train import measured_routing
from txlab.units import GiB


def build_model(setup: Setup, quant: bool = True) -> GPT:
    """The trial's model for inference: eval mode, int4 projections when asked. Run it under no_grad
    (parameters keep requires_grad: torch's memory tracker hooks every parameter's gradient)."""
    torch.manual_seed(setup.seed)
    model = init_model(setup.model, setup.context_length)
    if setup.device.type != "cpu":
        model = model.to(setup.device)
    model.eval()
    # The kernel of policy.attention (prefill); recomputation is a training policy: nothing to recompute
    # without a backward, and the decode engine walks the plain blocks.
    apply_policy(model, dataclasses.replace(setup.policy, remat="none"))
    if quant and setup.model.quant == "int4":
        quantize_model(model, setup.model.quant_group)
    return model


def state_dtype(dtype: str) -> torch.dtype:
    """The dtype of what a generation keeps (K/V, layer inputs): the projections' output dtype."""
    return torch.bfloat16 if dtype == "bf16" else torch.float32


@dataclass
class _Run:
    state: Inference
    prefill_s: float
    token_s: list[float]
    tokens: list[torch.Tensor] | None  # with keep_tokens: the greedy token after the prompt, then after each step


def run_once(
    model: GPT, setup: Setup, prompt: torch.Tensor, timed: bool, end_step=lambda: None, keep_tokens: bool = False
) -> _Run:
    """Prefill, and for decode `decode_tokens` greedy steps; times (device synchronized) when `timed`.
    `end_step` is called after the prefill and after every step (the monitor's per-forward reset).
    `keep_tokens`: return the generated tokens (off in measured runs: nothing extra is held)."""
    w, p, device = setup.workload, setup.policy, setup.device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if w.dtype == "bf16" else nullcontext()
    times, tokens = [], ([] if keep_tokens else None)
    with torch.no_grad(), autocast:
        if timed:
            sync(device)
        t0 = time.perf_counter()
        run = Inference(model, setup.context_length, w.batch_size, p.kv, p.k_chunk, state_dtype(w.dtype))
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
def quant_error(setup: Setup, model: GPT, prompt: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """Logit relative error and next-token agreement of the int4 model against the same weights at full
    precision, over every position of `prompt` (the trial's tokens), `chunk` positions of logits at a time."""
    ref = build_model(setup, quant=False)
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


def _inference_facts(setup: Setup, model: GPT) -> Facts:
    m = setup.model
    # model FLOPs of one forward token at the longest context it sees (training's 6N + 12LHQT, over 3)
    per_token = active_flops_per_token(model, m, setup.context_length)
    return Facts(
        n_params=model.num_params(),
        n_active_params=model.num_active_params(),
        flops_per_token=per_token / 3,
        weight_bytes_fp=weight_bytes(model),
    )


def _kv_memory(memory: Memory, state: Inference, model: GPT, kv_policy: str) -> Memory:
    """The monitor's figures with the K/V as their own column and int4 weights as parameters."""
    kv, kept = state.kv_cache_bytes, state.kv_inputs_bytes
    q = quantized_bytes(model)  # int4 weights are buffers to the tracker (filed under other)
    # The K/V (or kept inputs) are allocated before any compute and live to the end, so all of them are in
    # the peak; the tracker files them under activations: take the K/V out as their own column.
    return dataclasses.replace(
        memory,
        activations_bytes=max(0, memory.activations_bytes - kv),
        params_bytes=memory.params_bytes + q,
        other_bytes=max(0, memory.other_bytes - q),
        kv_cache_bytes=kv,
        kv_inputs_bytes=kept if kv_policy == "recompute" else None,
    )


def measure_inference(setup: Setup, rec: Records, progress: bool = False) -> None:
    """Fill `rec` for a prefill / decode trial: peak memory (KV cache as its own column), times, and int4's
    error against full precision. On CUDA the budget is the device's cap (txlab.trial.run.device_window)."""
    m, w, device = setup.model, setup.workload, setup.device
    model = build_model(setup, quant=False)
    rec.facts = _inference_facts(setup, model)
    if m.quant == "int4":
        quantize_model(model, m.quant_group)
    rec.facts = dataclasses.replace(rec.facts, weight_bytes=weight_bytes(model))
    prompt = trial_batches(setup).next()[0]  # (B, seq_len)
    with RssWindow() as rss:
        with MemoryMonitor(device, model, None, [prompt], setup.budget_bytes) as monitor:
            r = run_once(model, setup, prompt, timed=False, end_step=monitor.end_step)
        rec.memory = _kv_memory(monitor.stats(), r.state, model, setup.policy.kv)
        del r
        kv = rec.memory.kv_cache_bytes
        log(progress, f"  measured run: peak {rec.memory.peak_bytes / GiB:.3f} GiB, KV cache {kv / GiB:.3f} GiB")
        for i in range(w.warmup_steps):
            run_once(model, setup, prompt, timed=False)
            log(progress, f"  warm-up run {i + 1}/{w.warmup_steps}")
        prefill_s, token_s = [], []
        for i in range(w.steps):
            r = run_once(model, setup, prompt, timed=True)
            prefill_s.append(r.prefill_s)
            token_s += r.token_s
            del r
            per_tok = f", {statistics.median(token_s[-w.decode_tokens :]):.4f} s/token" if token_s else ""
            log(progress, f"  timed run {i + 1}/{w.steps}: prefill {prefill_s[-1]:.3f} s{per_tok}")
    # the last timed run's last forward, as a training row's: the prompt's for prefill, a decode's last step
    rec.routing = measured_routing(model, None)
    rec.memory = dataclasses.replace(rec.memory, peak_rss_bytes=rss.peak if device.type == "cpu" else None)
    prefill = statistics.median(prefill_s)
    if w.kind == "decode":
        per_token = statistics.median(token_s)
        # a decode step generates one token (per sequence)
        timing = Timing(step_time_s=per_token, tokens_per_s=w.batch_size / per_token, time_per_token_s=per_token)
    else:
        timing = Timing(step_time_s=prefill, tokens_per_s=w.batch_size * w.seq_len / prefill)
    if device.type == "cuda":
        timing = dataclasses.replace(
            timing, mfu=mfu(rec.facts.flops_per_token, timing.tokens_per_s, device_info(device)[0], w.dtype)
        )
    rec.timing = dataclasses.replace(timing, prefill_time_s=prefill)
    if m.quant == "int4":
        error, agreement = quant_error(setup, model, prompt)
        rec.quality = Quality(logit_rel_error=error, next_token_agreement=agreement)
        log(
            progress,
            f"  int4 vs full precision: logit relative error {error:.4f}, next-token agreement {agreement:.1%}",
        )
