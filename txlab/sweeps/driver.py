"""Run a sweep on Ray Tune and append every finished trial to the store.

Shape of a run:
  1. `plan()` expands the spec (txlab.sweeps.spec), validates every trial config, opens the store and drops the
     trial keys already stored (status ok/oom/over_budget; `error` too unless --rerun-failed). Nothing
     touches Ray until the whole plan is valid.
  2. `run_sweep()` connects to Ray (local instance, `--address` or RAY_ADDRESS), refuses trials that can
     never be placed on a fixed set of nodes (`_check_fits`; a local instance is checked before it starts)
     and runs a `tune.Tuner` whose param space is `tune.grid_search` over the remaining trials, each trial
     with its placement group (`trial_resources` in `tune.with_resources`: the spec's resources, or one
     bundle of them per rank for `parallel.fsdp` = N), `reuse_actors` (estimate mode only),
     `max_concurrent_trials` and `FailureConfig(max_failures)`.
  3. Each trial (a Ray actor, placed by Ray on a node with the resources) starts `python -m txlab.sweeps.worker`
     in a fresh process, waits for its row, adds `sweep` and `node_id`, and reports the row to Tune. A
     sharded trial starts one actor per rank in its bundles instead, each running its rank's worker
     process, and merges their rows (txlab.sweeps.ranks).
     Estimate-mode trials (fake tensors, nothing allocated) run in the actor, and actors are reused. An
     exception inside the trial is already an `error` row (txlab.measure.trial); a trial process that dies (signal,
     kernel OOM killer) becomes an `error` row here. Neither is retried. Only failures Ray sees (a lost
     node, a killed actor) go to Tune's FailureConfig, which retries them.
  4. The driver's `StoreWriter` callback writes each reported row to the store as it arrives (one
     writer, under the store's writer lock) and prints the progress line. Trials that Tune gives up on
     become `error` rows from `on_trial_error`.
The store is the only state that matters: kill the driver at any moment and rerun the same command;
finished rows are kept and skipped, the rest run.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from txlab.config import ConfigError
from txlab.results.columns import FINAL_STATUSES, row_schema
from txlab.results.store import Store
from txlab.sweeps.spec import Expansion, SweepSpec, Trial, expand

# What to do when another driver took over this driver's store lease (object storage).
LEASE_LOST_FIX = "let the other sweep finish (or stop it)"


# --- planning ------------------------------------------------------------------------------------


@dataclass
class Plan:
    expansion: Expansion
    store: Store
    stored: dict[str, str]  # trial_key -> stored status, for this sweep's trials
    to_run: list[Trial]
    rerun_failed: bool

    @property
    def spec(self) -> SweepSpec:
        return self.expansion.spec

    def summary(self) -> str:
        e = self.expansion
        done = len(e.trials) - len(self.to_run)
        parts = [f"sweep {e.spec.name}: {e.spec.grid_size} grid points"]
        if e.skipped:
            parts.append(f"{len(e.skipped)} skipped by skip_if")
        if e.duplicates:
            parts.append(f"{len(e.duplicates)} duplicate configs")
        parts.append(f"{len(e.trials)} trials")
        parts.append(f"{done} already in the store")
        parts.append(f"{len(self.to_run)} to run")
        return ", ".join(parts)


def plan(spec: SweepSpec, store_uri: str, rerun_failed: bool = False, create: bool = True) -> Plan:
    expansion = expand(spec)  # raises ConfigError for a bad point: nothing has started
    store = Store.open(store_uri, create=create)
    statuses = store.statuses()
    keys = {t.key for t in expansion.trials}
    stored = {k: s for k, s in statuses.items() if k in keys}
    skip_statuses = set(FINAL_STATUSES) if rerun_failed else set(FINAL_STATUSES) | {"error"}
    to_run = [t for t in expansion.trials if stored.get(t.key) not in skip_statuses]
    return Plan(expansion, store, stored, to_run, rerun_failed)


# --- rows ----------------------------------------------------------------------------------------


def error_row(trial_key: str, flat: dict[str, Any], sweep: str, message: str, **identity: Any) -> dict[str, Any]:
    """A full row for a trial that produced none (its process or node died): config columns, no figures."""
    row: dict[str, Any] = dict.fromkeys(row_schema().names)
    row.update({k: v for k, v in flat.items() if k in row})
    row.update(trial_key=trial_key, sweep=sweep, status="error", error=message[:2000], measured=True)
    row.update({k: v for k, v in identity.items() if k in row})
    return row


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- the trial: runs inside a Ray actor ------------------------------------------------------------


def run_in_subprocess(
    trial_key: str,
    flat: dict[str, Any],
    sweep: str,
    python: str | None = None,
    mode: str = "measure",
    precheck: bool = True,
) -> dict[str, Any]:
    """Run one trial in a fresh Python process; always returns a row (an `error` row if it died).
    `mode` and `precheck`: the spec's (see sweeps.spec)."""
    import socket

    from txlab.sweeps.worker import run_worker

    started, t0 = _now(), time.perf_counter()
    done = run_worker({"trial_key": trial_key, "config": flat, "mode": mode, "precheck": precheck}, python)
    if done.returncode == 0 and done.row is not None:
        return done.row
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        why = f"trial process killed by {name}"
        if name == "SIGKILL":
            why += " (out of host memory? the kernel's OOM killer sends SIGKILL)"
    else:
        why = f"trial process exited with status {done.returncode}"
    last = done.last_line()
    message = why + (f": {last}" if last else "")
    return error_row(
        trial_key,
        flat,
        sweep,
        message,
        host=socket.gethostname(),
        started_at=started,
        duration_s=time.perf_counter() - t0,
    )


