"""One-command GPU check: what txlab measures on one CUDA device, against its own estimate and the HF peer.

    python benchmarks/gpu_check.py                  # on a machine with one CUDA device; < 8 minutes on an H100/H200
    python benchmarks/gpu_check.py --dry-run        # the plan, on any machine (nothing runs)
    python benchmarks/gpu_check.py --quick          # one length, fewer checks (a smoke run of the script)

Checks, in this order, each a row of the table:
1. `preset`: every policy preset (naive, sdpa, checkpoint, selective, recompute, planned) at a few
   lengths, gpt2-small, bf16 autocast, fused AdamW (the CUDA default): `run_trial` gives the allocator's
   peak (`peak_bytes`, torch.cuda.max_memory_allocated over the two monitored steps) and reserved bytes
   beside the tensor tracker's figure for the same steps (`tracked_peak_bytes`, what the CPU figures
   are), and `estimate_trial(cfg, "cuda")` gives txlab's prediction without running; step time, MFU.
2. `fp32`: one preset in fp32 (fused AdamW still), beside its bf16 row.
3. `oom`: a trial capped by measure.budget_gib (a real cap on CUDA: set_per_process_memory_fraction)
   far below its need, which must end `oom`, then the next trial in the same process, which must end
   `ok` (the cap lifted and the cache emptied).
4. `compile`: `workload.compile: true` under sdpa and recompute; compile_s apart from step_time_s, and
   the speedup over the eager row of check 1.
5. `hf`: Hugging Face GPT2LMHeadModel, default and with gradient checkpointing, forward + backward in bf16
   autocast on the device, beside txlab's presets in the same harness (the peers of benchmarks/vs_hf_gpt2.py,
   max_memory_allocated and median time over interleaved repetitions).

Writes results/gpu_check/gpu_check.md (the table and the verdicts) and gpu_check.parquet. A deadline
(--deadline-s, default 450) skips the checks left when it passes, each named as skipped, so the whole run
stays under 8 minutes. On a machine without CUDA it refuses with one line (exit 2); --dry-run prints the
plan anywhere (tests/test_benchmarks_speed.py runs it on the CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

PRESETS = ["naive", "sdpa", "checkpoint", "selective", "recompute", "planned"]
BASE = {
    "model.size": "gpt2-small",
    "workload.dtype": "bf16",
    "workload.batch_size": 1,
    "workload.steps": 3,
    "workload.warmup_steps": 1,
    "measure.device": "cuda",
}


MIDWAY = "midway"  # planned's budget, resolved when the check runs (txlab estimate of sdpa and checkpoint)


@dataclass
class Check:
    kind: str  # preset | fp32 | oom | after_oom | compile | hf
    name: str
    seq_len: int
    overrides: dict = field(default_factory=dict)
    expect: str = "ok"  # the status the check must end with

    def describe(self) -> str:
        keys = " ".join(f"{k}={v}" for k, v in self.overrides.items() if k not in BASE or BASE[k] != v)
        return f"{self.kind:<9} {self.name:<22} T={self.seq_len:<6} expect {self.expect:<4} {keys}"


def plan(lengths: list[int], quick: bool = False) -> list[Check]:
    """Every check the run makes, in order (what --dry-run prints)."""
    checks: list[Check] = []
    for T in lengths:
        for p in PRESETS:
            if p == "naive" and T > 8192:  # materialized T x T scores: minutes and tens of GiB past 8k
                continue
            over = {**BASE, "workload.seq_len": T, "policy.name": p}
            if p == "planned":  # the budget: midway between checkpoint's and sdpa's estimated peaks
                over["measure.budget_gib"] = MIDWAY
            checks.append(Check("preset", p, T, over))
    T0 = lengths[0]
    checks.append(
        Check(
            "fp32",
            "sdpa fp32",
            T0,
            {**BASE, "workload.seq_len": T0, "policy.name": "sdpa", "workload.dtype": "fp32"},
        )
    )
    # naive at 8192 tokens needs tens of GiB; a 1 GiB cap must stop it with a real out-of-memory error
    checks.append(
        Check(
            "oom",
            "naive capped at 1 GiB",
            8192,
            {**BASE, "workload.seq_len": 8192, "policy.name": "naive", "measure.budget_gib": 1.0},
            "oom",
        )
    )
    checks.append(Check("after_oom", "sdpa after the oom", T0, {**BASE, "workload.seq_len": T0, "policy.name": "sdpa"}))
    if not quick:
        for p in ("sdpa", "recompute"):
            over = {**BASE, "workload.seq_len": T0, "policy.name": p, "workload.compile": True}
            checks.append(Check("compile", f"{p} compiled", T0, over))
        for v in ("hf", "hf-gc", "sdpa", "checkpoint", "recompute"):
            checks.append(Check("hf", C.label(v), lengths[-1], {"variant": v}))
    return checks


# --- running -----------------------------------------------------------------------------------------


def _trial(check: Check) -> dict:
    from txlab.config import load_config
    from txlab.trial import estimate_trial, run_trial

    over = dict(check.overrides)
    if over.get("measure.budget_gib") == MIDWAY:
        peaks = [
            estimate_trial(load_config(None, {**over, "measure.budget_gib": None, "policy.name": p}), "cuda")[
                "peak_bytes"
            ]
            for p in ("checkpoint", "sdpa")
        ]
        over["measure.budget_gib"] = sum(peaks) / 2 / C.GiB
    cfg = load_config(None, over)
    row = run_trial(cfg)
    out = {
        "status": row["status"],
        "error": (row["error"] or "")[:200] or None,
        "peak_GiB": _gib(row.get("peak_bytes")),
        "reserved_GiB": _gib(row.get("reserved_bytes")),
        "tracked_GiB": _gib(row.get("tracked_peak_bytes")),
        "step_time_s": row.get("step_time_s"),
        "tokens_per_s": row.get("tokens_per_s"),
        "mfu": row.get("mfu"),
        "compile_s": row.get("compile_s"),
        "plan": row.get("plan"),
        "budget_GiB": cfg.measure.budget_gib,
    }
    if check.kind in ("preset", "fp32"):
        est = estimate_trial(cfg, "cuda")
        out["estimate_GiB"] = _gib(est.get("peak_bytes"))
        if out["peak_GiB"] and out["estimate_GiB"]:
            out["estimate_vs_allocator"] = out["estimate_GiB"] / out["peak_GiB"]
        if out["peak_GiB"] and out["tracked_GiB"]:
            out["tracker_vs_allocator"] = out["tracked_GiB"] / out["peak_GiB"]
    return out


def _gib(b):
    return None if b is None else b / C.GiB


def _hf_side_by_side(checks: list[Check], reps: int = 5) -> dict[str, dict]:
    """HF and txlab contenders on the device in one harness: bf16 autocast fwd + bwd, interleaved timing."""
    import torch

    dev = torch.device("cuda")
    T = checks[0].seq_len
    out = {}
    contenders = {}
    for ch in checks:
        v = ch.overrides["variant"]
        c = C.build(v, T)
        c.model.to(dev)
        contenders[ch.name] = c
    x, y = (t.to(dev) for t in C.tokens(C.vocab_of(next(iter(contenders.values()))), T))

    def step(c):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = c.loss(x, y)
        loss.backward()
        c.model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    for name, c in contenders.items():  # peak of one step (also the warm-up)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(c)
        out[name] = {
            "status": "ok",
            "peak_GiB": torch.cuda.max_memory_allocated() / C.GiB,
            "activation_peak_GiB": (torch.cuda.max_memory_allocated() - base) / C.GiB,
            "note": c.note,
        }
    times = C.interleaved({n: (lambda c=c: step(c)) for n, c in contenders.items()}, reps, warmup=1, log=False)
    for n, ts in times.items():
        out[n].update(C.spread(ts))
        out[n]["step_time_s"] = out[n].pop("time_s")
    return out


def run(checks: list[Check], deadline_s: float, log=print) -> list[dict]:
    t0 = time.perf_counter()
    rows = []
    hf_checks = [c for c in checks if c.kind == "hf"]
    for ch in [c for c in checks if c.kind != "hf"] + ([hf_checks[0]] if hf_checks else []):
        if time.perf_counter() - t0 > deadline_s:
            group = hf_checks if ch.kind == "hf" else [ch]
            rows += [{**_base(c), "status": "skipped", "error": f"past the {deadline_s:.0f} s deadline"} for c in group]
            continue
        started = time.perf_counter()
        if ch.kind == "hf":
            try:
                got = _hf_side_by_side(hf_checks)
            except Exception as e:  # noqa: BLE001 - a failing check is a row, the others still run
                got = {c.name: {"status": "error", "error": f"{type(e).__name__}: {e}"[:200]} for c in hf_checks}
            for c in hf_checks:
                rows.append({**_base(c), **got[c.name], "check_s": time.perf_counter() - started})
                log(_line(rows[-1]))
            continue
        try:
            got = _trial(ch)
        except Exception as e:  # noqa: BLE001
            got = {"status": "error", "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append({**_base(ch), **got, "check_s": time.perf_counter() - started})
        log(_line(rows[-1]))
    return verdicts(rows)


def _base(ch: Check) -> dict:
    return {"kind": ch.kind, "check": ch.name, "seq_len": ch.seq_len, "expect": ch.expect}


def _line(r: dict) -> str:
    peak = f"{r['peak_GiB']:.3f} GiB" if r.get("peak_GiB") is not None else "-"
    t = f"{r['step_time_s']:.3f} s" if r.get("step_time_s") is not None else "-"
    return f"{r['kind']:<9} {r['check']:<22} T={r['seq_len']:<6} {r['status']:<8} peak {peak:<12} step {t}"


def verdicts(rows: list[dict]) -> list[dict]:
    """passed: the status expected, and for the compiled rows a speedup over the same preset's eager row."""
    eager = {(r["check"], r["seq_len"]): r for r in rows if r["kind"] == "preset"}
    for r in rows:
        r["passed"] = r["status"] == r["expect"]
        if r["kind"] == "compile" and r.get("step_time_s"):
            e = eager.get((r["check"].split()[0], r["seq_len"]))
            if e and e.get("step_time_s"):
                r["speedup_vs_eager"] = e["step_time_s"] / r["step_time_s"]
    return rows


