"""cluster.yaml is not an open cluster: Ray's schema accepts it, token authentication is on on every node,
the dashboard listens on the head's loopback, and no security-group rule opens Ray's ports to the internet.
Also the repository-wide rules: YAML read with the safe loader only, no eval/exec, no unpickling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_PORTS = {6379: "GCS", 8265: "dashboard / job server", 10001: "Ray client server"}
ANYWHERE = {"0.0.0.0/0", "::/0"}


def open_to_the_internet(config: dict) -> list[str]:
    """Every (rule, port) of the launcher's security group that lets anyone reach a Ray port."""
    found = []
    rules = (config.get("provider", {}).get("security_group") or {}).get("IpPermissions") or []
    for rule in rules:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if not cidrs & ANYWHERE:
            continue
        if str(rule.get("IpProtocol")) == "-1":
            found.append(f"all traffic from {sorted(cidrs & ANYWHERE)}")
            continue
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        found += [f"{name} ({port})" for port, name in RAY_PORTS.items() if lo <= port <= hi]
    return found


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_fits_rays_schema(config):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_no_ray_port_is_open_to_the_internet(config):
    sg = config["provider"].get("security_group")
    assert sg is not None and sg.get("GroupName"), "the nodes' security group is named in the file"
    assert open_to_the_internet(config) == []


def test_the_check_catches_open_rules():
    bad = {
        "provider": {
            "security_group": {
                "IpPermissions": [
                    {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
                    {"IpProtocol": "tcp", "FromPort": 1, "ToPort": 7000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
                    {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
                    {"IpProtocol": "tcp", "FromPort": 10001, "ToPort": 10001, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
                ]
            }
        }
    }
    assert open_to_the_internet(bad) == [
        "dashboard / job server (8265)",
        "GCS (6379)",
        "all traffic from ['0.0.0.0/0']",
    ]


def test_token_auth_and_loopback_dashboard(config):
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in worker
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head + worker
    assert "export RAY_AUTH_MODE=token" in " ".join(config["setup_commands"])  # drivers and `ray job` on the nodes
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "--include-dashboard=false" not in head  # the dashboard is there, reached through `ray dashboard`


SOURCES = [p for d in ("txlab", "sweeps", "analysis", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]


def test_safe_yaml_no_eval_no_unpickling():
    offenders = []
    patterns = {
        "unsafe YAML loader": re.compile(r"yaml\.(load|load_all|unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader\b"),
        "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
        "unpickling": re.compile(r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bread_pickle\(|\bUnpickler\("),
        "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
    }
    for path in SOURCES:
        text = path.read_text()
        for what, pattern in patterns.items():
            for m in pattern.finditer(text):
                line = text[: m.start()].count("\n") + 1
                src = text.splitlines()[line - 1]
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}: {src.strip()}")
    assert offenders == []