def estimate_in_actor(trial_key: str, flat: dict[str, Any], sweep: str) -> dict[str, Any]:
    """An estimate-mode trial in this process (the actor, reused across trials): always returns a row."""
    import socket

    from txlab.sweeps.worker import row_for

    started, t0 = _now(), time.perf_counter()
    try:
        return row_for({"trial_key": trial_key, "config": flat, "mode": "estimate"})
    except Exception as e:  # noqa: BLE001 - estimate_trial makes its own error rows; this is a key mismatch
        return error_row(
            trial_key,
            flat,
            sweep,
            f"{e.__class__.__name__}: {e}",
            host=socket.gethostname(),
            started_at=started,
            duration_s=time.perf_counter() - t0,
            measured=False,
        )


def sharded_on_ray(
    trial_key: str, flat: dict[str, Any], sweep: str, precheck: bool, cpu: float, gpu: float
) -> dict[str, Any]:
    """A `parallel.fsdp` = N trial: its N ranks in the trial's placement group (txlab.sweeps.ranks), one
    row. A rank whose Ray actor died raises (RankLost) so that Tune retries the trial."""
    import socket

    from txlab.config import config_from_flat
    from txlab.sweeps.ranks import run_ranks

    started, t0 = _now(), time.perf_counter()
    try:
        cfg = config_from_flat(flat)
        if cfg.trial_key != trial_key:
            raise RuntimeError(
                f"trial key mismatch: the driver planned {trial_key}, this node resolves {cfg.trial_key} "
                "(is the same txlab version installed on every node?)"
            )
    except Exception as e:  # noqa: BLE001 - a config this node cannot build is the trial's error row
        message = f"{e.__class__.__name__}: {e}"
        return error_row(trial_key, flat, sweep, message, host=socket.gethostname(), started_at=started)
    job = {"trial_key": trial_key, "config": flat, "mode": "measure", "precheck": precheck}
    return run_ranks(cfg, job, cpu, gpu, started, t0)


