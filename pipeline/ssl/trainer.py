"""The training loop shared by every SSL algorithm: sample, augment, step, EMA, evaluate, save.

Data never leaves the device: the images live there as one uint8 (N, H, W, C) tensor and
each batch is a gather by index, drawn from one seeded ``torch.Generator`` that also
drives augmentation. Extra labeled rows (synthetic ones in the augmented arm, judged real
ones in the control arm) are added on top of the batch's real labeled rows and drawn and
augmented from a second generator, so the main stream, and with it every real row an arm
sees, is the baseline's: with no extra rows an arm reproduces the baseline bit for bit. The checkpoint holds that generator's state together with the
model, EMA, optimiser, LR schedule, algorithm state and the learning curve so far, so
a resumed run continues the very same stream (bit-exact on CPU).

Batch k+1 (index draws, weak and strong augmentation, layout) is produced while the model
trains on batch k: on CUDA on a side stream, after step k's kernels are queued, so the
augmentation's host syncs and kernels overlap the step; on the CPU the same order of calls.
The generators are only ever used for batches, so producing ahead changes no draw; a
checkpoint saves their state from *before* the produced-but-unused batch, which a resumed
run therefore draws again.

Evaluation (``evaluate_ema``): the EMA model's weights are averaged, its BatchNorm statistics
are not; before each evaluation they are recomputed for the EMA weights on a fixed set of
clean training images (``TrainData.calib_idx``; ``evaluate.recalibrate_bn``). The final
figures are the mean over the last ``final_points`` evaluation points, each of which also
reads the test split (``final_evals``); earlier points read the curve set only.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anl_core.precision import autocast_for, uses_bf16
from anl_core.progress import progress_bar
from pipeline.atomic import atomic_torch_save

from .algorithms import Batch, SSLAlgorithm
from .config import SSLConfig
from .evaluate import EvalResult, evaluate, recalibrate_bn
from .randaugment import strong_augment, weak_from_store
from .schedules import eval_steps, lr_schedule

EXTRA_STREAM = 0x5EED  # offset of the extra-rows generator's seed from the run's seed


class CheckpointMismatchError(RuntimeError):
    """A checkpoint belongs to a different run (config, data or arm)."""


@dataclass
class TrainData:
    """Everything the loop samples from, on the training device."""

    store: torch.Tensor          # uint8 (N, H, W, C): real training images, then synthetic
    labels: torch.Tensor         # int64 (N,); synthetic rows carry their shard labels
    weights: torch.Tensor        # float (N,) loss weight when a row is drawn as labeled
    labeled_real: torch.Tensor   # int64 indices into store
    labeled_synth: torch.Tensor  # int64 indices into store: extra labeled rows (synthetic or
                                 # control), empty unless synthetic_as=labeled
    unlabeled: torch.Tensor      # int64 indices into store
    test_images: torch.Tensor    # uint8 (M, H, W, C)
    test_labels: torch.Tensor
    curve_images: torch.Tensor   # learning-curve points: the validation images, if the split
    curve_labels: torch.Tensor   # has them, else a subset of the test images
    num_classes: int
    curve_split: str = "test"    # which split curve_images come from
    val_images: torch.Tensor | None = None  # the whole validation split (None: no split)
    val_labels: torch.Tensor | None = None
    # Store indices of the clean training images the EMA model's BN statistics are
    # recomputed on (real labeled + unlabeled, no validation; empty: the unlabeled pool).
    calib_idx: torch.Tensor | None = None


def class_balanced_probs(labels: torch.Tensor) -> torch.Tensor:
    """(N,) float probabilities that give each class present in ``labels`` an equal share."""
    counts = torch.bincount(labels)
    probs = 1.0 / counts[labels].float()
    return probs / probs.sum()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # As USB: no weight decay on biases and BatchNorm parameters (the 1-d tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]




class Trainer:
    def __init__(self, model: nn.Module, algorithm: SSLAlgorithm, data: TrainData,
                 config: SSLConfig, device: torch.device, checkpoint_path: Path,
                 fingerprint: str, progress: bool = True, label: str | None = None) -> None:
        self.config, self.device, self.data, self.algorithm = config, device, data, algorithm
        self.checkpoint_path, self.fingerprint, self.progress = checkpoint_path, fingerprint, progress
        self.label = label or algorithm.name  # names the unit in progress lines (arm, seed)
        cuda = device.type == "cuda"
        # bf16 autocast on CUDA and on CPUs with native bf16; on the CPU NHWC only pays with it.
        self.amp = uses_bf16(device, config.amp, cpu=True)
        self.channels_last = config.channels_last and (cuda or self.amp)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=fmt).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.forward_model = torch.compile(self.model) if (config.compile and cuda) else self.model
        self.optimizer = torch.optim.SGD(_param_groups(self.model, config.weight_decay),
                                         lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(config))
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        # Extra labeled rows are drawn and augmented from their own stream (see module doc).
        self.extra_generator = torch.Generator(device=device)
        self.extra_generator.manual_seed(config.seed + EXTRA_STREAM)
        self._extra_rows = (round(config.synthetic_batch_share * config.batch_size)
                            if len(data.labeled_synth) else 0)
        self.step = 0
        self.curve: list[dict] = []
        self.train_time_s = 0.0
        self.wall_time_s = 0.0
        # Loss terms summed since the last learning-curve point (checkpointed, so a resumed
        # run averages over the same steps as an uninterrupted one).
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._ema_params = list(self.ema.parameters())
        self._params = list(self.model.parameters())
        # The evaluation points whose test figures make the final result (the last k).
        self._final_steps = set(eval_steps(config)[-config.final_points:])
        self.final_evals: list[dict] = []
        self._calibrated_at: int | None = None  # step the EMA's BN statistics are for
        self._last_test: tuple[int, EvalResult] | None = None  # the final window's last read
        self._synth_probs = class_balanced_probs(self.data.labels[self.data.labeled_synth]) \
            if config.synthetic_class_balance and len(self.data.labeled_synth) else None
        # Batches are produced on this stream (CUDA) one step ahead; see the module doc.
        self._side = torch.cuda.Stream(device) if cuda else None
        self._states_before_pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------- batches

    def _extra_indices(self) -> torch.Tensor | None:
        """Store indices of the k extra labeled rows of this batch, from the extra stream."""
        d, k, g = self.data, self._extra_rows, self.extra_generator
        if k == 0:
            return None
        if self._synth_probs is None:
            pos = torch.randint(len(d.labeled_synth), (k,), generator=g, device=self.device)
        else:
            pos = torch.multinomial(self._synth_probs, k, replacement=True, generator=g)
        return d.labeled_synth[pos]

    def sample_batch(self) -> Batch:
        d, g, b = self.data, self.generator, self.config.batch_size
        idx = d.labeled_real[torch.randint(len(d.labeled_real), (b,), generator=g,
                                           device=self.device)]
        batch = Batch(x_lb=weak_from_store(d.store, idx, g), y_lb=d.labels[idx],
                      w_lb=d.weights[idx])
        extra = self._extra_indices()
        if extra is not None:
            # The real rows keep the baseline's loss scale: the labeled loss is the sum over
            # all rows divided by the b real ones (weighted_ce takes a mean over b + k rows).
            scale = (b + len(extra)) / b
            batch.x_lb = torch.cat([batch.x_lb, weak_from_store(d.store, extra,
                                                                self.extra_generator)])
            batch.y_lb = torch.cat([batch.y_lb, d.labels[extra]])
            batch.w_lb = torch.cat([batch.w_lb, d.weights[extra]]) * scale
        if self.algorithm.uses_unlabeled:
            n_u = self.config.mu * self.config.batch_size
            pos = torch.randint(len(d.unlabeled), (n_u,), generator=g, device=self.device)
            uidx = d.unlabeled[pos]
            batch.x_ulb_w = weak_from_store(d.store, uidx, g)
            batch.x_ulb_s = strong_augment(weak_from_store(d.store, uidx, g), g)
            batch.idx_ulb = pos
        if self.channels_last:
            for name in ("x_lb", "x_ulb_w", "x_ulb_s"):
                x = getattr(batch, name)
                if x is not None:
                    setattr(batch, name, x.contiguous(memory_format=torch.channels_last))
        return batch

    def _produce(self) -> Batch:
        """Start the next batch (on the side stream on CUDA), remembering the generators'
        state before it for checkpoints."""
        self._states_before_pending = (self.generator.get_state(),
                                       self.extra_generator.get_state())
        if self._side is None:
            return self.sample_batch()
        with torch.cuda.stream(self._side):
            return self.sample_batch()

    def _ready(self, batch: Batch) -> Batch:
        """Make the main stream wait for ``batch`` and own its memory from here on."""
        if self._side is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self._side)
            for f in dataclasses.fields(batch):
                t = getattr(batch, f.name)
                if isinstance(t, torch.Tensor):
                    t.record_stream(main)
        return batch

    # ------------------------------------------------------------------- one step

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        with autocast_for(self.device, self.amp, cpu=True):
            out = self.algorithm.train_step(self.forward_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        return out.terms

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Weights only. USB copies the raw model's BN buffers here too, which describe the
        # raw weights' last batches, not the EMA weights: evaluate_ema recomputes them instead.
        decay = self.config.ema
        if self.config.ema_warmup:
            decay = min(decay, (1.0 + self.step) / (10.0 + self.step))
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - decay)
        self._calibrated_at = None

    # ------------------------------------------------------------------- evaluation

    def calibration_images(self) -> torch.Tensor:
        """The fixed clean training images the EMA's BN statistics are recomputed on."""
        d = self.data
        pool = d.calib_idx if d.calib_idx is not None and len(d.calib_idx) else d.unlabeled
        return d.store[pool[:self.config.bn_calibration]]

    def recalibrate_ema(self) -> None:
        """Recompute the EMA model's BN statistics for its current weights (once per step)."""
        if self._calibrated_at != self.step:
            recalibrate_bn(self.ema, self.calibration_images(), amp=self.amp,
                           channels_last=self.channels_last)
            self._calibrated_at = self.step

    def evaluate_ema(self, split: str = "test") -> EvalResult:
        """The EMA model (BN recalibrated) on the ``test`` or ``validation`` split, or the
        ``curve`` set."""
        d = self.data
        images, labels = {"test": (d.test_images, d.test_labels),
                          "validation": (d.val_images, d.val_labels),
                          "curve": (d.curve_images, d.curve_labels)}[split]
        if images is None:
            raise ValueError(f"this run has no {split} split")
        self.recalibrate_ema()
        return evaluate(self.ema, images, labels, d.num_classes, amp=self.amp,
                        channels_last=self.channels_last)

    def final_result(self) -> tuple[EvalResult, float, float | None]:
        """(last point's test result, mean test error, mean curve error) over the final
        window's evaluation points (``final_points``)."""
        if not self.final_evals:
            raise RuntimeError("the run has not reached its final evaluation points")
        if self._last_test is not None and self._last_test[0] == self.step:
            last = self._last_test[1]
        else:  # resumed from the final checkpoint: score the saved EMA again
            last = self.evaluate_ema("test")
        test = sum(e["test_error"] for e in self.final_evals) / len(self.final_evals)
        curve = sum(e["curve_error"] for e in self.final_evals) / len(self.final_evals)
        return last, test, curve

    # ------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        # Before a batch produced ahead but not trained on: a resumed run draws it again.
        generator, extra = self._states_before_pending or (self.generator.get_state(),
                                                           self.extra_generator.get_state())
        return {
            "fingerprint": self.fingerprint, "step": self.step,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "generator": generator, "extra_generator": extra,
            "algorithm": self.algorithm.state_dict(),
            "curve": list(self.curve), "train_time_s": self.train_time_s,
            "wall_time_s": self.wall_time_s, "config": self.config.to_dict(),
            "sums": dict(self._sums), "count": self._count,
            "final_evals": list(self.final_evals),
            # the step whose EMA weights the saved BN statistics were recomputed for
            "ema_calibrated_step": self._calibrated_at,
        }

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.state_dict(), self.checkpoint_path)

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoint_path`` when it exists; False when starting fresh."""
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"{self.checkpoint_path} belongs to another run (fingerprint "
                f"{state.get('fingerprint')} != {self.fingerprint}: different config, data or "
                "arm); use another out_dir or delete the checkpoint to start over")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        self.extra_generator.set_state(state["extra_generator"].cpu())
        self.algorithm.load_state_dict(state["algorithm"])
        self.step, self.curve = state["step"], list(state["curve"])
        self.train_time_s, self.wall_time_s = state["train_time_s"], state["wall_time_s"]
        self._sums, self._count = dict(state["sums"]), state["count"]
        self.final_evals = list(state.get("final_evals", []))
        calibrated = state.get("ema_calibrated_step")
        self._calibrated_at = calibrated if calibrated == self.step else None
        return True

    # ------------------------------------------------------------------- the loop

    def fit(self, on_step: Callable[[int], None] | None = None) -> None:
        """Train from ``self.step`` to ``config.steps``; ``on_step(step)`` runs after each step.

        Loss terms are summed on the device and read back only at evaluation points, so
        the loop issues no host sync per step (except progress-bar updates every
        ``progress_every`` steps).
        """
        cfg = self.config
        bar = progress_bar(total=cfg.steps, initial=self.step, enabled=self.progress,
                           desc=self.label, unit="step", logger=__name__,
                           dynamic_ncols=True)
        session_start = time.perf_counter()
        mark = time.perf_counter()
        if self._side is not None:  # the data store and the model were put there on main
            self._side.wait_stream(torch.cuda.current_stream(self.device))
        pending = self._produce() if self.step < cfg.steps else None
        try:
            while pending is not None:
                batch = self._ready(pending)
                terms = self.train_step(batch)  # queued on the card; produce the next meanwhile
                pending = self._produce() if self.step + 1 < cfg.steps else None
                if pending is None:
                    self._states_before_pending = None
                self.step += 1
                self._count += 1
                for k, v in terms.items():
                    self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
                bar.update(1)
                if self.progress and self.step % cfg.progress_every == 0:
                    bar.set_postfix(loss=f"{float(terms['loss']):.3f}")
                boundary = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                save = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                if boundary or save:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.train_time_s += time.perf_counter() - mark
                    if boundary:
                        self._record()
                        # Read back by _record anyway: the progress lines carry them at no sync.
                        row = self.curve[-1]
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}", **{
                            f"{row['curve_split']}_error": f"{row['test_error']:.4f}"})
                    if save:
                        self.wall_time_s += time.perf_counter() - session_start
                        session_start = time.perf_counter()
                        self.save_checkpoint()
                    mark = time.perf_counter()
                if on_step is not None:
                    on_step(self.step)
        finally:
            bar.close()
        self.wall_time_s += time.perf_counter() - session_start

    def _record(self) -> None:
        row = {"step": self.step, "lr": float(self.scheduler.get_last_lr()[0])}
        row.update({k: float(v) / max(self._count, 1) for k, v in self._sums.items()})
        self._sums, self._count = {}, 0
        result = self.evaluate_ema("curve")
        # The column keeps its old name for old readers; curve_split says which images.
        row.update(test_error=result.top1_error, eval_images=len(self.data.curve_labels),
                   curve_split=self.data.curve_split, train_time_s=self.train_time_s)
        self.curve.append(row)
        if self.step in self._final_steps:  # a point of the final figure: read test too
            test = self.evaluate_ema("test")
            self._last_test = (self.step, test)
            self.final_evals.append({"step": self.step, "curve_error": result.top1_error,
                                     "test_error": test.top1_error})
