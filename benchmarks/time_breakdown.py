"""Where a predicted step's time goes: the time model's price of every traced operator of a trial's step, summed by
(class, operator, phase), with the timeline's step and exposed communication (docs/time_model.md, docs/advise.md).

    python benchmarks/time_breakdown.py examples/advise_llama70b.yaml --set parallel.fsdp=64 --set parallel.cp=4 \\
        --set policy.name=recompute --set workload.grad_accum=4 --set measure.hardware=h100-sxm [--tile-body fused]

`--tile-body fused` is a what-if, not a prediction: an estimate for CUDA traces the tile body a CUDA run of txlab's
chunked / context-parallel attention computes (`ops`: PyTorch operators on materialized score tiles); `fused`
traces the CPU's fused tile body instead, whose kernel calls have the shapes, causal flags and FLOPs a flash
kernel per tile would have, and which the trace prices as fused attention. The difference is what the tiles would
save as fused kernels (txlab does not run them so on a GPU).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def breakdown(config: str, overrides: list[str], tile_body: str | None = None) -> dict:
    """The step's predicted figures and its operators' prices summed by (class, operator, phase)."""
    import txlab.model.attention as attention
    import txlab.trial.fake as fake
    from txlab.config.loading import load_config
    from txlab.timemodel.cost import Coster
    from txlab.timemodel.predict import timeline
    from txlab.timemodel.trace import is_kv_exchange
    from txlab.trial.predict import traced_step_memory, work_of
    from txlab.trial.resolve import resolve

    setup = resolve(load_config(config, overrides), estimate=True)
    if setup.hardware is None:
        raise SystemExit("time_breakdown: set measure.hardware (a profile to price the step on)")
    with contextlib.ExitStack() as stack:
        if tile_body is not None:  # the estimator sets the body it models inside its run: hold it at ours
            chosen = fake.chunked_tile_body
            fake.chunked_tile_body = lambda body: attention.chunked_tile_body(tile_body)
            stack.callback(setattr, fake, "chunked_tile_body", chosen)
        _, _, ops = traced_step_memory(setup)
    work = work_of(setup, None)
    times = Coster(setup.hardware, work.dtype, work.threads).times(ops)
    line = timeline(ops, setup.hardware, work)
    cp_group = setup.layout.cp_group(0)
    rows: dict[tuple, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for op, t in zip(ops, times):
        name = op.name.removeprefix("aten.").rsplit(".", 1)[0]
        cls = "collective (K/V)" if is_kv_exchange(op, cp_group) else op.cls
        row = rows[(cls, name, op.phase)]
        row[0] += 1
        row[1] += t
        row[2] += op.flops
        row[3] += op.read + op.write
    return {"step_s": line.step_s, "exposed_comm_s": line.exposed_comm_s, "ops": len(ops), "rows": dict(rows)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tile-body", choices=("ops", "fused"), help="what-if: trace this tile body (see the docstring)")
    ap.add_argument("--top", type=int, default=25, help="rows of the operator table")
    args = ap.parse_args(argv)
    out = breakdown(args.config, args.set, args.tile_body)
    rows = out["rows"]
    total = sum(r[1] for r in rows.values())
    print(f"step {out['step_s']:.4g} s predicted (exposed comm {out['exposed_comm_s']:.3g} s); {out['ops']} operators, "
          f"their prices summed {total:.4g} s (collectives overlap compute on a GPU)")  # fmt: skip
    by_class: dict[str, float] = collections.defaultdict(float)
    for (cls, _, _), r in rows.items():
        by_class[cls] += r[1]
    print("by class: " + ", ".join(f"{c} {s:.3g} s" for c, s in sorted(by_class.items(), key=lambda kv: -kv[1])))
    print(f"{'seconds':>8} {'share':>6} {'count':>6}  {'TFLOP':>8} {'GB moved':>9}  class / operator / phase")
    for (cls, name, phase), (n, t, flops, moved) in sorted(rows.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{t:8.4g} {t / total:6.1%} {n:6d}  {flops / 1e12:8.2f} {moved / 1e9:9.1f}  {cls} / {name} / {phase}")
    return out


if __name__ == "__main__":
    main()
