"""The driver's side of a running sweep: the progress counts and line (`Progress`), the one writer of the
store fed with the reported rows (`RowWriter`), and the Tune callback and stopper that feed it
(`make_callback_class`, made on demand so that this module imports without Ray)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from txlab.sweeps.plan import Plan
from txlab.sweeps.rows import error_row, utc_now
from txlab.text import first_line
from txlab.units import GiB

# What to do when another driver took over this driver's store lease (object storage).
LEASE_LOST_FIX = "let the other sweep finish (or stop it)"


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
    (`store_error`) once the store cannot take rows. The Tune callback (`make_callback_class`) feeds it."""

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
        self.write(
            error_row(key, self.jobs[key]["config"], self.plan.spec.name, message, host=host, started_at=utc_now())
        )

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
            why = e.strerror or first_line(e)
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
            figure = f"  peak {row['peak_bytes'] / GiB:.3f} GiB"
        if row.get("step_time_s") is not None:
            figure += f"  step {row['step_time_s']:.3f} s"
        where = f"  on {row.get('host') or '?'}"
        self.progress.print(f"  {row['status']:<11} {key}  {self.labels.get(key, '')}{figure}{where}")
        if row["status"] == "error" and row.get("error"):
            self.progress.print(f"              {first_line(row['error'])}")
        self.progress.print(self.progress.line())


def make_callback_class():
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
    """The last line of a failed Tune trial's error (a traceback's last line is its exception)."""
    try:
        text = trial.get_error() or ""
    except Exception:  # noqa: BLE001 - the message is a courtesy; never fail the sweep over it
        text = ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"
