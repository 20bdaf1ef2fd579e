"""SSLConfig: every knob of a semi-supervised run, one validated pydantic model.

Defaults follow the USB FixMatch protocol for CIFAR-10 (WRN-28-2, batch 64, mu 7,
tau 0.95, lambda_u 1, SGD 0.03 nesterov, wd 5e-4, cosine decay, EMA 0.999); see
shared/ANCHORS.md. Budgets are named by their step count, not by adjectives, so a
"steps-8192" rerun says exactly what it ran.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from anl_core.config import STRICT, Seed
from pipeline.digest import digest

# The registry's names (pipeline.ssl.algorithms.ALGORITHMS, pipeline.ssl.nets.NETS), repeated
# here because those modules import torch and a preset is checked without it; a test keeps
# the lists equal, and pre-flight asks the registry itself.
ALGORITHM_NAMES = ("supervised", "fixmatch")
NET_NAMES = ("wrn-28-2", "wrn-28-8", "cnn-small", "cnn-tiny")
# 16 x USB's 2^20: above it a step count is a typo, not a budget.
MAX_SSL_STEPS = 2**24

# name -> (steps, eval_every, checkpoint_every). The full USB budget is 2^20 steps.
BUDGETS: dict[str, dict[str, int]] = {
    "steps-1048576": {"steps": 2**20, "eval_every": 8192, "checkpoint_every": 8192},
    "steps-262144": {"steps": 2**18, "eval_every": 4096, "checkpoint_every": 4096},
    "steps-65536": {"steps": 2**16, "eval_every": 2048, "checkpoint_every": 2048},
    "steps-8192": {"steps": 2**13, "eval_every": 512, "checkpoint_every": 1024},
    "steps-1024": {"steps": 2**10, "eval_every": 128, "checkpoint_every": 256},
    "steps-256": {"steps": 2**8, "eval_every": 64, "checkpoint_every": 128},
}

# name -> trainer fields. A recipe is a whole training setting, chosen on the validation
# split (bench/RESULTS.md, "Choosing the recipe"); a field given explicitly beside it wins.
RECIPES: dict[str, dict[str, Any]] = {
    # USB's FixMatch as published: its cosine ends at 0.2 x lr (meant for 2^20 steps).
    "usb": {"schedule": "fixmatch-cosine", "warmup": 0.0, "final_points": 1},
    # Short CPU budgets (thousands of steps), where the last evaluation *is* the result: a
    # linear warm-up, cosine to 0 so the last points are taken at a small step, the final
    # figure the mean of the last 3 evaluations, and the cnn-small net at width 16 with bf16
    # autocast. lr, width and batch were chosen on one split's validation images at 4096
    # steps (bench/RESULTS.md, "The SSL instrument"): lr 0.01 / 0.03 / 0.1 / 0.2 gave 30.9 /
    # 28.9 / 28.1 / 28.2% error, batch 32 29.2% at twice the cost; width 32 gave 27.3% (at
    # lr 0.03) at twice the step time, so width 16 keeps 5 repetitions with the doubled arms
    # within about an hour on 2 cores.
    "cpu-short": {"schedule": "warmup-cosine", "warmup": 0.05, "final_points": 3,
                  "net": "cnn-small", "net_width": 16, "batch_size": 16, "mu": 2,
                  "lr": 0.1},
}

MAX_EXTRA_SHARE = 4.0  # at most 4 extra labeled rows per real one

# The fields only an arm with extra labeled rows (augmented, control) reads.
SYNTHETIC_FIELDS = ("synthetic_as", "synthetic_weight", "synthetic_batch_share",
                    "synthetic_class_balance")
# Bumped when the meaning of a field changes, so that no checkpoint of the old meaning is
# resumed or reused: 2 = extra rows on top of the real ones, drawn from their own stream;
# 3 = the EMA model is evaluated with BN statistics recomputed for its own weights (not the
# raw model's copied buffers), and bf16 autocast on CPUs with native bf16.
LAYOUT_VERSION = 3

# Fields that change where or how fast a run executes but not what it computes (on
# one device); they are left out of the fingerprint so a run may resume elsewhere.
_NOT_FINGERPRINTED = ("device", "compile", "progress_every")


class SSLConfigError(ValueError):
    """An unknown budget name. (A bad field value raises pydantic's ValidationError, a
    ValueError that names the field.)"""


class SSLConfig(BaseModel):
    """Every knob of the trainer, declared once with its bounds; ``pipeline.config_sections``
    composes it as the ``ssl:`` section (adding arms and seeds), so a preset is validated here
    too."""

    model_config = STRICT

    algorithm: str = "fixmatch"
    net: str = "auto"  # "auto": wrn-28-2 for colour, cnn-small for grey; see nets.NETS
    # Base width of the cnn nets (cnn-small: 32, cnn-tiny: 8 when None); WRN has its own.
    net_width: int | None = Field(None, ge=1)
    steps: int = Field(2**20, ge=1, le=MAX_SSL_STEPS)
    batch_size: int = Field(64, ge=1)
    mu: int = Field(7, ge=1)  # unlabeled batch = mu * batch_size
    tau: float = Field(0.95, gt=0, le=1)  # confidence threshold for pseudo-labels
    lambda_u: float = Field(1.0, ge=0)
    hard_labels: bool = True
    # Temperature: kept for other algorithms; FixMatch, as USB, never applies it.
    T: float = Field(0.5, gt=0)
    lr: float = Field(0.03, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = True
    ema: float = Field(0.999, ge=0, lt=1)
    # EMA decay at step t is min(ema, (1 + t) / (10 + t)): without it a short run evaluates
    # weights that are still mostly the random init (0.999^1000 = 0.37); from ~10k steps
    # on it is exactly USB's fixed 0.999.
    ema_warmup: bool = True
    include_labeled_in_unlabeled: bool = True  # USB puts the labeled images in the pool too
    # Cap on the real unlabeled pool (None: all of it): this many of the split's unlabeled
    # images, drawn class-blind with the split's seed (pipeline.data.splits.capped_pool);
    # 0 leaves none, for the supervised arms. BN calibration reads only labeled + this pool.
    unlabeled_pool: int | None = Field(None, ge=0)
    # "fixmatch-cosine": lr * cos(7 pi k / 16 K), USB's, ending at 0.2 lr; "warmup-cosine":
    # linear warm-up over the first ``warmup`` share of the steps, then cosine to 0.
    schedule: Literal["fixmatch-cosine", "warmup-cosine"] = "fixmatch-cosine"
    warmup: float = Field(0.0, ge=0, lt=1)
    # The final validation and test figures: the mean over the last ``final_points``
    # evaluation points (each with recalibrated BN), not the last point alone. The window
    # they span follows eval_every: (final_points - 1) x eval_every steps before the end
    # (metrics.json lists their steps as final_evals).
    final_points: int = Field(1, ge=1)
    # Clean training images (labeled + unlabeled, never validation; no labels read) on which
    # the EMA model's BatchNorm statistics are recomputed before every evaluation.
    bn_calibration: int = Field(1024, ge=1)
    eval_every: int = Field(5000, ge=1, le=MAX_SSL_STEPS)
    eval_size: int | None = Field(None, ge=1)  # test images per curve point (None: all)
    checkpoint_every: int = Field(5000, ge=1, le=MAX_SSL_STEPS)
    seed: Seed = 0
    device: str = "auto"
    synthetic_as: Literal["labeled", "unlabeled"] = "labeled"
    synthetic_weight: float = Field(1.0, ge=0)  # loss weight of a synthetic row (real: 1)
    # Extra labeled rows (synthetic in the augmented arm, judged real in the control arm)
    # added to each labeled batch on top of its batch_size real rows, as a share of
    # batch_size: 0.5 at batch 16 is 16 real + 8 extra rows. The real rows are the
    # baseline's own (trainer.py), so the arms differ only by the extra rows.
    synthetic_batch_share: float = Field(0.5, ge=0, le=MAX_EXTRA_SHARE)
    # Draw the extra rows class-balanced (each class equally often) rather than
    # row-uniform: a filter keeps very different shares of each class (bench/RESULTS.md).
    synthetic_class_balance: bool = False
    # bf16 autocast on CUDA, and on CPUs with native bf16 (anl_core.precision); channels_last
    # wherever autocast is on (on the CPU it only pays with bf16).
    amp: bool = True
    channels_last: bool = True
    compile: bool = False  # torch.compile of the training forward, CUDA only
    progress_every: int = Field(50, ge=1)  # steps between progress-bar updates (host syncs)
    # Algorithm-specific knobs. No registered algorithm takes any yet, so a key here would be
    # silently ignored: refused until an algorithm declares it.
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_budget(cls, budget: str, **overrides: Any) -> SSLConfig:
        """A config with the step count and cadences of a named budget, e.g. "steps-8192"."""
        if budget not in BUDGETS:
            raise SSLConfigError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
        return cls(**{**BUDGETS[budget], **overrides})

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        if name not in ALGORITHM_NAMES:
            raise ValueError(f"unknown SSL algorithm; choose one of {', '.join(ALGORITHM_NAMES)}")
        return name

    @field_validator("net")
    @classmethod
    def _known_net(cls, name: str) -> str:
        if name != "auto" and name not in NET_NAMES:
            raise ValueError(f"unknown net; choose auto or one of {', '.join(NET_NAMES)}")
        return name

    @field_validator("extra")
    @classmethod
    def _no_unread_knobs(cls, extra: dict[str, Any]) -> dict[str, Any]:
        if extra:
            raise ValueError(f"no algorithm reads {', '.join(map(repr, extra))} (none takes "
                             "extra knobs); remove it")
        return extra

    @model_validator(mode="after")
    def _warmup_needs_its_schedule(self) -> SSLConfig:
        if self.warmup and self.schedule != "warmup-cosine":
            raise ValueError(f"warmup={self.warmup} does nothing under schedule="
                             f"{self.schedule!r}; set schedule=warmup-cosine or warmup=0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def fingerprint(self, reads_extra_rows: bool = True) -> str:
        """Hash of the fields that decide the result (not device/compile/progress).

        ``reads_extra_rows=False`` (supervised and baseline arms) leaves out the fields about
        extra labeled rows, which those arms never read, so a change to them reuses the arms.
        """
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        if d["unlabeled_pool"] is None:
            del d["unlabeled_pool"]  # uncapped: runs from before the cap keep their prints
        if not reads_extra_rows:
            for k in SYNTHETIC_FIELDS:
                del d[k]
        d["layout_version"] = LAYOUT_VERSION
        return digest(d, spaced=True)[:16]

    def without_extra_rows(self) -> SSLConfig:
        """This config with the extra-row fields at their defaults (for arms without them)."""
        return self.model_copy(update={k: SSLConfig.model_fields[k].default
                                       for k in SYNTHETIC_FIELDS})
