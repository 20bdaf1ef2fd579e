"""What every stage reads from a run: the dataset, the split, the base model, the round's
folder and the condition tokens.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.runs import ROUND_TWO, StageError


def dataset_for(config: AugmentConfig):
    from pipeline.data.datasets import load_dataset_cached

    return load_dataset_cached(config.dataset, config.dataset_root, config.download,
                               **config.loader_options())


def split_for(run_dir: Path):
    from pipeline.data.splits import load_split

    return load_split(run_dir / "split.parquet")


def base_model_dir(run_dir: Path, config: AugmentConfig) -> Path:
    from pipeline.models import resolve_base_model

    if config.pretrains_base:
        base = run_dir / "base"
        if not (base / "training.json").exists():
            raise StageError(f"{base} is not finished; run the pretrain stage first")
        return resolve_base_model(str(base))
    return resolve_base_model(config.base_model)


def load_run_base(run_dir: Path, config: AugmentConfig, device: str):
    """The frozen base U-Net (fp32 on CPU; the stored dtype is not trusted) and its scheduler."""
    from pipeline.models import load_base_unet

    unet, scheduler = load_base_unet(base_model_dir(run_dir, config), device)
    if unet.config.sample_size != config.image_size:
        raise StageError(f"image_size={config.image_size} but the base model works at "
                         f"{unet.config.sample_size}; set image_size={unet.config.sample_size}")
    return unet, scheduler


def round_root(run_dir: Path, loop_round: int) -> Path:
    """Where a round's conditions, adapters, samples, shards and stage records live."""
    return run_dir if loop_round == 1 else run_dir / ROUND_TWO


TOKENS_FILE = "conditions/tokens.safetensors"


def load_tokens(run_dir: Path) -> dict:
    """Tokens, labeled indices, labels and encoder metadata written by the encode stage."""
    from safetensors import safe_open

    path = run_dir / TOKENS_FILE
    if not path.exists():
        raise StageError(f"{path} not found; run the encode stage first")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    return {**data, "encoder_id": meta["encoder_id"], "token_dim": int(meta["token_dim"]),
            "num_tokens": int(meta["num_tokens"])}


def class_indices(run_dir: Path, config: AugmentConfig) -> list[int]:
    return list(range(dataset_for(config).num_classes))


def adapter_rel(class_idx: int | None) -> str:
    return "adapters/shared" if class_idx is None else f"adapters/class-{class_idx:02d}"


def sample_rel(class_idx: int) -> str:
    return f"samples/class-{class_idx:02d}"


def ssl_rel(arm: str, seed: int) -> str:
    return f"ssl/{arm}/seed-{seed}"
