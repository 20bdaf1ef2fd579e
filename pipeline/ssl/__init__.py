"""Downstream semi-supervised classifier: FixMatch (USB protocol) on real + synthetic data.

Entry point: ``run_arm(arm, dataset, split, out_dir, config, shard_dir=None)``.

Names are imported on first use (PEP 562): ``pipeline.config`` composes ``SSLConfig`` from the
light ``pipeline.ssl.config``, and reading a preset should not import torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "algorithms": ("ALGORITHMS", "Batch", "FixMatch", "SSLAlgorithm", "StepOutput", "Supervised"),
    "arm_names": ("ARMS",),
    "arms": ("ArmError", "build_train_data", "load_synthetic", "run_arm"),
    "config": ("BUDGETS", "SSLConfig", "SSLConfigError"),
    "evaluate": ("EvalResult",),  # evaluate() itself: pipeline.ssl.evaluate.evaluate
    "export": ("ExportError", "export_classifier", "load_classifier"),
    "nets": ("NETS", "build_net"),
    "trainer": ("CheckpointMismatchError", "TrainData", "Trainer"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [name for names in _HOMES.values() for name in names]


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module 'pipeline.ssl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME_OF[name]}", __name__), name)
    globals()[name] = value  # once
    return value