def md_table(df) -> str:
    """A Markdown table of a DataFrame (floats to 3 decimals, empty cells for nulls)."""
    import pandas as pd

    def cell(v):
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def markdown(rows: list[dict], device: str) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    cols = [
        c
        for c in (
            "kind",
            "check",
            "seq_len",
            "status",
            "expect",
            "passed",
            "peak_GiB",
            "reserved_GiB",
            "tracked_GiB",
            "estimate_GiB",
            "estimate_vs_allocator",
            "tracker_vs_allocator",
            "step_time_s",
            "mfu",
            "compile_s",
            "speedup_vs_eager",
        )
        if c in df
    ]
    head = f"# txlab GPU check\n\n{C.machine_line()}\n\ndevice: {device}\n\n"
    body = md_table(df[cols])
    failed = df[~df["passed"]]
    tail = "\n\nall checks passed\n" if not len(failed) else "\n\nfailed: " + ", ".join(failed["check"]) + "\n"
    return head + body + tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--quick", action="store_true", help="the first length only, no compile or HF checks")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit; runs nothing (any machine)")
    ap.add_argument("--deadline-s", type=float, default=450.0)
    ap.add_argument("--out", default="results/gpu_check")
    args = ap.parse_args(argv)
    lengths = args.lengths[:1] if args.quick else args.lengths
    checks = plan(lengths, args.quick)
    if args.dry_run:
        print(f"gpu_check plan: {len(checks)} checks, deadline {args.deadline_s:.0f} s")
        for ch in checks:
            print("  " + ch.describe())
        return 0
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); --dry-run prints the plan",
            file=sys.stderr,
        )
        return 2
    device = torch.cuda.get_device_name(0)
    print(C.machine_line(), f"device {device}", flush=True)
    rows = run(checks, args.deadline_s, log=lambda s: print(s, flush=True))
    import pandas as pd

    out = Path(args.out)
    df = pd.DataFrame(rows)
    df["device"] = device
    path = C.write_parquet(df, out, "gpu_check")
    md = markdown(rows, device)
    (out / "gpu_check.md").write_text(md)
    print(md)
    print(f"wrote {path} and {out / 'gpu_check.md'}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
