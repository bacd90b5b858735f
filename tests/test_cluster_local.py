"""The local multi-node Ray cluster of `cluster/local/`: a head and two workers on this host, token auth on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from cluster_util import START, STOP, is_alive, local_cluster, ray_cli, script_env

NODES_SCRIPT = """
import json, ray
ray.init(logging_level="ERROR")
print(json.dumps([{"alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]))
"""


def _http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.integration
@pytest.mark.slow
def test_head_and_two_workers_with_token_auth_stop_by_pid():
    with local_cluster(workers=2) as cluster:
        launchers = cluster.launcher_pids()
        assert sorted(launchers) == ["head", "worker1", "worker2"]

        # A driver that has the token sees the three nodes, each with its own resources.
        out = subprocess.run(
            [sys.executable, "-c", NODES_SCRIPT],
            env=cluster.client_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        nodes = json.loads(out.strip().splitlines()[-1])
        assert [n["alive"] for n in nodes] == [True, True, True]
        names = sorted(r for n in nodes for r in n["resources"] if r.startswith("local_"))
        assert names == ["local_head", "local_worker1", "local_worker2"]

        # The dashboard (the jobs API that `ray job submit` uses) refuses requests without the right token.
        jobs = f"{cluster.dashboard_url}/api/jobs/"
        assert _http_status(jobs) == 401
        assert _http_status(jobs, token="not-the-token") == 403
        assert _http_status(jobs, token=cluster.token()) == 200

        # The real `ray job submit` CLI: with the token it runs a driver on the cluster; without, it is refused.
        driver = "import ray; ray.init(); print('nodes seen by the job:', len(ray.nodes()))"
        submitted = ray_cli(cluster, "job", "submit", "--", "python", "-c", driver, timeout=300)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "nodes seen by the job: 3" in submitted.stdout
        no_token = cluster.client_env()
        del no_token["RAY_AUTH_TOKEN_PATH"]
        no_token["RAY_AUTH_TOKEN"] = "not-the-token"
        refused = ray_cli(cluster, "job", "list", env=no_token, timeout=120)
        assert refused.returncode != 0
        assert "Authentication failed" in refused.stdout + refused.stderr

        started = cluster.processes()
        assert set(launchers.values()) <= set(started)
        # Per node at least the launcher, raylet and agents; the head adds the GCS and the dashboard.
        assert len(started) > 3 * 3

    # local_cluster stopped it with stop.sh; every process it had is gone.
    left = sorted(pid for pid, starttime in started.items() if is_alive(pid, starttime))
    assert left == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be in 1..32"),
        (["--workers", "two"], "--workers must be a non-negative integer"),
        (["--base-port", "80"], "leaves no room"),
        (["--object-store-mb", "10"], "at least 75"),
        (["--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_start_rejects_bad_arguments(tmp_path, args, message):
    proc = subprocess.run(
        ["bash", str(START), "--dir", str(tmp_path), *args], env=script_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "pids").exists()


def test_stop_without_a_cluster_does_nothing(tmp_path):
    proc = subprocess.run(
        ["bash", str(STOP), "--dir", str(tmp_path)], env=script_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "nothing to stop" in proc.stdout


def test_stop_ignores_a_recorded_pid_that_now_belongs_to_another_process(tmp_path):
    # This test's own pid with a wrong start time stands for a pid the kernel has given to someone else.
    (tmp_path / "pids").write_text(f"head {os.getpid()} 1\n")
    proc = subprocess.run(
        ["bash", str(STOP), "--dir", str(tmp_path)], env=script_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "stopping 0 node(s)" in proc.stdout