def _ranks(flat: dict[str, Any], mode: str) -> int:
    """How many ranks (bundles of the spec's resources) a trial takes: `parallel.fsdp` when measured; an
    estimate runs rank 0 alone on a fake process group."""
    return int(flat.get("parallel.fsdp") or 1) if mode == "measure" else 1


def _trial_ranks(trial: Trial, mode: str) -> int:
    return trial.config.parallel.fsdp if mode == "measure" else 1


def _trainable(
    config: dict[str, Any],
    jobs: dict[str, dict[str, Any]] | None = None,
    sweep: str = "",
    mode: str = "measure",
    precheck: bool = True,
    cpu: float = 1.0,
    gpu: float = 0.0,
) -> None:
    """The Tune function trainable: one trial, one row, one `tune.report`."""
    import ray
    from ray import tune

    key = config["trial_key"]
    if mode == "estimate":
        row = estimate_in_actor(key, jobs[key], sweep)
    elif _ranks(jobs[key], mode) > 1:
        row = sharded_on_ray(key, jobs[key], sweep, precheck, cpu, gpu)
    else:
        row = run_in_subprocess(key, jobs[key], sweep, mode=mode, precheck=precheck)
    row["sweep"] = sweep
    row["node_id"] = row.get("node_id") or ray.get_runtime_context().get_node_id()
    tune.report({"row": json.dumps(row, default=str), "status": row["status"]})


# --- the driver: progress and the store ------------------------------------------------------------


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


@dataclass
class Progress:
    """Counts and the one progress line: done/total, running, OOM, failed, elapsed, ETA."""

    name: str
    total: int
    stream: Any = None
    started: float = field(default_factory=time.monotonic)  # for "elapsed": the whole sweep
    trials_started: float | None = None  # for the ETA: when Tune began running trials
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("ok", "oom", "over_budget", "error"), 0))
    running: int = 0
    retried: int = 0
    last_line_at: float = 0.0

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def eta(self) -> float | None:
        if self.done >= self.total:
            return 0.0
        if not self.done:
            return None
        elapsed = time.monotonic() - (self.trials_started or self.started)
        return elapsed / self.done * (self.total - self.done)

    def line(self) -> str:
        c = self.counts
        retried = f", {self.retried} retried" if self.retried else ""
        return (
            f"[{self.name}] {self.done}/{self.total} done, {self.running} running | ok {c['ok']}, "
            f"OOM {c['oom']}, over budget {c['over_budget']}, failed {c['error']}{retried} | "
            f"elapsed {_fmt_s(time.monotonic() - self.started)}, ETA {_fmt_s(self.eta())}"
        )

    def print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)
        self.last_line_at = time.monotonic()


