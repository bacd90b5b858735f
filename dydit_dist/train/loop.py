"""The training loop of one rank: `train_loop_per_worker(config_dict)` is what Ray Train runs.

    Trainer(cfg, session).train()     # session: RaySession in a Ray worker, LocalSession without Ray

Setup: the network (static or DyDiT) and its loss as one module, initial weights (only for a fresh
run), the DeepSpeed engine, the partitioned EMA, then the latest checkpoint when there is one
(DeepSpeed state + step, data position, RNG and EMA), then the data stream at the restored position.
Each optimizer step runs `accumulation` micro-batches; every `log_every` steps the metrics (averaged
over ranks) are written to TensorBoard and reported to the session, no more often than it takes them
(`min_report_interval_s`); every `checkpoint_every` steps and at the last step a checkpoint is reported
and the EMA weights exported. Every rank reports at the same steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist

from dydit_dist import config as config_lib
from dydit_dist import storage
from dydit_dist.cli import data_url, run_url
from dydit_dist.data import LatentStream
from dydit_dist.dynamic.flexdit_schedule import flexdit_timestep_interval
from dydit_dist.train import checkpoints
from dydit_dist.train.deepspeed_setup import grad_accumulation, initialize
from dydit_dist.train.ema import PartitionedEMA
from dydit_dist.train.metrics import TensorBoardLog, progress_line
from dydit_dist.train.network import build_network, init_weights
from dydit_dist.train.state import TrainerState
from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

log = logging.getLogger(__name__)


def train_loop_per_worker(config_dict: dict) -> None:
    """Ray Train's per-worker function: the typed config is rebuilt from the plain dict here."""
    from dydit_dist.train.ray_session import RaySession

    cfg = config_lib.from_dict(config_dict)
    storage.configure_from(cfg.storage)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    retain_freed_memory()
    Trainer(cfg, RaySession()).train()


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                        top_pad: int = 64 << 20) -> bool:
    """glibc malloc: keep the memory of freed tensors in the process instead of handing it back to the
    kernel and faulting it in again on the next step. PyTorch's CPU allocator frees every step's
    activations; in a fresh Ray worker (about 3,000 page faults and 4-11% system time per step of the
    debug model, which a long-lived process whose malloc thresholds have grown does not pay):

    - `mmap_threshold`: tensors up to this size come from the heap, not from their own mmap;
    - `trim_threshold`: up to this much free memory at the top of the main heap stays mapped;
    - `top_pad`: Ray Train runs the training function on a thread of its own, whose allocations come
      from a per-thread arena made of 64 MiB heaps; glibc unmaps such a heap as soon as it is free,
      whatever the trim threshold, unless the top pad is at least a heap's size.

    -> False where there is no glibc (the call does nothing there)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc on Linux
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(bool(mallopt(option, value)) for option, value in
               ((m_mmap_threshold, mmap_threshold), (m_trim_threshold, trim_threshold), (m_top_pad, top_pad)))


class Trainer:
    def __init__(self, cfg, session):
        self.cfg, self.session = cfg, session
        self.rank, self.world_size = session.world_rank, session.world_size
        self.t_range = (flexdit_timestep_interval(self.rank, self.world_size, cfg.diffusion.num_timesteps)
                        if cfg.model.method == "flexdit" else None)  # FlexDiT: this rank's timesteps
        if self.world_size != cfg.ray.num_workers:
            raise config_lib.ConfigError(f"ray.num_workers={cfg.ray.num_workers} but {self.world_size} workers started")
        self.device = session.device(cfg.ray.use_gpu)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.accumulation = grad_accumulation(cfg, self.world_size)
        self.checkpoints_url = run_url(cfg, "checkpoints")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        # 1. Network + loss, initial weights (a resumed run gets them from its checkpoint instead)
        self.network = build_network(cfg.model).to(self.device)
        objective = DiffusionObjective(self.network, cfg)
        with session.restore() as folder:
            if folder is None:
                init_weights(self.network, cfg)
            # 2. Engine, EMA, trainer state; then the checkpoint on top
            self.engine = initialize(objective, cfg, self.world_size)
            ema = PartitionedEMA(self.network, cfg.train.ema_decay, self.rank, self.world_size)
            self.state = TrainerState(ema=ema)
            if folder is not None:
                checkpoints.load(self.engine, self.state, folder, cfg, self.rank, self.world_size)
                log.info("rank %d resumed at step %d from %s", self.rank, self.state.step, folder)
        self.resumed_from = self.state.step
        self._grad_norm: float | None = None  # ZeRO-0 only; DeepSpeed reports it under ZeRO
        self._indices: list[list[int]] = []  # sample indices of the current step's micro-batches

        # 3. Data, continuing where the checkpoint left it
        d = cfg.data
        self.stream = LatentStream(data_url(cfg), cfg.train.micro_batch_size, self.rank, self.world_size,
                                   cfg.train.seed, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                                   on_error=d.on_error, pin_memory=self.device.type == "cuda")
        if self.state.data is not None:
            self.stream.load_state_dict(self.state.data)
        self.batches = iter(self.stream)
        self.tensorboard = TensorBoardLog(run_url(cfg, "tensorboard"), enabled=self.rank == 0)

    # ------------------------------------------------------------------ one step

    def forward_backward_step(self, micro: int) -> dict[str, torch.Tensor]:
        """One micro-batch: draw, forward, backward (DeepSpeed scales by the accumulation)."""
        batch = next(self.batches)
        self._indices.append(batch["index"].tolist())
        g = step_generator(self.cfg.train.seed, self.rank, self.state.step, micro, self.device)
        inputs = draw_inputs(batch, self.network, self.cfg, g, self.device, t_range=self.t_range)
        terms = self.engine(**inputs, step=self.state.step, generator=g)
        self.engine.backward(terms["loss"])
        if self.cfg.deepspeed.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            self._grad_norm = _total_norm(self.engine.module.parameters())  # DeepSpeed keeps it only for ZeRO
        self.engine.step()
        return {k: v.detach().float().to(self.device) for k, v in terms.items()}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches; the EMA follows. -> mean loss terms."""
        self._indices = []
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            for k, v in self.forward_backward_step(micro).items():
                sums[k] = sums.get(k, 0) + v
        self.state.step += 1
        self.state.ema.update()
        if self.cfg.train.record_batches:
            storage.write_json(run_url(self.cfg, "batches", f"rank-{self.rank:05d}", f"step-{self.state.step:07d}.json"),
                               {"step": self.state.step, "index": self._indices})
        return {k: v / self.accumulation for k, v in sums.items()}

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict | None:
        t = self.cfg.train
        last, window_steps = None, 0
        window_start, window_cpu = time.perf_counter(), time.process_time()
        reported_at = window_start
        sums: dict[str, torch.Tensor] = {}
        if self.state.step >= t.max_steps:
            log.info("rank %d: already at step %d of train.max_steps=%d, nothing to do", self.rank, self.state.step,
                     t.max_steps)
        while self.state.step < t.max_steps:
            self._maybe_exit_for_test()
            for k, v in self.train_step().items():
                sums[k] = sums.get(k, 0) + v
            window_steps += 1
            step = self.state.step
            log_now = step % t.log_every == 0 or step == t.max_steps
            checkpoint_now = step % t.checkpoint_every == 0 or step == t.max_steps
            if not (log_now or checkpoint_now):
                continue
            now, now_cpu = time.perf_counter(), time.process_time()
            last, report_due = self._metrics(sums, window_steps, now - window_start, now_cpu - window_cpu,
                                             now - reported_at)
            # The next window starts here, so its samples/s includes this window's logging and report.
            window_start, window_cpu, sums, window_steps = now, now_cpu, {}, 0
            self.tensorboard.log(step, {k: v for k, v in last.items() if k != "step" and v is not None})
            if checkpoint_now:
                self._checkpoint(last)
                window_start, window_cpu = time.perf_counter(), time.process_time()  # not part of throughput
            elif report_due:
                self.session.report(last)
            else:
                continue
            reported_at = time.perf_counter()
        self.tensorboard.close()
        return last

    def _metrics(self, sums: dict, steps: int, elapsed: float, cpu: float, since_report: float) -> tuple[dict, bool]:
        """Loss terms averaged over the window and the ranks, learning rate, gradient norm, throughput
        (samples/s of the whole job; cpu_s_per_step: this process's CPU seconds per step, rank 0's kept).

        -> (metrics, whether they go to the session too). A session may take reports no more often than
        `session.min_report_interval_s` (Ray Train's controller collects one per poll, and a worker
        that reports again before that blocks until it has); the time since the last report rides along
        the ranks' all-reduce, so every rank makes the same choice and reports the same number of times.
        """
        names = sorted(sums)
        values = torch.stack([sums[k] / steps for k in names]).to(self.device)
        values = torch.cat([values, values.new_tensor([since_report])])
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        *terms, since_report = values.tolist()
        metrics = dict(zip(names, terms, strict=True))
        grad_norm = self.engine.get_global_grad_norm() if self.cfg.deepspeed.zero_stage else self._grad_norm
        metrics.update(step=self.state.step, lr=float(self.engine.get_lr()[0]),
                       grad_norm=None if grad_norm is None else float(grad_norm),
                       samples_per_s=self.cfg.train.global_batch_size * steps / max(elapsed, 1e-9),
                       cpu_s_per_step=cpu / steps,
                       resumed_from=self.resumed_from, **self.stream.metrics())
        if self.cfg.model.method == "dydit":
            metrics["flops_target"] = self.cfg.model.dynamic.target_lambda
        if self.rank == 0:
            log.info(progress_line(metrics, self.cfg.train.max_steps))
        return metrics, since_report >= self.session.min_report_interval_s

    def _checkpoint(self, metrics: dict) -> None:
        """Every rank writes its part locally and reports it; rank 0 exports the EMA weights first."""
        self.state.data = self.stream.state_dict()
        name = checkpoints.checkpoint_name(self.state.step)
        checkpoints.export_ema(self.state, self.network, self.checkpoints_url, dataclasses.asdict(self.cfg.model),
                               keep=self.cfg.ray.num_to_keep)
        with tempfile.TemporaryDirectory(prefix="dydit-ckpt-") as folder:
            checkpoints.save(self.engine, self.state, folder, self.cfg, self.rank, self.world_size)
            self.session.report(metrics, checkpoint_dir=folder, name=name)

    def _maybe_exit_for_test(self) -> None:
        """Test hook: rank `fault_exit_rank` kills its own process at step `fault_exit_step`, once per run
        (a marker object in the run folder keeps the restarted worker from doing it again)."""
        t = self.cfg.train
        if t.fault_exit_step != self.state.step or t.fault_exit_rank != self.rank:
            return
        marker = run_url(self.cfg, "faults", f"rank-{self.rank:05d}-step-{self.state.step:07d}.json")
        if storage.exists(marker):
            return
        storage.write_json(marker, {"rank": self.rank, "step": self.state.step, "pid": os.getpid()})
        log.warning("test hook: rank %d exits its process at step %d", self.rank, self.state.step)
        logging.shutdown()
        os._exit(1)


def _total_norm(params) -> float:
    """L2 norm of all gradients (after the all-reduce, before clipping)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
