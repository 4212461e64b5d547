"""`txlab` command line: the one place that knows the core, `txlab.sweeps` and `txlab.analysis`.

Each command imports what it needs inside its handler (ordinary imports a reader and a tool can follow):
sweeps (Ray) and analysis (seaborn) load only for their commands, and torch only once the input is
known to be good, so `txlab run` with a bad key fails in a fraction of a second.
Exit codes: 0 done; 1 the work ran and failed; 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

from txlab.config import ConfigError
from txlab.text import one_line


class UsageError(ConfigError):
    """Bad command-line input (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        raise UsageError(f"{self.prog}: {message}")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set workload.seq_len=2048 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="txlab", description="What fits, how fast, and at what cost: transformer memory and speed.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run one trial in this process (no Ray) and print its row")
    p.add_argument("config", help="trial config YAML")
    _add_set(p)
    p.add_argument("--store", help="append the row to this store (directory or URI)")
    p.add_argument("--json", action="store_true", help="print the row as JSON")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("sweep", help="run a sweep spec's grid through Ray Tune")
    p.add_argument("spec", help="sweep spec YAML")
    p.add_argument("--store", help="result store (directory or URI); default: results/<sweep name>")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true", help="validate every trial config, print counts, run nothing")
    p.add_argument("--rerun-failed", action="store_true", help="also rerun trials stored with status error")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("rerun", help="rerun one stored trial locally (no Ray) and compare")
    p.add_argument("--store", required=True, help="result store (directory or URI)")
    p.add_argument("--trial", required=True, help="trial key")
    _add_set(p)
    p.set_defaults(handler=cmd_rerun)

    p = sub.add_parser(
        "plot", help="memory-vs-length, frontier and trade-off plots of a store, or training curves of runs"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="result store (directory or URI)")
    source.add_argument(
        "--train", nargs="+", metavar="RUN_DIR", help="txlab train run directories: their training curves, overlaid"
    )
    p.add_argument("--out", help="output directory (with --train, default: the one run directory)")
    p.add_argument("--budget-gib", type=float, nargs="+", help="budgets to draw (default: those in the store)")
    p.set_defaults(handler=cmd_plot)

    p = sub.add_parser("report", help="one document with the plots and tables of a store")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="report.html or report.md")
    p.add_argument("--budget-gib", type=float, nargs="+", help="budgets to draw (default: those in the store)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("estimate", help="predict a trial's peak memory on fake tensors, without running it")
    p.add_argument("config")
    _add_set(p)
    p.add_argument("--capacity-gib", type=float, help="device memory to check the prediction against, GiB (2^30 bytes)")
    p.add_argument("--json", action="store_true", help="print the row as JSON")
    p.set_defaults(handler=cmd_estimate)

    p = sub.add_parser("advise", help="the fastest (or cheapest) feasible layout, policy and micro-batch on N devices")
    p.add_argument("config", help="trial config YAML (the model and the global batch)")
    _add_set(p)
    p.add_argument(
        "--hardware", required=True, help="hardware profile: a catalogue name (h100-sxm, ...), local, or a YAML"
    )
    p.add_argument(
        "--devices", required=True, help="devices to lay the training out on: N, a range A-B (A, 2A, ... B) or A,B,C"
    )
    p.add_argument(
        "--target-tokens-per-s", type=float, help="the fewest devices (of --devices) predicted to reach this rate"
    )
    p.add_argument(
        "--objective", choices=("time", "cost"), default="time", help="rank by predicted step time or $/Mtok"
    )
    p.add_argument("--confirm", action="store_true", help="run the winner as a measured trial on this machine")
    p.add_argument("--address", help="with --confirm: run the winner on the Ray cluster at HOST:PORT (txlab sweep)")
    p.add_argument("--json", action="store_true", help='print {"candidates": [rows, best first], "confirmed": row}')
    p.add_argument("--store", help="keep the candidates' estimate rows in this store (and reuse those there)")
    p.add_argument("--out", help="directory for winner.yaml, winner_sweep.yaml and advise.png")
    p.add_argument("--workers", type=int, help="estimating processes (default: the CPU count)")
    p.set_defaults(handler=cmd_advise)

    p = sub.add_parser("calibrate", help="measure this machine's device and write the `local` hardware profile")
    p.add_argument("--out", help="profile file to write (default: the one measure.hardware: local reads)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="a few small shapes only (seconds; for tests)")
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("train", help="a full training run: evaluation, checkpoints, resume (docs/training.md)")
    p.add_argument("config", help="trial config YAML (its train: section sets the schedule)")
    _add_set(p)
    p.add_argument(
        "--out", help="run directory (default: train.out_dir, else runs/<trial key>); resumes from its checkpoint"
    )
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("generate", help="sample from a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint.pt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this probability")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("attention", help="attention-distance histograms per layer of a model on a text")
    p.add_argument("--checkpoint", required=True, help="txlab run directory or checkpoint.pt, or local HF checkpoint")
    p.add_argument("--text", required=True, help="UTF-8 text file to run the model on")
    p.add_argument("--out", required=True, help="output directory: attention_distance.parquet, .png, .svg")
    p.add_argument("--max-tokens", type=int, help="the text's first N tokens (default: the model's positions, <= 4096)")
    p.set_defaults(handler=cmd_attention)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from txlab.config import load_config

    cfg = load_config(args.config, args.overrides)
    from txlab.train.loop import train

    r = train(cfg, args.out, progress=True, on_eval=_draw_training_curves)
    e, first = r.last_eval or {}, r.first_eval or {}
    print(f"{r.status} at step {r.step}/{cfg.train.steps}" + (f": {r.message}" if r.message else ""))
    if e:
        bpb = e.get("bits_per_byte")
        print(
            f"held-out: loss {first.get('loss', float('nan')):.4f} -> {e['loss']:.4f}"
            + (f", bits/byte {first['bits_per_byte']:.4f} -> {bpb:.4f}" if bpb is not None else "")
            + (f" (unigram baseline {r.unigram_bits_per_byte:.4f})" if r.unigram_bits_per_byte is not None else "")
            + f", accuracy {100 * e['accuracy']:.1f}%"
        )
    print(f"run directory {r.out_dir} (config.yaml, metrics.jsonl, checkpoint.pt, training_curves.png)")
    return 1 if r.status == "diverged" else 0


def _draw_training_curves(run_dir) -> None:
    """RUN_DIR/training_curves.png and .svg, redrawn after each evaluation of `txlab train` (seaborn loads
    at the first). A plot that fails is reported and training goes on."""
    from txlab.analysis.training_plots import write_training_curves

    try:
        write_training_curves([run_dir])
    except Exception as e:  # noqa: BLE001 - a figure is never worth a training run
        print(f"warning: training curves not drawn: {e.__class__.__name__}: {e}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from txlab.train.generate import check_sampling, generate

    check_sampling(args)
    text = generate(
        args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
    )
    print(args.prompt + text)
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    """`txlab attention --checkpoint PATH --text FILE --out DIR [--max-tokens N]` (docs/analysis.md)."""
    from pathlib import Path

    from txlab.results.store import refuse_output_in_store

    refuse_output_in_store(args.out)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out: {args.out}: exists and is not a directory")
    from txlab.interpret.attention_distance import attention_distance, check_inputs, load_hf, token_ids

    text, kind = check_inputs(args.checkpoint, args.text, args.max_tokens)  # before any model is loaded
    if kind == "hf":
        model, tok = load_hf(args.checkpoint)
    else:
        from txlab.train.checkpoint import load_model
        from txlab.train.generate import checkpoint_tokenizer

        model, cfg = load_model(args.checkpoint)
        tok = checkpoint_tokenizer(Path(args.checkpoint), cfg.data.tokenizer)
    ids, note = token_ids(model, tok.encode(text), args.max_tokens, args.text)
    if note:
        print(f"note: {note}")
    table = attention_distance(model, ids)
    from txlab.analysis.attention import write_attention_plot  # matplotlib: only once the table exists

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "attention_distance.parquet", index=False)
    paths = [out / "attention_distance.parquet", *write_attention_plot(out / "attention_distance.parquet", out)]
    means = table[table["head"] == -1].groupby("layer")["mean_distance"].first()
    print(f"{len(ids)} tokens; mean attention distance per layer: " + ", ".join(f"{m:.1f}" for m in means))
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from txlab.config import load_config

    cfg = load_config(args.config, args.overrides)
    store = None
    if args.store:
        from txlab.results.store import Store

        store = Store.open(args.store, create=True)  # fail on a bad store before any work
    from txlab.results.format import format_row
    from txlab.trial import run_trial

    row = run_trial(cfg, progress=not args.json)
    write_error = None
    if store is not None:
        try:
            store.write_row(row)  # whole or not at all (temporary + rename)
        except OSError as e:  # disk full, store made read-only: the row is still printed below
            write_error = f"error: store {args.store}: cannot write the row ({e.strerror or e}); nothing was written"
    if args.json:
        print(json.dumps(row, default=str))
    else:
        print(format_row(row))
        if store is not None and write_error is None:
            print(f"row written to {args.store}")
    if write_error:
        print(write_error, file=sys.stderr)
        return 1
    return 1 if row["status"] == "error" else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from txlab.sweeps.cli import cmd_sweep as sweep  # Ray: only for this command

    return sweep(args)


def cmd_rerun(args: argparse.Namespace) -> int:
    from txlab.sweeps.cli import cmd_rerun as rerun

    return rerun(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from txlab.analysis.cli import cmd_plot as plot  # seaborn: only for this command

    return plot(args)


def cmd_report(args: argparse.Namespace) -> int:
    from txlab.analysis.cli import cmd_report as report

    return report(args)


def cmd_estimate(args: argparse.Namespace) -> int:
    """`txlab estimate CONFIG [--set ...] [--capacity-gib N] [--json]`."""
    from txlab.config import load_config
    from txlab.results.format import format_row
    from txlab.trial import estimate_trial  # imports torch: only once the input is good
    from txlab.units import GiB

    cfg = load_config(args.config, args.overrides)
    if args.capacity_gib is not None and not args.capacity_gib > 0:
        raise ConfigError(f"--capacity-gib: must be > 0, got {args.capacity_gib}")
    capacity = None if args.capacity_gib is None else int(args.capacity_gib * GiB)
    row = estimate_trial(cfg, capacity_bytes=capacity)
    if args.json:
        print(json.dumps(row, default=str))
    else:
        print("estimate (fake tensors, nothing run; figures are predictions)")
        print(format_row(row))
        if row.get("formula_activation_bytes") is not None:
            print(
                f"formula   Korthikanti et al. 2022 activations {row['formula_activation_bytes'] / GiB:.3f} GiB"
                f"  (estimated {row['activations_bytes'] / GiB:.3f} GiB)"
                if row.get("activations_bytes") is not None
                else ""
            )
        if row.get("plan"):
            print(f"plan      {row['plan']}")
        if capacity is not None:
            print(f"capacity  {capacity / GiB:g} GiB: {'fits' if row['status'] == 'ok' else row['status']}")
    return 1 if row["status"] == "error" else 0


def cmd_advise(args: argparse.Namespace) -> int:
    """`txlab advise CONFIG --hardware NAME --devices N ...` (docs/advise.md)."""
    from txlab.advise.command import advise

    def plot(points, path, title, capacity):  # matplotlib loads only once there is an answer to draw
        from txlab.analysis.advise_plots import write_advise_plot

        return write_advise_plot(points, path, title, capacity)

    remote = None
    if args.address:
        if not args.confirm:
            raise ConfigError(
                "--address: the cluster runs the winner for --confirm; allowed: --confirm --address HOST:PORT"
            )
        from txlab.sweeps.cluster import check_address  # Ray: only for a cluster confirm
        from txlab.sweeps.confirm import confirm_on_cluster

        check_address(args.address)  # before any estimate

        def remote(spec_path, key):  # its own store: --store holds the estimate row under the same trial key
            return confirm_on_cluster(spec_path, args.address, str(spec_path.parent / "confirm_store"), key)

    return advise(args, plot, remote=remote)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """`txlab calibrate [--out PATH] [--device D] [--quick]` (docs/time_model.md, "Calibration")."""
    from pathlib import Path

    from txlab.hardware import local_path

    out = Path(args.out).expanduser() if args.out else local_path()
    if out.is_dir():
        raise ConfigError(f"--out: {out}: is a directory; give the profile file to write (e.g. {out}/local.yaml)")
    if args.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: unknown device {args.device!r}; allowed: auto, cpu, cuda")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: 'cuda' asked for but no CUDA device is available; allowed here: auto, cpu")
    from txlab.timemodel.calibrate import calibrate, summary, write_profile

    print(f"calibrating ({'quick' if args.quick else 'full'}); the machine should be otherwise idle")
    mapping = calibrate(args.device, quick=args.quick)
    for line in summary(mapping):
        print(line)
    print(f"wrote {write_profile(mapping, out)} (measure.hardware: {'local' if out == local_path() else out})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - the last line of defence: short message unless --debug
        if debug:
            traceback.print_exc()
        else:
            print(
                f"internal error: {e.__class__.__name__}: {one_line(str(e), 500)} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
