"""Tuning one class's ANL adapter: the tune stage's work, shared with the benches."""

from __future__ import annotations

from pathlib import Path

from anl_core.config import AdapterShape, TuneConfig


def unit_seed(seed: int, class_idx: int | None) -> int:
    """Different, reproducible seeds per class: seed + 1000 * (class + 1); shared: seed."""
    return seed if class_idx is None else seed + 1000 * (class_idx + 1)


def tune_class_adapter(unet, scheduler, images, tokens, adapter: AdapterShape,
                       tuning: TuneConfig, class_idx: int | None, encoder_id: str, *,
                       weights=None,
                       steps: int | None = None, warm_from: Path | None = None,
                       progress: bool = False):
    """Tune one adapter on ``images`` with their condition ``tokens``: (model, TuneResult).

    The stage's tuning and the benches' (``bench/faithfulness.py``) are this one function:
    the adapter's initialisation and its tuning draws come from the class's ``unit_seed``.
    ``warm_from``: start from a saved adapter (the second round) instead of a fresh one.
    """
    import torch

    from anl_core.inject import ANLConfig, ANLUNet, attach_anl
    from anl_core.tuning import tune_adapter

    seed = unit_seed(tuning.seed, class_idx)
    torch.manual_seed(seed)  # the adapter's initialisation
    if warm_from is not None:
        model = ANLUNet.from_pretrained(unet, warm_from, encoder_id=encoder_id)
    else:
        model = attach_anl(unet, ANLConfig(
            token_dim=tokens.shape[2], num_tokens=tokens.shape[1], encoder_id=encoder_id,
            **adapter.model_dump()))
    tcfg = tuning.model_copy(update={"seed": seed, **({"steps": steps} if steps else {})})
    return model, tune_adapter(model, scheduler, images, tokens, tcfg, progress=progress,
                               weights=weights)
