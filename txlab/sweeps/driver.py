"""Run a sweep on Ray Tune and append every finished trial to the store: the orchestration.

Shape of a run:
  1. `txlab.sweeps.plan.plan()` expands the spec (txlab.sweeps.spec), validates every trial config, opens the
     store and drops the trial keys already stored (status ok/oom/over_budget; `error` too unless
     --rerun-failed). Nothing touches Ray until the whole plan is valid (`--dry-run` prints it:
     txlab.sweeps.dry_run).
  2. `run_sweep()` connects to Ray (txlab.sweeps.cluster: local instance, `--address` or RAY_ADDRESS), refuses
     trials that can never be placed on a fixed set of nodes (txlab.sweeps.placement.check_fits; a local
     instance is checked before it starts) and runs a `tune.Tuner` whose param space is `tune.grid_search`
     over the remaining trials, each trial with its placement group (`trial_resources` in
     `tune.with_resources`: the spec's resources, or one bundle of them per rank for `parallel.fsdp` = N),
     `reuse_actors` (estimate mode only), `max_concurrent_trials` and `FailureConfig(max_failures)`.
  3. Each trial (a Ray actor, placed by Ray on a node with the resources) runs txlab.sweeps.actor.trainable:
     it starts `python -m txlab.sweeps.worker` in a fresh process, waits for its row, adds `sweep` and
     `node_id`, and reports the row to Tune. A sharded trial starts one actor per rank in its bundles
     instead, each running its rank's worker process, and merges their rows (txlab.sweeps.ranks).
     Estimate-mode trials (fake tensors, nothing allocated) run in the actor, and actors are reused. An
     exception inside the trial is already an `error` row (txlab.trial.run_trial); a trial process that dies
     (signal, kernel OOM killer) becomes an `error` row there. Neither is retried. Only failures Ray sees (a
     lost node, a killed actor) go to Tune's FailureConfig, which retries them.
  4. The driver's `StoreWriter` callback (txlab.sweeps.progress) writes each reported row to the store as it
     arrives (one writer, under the store's writer lock) and prints the progress line. Trials that Tune gives
     up on become `error` rows from `on_trial_error`.
The store is the only state that matters: kill the driver at any moment and rerun the same command;
finished rows are kept and skipped, the rest run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from txlab.sweeps.actor import trainable
from txlab.sweeps.cluster import autoscaling, connect, live_nodes, local_resources, quiet_env
from txlab.sweeps.placement import check_fits, per_trial, trial_resources
from txlab.sweeps.plan import Plan
from txlab.sweeps.progress import Progress, make_callback_class


@dataclass
class SweepResult:
    plan: Plan
    counts: dict[str, int]
    wall_s: float
    interrupted: bool = False
    store_error: str | None = None  # the store could not be written: the sweep stopped (rerun to resume)


def run_sweep(
    plan_: Plan,
    address: str | None = None,
    stream=None,
    heartbeat_s: float = 30.0,
    quiet: bool = True,
) -> SweepResult:
    """Run the plan's remaining trials through Ray Tune; rows land in the plan's store as they finish."""
    t0 = time.monotonic()
    spec = plan_.spec
    progress = Progress(spec.name, total=len(plan_.to_run), stream=stream)
    if not plan_.to_run:
        return SweepResult(plan_, progress.counts, 0.0)

    import ray

    if not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized():
        # A local instance has this machine's CPUs and GPUs: refuse what it could never place before
        # starting it (and before the store is made).
        check_fits(spec, plan_.to_run, [local_resources()], False, "this machine")
    quiet_env()
    from ray import tune

    # The lock first: a second sweep on this store is refused before it starts a Ray instance. (A bad
    # --address is refused earlier, by check_address in `txlab sweep`, before the store is made.)
    with plan_.store.writer_lock():
        where, started_here = connect(address, quiet=quiet)
        try:
            cluster = ray.cluster_resources()
            progress.print(
                f"[{spec.name}] {len(plan_.to_run)} trials on Ray ({where}: {int(cluster.get('CPU', 0))} CPU, "
                f"{cluster.get('GPU', 0):g} GPU); {per_trial(spec, plan_.to_run)}; store {plan_.store.uri}"
            )
            nodes = live_nodes()
            check_fits(spec, plan_.to_run, nodes, False if started_here else autoscaling(), f"the cluster ({where})")
            jobs = {t.key: {"config": t.config.flat()} for t in plan_.to_run}
            placed = tune.with_resources(
                tune.with_parameters(
                    trainable,
                    jobs={k: v["config"] for k, v in jobs.items()},
                    sweep=spec.name,
                    mode=spec.mode,
                    precheck=spec.precheck,
                    cpu=spec.cpu,
                    gpu=spec.gpu,
                ),
                trial_resources(spec, plan_.to_run),
            )
            callback = make_callback_class()(plan_, jobs, progress, heartbeat_s)
            tmp_storage = tempfile.mkdtemp(prefix="txlab-tune-")
            try:
                tuner = tune.Tuner(
                    placed,
                    param_space={"trial_key": tune.grid_search([t.key for t in plan_.to_run])},
                    tune_config=tune.TuneConfig(
                        num_samples=1,
                        max_concurrent_trials=spec.max_concurrent,
                        # Measured trials: a fresh actor (and trial process) per trial. Estimates run in
                        # the actor itself, so reusing it pays the torch import once per actor.
                        reuse_actors=spec.mode == "estimate",
                        trial_name_creator=lambda t: f"{spec.name}-{t.config['trial_key']}",
                        trial_dirname_creator=lambda t: t.config["trial_key"],
                    ),
                    run_config=tune.RunConfig(
                        name=spec.name,
                        storage_path=tmp_storage,  # Tune's bookkeeping only; the store is the record
                        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                        callbacks=[callback],
                        stop=callback.Stopper(callback),
                        verbose=0,
                        log_to_file=False,
                    ),
                )
                progress.trials_started = time.monotonic()
                tuner.fit()
            finally:
                shutil.rmtree(tmp_storage, ignore_errors=True)
        finally:
            if started_here:
                ray.shutdown()
    interrupted = progress.done < progress.total
    if interrupted:
        progress.print(progress.line() + " (stopped early)")
    return SweepResult(plan_, progress.counts, time.monotonic() - t0, interrupted, callback.store_error)


# What this module offers: run_sweep and its result. The rest of a sweep is imported from its own module
# (txlab.sweeps.plan, placement, cluster, actor, progress, rows, dry_run).
__all__ = ["SweepResult", "run_sweep"]
