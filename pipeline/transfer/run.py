"""The transfer run's steps (target, tune, sample, evaluate, report; declared in
``pipeline.transfer.steps``), each keyed, recorded and resumed by the run store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_write, atomic_write_json, atomic_write_text, finite
from pipeline.models import load_base_unet, resolve_base_model
from pipeline.paths import resolve_path
from pipeline.runs import read_json, slug
from pipeline.transfer.config import TransferConfig, TransferError, transfer_hash
from pipeline.transfer.metrics import transfer_metrics
from pipeline.transfer.model import (
    WholeUNet,
    base_channels,
    base_dir,
    build_model,
    condition_encoder,
    fit,
    generate,
    sample_mask_ratio,
    shot_tokens,
    trainable_count,
)
from pipeline.transfer.report import metric_rows, report_markdown, transfer_grid
from pipeline.transfer.steps import STEPS, step_keys, step_parts
from pipeline.transfer.target import draw_shots, target_name, target_pool


def transfer_run_dir(config: TransferConfig) -> Path:
    # The run store's slug (ASCII, no separators): the folder stays inside runs_dir whatever
    # the target is called.
    name = slug(target_name(config)) or "target"
    return resolve_path(config.runs_dir) / f"{config.mode}-{name}-{transfer_hash(config)[:8]}"


def _record(run_dir: Path, step: str) -> dict | None:
    return read_json(Path(run_dir) / "stages" / f"{step}.json")


def _run_step(run_dir: Path, config: TransferConfig, step: str,
              body: Callable[[str], tuple[dict[str, str], dict[str, Any]]]) -> dict:
    """The run store's frame (``pipeline.runs.run_stage``): skip a step recorded under its
    key, link in a sibling run's finished step with the same key, or run ``body(device)``
    and write ``stages/<step>.json`` last."""
    from pipeline.runs import run_stage

    def recorded(device: str):
        outputs, metrics = body(device)
        # The parts the key hashes, in the record: a reader sees why a step ran again.
        return outputs, {**metrics, "parts": step_parts(config)[step]}

    return run_stage(Path(run_dir), config, step, step_keys(config)[step], recorded)


def _require(run_dir: Path, config: TransferConfig, step: str) -> dict:
    from pipeline.runs import finished_record

    rec = finished_record(Path(run_dir), step, step_keys(config)[step])
    if rec is None:
        raise TransferError(f"{run_dir}: step {step!r} has not finished for this config; run "
                            "the steps in order (run_transfer does)")
    return rec


def check_transfer(config: TransferConfig) -> dict[str, Any]:
    """Every input, before any work: base model, target (enough images), encoder, device."""
    from pipeline.preflight import PreflightError, check_encoder, check_writable

    if config.device == "cuda" and not torch.cuda.is_available():
        raise TransferError("device='cuda' but no CUDA GPU is visible; use device=auto or cpu")
    try:
        check_writable(resolve_path(config.runs_dir))
    except PreflightError as e:
        raise TransferError(str(e)) from None
    unet_dir = base_dir(config)
    try:
        check_encoder(config.encoder)
    except PreflightError as e:
        raise TransferError(str(e)) from None
    pool = target_pool(config, base_channels(config))
    shots, held = draw_shots(len(pool), config.shots, config.max_held_out, config.seed)
    return {"base_model": str(unet_dir), "target": target_name(config), "images": len(pool),
            "shots": len(shots), "held_out": len(held), "image_shape": list(pool.shape[1:]),
            "device": config.resolved_device(), "run_dir": str(transfer_run_dir(config))}


def init_run(config: TransferConfig) -> Path:
    """The run directory, with the config it was made for (``config.json``)."""
    run_dir = transfer_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config.model_dump(mode="json"))
    return run_dir


def load_target(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / "target" / "target.npz") as f:
        return {k: f[k] for k in f.files}


def target_step(run_dir: Path, config: TransferConfig) -> dict:
    """Draw the shots and hold out the rest: ``target/target.npz``."""

    def body(device: str):
        run = Path(run_dir)
        pool = target_pool(config, base_channels(config))
        shot_idx, held_idx = draw_shots(len(pool), config.shots, config.max_held_out,
                                        config.seed)
        arrays = {"shots": pool[shot_idx], "held_out": pool[held_idx],
                  "shot_index": shot_idx, "held_out_index": held_idx}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        atomic_write(run / "target" / "target.npz", write)
        digest = hashlib.sha256(np.ascontiguousarray(pool).tobytes()).hexdigest()
        return {"target": "target/target.npz"}, {
            "name": target_name(config), "pool": len(pool), "shots": len(shot_idx),
            "held_out": len(held_idx), "image_shape": list(pool.shape[1:]),
            "pool_sha256": digest}

    return _run_step(run_dir, config, "target", body)


def _save_model(model: nn.Module, tokens: torch.Tensor | None, out: Path, info: dict) -> None:
    """Write the trained model into a temp dir and swap it in: never a half-saved model."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if tokens is None:
            model.net.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
            save_file({"tokens": tokens.contiguous()}, str(tmp / "condition_tokens.safetensors"))
        atomic_write_json(tmp / "tune.json", info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (a full disk): no half folder
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def tune_step(run_dir: Path, config: TransferConfig) -> dict:
    """Train what the mode trains on the shots: ``model/``."""

    def body(device: str):
        run = Path(run_dir)
        shots = load_target(run)["shots"]
        unet, scheduler = load_base_unet(resolve_base_model(config.base_model), device)
        encoder = condition_encoder(config.encoder, device) if config.mode == "anl" else None
        tokens = shot_tokens(encoder, shots) if encoder is not None else None
        model = build_model(config, unet, encoder)
        result = fit(config, model, scheduler, shots, tokens)
        metrics = {"mode": config.mode, "steps": result.steps,
                   "trained_params": trainable_count(model) if result.steps else 0,
                   "base_params": sum(p.numel() for p in unet.parameters()),
                   "steps_per_s": round(result.steps_per_second, 3) if result.steps else None,
                   "train_s": round(result.seconds, 3),
                   "final_loss": float(np.mean(result.loss_history[-20:]))
                   if result.loss_history else None}
        _save_model(model, tokens, run / "model", {**metrics, "loss": result.loss_history})
        return {"model": "model"}, metrics

    return _run_step(run_dir, config, "tune", body)


def load_trained(run_dir: Path, config: TransferConfig, device: str):
    """(model, scheduler, condition tokens or None) saved by the tune step."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from anl_core.inject import ANLUNet

    unet, scheduler = load_base_unet(resolve_base_model(config.base_model), device)
    model_dir = Path(run_dir) / "model"
    if config.mode != "anl":
        net = UNet2DModel.from_pretrained(model_dir, torch_dtype=torch.float32,
                                          low_cpu_mem_usage=False).to(device).eval()
        return WholeUNet(net), scheduler, None
    tokens = load_file(str(model_dir / "condition_tokens.safetensors"))["tokens"]
    return ANLUNet.from_pretrained(unet, model_dir), scheduler, tokens


def sample_step(run_dir: Path, config: TransferConfig) -> dict:
    """Draw the samples and write them as Parquet shards: ``shards/``."""
    from pipeline.data.shards import ShardWriter

    def body(device: str):
        run = Path(run_dir)
        _require(run, config, "tune")
        target = load_target(run)
        model, scheduler, tokens = load_trained(run, config, device)
        started = time.perf_counter()
        images, conds = generate(config, model, scheduler, target["shots"].shape[1:3], tokens,
                                 target["shot_index"])
        seconds = time.perf_counter() - started
        anl = config.mode == "anl"
        with ShardWriter(run / "shards", [target_name(config)], overwrite=True) as writer:
            # Through the null token a sample owes nothing to a shot: no condition recorded.
            writer.write(images, np.zeros(len(images), np.int64),
                         condition_id=None if config.unconditional else conds,
                         adapter_id=f"{config.mode}:{step_keys(config)['tune']}",
                         seed=config.seed, mask_ratio=sample_mask_ratio(config) if anl else None,
                         guidance=config.guidance if anl else None,
                         steps=config.num_inference_steps)
        return {"shards": "shards"}, {"rows": len(images), "sample_s": round(seconds, 3),
                                      "images_per_s": round(len(images) / seconds, 3)}

    return _run_step(run_dir, config, "sample", body)


def evaluate_step(run_dir: Path, config: TransferConfig) -> dict:
    """Measure the shards against the held-out images: ``eval/metrics.json``."""
    from pipeline.data.shards import read_shards
    from pipeline.evaluate.quality import encoder_features

    def body(device: str):
        run = Path(run_dir)
        tune, sample = (_require(run, config, s) for s in ("tune", "sample"))
        target = load_target(run)
        samples = read_shards(run / "shards").images
        features = encoder_features(condition_encoder(config.encoder, device))
        metrics = transfer_metrics(samples, target["shots"], target["held_out"], features, config)
        records = {s: _record(run, s) for s in ("target", "tune", "sample")}
        metrics |= {"feature_space": config.encoder, "mode": config.mode,
                    "trained_params": tune["metrics"]["trained_params"],
                    "steps": tune["metrics"]["steps"],
                    "steps_per_s": tune["metrics"]["steps_per_s"],
                    "images_per_s": sample["metrics"]["images_per_s"],
                    "wall_s": {s: r["wall_s"] for s, r in records.items()}}
        metrics = finite(metrics)
        atomic_write_json(run / "eval" / "metrics.json", metrics)
        return {"metrics": "eval/metrics.json"}, {k: metrics[k] for k in (
            "kid", "kid_std", "diversity_over_real", "near_copy_share")}

    return _run_step(run_dir, config, "evaluate", body)


def _report_context(run: Path, config: TransferConfig) -> dict[str, Any]:
    steps = []
    for s in STEPS[:-1]:
        rec = _record(run, s) or {}
        status = f"reused from {rec['adopted_from']}" if rec.get("adopted_from") else "ran"
        steps.append({"step": s, "key": rec.get("key"), "wall_s": rec.get("wall_s"),
                      "status": status})
    base = Path(config.base_model).name
    return {"title": f"Generative transfer: {base} → {target_name(config)}", "run": run.name,
            "mode": config.mode, "shots": config.shots, "steps": steps,
            "metrics": metric_rows(read_json(run / "eval" / "metrics.json")),
            "config": [{"parameter": k, "value": json.dumps(v)}
                       for k, v in config.model_dump(mode="json").items()]}

def report_step(run_dir: Path, config: TransferConfig) -> dict:
    """``report.html`` (self-contained: the grid is inline), ``report.md`` and ``grid.png``."""
    from pipeline.atomic import atomic_write_bytes
    from pipeline.data.shards import read_shards
    from pipeline.report.plots import data_uri
    from pipeline.report.render import render

    def body(device: str):
        run = Path(run_dir)
        _require(run, config, "evaluate")
        ctx = _report_context(run, config)
        shots, samples = load_target(run)["shots"], read_shards(run / "shards").images
        png = transfer_grid(shots, samples, ctx["title"],
                            cols=min(10, max(len(shots), len(samples))))
        atomic_write_bytes(run / "grid.png", png)
        atomic_write_text(run / "report.md", report_markdown(ctx))
        atomic_write_text(run / "report.html", render("transfer.html.j2", grid=data_uri(png),
                                                      **ctx))
        return {"html": "report.html", "md": "report.md", "grid": "grid.png"}, {}

    return _run_step(run_dir, config, "report", body)


STEP_FUNCTIONS: dict[str, Callable[[Path, TransferConfig], dict]] = {
    "target": target_step, "tune": tune_step, "sample": sample_step,
    "evaluate": evaluate_step, "report": report_step,
}


def run_transfer(config: TransferConfig) -> Path:
    """Check, then run (or resume) every step; returns the run directory."""
    check_transfer(config)
    run_dir = init_run(config)
    for step in STEPS:
        STEP_FUNCTIONS[step](run_dir, config)
    return run_dir
