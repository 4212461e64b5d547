"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, both on
127.0.0.1, token authentication on), a sweep submitted with `ray job submit --working-dir`, and rows from
both nodes in the store. The cluster's processes are killed by session id afterwards, even on failure,
so nothing of it outlives the test (and no other Ray on the machine is touched, as `ray stop` would)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, TINY_BASE, kill_session, trial_processes
from txlab.results.store import Store

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(RAY), reason="ray CLI not installed")]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """Head and worker nodes as `ray start --block` processes, each in its own session and temp dir."""

    def __init__(self, root: str):
        self.root = root  # short: Ray's socket paths live under it
        self.env = dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.nodes: list[subprocess.Popen] = []

    def _start(self, name: str, head: bool, worker_ports: int) -> None:
        nm, om, al, ag, re_, me = free_ports(6)
        cmd = [
            RAY,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={al}",
            f"--dashboard-agent-grpc-port={ag}",
            f"--runtime-env-agent-port={re_}",
            f"--metrics-export-port={me}",
            f"--min-worker-port={worker_ports}",
            f"--max-worker-port={worker_ports + 199}",
            f"--temp-dir={self.root}/{name}",
            "--disable-usage-stats",
        ]
        if head:
            cmd += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}",
            ]
        else:
            cmd += [f"--address=127.0.0.1:{self.gcs_port}"]
        log = open(f"{self.root}/{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = Path(f"{self.root}/{name}.log").read_text()
            if "Ray runtime started" in text:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited {proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"ray start ({name}) did not come up:\n{text[-3000:]}")

    def start(self) -> LocalCluster:
        # Each node its own temp dir: two nodes sharing one would garbage-collect each other's
        # runtime-env files (the job's working dir) on this single machine.
        self._start("head", head=True, worker_ports=23000)
        self._start("worker", head=False, worker_ports=24000)
        return self

    def submit(self, *entrypoint: str, timeout: float = 300, no_wait: str | None = None) -> subprocess.CompletedProcess:
        """`ray job submit`; with `no_wait` (a submission id) it returns once the job is accepted."""
        extra = ["--no-wait", "--submission-id", no_wait] if no_wait else []
        return self.job("submit", *extra, "--working-dir", str(REPO), "--", *entrypoint, timeout=timeout)

    def job(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(self.env, RAY_ADDRESS=f"http://127.0.0.1:{self.dashboard_port}")
        return subprocess.run([RAY, "job", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def shutdown(self) -> None:
        for proc in reversed(self.nodes):
            kill_session(proc.pid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def cluster():
    root = tempfile.mkdtemp(prefix="txr-", dir="/tmp")
    c = LocalCluster(root)
    try:
        yield c.start()
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(720)
def test_job_submit_sweep_on_two_nodes_survives_a_lost_worker(cluster, tmp_path):
    """First one sharded trial (parallel.fsdp 2) whose ranks, one CPU each, Ray places on both nodes (one
    row, both node ids). Then rows from both nodes; then the worker node is stopped (every process of it
    SIGKILLed) while it runs a trial: Tune retries that trial on the head and the store ends complete, each
    trial once."""
    from txlab.results.store import check_store

    sharded = tmp_path / "sharded.yaml"
    base = {"model": {"n_layers": 2, "d_model": 64}, "parallel": {"fsdp": 2},
            "workload": {"steps": 1, "warmup_steps": 0, "seq_len": 64, "batch_size": 2}}  # fmt: skip
    sharded.write_text(
        yaml.safe_dump({"name": "sharded", "base": base, "grid": {"seed": [0]}, "resources": {"cpu": 1}})
    )
    job = cluster.submit("txlab", "sweep", str(sharded), "--store", str(tmp_path / "sharded_store"), timeout=300)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "never be placed" not in job.stdout + job.stderr and "1/1 done" in job.stdout, job.stdout[-4000:]
    (row,) = Store.open(str(tmp_path / "sharded_store")).read().to_pylist()
    assert row["status"] == "ok" and row["measured"] and row["parallel.fsdp"] == 2 and row["peak_bytes"] > 0, row
    rank_nodes = row["node_id"].split(",")
    assert len(set(rank_nodes)) == len(rank_nodes) == 2, row["node_id"]  # rank 0 on one node, rank 1 on the other

    spec = tmp_path / "two_nodes.yaml"
    lengths = [64, 96, 128, 160, 192, 224]
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "two_nodes",
                "base": TINY_BASE,
                "grid": {"workload.seq_len": lengths},
                "resources": {"cpu": 1},
                "max_failures": 3,
                "precheck": False,  # the Ray machinery is under test here, not the estimator
            }
        )
    )
    store = tmp_path / "store"
    job_id = "txlab-two-nodes"
    job = cluster.submit("txlab", "sweep", str(spec), "--store", str(store), no_wait=job_id)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]

    worker_session = cluster.nodes[1].pid
    stopped_while_running = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        nodes = (
            {r["node_id"] for r in Store.open(str(store)).read().to_pylist()}
            if (store / "_txlab_store.json").exists()
            else set()
        )
        if len(nodes) == 2 and trial_processes(worker_session):
            kill_session(worker_session)  # the worker node: raylet, its workers, the trial process
            stopped_while_running = True
            break
        time.sleep(0.2)
    assert stopped_while_running, "the worker node never ran a second trial"
    rows_at_stop = len(list(store.glob("*.parquet")))

    logs = cluster.job("logs", job_id, "--follow", timeout=360)
    status = cluster.job("status", job_id)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, logs.stdout[-4000:] + status.stdout[-2000:]
    assert f"{len(lengths)}/{len(lengths)} done" in logs.stdout and "retrying" in logs.stdout, logs.stdout[-4000:]
    rows = Store.open(str(store)).read().to_pylist()
    assert len(rows) == len(lengths) and {r["status"] for r in rows} == {"ok"}, rows
    assert sorted(r["workload.seq_len"] for r in rows) == lengths
    assert len({r["node_id"] for r in rows}) == 2, "rows from both nodes"
    assert set(rank_nodes) == {r["node_id"] for r in rows}, "the sharded trial's ranks were on these two nodes"
    assert all(r["sweep"] == "two_nodes" and r["host"] and r["device"] == "cpu" for r in rows)
    check = check_store(str(store))
    assert check.ok and check.rows == len(lengths) and check.superseded == 0, check.summary()
    assert rows_at_stop < len(lengths)

    # token authentication is on: a client without the mode set is turned away
    env = dict(cluster.env, RAY_ADDRESS=f"http://127.0.0.1:{cluster.dashboard_port}")
    env.pop("RAY_AUTH_MODE")
    denied = subprocess.run([RAY, "job", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0 and "Authentication required" in denied.stdout + denied.stderr


def _rank_sessions(sessions: list[int]) -> dict[int, int]:
    """The running rank processes of sharded trials: rank -> the node (its `ray start` session) it runs on."""
    import json

    import psutil

    found = {}
    for session in sessions:
        for proc in trial_processes(session):
            try:
                job = proc.cmdline()[-2]
                if "txlab-rank" in job:
                    found[json.loads(Path(job).read_text())["rank"]] = session
            except (OSError, ValueError, IndexError, KeyError, psutil.Error):
                pass
    return found


@pytest.mark.timeout(720)
def test_a_tp_trial_puts_each_tp_group_on_one_node(cluster, tmp_path):
    """fsdp 2 x tp 2 on two 1-CPU nodes. At 1 CPU a rank no node holds a TP group (2 CPUs): the sweep is
    refused in one line before any trial runs. At half a CPU a rank each node holds one TP group: ranks 0
    and 1 (a TP group: tp innermost) run on one node, ranks 2 and 3 on the other, and the row is ok."""
    base = {"model": {"n_layers": 2, "d_model": 64}, "parallel": {"fsdp": 2, "tp": 2},
            "workload": {"steps": 1, "warmup_steps": 0, "seq_len": 64, "batch_size": 2}}  # fmt: skip
    spec = tmp_path / "tp.yaml"
    spec.write_text(yaml.safe_dump({"name": "tp", "base": base, "grid": {"seed": [0]}, "resources": {"cpu": 1}}))
    job = cluster.submit("txlab", "sweep", str(spec), "--store", str(tmp_path / "refused"), no_wait="txlab-refused")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    out = cluster.job("logs", "txlab-refused", "--follow", timeout=300).stdout
    status = cluster.job("status", "txlab-refused")
    assert "exit code 2" in status.stdout + status.stderr and "Traceback" not in out, out[-4000:]
    (line,) = {ln for ln in out.splitlines() if "never be placed" in ln}  # Ray repeats a failed job's log
    assert line.startswith("error: sweep tp: "), line
    assert "trials with parallel.fsdp 2 x parallel.tp 2 need 2 x {2 CPU, 0 GPU} on one node each" in line, line

    spec.write_text(yaml.safe_dump({"name": "tp", "base": base, "grid": {"seed": [0]}, "resources": {"cpu": 0.5}}))
    store, job_id = tmp_path / "store", "txlab-tp-groups"
    job = cluster.submit("txlab", "sweep", str(spec), "--store", str(store), no_wait=job_id)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    sessions, seen = [node.pid for node in cluster.nodes], {}
    deadline = time.monotonic() + 300
    while len(seen) < 4 and time.monotonic() < deadline:  # every rank lives until all four have joined
        seen.update(_rank_sessions(sessions))
        time.sleep(0.2)
    logs = cluster.job("logs", job_id, "--follow", timeout=360)
    status = cluster.job("status", job_id)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, logs.stdout[-4000:]
    assert sorted(seen) == [0, 1, 2, 3], (seen, logs.stdout[-4000:])
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[0] != seen[2], seen  # a TP group a node
    (row,) = Store.open(str(store)).read().to_pylist()
    assert row["status"] == "ok" and row["measured"] and row["parallel.tp"] == 2 and row["peak_bytes"] > 0, row
    assert len(set(row["node_id"].split(","))) == 2, row["node_id"]
    confirm_through_the_cluster(cluster, tmp_path)


def confirm_through_the_cluster(cluster, tmp_path):
    """`txlab advise --confirm --address HOST:PORT` (run from test_a_tp_trial_puts_each_tp_group_on_one_node, on its
    cluster): the winner runs through the sweep driver on the cluster, its measured row is `confirmed` and lands in
    the advise directory's confirm_store, apart from --store's estimate rows (same trial key)."""
    txlab = str(BIN / "txlab")
    profile = tmp_path / "cpu.yaml"  # a CPU profile, so the winner is a CPU trial the 1-CPU nodes can place
    done = subprocess.run([txlab, "calibrate", "--quick", "--out", str(profile)], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"n_layers": 2, "d_model": 64},
                                   "workload": {"steps": 2, "warmup_steps": 1, "seq_len": 64, "batch_size": 2}}))  # fmt: skip
    out, store = tmp_path / "advise", tmp_path / "estimates"
    argv = [txlab, "advise", str(cfg), "--hardware", str(profile), "--devices", "1", "--workers", "1", "--json",
            "--confirm", "--address", f"127.0.0.1:{cluster.gcs_port}", "--out", str(out), "--store", str(store)]  # fmt: skip
    done = subprocess.run(argv, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    best, confirmed = doc["candidates"][0], doc["confirmed"]
    assert confirmed["status"] == "ok" and confirmed["measured"] is True and confirmed["sweep"] == "advise_winner"
    assert confirmed["trial_key"] == best["trial_key"] and confirmed["node_id"], confirmed
    (row,) = Store.open(str(out / "confirm_store")).read().to_pylist()
    assert row["trial_key"] == best["trial_key"] and row["measured"] is True
    assert all(r["measured"] is False for r in Store.open(str(store)).read().to_pylist())
