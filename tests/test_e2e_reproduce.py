"""End to end: `ray job submit` (the real CLI, with the token) of the reproduce pipeline to a local
multi-node cluster (a head and 2 workers), outputs on the S3 test server.

Run alone with `pytest -m e2e`. It takes a few minutes: the pipeline trains a static DiT from scratch,
fine-tunes a DyDiT on 2 workers with ZeRO-2, samples both, evaluates and writes the report.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from cluster_util import REPO, local_cluster, ray_cli

from dydit_dist import storage

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _submit(cluster, root: str, endpoint: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = ray_cli(
        cluster, "job", "submit", "--working-dir", str(REPO), "--",
        "python", "-m", "jobs.reproduce", "--config", "reproduce_debug",
        f"storage.root={root}", f"storage.endpoint_url={endpoint}",
        timeout=1800,
    )
    return result, time.monotonic() - start


def _objects(prefix: str) -> list[str]:
    fs, path = storage.filesystem(prefix)
    fs.invalidate_cache()
    return sorted(fs.find(path))


def test_reproduce_submitted_to_multinode_cluster(s3_endpoint, s3_bucket):
    root = f"{s3_bucket}/e2e"
    node_env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DS_ACCELERATOR": "cpu",
    }
    with local_cluster(workers=2, worker_cpus=2, node_env=node_env) as cluster:
        # 1. Token authentication: the dashboard refuses a request without the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(cluster.dashboard_url + "/api/jobs/", timeout=30)
        assert refused.value.code == 401
        ok = urllib.request.Request(cluster.dashboard_url + "/api/jobs/",
                                    headers={"Authorization": f"Bearer {cluster.token()}"})
        assert urllib.request.urlopen(ok, timeout=30).status == 200

        # 2. The pipeline, submitted with the real CLI.
        first, first_s = _submit(cluster, root, s3_endpoint)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
        assert "reproduce: done" in first.stdout

        run = f"{root}/runs/reproduce_debug"
        objects = _objects(root)
        bucket_path = root.removeprefix("s3://")
        names = [o.removeprefix(bucket_path + "/") for o in objects]
        assert any(n.startswith("data/reproduce_debug/shard-") and n.endswith(".tar") for n in names)
        assert "data/reproduce_debug/manifest.json" in names
        for stage in ("pretrain", "finetune"):
            assert any(n.startswith(f"runs/reproduce_debug/{stage}/checkpoints/ema-") and n.endswith(".safetensors")
                       for n in names), stage
        for method in ("static", "dydit"):
            shards = [n for n in names if n.startswith(f"runs/reproduce_debug/{method}/samples/shard-")]
            assert len(shards) == 4, (method, shards)  # 64 samples in shards of 16
            manifest = storage.read_json(f"{run}/{method}/samples/manifest.json")
            assert manifest["complete"] and manifest["num_samples"] == 64
            assert manifest["stats"]["gflops"] > 0 and all(r["gflops"] > 0 for r in manifest["shards"])
            if method == "dydit":  # the report's width plot, from shard 0's record
                assert manifest["stats"]["width_by_timestep"] == manifest["shards"][0]["width_by_timestep"]
            metrics = storage.read_json(f"{run}/{method}/metrics.json")
            assert metrics["num_samples"] == 64 and metrics["metrics"]["fid"] > 0
        report = storage.read_bytes(f"{run}/report.md").decode()
        assert "static" in report and "dydit" in report and "NOT Inception" in report
        # the training curves of both runs, read back from their TensorBoard event files on S3
        assert "- static (pretrain) training: last logged step 30," in report
        assert re.search(r"- dydit training: last logged step 20, loss [0-9.]+, FLOPs ratio [0-9.]+ \(target", report)
        assert storage.read_bytes(f"{run}/plots/training.png")[:4] == b"\x89PNG"

        # 3. A second submission finds every stage done and only checks.
        second, second_s = _submit(cluster, root, s3_endpoint)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert second.stdout.count("outputs exist, skipped") >= 7
        assert "running" not in [line.rsplit(": ", 1)[-1] for line in second.stdout.splitlines()
                                 if line.startswith("[reproduce")]
        print(f"e2e: first submission {first_s:.0f} s, second {second_s:.0f} s")
    # 4. local_cluster stopped every process it started by pid, or raised.
