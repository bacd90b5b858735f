"""The step-time hit of a checkpoint, with the upload and EMA export in the background or not.

    python benchmarks/checkpoint_stall.py [--models debug DiT-S/2] [--steps 12] [--every 4]

One rank on CPU without Ray (`LocalSession`: the "upload" is a copy to a local folder, then the commit
marker), the debug DiT and DiT-S/2 (256 px, 32x32 latents), micro-batch 2, ZeRO-2, fp32. For each
model, `train.async_checkpoint=false` (before: the rank waits for the DeepSpeed state's copy and the EMA
export) and `true` (after: it writes the DeepSpeed state locally, gathers the EMA to host memory, and
goes on). Per run: the median time of a step without a checkpoint, the time spent inside
`Trainer.checkpoint` (the stall), and the extra time of the `--every` steps that follow a checkpoint
(what the background copy costs the steps it overlaps). The last checkpoint is not counted (the run
waits for it at the end either way).

Results: benchmarks/results/checkpoint_stall.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
from stamp import stamp

from dydit_dist import config as config_lib
from dydit_dist.data.synthetic import random_dataset
from dydit_dist.train.deepspeed_setup import init_single_process
from dydit_dist.train.loop import Trainer
from dydit_dist.train.ray_session import LocalSession

RESULTS = Path(__file__).parent / "results"
MODELS = {"debug": [], "DiT-S/2": ["model.name=DiT-S/2", "model.image_size=256", "model.vae_downsample=8",
                                   "model.num_classes=1000"]}


class TimedTrainer(Trainer):
    def train_step(self):
        start = time.perf_counter()
        out = super().train_step()
        self.step_times.append(time.perf_counter() - start)
        return out

    def checkpoint(self, metrics):
        start = time.perf_counter()
        super().checkpoint(metrics)
        self.checkpoint_times.append(time.perf_counter() - start)


def run(model: str, background: bool, steps: int, every: int, folder: str) -> dict:
    root = f"memory://stall-{uuid.uuid4().hex[:8]}"
    cfg = config_lib.load("debug", [
        *MODELS[model], "ray.num_workers=1", "train.global_batch_size=2", "train.micro_batch_size=2",
        f"train.max_steps={steps}", f"train.checkpoint_every={every}", f"train.log_every={every}",
        "data.num_workers=0", f"storage.root={root}", f"data.uri={root}/data",
        f"train.async_checkpoint={str(background).lower()}"])
    random_dataset(cfg.data.uri, cfg, num_samples=64)
    trainer = TimedTrainer(cfg, LocalSession(os.path.join(folder, uuid.uuid4().hex[:8]), background=background))
    trainer.step_times, trainer.checkpoint_times = [], []
    trainer.train()
    times = trainer.step_times  # times[i] is step i + 1; checkpoints follow steps every, 2 x every, ...
    base = statistics.median(times[1:])  # the first step warms up
    stalls = trainer.checkpoint_times[:-1]
    following = [times[c + j] for c in range(every, len(times) - every + 1, every) for j in range(every)]
    overlap = (sum(following) - base * len(following)) / max(1, len(stalls))
    size = sum(p.numel() for p in trainer.network.parameters())
    return {"model": model, "params_M": round(size / 1e6, 1), "async": background, "step_s": round(base, 4),
            "checkpoint_stall_s": round(statistics.mean(stalls), 3),
            "stall_in_steps": round(statistics.mean(stalls) / base, 1),
            "following_steps_extra_s": round(overlap, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_single_process("gloo")
    rows = []
    with tempfile.TemporaryDirectory(prefix="stall-") as folder:
        for model in args.models:
            for background in (False, True):
                rows.append(run(model, background, args.steps, args.every, folder))
                print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "steps": args.steps, "every": args.every}
    meta["source"] = stamp()
    (RESULTS / "checkpoint_stall.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    columns = list(rows[0])
    lines = ["# checkpoint stall", "",
             f"{meta['machine']}; one rank, micro-batch 2, ZeRO-2, fp32, 1 thread; checkpoint every {args.every} "
             f"of {args.steps} steps; upload = copy to a local folder (LocalSession). async=false: before "
             "(the rank waits for the copy and the EMA export); true: after. checkpoint_stall_s = time inside "
             "Trainer.checkpoint (mean over the checkpoints but the last); following_steps_extra_s = extra time of "
             "the steps after one checkpoint over the median step.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    (RESULTS / "checkpoint_stall.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
