"""The trainer of one rank.

    Trainer(cfg, session).train()     # session: RaySession in a Ray worker (`train.worker`), LocalSession without Ray

Setup: the network (static, DyDiT or FlexDiT) and its loss as one module, initial weights (only for a
fresh run), the DeepSpeed engine, the partitioned EMA, then the latest checkpoint when there is one
(DeepSpeed state + step, data position, RNG and EMA), then the data stream at the restored position.
Each optimizer step runs `accumulation` micro-batches; every `log_every` steps the metrics window is
closed (`train.metrics.MetricsWindow`) and, when the session takes reports that often, reported;
every `checkpoint_every` steps and at the last step a checkpoint is reported and the EMA weights
exported (`train.checkpoints`), both uploaded while training goes on (`train.async_checkpoint`). Every
rank reports at the same steps. A resumed run first exports the EMA of its checkpoint when the export
of that step was lost (the worker died between the commit and the export's write). A window whose loss
(all-reduced: every rank decides alike) is not finite is reported but not checkpointed, and
`DIVERGED_WINDOWS` of them in a row stop the run (`Diverged`): the weights are NaN or about to be, and a
restart from the last checkpoint would meet the same steps again.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.distributed as dist

from dydit_dist import config as config_lib
from dydit_dist import storage
from dydit_dist.capacity import check_gpu
from dydit_dist.data import LatentStream
from dydit_dist.dynamic.flexdit_schedule import flexdit_timestep_interval
from dydit_dist.network import build_network, init_weights
from dydit_dist.paths import RunPaths
from dydit_dist.train import checkpoints
from dydit_dist.train.deepspeed_setup import grad_accumulation, initialize
from dydit_dist.train.ema import PartitionedEMA
from dydit_dist.train.metrics import MetricsWindow, TensorBoardLog
from dydit_dist.train.state import TrainerState
from dydit_dist.train.step import DiffusionObjective, draw_inputs, step_generator

log = logging.getLogger(__name__)
DIVERGED_WINDOWS = 3  # metrics windows in a row whose loss is not finite stop the run


class Diverged(config_lib.ConfigError):
    """The loss stayed NaN or infinite (`DIVERGED_WINDOWS` windows): not retried, the job says how to go on."""


class Trainer:
    def __init__(self, cfg, session):
        self.cfg, self.session, self.paths = cfg, session, RunPaths(cfg)
        self.rank, self.world_size = session.world_rank, session.world_size
        # FlexDiT with a grid per timestep interval: this rank's timesteps, so that its batch shares one grid;
        # one grid (the released runs) shares it anyway, and t is drawn over all of [0, T) as train.py does
        timewise = cfg.model.method == "flexdit" and cfg.model.flexdit.num_intervals > 1
        self.t_range = (flexdit_timestep_interval(self.rank, self.world_size, cfg.diffusion.num_timesteps)
                        if timewise else None)
        if self.world_size != cfg.ray.num_workers:
            raise config_lib.ConfigError(f"ray.num_workers={cfg.ray.num_workers} but {self.world_size} workers started")
        if cfg.ray.use_gpu:
            check_gpu(f"training worker {self.rank}")
        checkpoints.remove_stale_staging()  # of workers killed on this node before their upload ended
        self.device = session.device(cfg.ray.use_gpu)
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda" (a session outside Ray): the current device, made explicit
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.accumulation = grad_accumulation(cfg, self.world_size)
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
        self._norm_skips_before = self.state.norm_skips
        self._grad_norm: float | None = None  # ZeRO-0 only; DeepSpeed reports it under ZeRO
        self._grad_scale = 1.0  # fp16: the loss scale the last step's gradients carried
        self._scaler = checkpoints.grad_scaler(self.engine)
        self._indices: list[list[int]] = []  # sample indices of the current step's micro-batches
        self._lr = 0.0  # the lr the last step ran at (the engine's has moved on to the next step's when it ends)

        # 3. Data, continuing where the checkpoint left it
        d = cfg.data
        self.stream = LatentStream(self.paths.data, cfg.train.micro_batch_size, self.rank, self.world_size,
                                   cfg.train.seed, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                                   on_error=d.on_error, max_bad_fraction=d.max_bad_fraction,
                                   pin_memory=self.device.type == "cuda")
        if self.state.data is not None:
            self.stream.load_state_dict(self.state.data)
        self.batches = iter(self.stream)
        self.tensorboard = TensorBoardLog(self.paths.tensorboard, enabled=self.rank == 0)
        self.exports = checkpoints.Background("ema-export")  # rank 0 writes the EMA weights here
        self._unpublished: int | None = None  # rank 0: the step of an export the pointer does not name yet
        self._diverging = 0  # metrics windows in a row whose loss was not finite

    # ------------------------------------------------------------------ one step

    def forward_backward_step(self, micro: int) -> dict[str, torch.Tensor]:
        """One micro-batch: draw, forward, backward (DeepSpeed scales by the accumulation)."""
        batch = next(self.batches)
        self._indices.append(batch["index"].tolist())
        g = step_generator(self.cfg.train.seed, self.rank, self.state.step, micro, self.device)
        inputs = draw_inputs(batch, self.network, self.cfg, g, self.device, t_range=self.t_range)
        terms = self.engine(**inputs, step=self.state.step, generator=g)
        self.engine.backward(terms["loss"])
        if self.engine.is_gradient_accumulation_boundary():
            if self._scaler is not None:  # fp16: the gradients carry the loss scale (one host read per step)
                self._grad_scale = self._scaler.get_scale()
            if self.cfg.deepspeed.zero_stage == 0:  # DeepSpeed keeps the norm only under ZeRO
                self._grad_norm = _total_norm(self.engine.module.parameters()) / self._grad_scale
        self.engine.step()
        return {k: v.detach().float().to(self.device) for k, v in terms.items()}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches; the EMA follows. -> mean loss terms."""
        self._indices = []
        self._lr = float(self.engine.get_lr()[0])  # DeepSpeed steps the scheduler with the optimizer
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            for k, v in self.forward_backward_step(micro).items():
                sums[k] = sums.get(k, 0) + v
        self.state.step += 1
        self.state.ema.update()
        if self.cfg.train.record_batches:
            storage.write_json(self.paths.batch_record(self.rank, self.state.step),
                               {"step": self.state.step, "index": self._indices})
        return {k: v / self.accumulation for k, v in sums.items()}

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict | None:
        t = self.cfg.train
        self.export_lost_ema()  # before the first window: not part of the throughput
        window = MetricsWindow(t, self.tensorboard, self.device, self.rank, self.world_size,
                               self.session.min_report_interval_s)
        last = None
        if self.state.step >= t.max_steps:
            log.info("rank %d: already at step %d of train.max_steps=%d, nothing to do", self.rank, self.state.step,
                     t.max_steps)
        while self.state.step < t.max_steps:
            window.add(self.train_step())
            step = self.state.step
            checkpoint_now = checkpoints.due(step, t)
            if not (window.due(step) or checkpoint_now):
                continue
            last, report_due = window.close(step, self.step_metrics())
            finite = math.isfinite(last["loss"])  # all-reduced: every rank decides alike
            self._diverging = 0 if finite else self._diverging + 1
            if not finite:
                self._check_divergence(step, t)
            if checkpoint_now and finite:  # the weights of a non-finite window may be NaN: only reported
                self.checkpoint(last)
                window.restart()  # the checkpoint is not part of throughput
            elif report_due or checkpoint_now:
                self.session.report(last)
            else:
                continue
            window.reported()
        self.session.wait_committed()
        self.exports.wait()
        self.publish_ema()
        self.exports.close()
        self.tensorboard.close()
        return last

    def _check_divergence(self, step: int, t) -> None:
        """A window whose loss is not finite; the `DIVERGED_WINDOWS`-th in a row raises `Diverged`."""
        log.warning("rank %d: the loss of the steps up to %d is not finite (%d of %d windows in a row before the run "
                    "stops); this window is not checkpointed", self.rank, step, self._diverging, DIVERGED_WINDOWS)
        if self._diverging >= DIVERGED_WINDOWS or step >= t.max_steps:  # nor ends a run on NaN weights
            raise Diverged(f"training diverged: the loss was NaN or infinite for {self._diverging} metrics window(s) in a "
                           f"row, up to step {step} (the data are checked finite, so the weights or the numerics "
                           f"are); lower train.lr ({t.lr:g}), set train.grad_clip or train.skip_grad_norm, or use "
                           "train.precision=bf16; the checkpoints before it are kept")

    def step_metrics(self) -> dict:
        """What the metrics window adds to the loss terms: the learning rate the last step ran at, gradient
        norm, the steps not applied (`train/skipped_steps`), data counters."""
        grad_norm = self.engine.get_global_grad_norm() if self.cfg.deepspeed.zero_stage else self._grad_norm
        if grad_norm is not None and self.cfg.deepspeed.zero_stage:  # fp16 under ZeRO: DeepSpeed's is scaled
            grad_norm = float(grad_norm) / self._grad_scale
        metrics = dict(lr=self._lr, grad_norm=None if grad_norm is None else float(grad_norm),
                       resumed_from=self.resumed_from, **{"train/skipped_steps": self.skipped_steps()},
                       **self.stream.metrics())
        if self.cfg.model.method == "dydit":
            metrics["flops_target"] = self.cfg.model.dynamic.target_lambda
        return metrics

    def skipped_steps(self) -> int:
        """Optimizer steps whose update was not applied, the same on every rank: DeepSpeed's (a gradient
        with NaN or inf under ZeRO-1/2 or an fp16 loss-scale overflow; `engine.skipped_steps`, kept in its
        checkpoints) and `skip_on_grad_norm`'s (train.skip_grad_norm, or a non-finite norm; kept in
        `TrainerState.norm_skips`)."""
        return int(self.engine.skipped_steps) + self.norm_skips()

    def norm_skips(self) -> int:
        """`skip_on_grad_norm`'s skips of the whole run: the resumed state's, and this worker's."""
        adamw = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # ZeRO wraps it
        return self._norm_skips_before + int(getattr(adamw, "skipped_steps", 0))

    def checkpoint(self, metrics: dict) -> None:
        """Every rank writes its part locally and hands it to the session, which uploads it (in the
        background with train.async_checkpoint); rank 0 gathers the EMA into host memory and exports it
        (in a thread with train.async_checkpoint). At most one checkpoint is in flight: the previous one
        must be committed, and its EMA export written, before this one starts (their errors surface here);
        the pointer then names that export."""
        self.session.wait_committed()
        self.exports.wait()
        self.publish_ema()
        self.state.data = self.stream.state_dict()
        self.state.norm_skips = self.norm_skips()
        synchronous = not self.cfg.train.async_checkpoint
        self.export_ema(wait=synchronous)
        folder = checkpoints.staging_folder()  # the session deletes it once uploaded
        try:
            checkpoints.save(self.engine, self.state, folder, self.cfg, self.rank, self.world_size)
        except (OSError, RuntimeError) as err:  # a full temp disk: torch's "unexpected pos", retried elsewhere
            failure = checkpoints.staging_failed(folder, err)
            if failure is err:
                raise
            raise failure from err
        self.session.report(metrics, checkpoint_dir=folder, name=checkpoints.checkpoint_name(self.state.step))
        if synchronous:  # the report returned once committed
            self.session.wait_committed()
            self.publish_ema()

    def export_ema(self, wait: bool) -> None:
        """Rank 0 gathers the EMA of `state.step` into host memory (collective: every rank calls this) and
        writes it in the export thread; `wait`: return once it is written. The pointer names it only once
        the step's checkpoint is committed (`publish_ema`)."""
        weights = checkpoints.gather_ema(self.state, self.network)
        if weights is not None:
            self.exports.submit(checkpoints.write_ema, weights, self.state.step, self.paths.checkpoints,
                                dataclasses.asdict(self.cfg.model))
            self._unpublished = self.state.step
            if wait:
                self.exports.wait()

    def publish_ema(self) -> None:
        """Rank 0 points `ema-latest.json` at the last export; only once its checkpoint is committed and the
        export written (the caller has waited for both)."""
        if self._unpublished is not None:
            checkpoints.publish_ema(self._unpublished, self.paths.checkpoints, dataclasses.asdict(self.cfg.model),
                                    self.cfg.train.keep_checkpoints)
            self._unpublished = None

    def export_lost_ema(self) -> None:
        """Export the EMA of the resumed state when the pointer is behind it: a worker that died after its
        checkpoint was committed but before the export thread wrote that step's EMA left no export of it,
        and a run resumed at train.max_steps has no checkpoint left to write one. Rank 0 reads the
        pointer and tells the others, so that every rank joins the gather or none does."""
        if self.resumed_from == 0:
            return
        behind = self.rank == 0 and checkpoints.exported_step(self.paths.checkpoints) < self.state.step
        if self.world_size > 1:
            flag = torch.tensor([int(behind)], device=self.device)
            dist.broadcast(flag, src=0)
            behind = bool(flag.item())
        if behind:
            if self.rank == 0:
                log.info("EMA export of the resumed step %d is missing: exporting it", self.state.step)
            self.export_ema(wait=True)
            self.publish_ema()  # the resumed state is a committed checkpoint's


def _total_norm(params) -> float:
    """L2 norm of all gradients (after the all-reduce, before clipping)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0