class RowWriter:
    """The driver's side of a sweep, without Ray: writes each reported row to the store (the one writer),
    keeps the progress counts and the set of running trials, prints the progress lines, and stops the sweep
    (`store_error`) once the store cannot take rows. The Tune callback (`_make_callback_class`) feeds it."""

    def __init__(self, plan: Plan, jobs: dict[str, dict[str, Any]], progress: Progress, heartbeat_s: float):
        self.plan, self.jobs, self.progress, self.heartbeat_s = plan, jobs, progress, heartbeat_s
        self.written: set[str] = set()
        self.running: set[str] = set()  # trial keys started and not yet reported, failed or retried
        self.labels = {t.key: t.label() for t in plan.to_run}
        self.store_error: str | None = None  # set when the store cannot be written: the sweep stops

    # --- trial events ---------------------------------------------------------------------------

    def _set_running(self, key: str, running: bool) -> None:
        # Counted here, not from Tune's trial statuses: Tune calls on_trial_start before it marks the trial
        # RUNNING, and a trial that has reported its row stays RUNNING until Tune reaps it.
        (self.running.add if running else self.running.discard)(key)
        self.progress.running = len(self.running)

    def trial_started(self, key: str) -> None:
        self._set_running(key, True)

    def trial_reported(self, key: str, row: dict[str, Any]) -> None:
        self._set_running(key, False)
        self.write(row)

    def trial_completed(self, key: str) -> None:
        self._set_running(key, False)
        if key not in self.written:  # finished without a row: cannot happen unless the trainable changed
            self.write(
                error_row(key, self.jobs[key]["config"], self.plan.spec.name, "trial ended without a result row")
            )

    def trial_retried(self, key: str, why: str) -> None:
        self._set_running(key, False)  # started again (on_trial_start) when Tune reschedules it
        self.progress.retried += 1
        self.progress.print(f"  retrying  {key}: {why}")

    def trial_failed(self, key: str, message: str, host: str | None) -> None:
        self._set_running(key, False)
        self.write(error_row(key, self.jobs[key]["config"], self.plan.spec.name, message, host=host, started_at=_now()))

    def step(self) -> None:
        lost = self.plan.store.lock_lost()
        if lost and not self.store_error:
            self._stop(f"store {self.plan.store.uri}: {lost}", "", "lease lost", fix=LEASE_LOST_FIX)
        if time.monotonic() - self.progress.last_line_at >= self.heartbeat_s:
            self.progress.print(self.progress.line())

    # --- rows -------------------------------------------------------------------------------------

    def write(self, row: dict[str, Any]) -> None:
        key = row["trial_key"]
        if key in self.written or self.store_error:
            return
        lost = self.plan.store.lock_lost()
        if lost:  # another driver holds the store now: this one must not write
            self._stop(f"store {self.plan.store.uri}: {lost}", key, "lease lost", fix=LEASE_LOST_FIX)
            return
        try:
            row = self._store(row)
        except OSError as e:
            why = e.strerror or (str(e).splitlines() or [e.__class__.__name__])[0]
            self._stop(f"store {self.plan.store.uri}: cannot write the row of trial {key} ({why})", key, why)
            return
        self.written.add(key)
        self.progress.counts[row["status"]] += 1
        self._print_row(row)

    def _store(self, row: dict[str, Any]) -> dict[str, Any]:
        """Write the row; a row the store refuses is stored as an `error` row saying why. Returns what was
        stored. OSError (disk full, read-only store, bucket gone) propagates."""
        import pyarrow as pa

        try:
            self.plan.store.write_row(row)
            return row
        except OSError:
            raise
        except (ValueError, TypeError, pa.ArrowException) as e:
            # A row the store refuses (a column or type outside the schema: txlab versions differ) is stored
            # as an `error` row saying so, rather than ending the whole sweep.
            row = self._refused_row(row, e)
            self.plan.store.write_row(row)
            return row

    def _refused_row(self, row: dict[str, Any], e: Exception) -> dict[str, Any]:
        key = row["trial_key"]
        flat = self.jobs[key]["config"] if key in self.jobs else {}
        return error_row(
            key,
            flat,
            self.plan.spec.name,
            f"row refused by the store: {e}",
            host=row.get("host"),
            node_id=row.get("node_id"),
            started_at=row.get("started_at"),
            duration_s=row.get("duration_s"),
            device=row.get("device"),
        )

    def _stop(self, what: str, key: str, why: str, fix: str = "fix the store (space, permissions)") -> None:
        """The store cannot take rows: no row is half-written (temporary + rename), so stop the whole sweep
        (the Stopper) rather than run trials whose rows cannot land."""
        self.store_error = (
            f"{what}; sweep stopped, {len(self.written)} row(s) written this run are kept; "
            f"{fix} and rerun the same command to resume"
        )
        self.progress.print(f"  store write failed: {key + ': ' if key else ''}{why}")

    def _print_row(self, row: dict[str, Any]) -> None:
        key = row["trial_key"]
        figure = ""
        if row.get("peak_bytes") is not None:
            figure = f"  peak {row['peak_bytes'] / 2**30:.3f} GiB"
        if row.get("step_time_s") is not None:
            figure += f"  step {row['step_time_s']:.3f} s"
        where = f"  on {row.get('host') or '?'}"
        self.progress.print(f"  {row['status']:<11} {key}  {self.labels.get(key, '')}{figure}{where}")
        if row["status"] == "error" and row.get("error"):
            self.progress.print(f"              {row['error'].splitlines()[0][:300]}")
        self.progress.print(self.progress.line())


