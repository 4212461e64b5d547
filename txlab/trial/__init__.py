"""One trial, from its config to its result row: `run_trial(cfg)` measures it in this process,
`estimate_trial(cfg)` predicts it on fake tensors, `precheck(cfg)` tells whether to run it.

The path (docs/design.md, "The trial pipeline"): `run` picks the stage; `resolve` turns the config, once,
into a `Setup`; `pipeline` runs the stage (`train`, `infer`, `estimate`; `sharded` runs the pipeline on
each rank and merges), which fills typed records (`txlab.measure.records`), decides the outcome and calls
`row.build_row`."""

from txlab.trial.run import estimate_trial, precheck, run_trial

__all__ = ["estimate_trial", "precheck", "run_trial"]
