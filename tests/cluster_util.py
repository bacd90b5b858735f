"""Start and stop the local multi-node Ray cluster of `cluster/local/` from tests.

    with local_cluster(workers=2, node_env={"AWS_ENDPOINT_URL": ...}) as cluster:
        ray_cli(cluster, "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.reproduce", ...)

`local_cluster` runs `cluster/local/start.sh` (a head and N workers on this host, token authentication
on, a fresh token in the cluster's own directory, never `~/.ray/auth_token`) on free ports, and on the
way out runs `cluster/local/stop.sh`, which stops exactly the processes the start script started, by
process id, then checks that every one of them is gone. Nothing here calls `ray stop`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = REPO / "cluster" / "local" / "start.sh"
STOP = REPO / "cluster" / "local" / "stop.sh"

RAY_BIN = Path(sys.executable).parent / "ray"  # the `ray` CLI of the Python that runs the tests

# The client environment variables of a token-authenticated cluster (Ray >= 2.52).
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class LocalClusterError(RuntimeError):
    """The local cluster did not start, or left processes behind when stopped."""


# The KubeRay launch files, cluster/kuberay/rayjob-{launch}.yaml (RayJob `dydit-{launch}`): the launch
# `{job}` or `{job}-{variant}` runs `python -m jobs.{job}` (reproduce-sdxl: the AT-EDM comparison on SD-XL).
RAYJOB_JOBS = ("prepare", "finetune", "sample", "evaluate", "reproduce")
LAUNCHES = (*RAYJOB_JOBS, "reproduce-sdxl")


def job_of(launch: str) -> str:
    """The job module a launch file runs: `reproduce-sdxl` -> `reproduce`."""
    return launch.split("-", 1)[0]

@dataclass(frozen=True)
class LocalCluster:
    dir: Path  # the cluster's directory: pids, auth_token, cluster.env, logs/, one temp dir per node
    base_port: int
    workers: int

    @property
    def gcs_address(self) -> str:
        """For `ray.init(address=...)` and `ray status`."""
        return f"127.0.0.1:{self.base_port}"

    @property
    def dashboard_url(self) -> str:
        """For `ray job submit --address ...` and the dashboard's HTTP API."""
        return f"http://127.0.0.1:{self.base_port + 1}"

    @property
    def token_file(self) -> Path:
        return self.dir / "auth_token"

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) plus what a Ray client of this cluster needs.

        `RAY_ADDRESS` serves `ray.init`; `RAY_API_SERVER_ADDRESS` serves `ray job ...`, which reads it
        before `RAY_ADDRESS`. The token is given by file; `RAY_AUTH_TOKEN` is removed because it would win.
        """
        env = dict(os.environ if base is None else base)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(
            RAY_ADDRESS=self.gcs_address,
            RAY_API_SERVER_ADDRESS=self.dashboard_url,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
        )
        return env

    def launcher_pids(self) -> dict[str, int]:
        """Node name -> pid of its `ray start --block` process, as start.sh recorded them."""
        pids = {}
        for line in (self.dir / "pids").read_text().splitlines():
            name, pid, _ = line.split()
            pids[name] = int(pid)
        return pids

    def processes(self) -> dict[int, int]:
        """Every live process of this cluster: the launchers and all their descendants, pid -> start time."""
        children: dict[int, list[int]] = {}
        for pid in _all_pids():
            stat = _proc_stat(pid)
            if stat is not None:
                children.setdefault(stat[1], []).append(pid)
        found: dict[int, int] = {}
        queue = list(self.launcher_pids().values())
        while queue:
            pid = queue.pop()
            stat = _proc_stat(pid)
            if stat is None or stat[0] == "Z" or pid in found:
                continue
            found[pid] = stat[2]
            queue.extend(children.get(pid, []))
        return found


def ray_cli(cluster: LocalCluster, *args: str, **run_kwargs) -> subprocess.CompletedProcess:
    """Run the real `ray` CLI against the cluster, with its address and token (or with `env=`, as given):

    ray_cli(cluster, "job", "submit", "--working-dir", str(REPO), "--", "python", "-m", "jobs.reproduce",
            "--config", "debug", timeout=1800)
    """
    run_kwargs.setdefault("capture_output", True)
    run_kwargs.setdefault("text", True)
    env = run_kwargs.pop("env", None) or cluster.client_env()
    return subprocess.run([str(RAY_BIN), *args], env=env, **run_kwargs)


def is_alive(pid: int, starttime: int) -> bool:
    """Whether the process `pid` that started at `starttime` (clock ticks) still runs (a zombie does not)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == starttime


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for start.sh and stop.sh: this interpreter's `ray`, no inherited Ray client settings.

    start.sh passes its environment on to every node, so `extra` is how settings reach every task
    (the S3 test server's AWS_ENDPOINT_URL and credentials, as the Secret does on KubeRay).
    """
    skip = AUTH_ENV + ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(extra or {})
    env["RAY_BIN"] = str(RAY_BIN)
    env["PATH"] = f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_base_port(workers: int, attempts: int = 50) -> int:
    """A base port whose fixed ports (GCS, dashboard, client, every node's six) are free on this host."""
    for _ in range(attempts):
        # Below Linux's ephemeral range (32768 and up), where outgoing connections take their ports.
        base = random.randrange(20000, 32768 - 1000 - 100 * (workers + 1), 10)
        ports = [base, base + 1, base + 2]
        ports += [base + 10 * (i + 1) + k for i in range(workers + 1) for k in range(6)]
        ports += [base + 1000 + 100 * i for i in range(workers + 1)]
        if all(_port_free(p) for p in ports):
            return base
    raise LocalClusterError(f"no free port range found in {attempts} attempts")


def start(
    workers: int = 2,
    *,
    head_cpus: int = 1,
    worker_cpus: int = 1,
    object_store_mb: int = 100,
    timeout_s: int = 180,
    node_env: dict[str, str] | None = None,
) -> LocalCluster:
    """Start a head and `workers` worker nodes in a fresh short directory under /tmp; see `stop`.

    `node_env`: environment variables for every node, hence every task and job driver.
    """
    # Short on purpose: Ray puts Unix sockets below it, and their paths may not exceed 107 characters.
    cluster_dir = Path(tempfile.mkdtemp(prefix="dyr-", dir="/tmp"))
    base_port = free_base_port(workers)
    options = {
        "--dir": cluster_dir,
        "--workers": workers,
        "--base-port": base_port,
        "--head-cpus": head_cpus,
        "--worker-cpus": worker_cpus,
        "--object-store-mb": object_store_mb,
        "--timeout": timeout_s,
    }
    cmd = ["bash", str(START), *(str(part) for option in options.items() for part in option)]
    try:
        proc = subprocess.run(
            cmd, env=script_env(node_env), capture_output=True, text=True, timeout=timeout_s * (workers + 2)
        )
    except subprocess.TimeoutExpired:
        # start.sh was killed before it could clean up after itself: stop what it had started.
        subprocess.run(["bash", str(STOP), "--dir", str(cluster_dir)], env=script_env(), timeout=120)
        raise
    if proc.returncode != 0:
        raise LocalClusterError(f"{START} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return LocalCluster(dir=cluster_dir, base_port=base_port, workers=workers)


def stop(cluster: LocalCluster, *, grace_s: int = 30) -> set[int]:
    """Stop the cluster with stop.sh; return the pids it stopped. Raises if any of them survives."""
    before = cluster.processes() if (cluster.dir / "pids").exists() else {}
    proc = subprocess.run(
        ["bash", str(STOP), "--dir", str(cluster.dir), "--grace", str(grace_s)],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=grace_s + 60,
    )
    left = sorted(pid for pid, starttime in before.items() if is_alive(pid, starttime))
    if proc.returncode != 0 or left:
        raise LocalClusterError(
            f"{STOP} exited {proc.returncode}, processes left: {left}\n{proc.stdout}\n{proc.stderr}"
        )
    stopped = cluster.dir / "pids.stopped"
    return set(before) | ({int(p) for p in stopped.read_text().split()} if stopped.exists() else set())


@contextlib.contextmanager
def local_cluster(workers: int = 2, *, keep_dir: bool = False, **kwargs) -> Iterator[LocalCluster]:
    """`start(...)` on entry, `stop(...)` on exit, also on error.

    The directory (logs included) is removed after a clean exit unless `keep_dir`; after an error it stays.
    """
    cluster = start(workers, **kwargs)
    clean = False
    try:
        yield cluster
        clean = True
    finally:
        stop(cluster)
        if clean and not keep_dir:
            shutil.rmtree(cluster.dir, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process from /proc/PID/stat, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[1]), int(fields[19])
