"""`txlab plot` and `txlab report` (dispatched lazily from txlab.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

from txlab.analysis.data import AnalysisError, budgets_of, prepare, require_rows


def _write_figures(df, out: Path, budgets: list[float], echo) -> dict[str, list[Path]]:
    """Each plot the store can show as PNG + SVG (each figure closed once saved); the others are skipped with
    their reason."""
    from txlab.analysis.layout import save_figure
    from txlab.analysis.plots import PLOTS, Skipped, draw

    written = {}
    for name in PLOTS:
        fig = draw(name, df, budgets)
        if isinstance(fig, Skipped):
            echo(f"skipped {name}: {fig.reason}")
            continue
        written[name] = save_figure(fig, out, name)
    return written


def _write_tables(df, out: Path, budgets: list[float], where: str) -> list[Path]:
    """frontier.csv, versus_baseline.csv and both as frontier.md; with sharded trials, fewest_devices.csv
    and its tables in frontier.md too."""
    from txlab.analysis.frontier import (
        fewest_devices,
        fewest_devices_markdown,
        frontier,
        frontier_markdown,
        versus_baseline,
    )

    fr, vs, fd = frontier(df, budgets), versus_baseline(df), fewest_devices(df, budgets)
    paths = [out / "frontier.csv", out / "versus_baseline.csv", out / "frontier.md"]
    fr.to_csv(paths[0], index=False)
    vs.to_csv(paths[1], index=False)
    markdown = frontier_markdown(fr, vs, where)
    if not fd.empty:
        paths.append(out / "fewest_devices.csv")
        fd.to_csv(paths[-1], index=False)
        markdown += "\n" + fewest_devices_markdown(fd)
    paths[2].write_text(markdown)
    return paths


def write_plots(source, out: str | Path, budgets=None, echo=print) -> dict[str, list[Path]]:
    """Every plot (PNG + SVG) and the frontier tables (CSV + Markdown) into `out`; returns name -> files.

    Plots a store cannot show (e.g. no chunked attention) are skipped with a printed reason.
    """
    df = prepare(source)
    require_rows(df, str(source) if not hasattr(source, "columns") else "data")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"{out}: cannot create output directory ({e.strerror})") from None
    budgets, where = budgets_of(df, budgets)
    if where in ("device capacity", "none"):
        echo(
            f"note: no measure.budget_gib in the store and no --budget-gib; budgets: {where}"
            + (f" ({', '.join(f'{b:g}' for b in budgets)} GiB)" if budgets else "")
        )
    written = _write_figures(df, out, budgets, echo)
    written["tables"] = _write_tables(df, out, budgets, where)
    for paths in written.values():
        for p in paths:
            echo(f"wrote {p}")
    return written


def _check_budgets(budgets) -> None:
    for b in budgets or []:
        if not b > 0 or b == float("inf"):
            raise AnalysisError(f"--budget-gib: must be > 0 and finite, got {b}")


def cmd_plot(args: argparse.Namespace) -> int:
    """`txlab plot --store DIR --out DIR [--budget-gib N ...]`, or `txlab plot --train RUN_DIR ... [--out DIR]`."""
    from txlab.results.store import refuse_output_in_store

    if getattr(args, "train", None):
        from txlab.analysis.training_plots import write_training_curves

        if args.budget_gib:
            raise AnalysisError("--budget-gib: a store's plots take budgets, training curves do not")
        if args.out:
            refuse_output_in_store(args.out)
        for p in write_training_curves(args.train, args.out):
            print(f"wrote {p}")
        return 0
    if not args.out:
        raise AnalysisError("--out: required with --store (the directory the plots and tables go to)")
    refuse_output_in_store(args.out)  # a store holds rows only: plots inside it break Parquet readers
    _check_budgets(args.budget_gib)
    write_plots(args.store, args.out, args.budget_gib)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from txlab.analysis.report import write_report
    from txlab.results.store import refuse_output_in_store

    refuse_output_in_store(args.out)  # the report and its report_files/ too
    _check_budgets(getattr(args, "budget_gib", None))
    path = write_report(args.store, args.out, getattr(args, "budget_gib", None))
    print(f"wrote {path}")
    return 0
