"""SSLConfig: every knob of a semi-supervised run, one JSON-serialisable dataclass.

Defaults follow the USB FixMatch protocol for CIFAR-10 (WRN-28-2, batch 64, mu 7,
tau 0.95, lambda_u 1, SGD 0.03 nesterov, wd 5e-4, cosine decay, EMA 0.999); see
shared/ANCHORS.md. Budgets are named by their step count, not by adjectives, so a
"steps-8192" rerun says exactly what it ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# name -> (steps, eval_every, checkpoint_every). The full USB budget is 2^20 steps.
BUDGETS: dict[str, dict[str, int]] = {
    "steps-1048576": {"steps": 2**20, "eval_every": 8192, "checkpoint_every": 8192},
    "steps-262144": {"steps": 2**18, "eval_every": 4096, "checkpoint_every": 4096},
    "steps-65536": {"steps": 2**16, "eval_every": 2048, "checkpoint_every": 2048},
    "steps-8192": {"steps": 2**13, "eval_every": 512, "checkpoint_every": 1024},
    "steps-1024": {"steps": 2**10, "eval_every": 128, "checkpoint_every": 256},
    "steps-256": {"steps": 2**8, "eval_every": 64, "checkpoint_every": 128},
}

SYNTHETIC_AS = ("labeled", "unlabeled")
MAX_EXTRA_SHARE = 4.0  # at most 4 extra labeled rows per real one

# The fields only an arm with extra labeled rows (augmented, control) reads.
SYNTHETIC_FIELDS = ("synthetic_as", "synthetic_weight", "synthetic_batch_share",
                    "synthetic_class_balance")
# Bumped when the meaning of a field changes, so that no checkpoint of the old meaning is
# resumed or reused: 2 = extra rows on top of the real ones, drawn from their own stream.
LAYOUT_VERSION = 2

# Fields that change where or how fast a run executes but not what it computes (on
# one device); they are left out of the fingerprint so a run may resume elsewhere.
_NOT_FINGERPRINTED = ("device", "compile", "progress_every")


class SSLConfigError(ValueError):
    """An SSLConfig field has a value the trainer cannot use; the message names it."""


@dataclass
class SSLConfig:
    algorithm: str = "fixmatch"
    net: str = "auto"  # "auto": wrn-28-2 for colour, cnn-small for grey; see nets.NETS
    steps: int = 2**20
    batch_size: int = 64
    mu: int = 7  # unlabeled batch = mu * batch_size
    tau: float = 0.95  # confidence threshold for pseudo-labels
    lambda_u: float = 1.0
    hard_labels: bool = True
    T: float = 0.5  # temperature: kept for other algorithms; FixMatch, as USB, never applies it
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    ema: float = 0.999
    # EMA decay at step t is min(ema, (1 + t) / (10 + t)): without it a short run evaluates
    # weights that are still mostly the random init (0.999^1000 = 0.37); from ~10k steps
    # on it is exactly USB's fixed 0.999.
    ema_warmup: bool = True
    include_labeled_in_unlabeled: bool = True  # USB puts the labeled images in the pool too
    eval_every: int = 5000
    eval_size: int | None = None  # test images used for learning-curve points (None: all)
    checkpoint_every: int = 5000
    seed: int = 0
    device: str = "auto"
    synthetic_as: str = "labeled"
    synthetic_weight: float = 1.0  # loss weight of a synthetic labeled row (real rows: 1)
    # Extra labeled rows (synthetic in the augmented arm, judged real in the control arm)
    # added to each labeled batch on top of its batch_size real rows, as a share of
    # batch_size: 0.5 at batch 16 is 16 real + 8 extra rows. The real rows are the
    # baseline's own (trainer.py), so the arms differ only by the extra rows.
    synthetic_batch_share: float = 0.5
    # Draw the extra rows class-balanced (each class equally often) rather than
    # row-uniform: a filter keeps very different shares of each class (bench/RESULTS.md).
    synthetic_class_balance: bool = False
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile of the training forward, CUDA only
    progress_every: int = 50  # steps between progress-bar postfix updates (host syncs)
    extra: dict[str, Any] = field(default_factory=dict)  # algorithm-specific knobs

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SSLConfigError(msg)

        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.mu >= 1, f"mu must be >= 1, got {self.mu}")
        need(0.0 < self.tau <= 1.0, f"tau must be in (0, 1], got {self.tau}")
        need(0.0 <= self.ema < 1.0, f"ema must be in [0, 1), got {self.ema}")
        need(self.eval_every >= 1 and self.checkpoint_every >= 1,
             "eval_every and checkpoint_every must be >= 1")
        need(self.synthetic_as in SYNTHETIC_AS,
             f"synthetic_as must be one of {SYNTHETIC_AS}, got {self.synthetic_as!r}")
        need(self.synthetic_weight >= 0, f"synthetic_weight must be >= 0, got {self.synthetic_weight}")
        need(self.synthetic_batch_share is not None and
             0.0 <= self.synthetic_batch_share <= MAX_EXTRA_SHARE,
             f"synthetic_batch_share (extra labeled rows per batch, as a share of batch_size) "
             f"must be in [0, {MAX_EXTRA_SHARE:g}], got {self.synthetic_batch_share}")
        need(self.T > 0, f"T must be > 0, got {self.T}")

    @classmethod
    def from_budget(cls, budget: str, **overrides: Any) -> SSLConfig:
        """A config with the step count and cadences of a named budget, e.g. "steps-8192"."""
        if budget not in BUDGETS:
            raise SSLConfigError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
        return cls(**{**BUDGETS[budget], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SSLConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SSLConfigError(f"unknown SSLConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SSLConfig:
        return cls.from_dict(json.loads(text))

    def fingerprint(self, reads_extra_rows: bool = True) -> str:
        """Hash of the fields that decide the result (not device/compile/progress).

        ``reads_extra_rows=False`` (supervised and baseline arms) leaves out the fields about
        extra labeled rows, which those arms never read, so a change to them reuses the arms.
        """
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        if not reads_extra_rows:
            for k in SYNTHETIC_FIELDS:
                del d[k]
        d["layout_version"] = LAYOUT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def without_extra_rows(self) -> SSLConfig:
        """This config with the extra-row fields at their defaults (for arms without them)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: defaults[k] for k in SYNTHETIC_FIELDS})
