"""SSL gain (issue 9): does the synthetic data help a semi-supervised classifier?

Supervised, baseline (FixMatch on real labeled + unlabeled) and augmented (the same plus the
synthetic shards) arms on one labeled split, for several training seeds, all with one fixed
short budget; prints each arm's test error per seed, the gain of augmented over baseline
(accuracy points) per seed, its mean and its spread (sample std and range over seeds).

The synthetic data comes from the pipeline's own stages (split, encode, tune, sample,
shards: ``pipeline.stages``) run for the preset in ``--runs-dir`` (finished stages are
reused), or from an existing run via ``--shards RUN_DIR`` (its split is used, so the labeled
images are the ones the synthetic images were conditioned on).

    .venv/bin/python -m bench.ssl_gain --budget steps-8192              # GPU
    .venv/bin/python -m bench.ssl_gain --preset demo --steps 200 --batch-size 16 --mu 3 \\
        --eval-size 2000                                                  # CPU, reduced

Every arm's metrics.json is kept under --out; a rerun with the same settings skips it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    add_preset_args,
    base_model_label,
    csv_list,
    digest,
    load_bench_config,
    markdown_table,
)

ARMS = ("supervised", "baseline", "augmented")
TARGET_GAIN = 3.0  # accuracy points, mean over seeds (issue 9)
SYNTHESIS_STAGES = ("split", "encode", "tune", "sample", "shards")


def generate_shards(config) -> Path:
    """Run the pipeline's stages up to the shards for ``config``; return the run directory."""
    from pipeline.runs import init_run_dir
    from pipeline.stages import STAGE_FUNCTIONS

    if config.pretrains_base:
        raise SystemExit("this bench generates shards from a fixed base_model; the preset asks "
                         "to pretrain one: pass --shards RUN_DIR of a finished run instead")
    run_dir = init_run_dir(config)
    for stage in SYNTHESIS_STAGES:
        rec = STAGE_FUNCTIONS[stage](run_dir, config)
        state = "skipped" if rec.get("skipped") else \
            f"adopted from {rec['adopted_from']}" if rec.get("adopted_from") else \
            f"{rec.get('wall_s', 0):.0f} s"
        print(f"  stage {stage}: {state}", flush=True)
    return run_dir


def resolve_shards(path: Path) -> tuple[Path, Path | None]:
    """(shard dir, run dir or None) from a run directory or a bare shard directory."""
    path = path.resolve()
    if (path / "shards" / "manifest.json").exists():
        return path / "shards", path
    if (path / "manifest.json").exists():
        run = path.parent if (path.parent / "split.parquet").exists() else None
        return path, run
    raise SystemExit(f"--shards {path}: no manifest.json in it or in its shards/ folder; give a "
                     "finished run directory or a finished shard directory")


SYNTHETIC_FIELDS = ("synthetic_as", "synthetic_weight", "synthetic_batch_share",
                    "synthetic_class_balance")