def _make_callback_class():
    """The Tune callback (a `RowWriter` fed by Tune's trial events) and its stopper, made on demand so that
    this module imports without Ray."""
    from ray import tune

    class StoreWriter(RowWriter, tune.Callback):
        """Writes each finished trial's row to the store (on the driver: the one writer)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            self.trial_started(trial.config["trial_key"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "row" in result:
                self.trial_reported(trial.config["trial_key"], json.loads(result["row"]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.trial_completed(trial.config["trial_key"])

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.trial_retried(trial.config["trial_key"], _error_text(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            message = f"Ray trial failed after {trial.num_failures} attempt(s): {_error_text(trial)}"
            self.trial_failed(trial.config["trial_key"], message, trial.node_ip)

        def on_step_end(self, iteration, trials, **info):
            self.step()

    class StopOnStoreError(tune.Stopper):
        """Ends the experiment once the StoreWriter cannot write (Tune stops the running trials)."""

        def __init__(self, writer: StoreWriter):
            self.writer = writer

        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.writer.store_error is not None

    StoreWriter.Stopper = StopOnStoreError
    return StoreWriter


def _error_text(trial) -> str:
    try:
        text = trial.get_error() or ""
    except Exception:  # noqa: BLE001 - the message is a courtesy; never fail the sweep over it
        text = ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


# --- Ray ------------------------------------------------------------------------------------------


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT that accepts no TCP connection is refused at once: ray.init would retry it for
    minutes. Other forms (`auto`, `ray://...`) are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"Ray address {address!r}: cannot connect ({e.strerror or e.__class__.__name__}); "
            "is the cluster up (`ray up cluster.yaml`), and is this HOST:6379?"
        ) from None


def check_address(address: str | None) -> None:
    """Refuse a dashboard URL, or a HOST:PORT nothing listens on, as a Ray address (before anything is created)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {address!r} is a dashboard (job server) address: submit the sweep with "
            f"`ray job submit --working-dir . -- txlab sweep ...`, or give --address the cluster's HOST:6379"
        )
    if address:
        _check_reachable(address)


