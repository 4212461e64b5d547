"""One trial, from its config to its result row: `run_trial(cfg)` measures it in this process,
`estimate_trial(cfg)` predicts it on fake tensors, `precheck(cfg)` tells whether to run it.

The path (docs/design.md, "The trial pipeline"): `resolve` (the config, once, into a `Setup`) -> a stage
(`train`, `infer`, `sharded`, `estimate`) filling typed records (`txlab.measure.records`) -> `verdict` ->
`row.build_row`."""

from txlab.trial.run import estimate_trial, precheck, run_trial

__all__ = ["estimate_trial", "precheck", "run_trial"]
