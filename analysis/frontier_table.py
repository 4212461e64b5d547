"""Print a store's feasibility frontier as Markdown: the longest sequence per policy and depth under each
budget, and what the best policy gains over the fused-attention baseline.

    python analysis/frontier_table.py STORE [--budget-gib 2 4 ...]

A thin script over the library (txlab.analysis); `txlab plot` and `txlab report` draw the same tables
with their plots.
"""

from __future__ import annotations

import argparse

from txlab.analysis.data import budgets_of, prepare
from txlab.analysis.frontier import frontier, frontier_markdown, versus_baseline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="result store (directory or URI)")
    p.add_argument("--budget-gib", type=float, nargs="*", help="budgets (default: the store's own)")
    args = p.parse_args()
    df = prepare(args.store)
    budgets, source = budgets_of(df, args.budget_gib)
    print(frontier_markdown(frontier(df, budgets), versus_baseline(df), source))


if __name__ == "__main__":
    main()