def connect(address: str | None, quiet: bool = True) -> tuple[str, bool]:
    """ray.init: the given address, else RAY_ADDRESS (set inside `ray job submit`), else a local instance.
    Returns (where, started_here)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    level = logging.ERROR if quiet else logging.INFO
    if ray.is_initialized():
        return "existing", False
    check_address(address)
    if address:
        try:
            ray.init(address=address, logging_level=level, log_to_driver=not quiet)
        except (ConnectionError, TimeoutError, ValueError) as e:
            raise ConfigError(
                f"Ray address {address!r}: cannot connect ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})"
            ) from None
        return address, False
    # A laptop: a private local instance, no dashboard (nothing to submit jobs to), quiet logs.
    ray.init(include_dashboard=False, logging_level=level, log_to_driver=not quiet)
    return "local", True


def _quiet_env() -> None:
    # Tune's own loggers (CSV/JSON/TensorBoard per trial) duplicate what the store holds.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's classic output path, which is silent at verbose=0 (the newer one still prints a banner and
    # the experiment path); our StoreWriter prints the progress line instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


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
        _check_fits(spec, plan_.to_run, [local_resources()], False, "this machine")
    _quiet_env()
    from ray import tune

    # The lock first: a second sweep on this store is refused before it starts a Ray instance. (A bad
    # --address is refused earlier, by check_address in `txlab sweep`, before the store is made.)
    with plan_.store.writer_lock():
        where, started_here = connect(address, quiet=quiet)
        try:
            cluster = ray.cluster_resources()
            progress.print(
                f"[{spec.name}] {len(plan_.to_run)} trials on Ray ({where}: {int(cluster.get('CPU', 0))} CPU, "
                f"{cluster.get('GPU', 0):g} GPU); {_per_trial(spec, plan_.to_run)}; store {plan_.store.uri}"
            )
            nodes = live_nodes()
            _check_fits(spec, plan_.to_run, nodes, False if started_here else autoscaling(), f"the cluster ({where})")
            jobs = {t.key: {"config": t.config.flat()} for t in plan_.to_run}
            trainable = tune.with_resources(
                tune.with_parameters(
                    _trainable,
                    jobs={k: v["config"] for k, v in jobs.items()},
                    sweep=spec.name,
                    mode=spec.mode,
                    precheck=spec.precheck,
                    cpu=spec.cpu,
                    gpu=spec.gpu,
                ),
                trial_resources(spec, plan_.to_run),
            )
            callback = _make_callback_class()(plan_, jobs, progress, heartbeat_s)
            tmp_storage = tempfile.mkdtemp(prefix="txlab-tune-")
            try:
                tuner = tune.Tuner(
                    trainable,
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


def trial_resources(spec: SweepSpec, trials: list[Trial]):
    """Tune's resources per trial, a function of the trial's config: a placement group of one bundle of the
    spec's resources, or for a measured `parallel.fsdp` = N trial an empty head bundle (the trainable) and N
    bundles of them, one per rank, packed onto as few nodes as hold them."""
    from ray.tune import PlacementGroupFactory

    from txlab.sweeps.ranks import trial_bundles

    ranks = {t.key: n for t in trials if (n := _trial_ranks(t, spec.mode)) > 1}  # small: it is pickled
    cpu, gpu = spec.cpu, spec.gpu

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        return PlacementGroupFactory(trial_bundles(cpu, gpu, ranks.get(config["trial_key"], 1)), strategy="PACK")

    return resources


def _per_trial(spec: SweepSpec, trials: list[Trial]) -> str:
    """What each trial asks of Ray, for the sweep's opening line and the dry run."""
    text = f"each trial {spec.cpu:g} CPU, {spec.gpu:g} GPU"
    sizes = sorted({_trial_ranks(t, spec.mode) for t in trials} - {1})
    if sizes:
        text += f" (per rank: parallel.fsdp {'/'.join(map(str, sizes))} trials take that many times as much)"
    return text


