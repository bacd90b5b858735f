"""CPU accounting of a Linux machine's processes from /proc: who used the cores during a benchmark's window
(the workers, Ray's other processes, everything else) and waiting for a run's processes to exit."""

from __future__ import annotations

import os
import time
from typing import NamedTuple


class Proc(NamedTuple):
    cmd: str
    cpu: float  # user + system seconds
    system: float  # system seconds
    faults: int  # minor page faults


def read_processes() -> dict[int, Proc]:
    """Every process's command line, CPU seconds and minor page faults, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended between listdir and open
            continue
        user, system = int(fields[11]) / tick, int(fields[12]) / tick
        out[int(pid)] = Proc(cmd, user + system, system, int(fields[7]))
    return out


def wait_for_exit(prefixes: tuple[str, ...], timeout: float = 60.0) -> None:
    """Wait until no process named with one of `prefixes` is left: the run's actors outlive `fit()` by a
    few seconds, and the next bare loop must not share the machine with them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.isdir("/proc/self"):
        if not any(p.cmd.startswith(prefixes) for p in read_processes().values()):
            return
        time.sleep(0.5)


class ProcessSampler:
    """Every process's CPU seconds (utime + stime from /proc), sampled once a second in a thread.

    `split((t0, t1), worker_prefix)` -> CPU share of the machine over [t0, t1] used by the processes
    whose name starts with `worker_prefix`, by Ray's other processes and by everything else, as
    fractions of (t1 - t0) x CPUs (the rest is idle); and the workers' minor page faults per second and
    the share of their CPU spent in the kernel. Linux only; None elsewhere.
    """

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval, self.snapshots = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if os.path.isdir("/proc/self"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.snapshots.append((time.time(), read_processes()))
            self._stop.wait(self.interval)

    def split(self, window: tuple[float, float], worker_prefix: str) -> dict | None:
        inside = [s for s in self.snapshots if window[0] <= s[0] <= window[1]]
        if len(inside) < 2:
            return None
        (t0, a), (t1, b) = inside[0], inside[-1]
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        used = {"workers": 0.0, "ray_other": 0.0, "other": 0.0}
        worker_system = worker_faults = 0.0
        for pid, proc in b.items():
            before = a.get(pid, Proc(proc.cmd, 0.0, 0.0, 0))  # a process started inside the window: all of it
            if proc.cmd.startswith(worker_prefix):
                kind = "workers"
                worker_system += proc.system - before.system
                worker_faults += proc.faults - before.faults
            elif (proc.cmd.startswith("ray::") or "/ray/" in proc.cmd or "jobs.finetune" in proc.cmd
                  or "train_throughput" in proc.cmd):
                kind = "ray_other"
            else:
                kind = "other"
            used[kind] += proc.cpu - before.cpu
        return {"seconds": t1 - t0, **{k: v / capacity for k, v in used.items()},
                "idle": max(0.0, 1 - sum(used.values()) / capacity),
                "worker_system_share": worker_system / max(used["workers"], 1e-9),
                "worker_faults_per_s": worker_faults / (t1 - t0)}
