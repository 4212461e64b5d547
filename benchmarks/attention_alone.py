"""The attention kernels alone (txlab/model/attention.py): `math` (materialized T x T), `sdpa` (torch's fused
kernel) and `chunked` (online softmax over q_chunk x k_chunk tiles, a few tile sizes), forward + backward
of one causal attention at gpt2-small's head shape (batch 1, 12 heads of 64, fp32).

    python benchmarks/attention_alone.py                                  # memory 1k..16k, time 1k..4k
    python benchmarks/attention_alone.py --memory-lengths 1024 2048 4096 8192 16384 32768 --time-lengths 1024 2048 4096 8192

Memory: peak tracked bytes of forward + backward (q, k, v, the output gradient, the gradients, everything
saved and every temporary) under txlab's MemoryMonitor on fake tensors (exact accounting, nothing allocated),
through txlab's budgeted tracker: a point over `--budget-gib` is stopped there and reported as skipped.
The growth exponent is the least-squares slope of log peak against log T over the points that ran.
Time: real tensors, kernels interleaved per repetition (rotating order), one warm-up round, median of
`--reps`; only points whose fake peak is under `--ram-cap-gib` run for real (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

HEADS, HEAD_DIM = 12, 64


def kernels(chunks, ops: bool = True) -> dict[str, tuple[str, int]]:
    """name -> (kernel, chunk); `chunked C (ops)`: the same tiles computed by the PyTorch-ops body (txlab
    0.2's CPU kernel, the body other devices run), beside today's CPU body, the fused kernel per q tile."""
    out = {"math": ("math", 0), "sdpa": ("sdpa", 0)}
    out.update({f"chunked {c}": ("chunked", c) for c in chunks})
    if ops:
        out.update({f"chunked {c} (ops)": ("chunked-ops", c) for c in chunks})
    return out


def _fn(kind: str, chunk: int):
    import functools

    from txlab.model.attention import chunked_attention, get_attention

    if kind == "chunked-ops":
        return functools.partial(chunked_attention, q_chunk=chunk, k_chunk=chunk, body="ops")
    return get_attention(kind, chunk or 512, chunk or 512)


def _inputs(T: int, heads: int, head_dim: int):
    import torch

    g = torch.Generator().manual_seed(0)
    # laid out as the model passes them: heads split from a (B, T, H * D) projection, seen as (B, H, T, D)
    q, k, v = (torch.randn(1, T, heads, head_dim, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    dout = torch.randn(1, T, heads, head_dim, generator=g).transpose(1, 2)
    return q, k, v, dout


def fwd_bwd(fn, q, k, v, dout) -> None:
    fn(q, k, v).backward(dout)
    q.grad = k.grad = v.grad = None


def memory(kind: str, chunk: int, T: int, budget_bytes: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> dict:
    import torch

    t0 = time.perf_counter()
    with C.fake_mode():
        q, k, v, dout = _inputs(T, heads, head_dim)
        fn = _fn(kind, chunk)
        row = {"status": "ok"}
        try:
            with C.MemoryMonitor(C.CPU, torch.nn.Module(), None, [q, k, v, dout], budget_bytes) as mon:
                out = fn(q, k, v)
                out.backward(dout)
                del out
            row["peak_bytes"] = mon.stats().peak_bytes
        except C.BudgetExceeded as e:
            row.update(status="over_budget", peak_bytes=e.tracked_bytes)
    row["measure_s"] = time.perf_counter() - t0
    return row


def run(
    memory_lengths,
    time_lengths,
    chunks,
    reps: int,
    budget_gib: float,
    ram_cap_gib: float,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
    log: bool = True,
    ops: bool = True,
    ops_max_len: int | None = None,
):
    import pandas as pd

    ks = kernels(chunks, ops)
    rows = {}
    for T in sorted(set(memory_lengths) | set(time_lengths)):
        for name, (kind, chunk) in ks.items():
            if chunk and chunk > T:
                continue
            r = memory(kind, chunk, T, int(budget_gib * C.GiB), heads, head_dim)
            rows[(name, T)] = {
                "kernel": name,
                "seq_len": T,
                "status": r["status"],
                "peak_GiB": r["peak_bytes"] / C.GiB,
                **C.spread([]),
            }
            if log:
                print(
                    f"fake  {name:<13} T={T:<6} {r['status']:<11} {r['peak_bytes'] / C.GiB:.3f} GiB ({r['measure_s']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    for T in sorted(time_lengths):
        inputs = _inputs(T, heads, head_dim)
        fns = {}
        for name, (kind, chunk) in ks.items():
            r = rows.get((name, T))
            if r is None:
                continue
            if r["status"] != "ok" or r["peak_GiB"] > ram_cap_gib:
                r["time_note"] = "not timed: over the budget or the RAM cap"
                continue
            if kind == "chunked-ops" and ops_max_len is not None and T > ops_max_len:
                r["time_note"] = f"not timed: the ops body above --ops-max-len {ops_max_len}"
                continue
            fn = _fn(kind, chunk)
            fns[name] = lambda fn=fn, inputs=inputs: fwd_bwd(fn, *inputs)
        if log:
            print(f"timing T={T}: {', '.join(fns)}", file=sys.stderr, flush=True)
        for name, ts in C.interleaved(fns, reps, warmup=1, log=log).items():
            rows[(name, T)].update(C.spread(ts))
        del inputs
    df = pd.DataFrame(rows.values())
    for T, grp in df.groupby("seq_len"):
        base = grp[grp["kernel"] == "sdpa"]
        if len(base):
            ok = grp[grp["status"] == "ok"]  # a stopped point's peak is only a lower bound: no ratio
            df.loc[ok.index, "peak_vs_sdpa"] = ok["peak_GiB"] / base["peak_GiB"].iloc[0]
            if base["time_s"].notna().iloc[0]:
                df.loc[grp.index, "time_vs_sdpa"] = grp["time_s"] / base["time_s"].iloc[0]
    df["shown"] = [
        f"{p:.3f}" if s == "ok" else f"> {budget_gib:g} (skipped)" for s, p in zip(df["status"], df["peak_GiB"])
    ]
    return df


def exponents(df):
    import pandas as pd

    out = []
    for name, grp in df.groupby("kernel", sort=False):
        ok = grp[grp["status"] == "ok"]
        timed = ok[ok["time_s"].notna()]
        out.append(
            {
                "kernel": name,
                "memory_exponent": C.loglog_slope(ok["seq_len"], ok["peak_GiB"]),
                "memory_points": f"{ok['seq_len'].min()}..{ok['seq_len'].max()} ({len(ok)})",
                # the last doubling alone: the asymptotic exponent, less the O(T) inputs' share
                "memory_exponent_last": C.loglog_slope(ok["seq_len"].iloc[-2:], ok["peak_GiB"].iloc[-2:])
                if len(ok) > 1
                else None,
                "time_exponent": C.loglog_slope(timed["seq_len"], timed["time_s"]) if len(timed) > 1 else None,
            }
        )
    return pd.DataFrame(out)


def plot(df, path: Path, budget_gib: float) -> Path:
    plt = C.pyplot()
    import seaborn as sns

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(df["kernel"]))
    colors = dict(zip(names, sns.color_palette("deep", len(names))))
    for name in names:
        sub = df[(df["kernel"] == name) & (df["status"] == "ok")].sort_values("seq_len")
        ax1.plot(sub["seq_len"], sub["peak_GiB"], marker="o", color=colors[name], label=name)
        t = sub[sub["time_s"].notna()]
        if len(t):
            ax2.errorbar(
                t["seq_len"],
                t["time_s"],
                yerr=[t["time_s"] - t["time_min_s"], t["time_max_s"] - t["time_s"]],
                marker="o",
                color=colors[name],
                label=name,
                capsize=2,
            )
    ax1.axhline(budget_gib, color="grey", ls=":", lw=1)
    ax1.text(
        df["seq_len"].max(),
        budget_gib * 0.8,
        f"budget {budget_gib:g} GiB: points above it skipped",
        fontsize=7,
        color="grey",
        ha="right",
        va="top",
    )
    C.log2_axis(ax1, df["seq_len"])
    C.log2_axis(ax2, df.loc[df["time_s"].notna(), "seq_len"])
    ax1.legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="upper left")
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
    ax1.set_ylabel("peak tracked memory, GiB (2^30 B), log scale")
    ax1.set_title("forward + backward, peak memory")
    ax2.set_ylabel("seconds (median; whiskers min..max), log scale")
    ax2.set_title("forward + backward, time (2 CPU cores)")
    fig.suptitle(f"causal attention alone: batch 1, {HEADS} heads x {HEAD_DIM}, fp32", fontsize=11)
    return C.save_fig(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--time-lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--chunks", type=int, nargs="*", default=[256, 1024], help="chunked kernel's q_chunk = k_chunk")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-ops", action="store_true", help="leave out the chunked kernel's PyTorch-ops body")
    ap.add_argument("--ops-max-len", type=int, default=None, help="time the ops body only up to this length")
    ap.add_argument("--budget-gib", type=float, default=8.0, help="tracked-memory budget per point (fake run)")
    ap.add_argument("--ram-cap-gib", type=float, default=4.0, help="time only points whose peak is under this")
    ap.add_argument("--out", default="results/benchmarks/attention_alone")
    ap.add_argument("--plot", default="docs/img/attention_alone.png")
    ap.add_argument("--from", dest="stored", help="reprint and redraw a stored attention_alone.parquet, run nothing")
    args = ap.parse_args(argv)

    if args.stored:
        import pandas as pd

        df = pd.read_parquet(args.stored)
        df.loc[df["status"] != "ok", "peak_vs_sdpa"] = None
    else:
        print(C.machine_line())
        df = run(
            args.memory_lengths,
            args.time_lengths,
            args.chunks,
            args.reps,
            args.budget_gib,
            args.ram_cap_gib,
            ops=not args.no_ops,
            ops_max_len=args.ops_max_len,
        )
    cols = [
        "seq_len",
        "kernel",
        "shown",
        "peak_vs_sdpa",
        "time_s",
        "time_min_s",
        "time_max_s",
        "spread",
        "reps",
        "time_vs_sdpa",
    ]
    C.print_table(df[cols].rename(columns={"shown": "peak_GiB"}))
    ex = exponents(df)
    print("growth exponents (log-log slope; 1 = linear, 2 = quadratic):")
    C.print_table(ex, "{:.2f}")
    if args.stored:
        print(f"wrote {plot(df, Path(args.plot), args.budget_gib)}")
        return 0
    print(C.machine_line())
    path = C.write_parquet(df, Path(args.out), "attention_alone")
    C.write_parquet(ex, Path(args.out), "exponents")
    png = plot(df, Path(args.plot), args.budget_gib)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