def local_resources() -> dict[str, float]:
    """The CPUs and GPUs a local Ray instance started here would have (Ray's own detection)."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager as gpus
        from ray._private.utils import get_num_cpus

        n_gpus = gpus.get_current_node_num_accelerators()
        visible = gpus.get_current_process_visible_accelerator_ids()
        return {"CPU": float(get_num_cpus()), "GPU": float(n_gpus if visible is None else min(n_gpus, len(visible)))}
    except (ImportError, AttributeError):  # private API moved: count as Python does (no GPUs known)
        return {"CPU": float(os.cpu_count() or 1), "GPU": 0.0}


def live_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def autoscaling() -> bool | None:
    """Whether the connected cluster's autoscaler can add nodes: True, False (a fixed set of nodes: `ray
    start` by hand, a local instance), None when Ray does not say (the check only warns then)."""
    try:
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        config = state.get_cluster_config()  # autoscaler v2 / KubeRay: the node groups and their limits
        if config is not None and config.node_group_configs:
            groups = [g for g in config.node_group_configs if g.resources and g.max_count != 0]
            return any(g.max_count == -1 or g.max_count > g.min_count for g in groups)
        return scales_by_report(_internal_kv_get("__autoscaling_status"))  # the v1 monitor's last report
    except Exception:  # noqa: BLE001 - private API: unknown is a fine answer
        return None


def scales_by_report(raw: bytes | str | None) -> bool | None:
    """The v1 autoscaler's status report: without an autoscaling config the monitor runs a read-only
    provider that names each node's type after the node itself (nothing can be added); node types of a
    cluster config (`gpu_80gb`, ...) mean an autoscaler that can add nodes. None: no report (yet)."""
    try:
        types = (json.loads(raw or "{}").get("autoscaler_report") or {}).get("node_type_mapping") or {}
    except (ValueError, AttributeError):
        return None
    if not types:
        return None
    return not all(t == f"node_{node}" for node, t in types.items())


def _placeable(bundle: dict[str, float], n: int, nodes: list[dict[str, float]]) -> bool:
    """N equal bundles fit on these nodes (any number per node, as PACK allows)."""
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return True
    return sum(min(int(node.get(k, 0) / v + 1e-9) for k, v in need.items()) for node in nodes) >= n


def _describe_nodes(nodes: list[dict[str, float]]) -> str:
    counts: dict[str, int] = {}
    for node in nodes:
        text = f"{{{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU}}"
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"{c} x {t}" for t, c in counts.items()) or "none"


def _check_fits(
    spec: SweepSpec, trials: list[Trial], nodes: list[dict[str, float]], scales: bool | None, where: str
) -> None:
    """Every trial's bundles (one of the spec's resources per rank; one for a one-device trial) must fit on
    the cluster's nodes. A trial that cannot is refused (ConfigError: exit 2, before any trial runs) when the
    set of nodes is fixed; an autoscaling cluster (or one that does not say) may add such nodes: a warning."""
    sizes = sorted({_trial_ranks(t, spec.mode) for t in trials}, reverse=True)
    bundle = {"CPU": spec.cpu, "GPU": spec.gpu}
    misfit = next((n for n in sizes if not _placeable(bundle, n, nodes)), None)
    if misfit is None:
        return
    per = f"{{{spec.cpu:g} CPU, {spec.gpu:g} GPU}}"
    if misfit > 1:
        needs = (
            f"trials with parallel.fsdp {misfit} need {misfit} x {per} (resources per rank; "
            f"{misfit * spec.cpu:g} CPU and {misfit * spec.gpu:g} GPU in all)"
        )
    else:
        needs = f"each trial needs {per}"
    has = f"{where} has {_describe_nodes(nodes)}"
    if scales is False:
        raise ConfigError(
            f"sweep {spec.name}: {needs}; {has}: they can never be placed (lower resources or parallel.fsdp, "
            "or run on a larger cluster)"
        )
    print(
        f"warning: {needs}; {has}: such trials wait until the cluster (autoscaler) adds nodes that hold them",
        file=sys.stderr,
        flush=True,
    )


def format_dry_run(plan_: Plan) -> str:
    e = plan_.expansion
    lines = [plan_.summary() + " (all trial configs valid)"]
    for point, rule in e.skipped:
        lines.append("  skipped    " + " ".join(f"{k}={v}" for k, v in point.items()) + f"   [skip_if: {rule}]")
    for point, key in e.duplicates:
        lines.append("  duplicate  " + " ".join(f"{k}={v}" for k, v in point.items()) + f"   [same config as {key}]")
    to_run = {t.key for t in plan_.to_run}
    for t in e.trials:
        state = "run" if t.key in to_run else f"stored ({plan_.stored.get(t.key)})"
        lines.append(f"  {state:<20} {t.key}  {t.label()}")
    spec = plan_.spec
    lines.append(
        f"resources: {_per_trial(spec, plan_.to_run)}; max_concurrent {spec.max_concurrent or 'unlimited'}; "
        f"max_failures {spec.max_failures}; store {plan_.store.uri}"
    )
    return "\n".join(lines)


__all__ = ["Plan", "SweepResult", "plan", "run_sweep", "format_dry_run", "error_row", "connect", "ConfigError"]
