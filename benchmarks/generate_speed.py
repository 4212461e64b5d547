"""`txlab generate`'s loop before and after the KV cache, per generated token, at 512 tokens of context.

Old: the loop `txlab.train.generate.sample` had up to commit 4257fd3 (copied below, verbatim but for the
timestamps): every token reruns the model over the whole context, cropped to the model's positions.
New: `sample` now, the decode engine's loop (`txlab.model.decode.generate_tokens`, policy `cache`):
the prompt is prefilled once, then each token is one step against the cache.

Both run in turns in one process (old, new, new, old, ...), so they see the same machine load; each
repeat generates `--new-tokens` tokens after a `--prompt`-token prompt of random ids with the same seed
and sampling, and checks that both loops draw the same tokens. Reported per loop: the median time of a
generated token after the first (the first one is the prompt's forward, the same work in both), the
median first-token time and the median time of the whole `sample` call, and their ratios old / new;
with the load average (`os.getloadavg()`) before and after.

Two settings by default: a model of 1024 positions (the 512-token prompt and the new tokens fit: one
prefill, then steps), and one of 512 positions (the window is full from the start: each token is a
prefill of the cropped window, in both loops; no gain is expected there).

    python benchmarks/generate_speed.py                        # debug size (4 x 256), one thread
    python benchmarks/generate_speed.py --size gpt2-small --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from txlab.config import load_config
from txlab.model.decode import Inference, generate_tokens
from txlab.model.gpt import GPT
from txlab.train.generate import filter_logits, sample, sampler


@torch.no_grad()
def old_sample_timed(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, context):
    """The pre-cache loop (no end-of-text id here), with a timestamp after each token: (ids, seconds)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids)
    out, times = [], []
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        x = torch.tensor([ids[-context:] if context else ids], device=device)
        logits = F.linear(model(x)[0, -1], model.lm_head.weight).float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        ids.append(nxt)
        out.append(nxt)
        times.append(time.perf_counter() - t0)
    return out, times


@torch.no_grad()
def new_sample_timed(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, context):
    """What `sample` runs (the same Inference, loop and sampler), with a timestamp after each token."""
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(seed)
    positions = len(prompt_ids) + max_new_tokens - 1
    out, times = [], []
    t0 = time.perf_counter()
    run = Inference(model, min(positions, context), 1, kv="cache", dtype=param.dtype)
    tokens = generate_tokens(
        run, torch.tensor([prompt_ids], device=param.device), sampler(temperature, top_k, top_p, gen), slide=True
    )
    for _ in range(max_new_tokens):
        out.append(int(next(tokens)[1]))
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    return out, times


def bench(args, positions: int) -> dict:
    torch.manual_seed(0)
    cfg = load_config(None, {"model.size": args.size, "model.vocab_size": 257, "workload.seq_len": positions})
    model = GPT(cfg.model, positions).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (args.prompt,), generator=g).tolist()
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=None, context=positions)
    per_tok = {"old": [], "new": []}
    first = {"old": [], "new": []}
    total = {"old": [], "new": []}
    timed = {"old": old_sample_timed, "new": new_sample_timed}
    for r in range(args.warmup + args.repeats):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        drawn = {}
        for name in order:  # per-token timings
            drawn[name], times = timed[name](model, prompt, args.new_tokens, seed=r, **kw)
            if r >= args.warmup:
                first[name].append(times[0])
                per_tok[name].extend(times[1:])
        assert drawn["old"] == drawn["new"], f"repeat {r}: the loops drew different tokens"
        for name in order:  # the whole call, as `txlab generate` makes it
            t0 = time.perf_counter()
            if name == "old":
                old_sample_timed(model, prompt, args.new_tokens, seed=r, **kw)
            else:
                sample(model, prompt, args.new_tokens, seed=r, eot_id=None, **kw)
            if r >= args.warmup:
                total[name].append(time.perf_counter() - t0)
    med = {
        k: {n: statistics.median(v[n]) for n in v} for k, v in (("tok", per_tok), ("first", first), ("total", total))
    }
    return {"positions": positions, **med, "n_tok": len(per_tok["new"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="debug", help="model.size preset (vocab 257: the byte tokenizer)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (the context)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--positions", type=int, nargs="+", default=[1024, 512], help="model positions, one run each")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per loop (interleaved)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s); size {args.size}, prompt {args.prompt}, {args.new_tokens} new tokens, "
        f"temperature {args.temperature}, top-k {args.top_k}, {args.repeats} repeats (+{args.warmup} warm-up)"
    )
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print("positions | old s/token | new s/token | old/new | old first | new first | old call s | new call s | old/new")
    for positions in args.positions:
        r = bench(args, positions)
        t, f, c = r["tok"], r["first"], r["total"]
        print(
            f"{positions:9d} | {t['old']:.5f} | {t['new']:.5f} | {t['old'] / t['new']:.1f}x | {f['old']:.4f} | "
            f"{f['new']:.4f} | {c['old']:.3f} | {c['new']:.3f} | {c['old'] / c['new']:.1f}x",
            flush=True,
        )
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
