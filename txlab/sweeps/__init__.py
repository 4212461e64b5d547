"""The Ray Tune layer. It calls the core; the core never imports it (nor Ray).

spec.py       a sweep spec: the grid, skip_if, resources, mode
plan.py       the spec expanded and planned against the store (what runs, what is stored)
driver.py     run_sweep: connect, place, run the Tuner, write rows as they arrive
placement.py  a trial's placement group (a bundle per rank) and whether the cluster can ever hold it
cluster.py    reaching Ray: the address, a local instance, the nodes and whether they autoscale
actor.py      one trial inside its Ray actor: the Tune trainable and how it gets the trial's row
worker.py     one trial (or one rank) in a fresh process: `python -m txlab.sweeps.worker`
ranks.py      the ranks of a sharded trial placed by Ray, merged into one row
progress.py   the progress line and the Tune callback that writes each row to the store
rows.py       the row of a trial that produced none (its process or node died)
dry_run.py    what `txlab sweep --dry-run` prints
cli.py        `txlab sweep` and `txlab rerun`
"""
