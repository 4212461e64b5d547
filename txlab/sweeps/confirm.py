"""`txlab advise --confirm --address HOST:PORT`: the winner measured on a Ray cluster, through the sweep driver.

advise writes the winner as a one-trial measured sweep (winner_sweep.yaml: one bundle, and one GPU on CUDA, per
rank, TP groups packed on a node); this runs it like `txlab sweep winner_sweep.yaml --address ... --store ...` and
hands back the trial's row. It lives with the sweeps because it needs Ray, which txlab's core never imports:
`txlab advise` receives it from the command line as a function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from txlab.config import ConfigError


def confirm_on_cluster(spec_path: Path, address: str, store_uri: str, trial_key: str) -> dict[str, Any]:
    """Run the one-trial sweep at `spec_path` on the cluster at `address` into `store_uri`; the trial's row."""
    from txlab.sweeps.cli import find_row
    from txlab.sweeps.driver import run_sweep
    from txlab.sweeps.plan import plan
    from txlab.sweeps.spec import load_spec

    p = plan(load_spec(spec_path), store_uri)
    keys = [t.key for t in p.expansion.trials]
    if keys != [trial_key]:  # winner_sweep.yaml is advise's own file: a mismatch is a bug, said plainly
        raise ConfigError(f"--address: {spec_path} holds trials {keys}, not the winner {trial_key}")
    result = run_sweep(p, address=address, quiet=True)
    if result.store_error:
        raise ConfigError(f"--address: the confirm's store {store_uri} could not be written: {result.store_error}")
    return find_row(store_uri, trial_key)
