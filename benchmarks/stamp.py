"""What a results file was measured with: the git commit of this checkout and whether it had changes, so that a
table can be matched with the code it describes (`stamp()`; written into each rerun result's JSON)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stamp() -> dict:
    """{"commit": the HEAD commit, "dirty": uncommitted changes to tracked files other than the results
    (`benchmarks/results/`, which one benchmark writes while the next runs)}; None for each outside git."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    changed = None if status is None else [line for line in status.splitlines() if "benchmarks/results/" not in line]
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if changed is None else bool(changed)}