def ssl_config(config, args: argparse.Namespace, seed: int, arm: str):
    """The preset's SSL settings for one seed and arm with this bench's fixed budget.

    The arms without synthetic data get the synthetic fields at their defaults: they do not
    read them, and so a sweep over e.g. ``ssl.synthetic_batch_share`` reuses those arms.
    """
    import dataclasses

    from pipeline.ssl import SSLConfig
    from pipeline.ssl.config import BUDGETS

    fields = config.ssl.trainer_fields(seed)
    if arm != "augmented":
        defaults = {f.name: f.default for f in dataclasses.fields(SSLConfig)}
        fields.update({k: defaults[k] for k in SYNTHETIC_FIELDS})
    if args.budget:
        if args.budget not in BUDGETS:
            raise SystemExit(f"--budget {args.budget!r}: choose one of {', '.join(BUDGETS)}")
        fields.update(BUDGETS[args.budget])
    if args.steps:
        every = max(1, args.steps // 4)
        fields.update(steps=args.steps, eval_every=every, checkpoint_every=every)
    for name in ("batch_size", "mu", "eval_size"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields["device"] = config.resolved_device()
    return SSLConfig.from_dict(fields)


def gain_summary(gains: list[float]) -> dict:
    g = np.asarray(gains, dtype=np.float64)
    std = float(g.std(ddof=1)) if len(g) > 1 else float("nan")
    return {"mean": float(g.mean()), "std": std, "min": float(g.min()), "max": float(g.max()),
            "meets_target": bool(g.mean() >= TARGET_GAIN and len(g) > 1 and g.mean() > std)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_preset_args(p, "fashion-mnist-40labels")
    p.add_argument("--seeds", type=csv_list(int), default=[0, 1, 2], help="training seeds")
    p.add_argument("--arms", type=csv_list(str), default=list(ARMS))
    p.add_argument("--budget", default=None, help="a named budget, e.g. steps-8192")
    p.add_argument("--steps", type=int, default=None, help="explicit step count (overrides "
                   "--budget); evaluates and checkpoints every steps/4")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--mu", type=int, default=None, help="default: the preset's")
    p.add_argument("--eval-size", type=int, default=None,
                   help="test images per learning-curve point (the final figure uses all)")
    p.add_argument("--shards", type=Path, default=None,
                   help="use this run's (or shard folder's) synthetic data instead of generating")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/_bench/ssl_gain/runs"),
                   help="where the shards are generated (pipeline run directories)")
    p.add_argument("--out", type=Path, default=Path("runs/_bench/ssl_gain/arms"))
    p.add_argument("--generate-only", action="store_true",
                   help="make (or check) the synthetic shards, print the run directory, stop")
    args = p.parse_args()
    bad = set(args.arms) - set(ARMS)
    if bad:
        p.error(f"--arms {sorted(bad)}: choose from {', '.join(ARMS)}")
    if not (args.budget or args.steps):
        args.budget = "steps-8192"
    torch.set_num_threads(args.threads)
    from pipeline.shards import verify_shards
    from pipeline.splits import load_split, make_split
    from pipeline.stages import dataset_for

    config = load_bench_config(args, {"runs_dir": str(args.runs_dir.resolve())})
    ds = dataset_for(config)
    needs_shards = "augmented" in args.arms or args.generate_only
    if not needs_shards and args.shards is None:
        shard_dir = run_dir = manifest = None  # real-data arms only: the preset's split
    elif args.shards is None:
        print(f"generating synthetic shards with the pipeline stages ({config.preset}):")
        shard_dir, run_dir = resolve_shards(generate_shards(config))
    else:
        shard_dir, run_dir = resolve_shards(args.shards)
    if shard_dir is not None:
        manifest = verify_shards(shard_dir)
    if args.generate_only:
        print(f"shards ready: {shard_dir} ({manifest['num_rows']} rows); run directory "
              f"{run_dir}: pass it as --shards to train arms in separate processes")
        return
    if run_dir is not None:
        split = load_split(run_dir / "split.parquet")
        split_from = f"{run_dir / 'split.parquet'}"
    else:
        split = make_split(ds.train_labels, config.labels_per_class, config.split_seed,
                           ds.num_classes)
        split_from = (f"preset (labels_per_class {config.labels_per_class}, split_seed "
                      f"{config.split_seed}); WARNING: not checked against the shards' conditions")
    cond_ids = None
    if shard_dir is not None:
        try:
            from pipeline.shards import read_shards

            frame = read_shards(shard_dir, verify=False).frame
            if "condition_id" in frame:
                cond_ids = set(frame["condition_id"].dropna().astype(int).tolist())
        except Exception as e:  # noqa: BLE001 - the check below is advisory only
            print(f"(could not read condition ids: {e})")
    if cond_ids and not cond_ids <= set(split.labeled_idx.tolist()):
        raise SystemExit(f"the shards in {shard_dir} were conditioned on images that are not "
                         "labeled in this split; pass the run directory that made them")

    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    from pipeline.ssl import run_arm

    for seed in args.seeds:
        for arm in args.arms:
            scfg = ssl_config(config, args, seed, arm)
            tag = digest({"ssl": scfg.fingerprint(), "split": split.labeled_idx.tolist(),
                          "shards": [sh["sha256"] for sh in manifest["shards"]]
                          if arm == "augmented" else None})
            out = args.out / arm / f"seed-{seed}-{tag}"
            path = run_arm(arm, ds, split, out, scfg,
                           shard_dir=shard_dir if arm == "augmented" else None,
                           progress=config.progress)
            m = json.loads(path.read_text())
            results[arm][seed] = m
            print(f"  seed {seed} {arm}: error {m['top1_error']:.4f} "
                  f"({m['train_time_s']:.0f} s, {m['steps_per_s']:.2f} steps/s)", flush=True)

    first = next(iter((results.get("augmented") or next(iter(results.values()))).values()))
    n_synth = next(iter(results.get("augmented", {}).values()), {}).get("num_synthetic")
    print(f"\npreset {config.preset}; base {base_model_label(config.base_model)}")
    print(f"{ds.name}, {len(split.labeled_idx)} labels (split: {split_from}); synthetic rows "
          f"{n_synth} from {shard_dir}")
    print(f"net {first['net']}, {first['steps']} steps, batch {first['config']['batch_size']} "
          f"(+{first['config']['mu']}x unlabeled), synthetic_as "
          f"{first['config']['synthetic_as']} (weight {first['config']['synthetic_weight']}, "
          f"batch share {first['config']['synthetic_batch_share']}"
          f"{', class-balanced' if first['config'].get('synthetic_class_balance') else ''}), device {first['device']}, threads {args.threads}; "
          f"test error on all {first['num_test']} test images (EMA weights)")
    rows = []
    for seed in args.seeds:
        row: dict = {"seed": seed}
        for arm in args.arms:
            row[arm] = results[arm][seed]["top1_error"] * 100
        if {"baseline", "augmented"} <= set(args.arms):
            row["gain"] = row["baseline"] - row["augmented"]
        rows.append(row)
    columns = [("seed", "seed", "")] + [(a, f"{a} error %", ".2f") for a in args.arms]
    if rows and "gain" in rows[0]:
        columns.append(("gain", "gain (points)", "+.2f"))
    mean_row = {"seed": "mean"} | {a: float(np.mean([r[a] for r in rows])) for a in args.arms}
    if "gain" in rows[0]:
        mean_row["gain"] = float(np.mean([r["gain"] for r in rows]))
    print(markdown_table([*rows, mean_row], columns))
    if "gain" in rows[0]:
        s = gain_summary([r["gain"] for r in rows])
        print(f"augmented over baseline: mean gain {s['mean']:+.2f} points, std {s['std']:.2f}, "
              f"range {s['min']:+.2f}..{s['max']:+.2f} over {len(rows)} seeds; target (mean >= "
              f"{TARGET_GAIN:g} points and > its std): {'met' if s['meets_target'] else 'not met'}")
    print(f"arm outputs: {args.out.resolve()}")


if __name__ == "__main__":
    main()
