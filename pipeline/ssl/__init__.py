"""Downstream semi-supervised classifier: FixMatch (USB protocol) on real + synthetic data.

Entry point: ``run_arm(arm, dataset, split, out_dir, config, shard_dir=None)``.
"""

from .algorithms import ALGORITHMS, Batch, FixMatch, SSLAlgorithm, StepOutput, Supervised
from .arms import ARMS, ArmError, build_train_data, load_synthetic, run_arm
from .config import BUDGETS, SSLConfig, SSLConfigError
from .evaluate import EvalResult, evaluate
from .nets import NETS, build_net
from .trainer import CheckpointMismatchError, TrainData, Trainer

__all__ = [
    "ALGORITHMS", "ARMS", "BUDGETS", "NETS", "ArmError", "Batch", "CheckpointMismatchError",
    "EvalResult", "FixMatch", "SSLAlgorithm", "SSLConfig", "SSLConfigError", "StepOutput",
    "Supervised", "TrainData", "Trainer", "build_net", "build_train_data", "evaluate",
    "load_synthetic", "run_arm",
]
