"""Faithfulness sweep: are synthetic images of their condition's class, and diverse?

For one preset, adapters are tuned and sampled exactly as the stages in ``pipeline/stages/`` do it
(same ANLConfig fields, TuneConfig, per-class seeds, sampling seeds and condition ids), over

    tuning steps x adapter scope x token set     (each combination tunes its adapters once)
    guidance x mask ratio                         (sampling only, on those adapters)

and each cell prints:

* consistency: share of synthetic images the reference classifier (trained on every real
  training label except the validation split's, cached under runs/_cache/reference; its
  test accuracy is printed and must be >= 0.90 for the figure to mean much) assigns to the
  condition's label. The reference reads the unlabeled pool's labels: it is an evaluation
  instrument, and settings chosen with it are chosen with labels a user does not have;
  the SSL figures that decide presets come from bench/ssl_gain.py on the validation split;
* div/real: within-condition diversity (mean pairwise cosine distance of features among the
  samples of one condition image) over the same distance among real images of the class,
  averaged over classes; feature space: the preset's encoder, as in the quality stage;
* nn/real: mean pixel RMSE from a synthetic image to the nearest labeled image of its class,
  over the same for held-out real images; ``copies``: share of synthetic images closer to a
  labeled image than every held-out real image of the class is (near-copies of conditions);
* img/s: sampling throughput (U-Net passes, guidance included; no feature extraction).

Token sets: ``patch`` = the encoder's tokens (7x7 for EfficientNet-Lite0 at 224), ``pooled``
= their mean (one token: a mask ratio below 0.5 masks nothing), ``both`` = pooled + patches.
Guidance 0 is the unconditional control (the null token only): its consistency is chance.

    .venv/bin/python -m bench.faithfulness                       # full grid, for a GPU
    .venv/bin/python -m bench.faithfulness --classes 0,1,5,8 --tune-steps 100 \\
        --scopes shared --token-sets patch,pooled --guidance 0,3 --mask-ratios 0,0.5 \\
        --per-condition 4 --inference-steps 10 --set encoder=efficientnet-lite0@128   # CPU

With ``--set neighbors.per_image=K`` the adapters are also tuned on unlabeled neighbours of
their labeled images, found as the encode stage finds them (``pipeline.generate.neighbors``); the
share of them in the condition's class is printed. ``copies`` still compares with the
labeled images only: looking like an unlabeled image is not copying a condition.

With ``--set filter.method=prototype`` (or ``filter.copy_quantile``) the figures are those
of the samples the shards stage would keep (``pipeline.generate.synthetic_filter``); the consistency
before the filter and the share kept are printed beside them.

Cells (JSON, and a PNG grid: condition images over their first samples) are saved under
--out as they finish; a rerun with the same settings skips them.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    add_preset_args,
    base_fingerprint,
    base_model_label,
    csv_list,
    digest,
    image_grid_png,
    load_bench_config,
    markdown_table,
)
from pipeline.atomic import atomic_write_json
from pipeline.generate.tune import tune_class_adapter
from pipeline.runs import read_json
from pipeline.stages.encode import unlabeled_neighbors
from pipeline.stages.inputs import load_run_base

TOKEN_SETS = ("patch", "pooled", "both")
SCOPES = ("per-class", "shared")
MIN_REFERENCE_ACCURACY = 0.90
TARGETS = {"consistency": 0.80, "div_ratio": 0.90, "copies": 0.0}


def token_set(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, N, D) encoder tokens -> the token set the adapter is conditioned on."""
    if kind == "patch":
        return tokens
    pooled = tokens.mean(dim=1, keepdim=True)
    if kind == "pooled":
        return pooled
    if kind == "both":
        return torch.cat([pooled, tokens], dim=1)
    raise ValueError(f"unknown token set {kind!r}; choose one of {', '.join(TOKEN_SETS)}")


@dataclass
class RealClass:
    """What the synthetic images of one class are measured against."""

    labeled_idx: np.ndarray  # training indices of the class's labeled (condition) images
    diversity: float  # mean pairwise feature distance among held-out real images
    nn_rmse: np.ndarray  # held-out real image -> nearest labeled image of the class


class Sweep:
    """Everything fixed across cells: data, split, tokens, reference, real-image statistics."""

    def __init__(self, config, args: argparse.Namespace):
        from anl_core.encoders import load_encoder
        from pipeline.data.images import nearest_rmse, to_model_space
        from pipeline.data.splits import make_split
        from pipeline.evaluate.quality import encoder_features, mean_pairwise_distance
        from pipeline.evaluate.reference import ReferenceConfig, load_or_train_reference
        from pipeline.generate.synthetic_filter import build_filter
        from pipeline.stages.inputs import dataset_for
        self.config, self.args = config, args
        self.device = config.resolved_device()
        self.progress = config.progress
        self.ds = dataset_for(config)
        # The same split as the pipeline's split stage.
        self.split = make_split(self.ds.train_labels, config.labels_per_class, config.split_seed,
                                self.ds.num_classes, val_per_class=config.validation_per_class)
        self.classes = args.classes or list(range(self.ds.num_classes))
        bad = [c for c in self.classes if not 0 <= c < self.ds.num_classes]
        if bad:
            raise SystemExit(f"--classes {bad}: {self.ds.name} has classes 0..{self.ds.num_classes - 1}")
        self.encoder = load_encoder(config.encoder, device=self.device)
        # The encode stage's tokens: every labeled image, in split order.
        images = to_model_space(self.ds.train_images[self.split.labeled_idx], device=self.device)
        self.tokens = self.encoder.encode(images).cpu()
        # The encode stage's unlabeled neighbours, when the preset tunes on them.
        self.neighbors, self.neighbor_metrics = None, {}
        if config.neighbors.per_image:
            self.neighbors, self.neighbor_metrics = unlabeled_neighbors(
                self.ds, self.split, self.encoder, self.tokens, config, self.device)
        # The shards stage's filter of the samples (keeps everything without one).
        self._keep, self.filter_info = build_filter(config.filter, self.ds, self.split,
                                                    self.encoder, self.tokens, self.device)
        ref_cfg = ReferenceConfig(width=args.reference_width, epochs=args.reference_epochs)
        self.reference = load_or_train_reference(self.ds, args.reference_cache, ref_cfg,
                                                 self.device, self.progress,
                                                 exclude=self.split.val_idx)
        self.features = encoder_features(self.encoder)
        rng = np.random.default_rng(0)
        labeled = set(self.split.labeled_idx.tolist())
        self.real: dict[int, RealClass] = {}
        for c in self.classes:
            held = np.array([i for i in np.flatnonzero(self.ds.train_labels == c)
                             if i not in labeled])
            held = np.sort(rng.choice(held, min(args.real_per_class, len(held)), replace=False))
            lab = self.split.labeled_idx[self.split.labeled_labels == c]
            self.real[c] = RealClass(
                labeled_idx=lab,
                diversity=mean_pairwise_distance(self.features(self.ds.train_images[held])),
                nn_rmse=nearest_rmse(self.ds.train_images[held], self.ds.train_images[lab]))

    # ----------------------------------------------------------------- tuning (the stage's own)

    def load_base(self):

        # run_dir is only read when the config pretrains its own base, which a bench does not.
        if self.config.pretrains_base:
            raise SystemExit("the faithfulness bench needs a preset with a fixed base_model")
        return load_run_base(Path("."), self.config, self.device)

    def tune(self, scope: str, kind: str, steps: int, unet, scheduler) -> dict:
        """{class or None: tuned ANLUNet}: ``tune_class_adapter``, as the tune stage."""
        from pipeline.data.images import to_model_space
        from pipeline.generate.neighbors import tuning_pairs

        cfg = self.config
        labels = torch.as_tensor(self.split.labeled_labels)
        units = [None] if scope == "shared" else self.classes
        models, seconds = {}, 0.0
        for unit in units:
            rows = torch.arange(len(labels)) if unit is None \
                else torch.nonzero(labels == unit).flatten()
            targets, token_rows, weights = tuning_pairs(
                rows, self.neighbors, torch.as_tensor(self.split.labeled_idx),
                cfg.neighbors.self_share)
            images = to_model_space(self.ds.train_images[targets], size=cfg.image_size,
                                    device=self.device)
            tokens = token_set(self.tokens[token_rows], kind)
            encoder_id = self.encoder.encoder_id + ("" if kind == "patch" else f"+{kind}")
            model, result = tune_class_adapter(copy.deepcopy(unet), scheduler, images, tokens,
                                               cfg.adapter.component(), cfg.tuning, unit, encoder_id,
                                               weights=weights,
                                               steps=steps, progress=self.progress)
            seconds += result.seconds
            models[unit] = model
        return {"models": models, "tune_s": seconds, "adapters": len(units),
                "adapter_params": next(iter(models.values())).param_counts()}

    # ----------------------------------------------------------------- sampling + measuring

    def run_cell(self, tuned: dict, scheduler, kind: str, guidance: float, mask: float) -> dict:
        from pipeline.data.images import nearest_rmse
        from pipeline.evaluate.quality import within_group_diversity
        from pipeline.generate.sample import sample_images

        s, a = self.config.sampling, self.args
        labels = self.split.labeled_labels
        per_class, made, sample_s, grid = [], 0, 0.0, []
        for c in self.classes:
            model = tuned["models"][None if None in tuned["models"] else c]
            rows = np.flatnonzero(labels == c)
            cond_ids = self.split.labeled_idx[rows]
            t0 = time.perf_counter()
            images = sample_images(model, scheduler, token_set(self.tokens[rows], kind), cond_ids,
                                   a.per_condition, s, mask_ratio=mask, seed=s.seed,
                                   image_shape=self.ds.image_shape[:2], guidance=guidance,
                                   num_inference_steps=a.inference_steps)
            sample_s += time.perf_counter() - t0
            made += len(images)
            # Grid row: the class's condition images, then the first sample of each condition.
            grid.append((f"{c} real", self.ds.train_images[cond_ids]))
            grid.append((f"{c} synth", images[::a.per_condition]))
            conds = np.repeat(cond_ids, a.per_condition)
            pred = self.reference.predict(images)
            feats = self.features(images)
            real = self.real[c]
            nn = nearest_rmse(images, self.ds.train_images[real.labeled_idx])
            # What the shards stage would keep (all of it without a filter).
            keep = self.keep(images, c)
            raw_consistency = float((pred == c).mean())
            pred, feats, conds, nn = pred[keep], feats[keep], conds[keep], nn[keep]
            within = within_group_diversity(feats, conds) if keep.any() else float("nan")
            per_class.append({
                "class": c, "consistency": float((pred == c).mean()) if keep.any() else 0.0,
                "raw_consistency": raw_consistency, "kept": float(keep.mean()),
                "within_div": within, "real_div": real.diversity,
                "div_ratio": within / real.diversity,
                "nn_rmse": float(nn.mean()) if keep.any() else float("nan"),
                "nn_ratio": float(nn.mean() / real.nn_rmse.mean()) if keep.any() else float("nan"),
                "copies": float((nn < real.nn_rmse.min()).mean()) if keep.any() else float("nan")})
        mean = {k: float(np.nanmean([p[k] for p in per_class]))
                for k in ("consistency", "raw_consistency", "kept", "div_ratio", "nn_ratio",
                          "copies")}
        return {**mean, "images": made, "sample_s": sample_s,
                "img_per_s": made / sample_s if sample_s else None, "per_class": per_class,
                "grid": grid}

    def keep(self, images: np.ndarray, label: int) -> np.ndarray:
        """The shards stage's filter (``filter:``) on one class's samples."""
        return self._keep(images, np.full(len(images), label, np.int64))


def cell_rows(args: argparse.Namespace):
    """Tune groups (steps, scope, token set), each with its (guidance, mask) sampling cells."""
    for steps in args.tune_steps:
        for scope in args.scopes:
            for kind in args.token_sets:
                cells = []
                for g in args.guidance:
                    # Guidance 0 samples from the null token alone: the mask cannot matter.
                    for m in (args.mask_ratios[:1] if g == 0 else args.mask_ratios):
                        cells.append((g, m))
                yield (steps, scope, kind), cells


def meets_targets(row: dict) -> bool:
    return (row["consistency"] >= TARGETS["consistency"]
            and row["div_ratio"] >= TARGETS["div_ratio"] and row["copies"] <= TARGETS["copies"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_preset_args(p, "fashion-mnist-40labels")
    p.add_argument("--tune-steps", type=csv_list(int), default=[250, 1000])
    p.add_argument("--scopes", type=csv_list(str), default=list(SCOPES))
    p.add_argument("--token-sets", type=csv_list(str), default=list(TOKEN_SETS))
    p.add_argument("--guidance", type=csv_list(float), default=[0.0, 1.0, 2.0, 3.0, 5.0])
    p.add_argument("--mask-ratios", type=csv_list(float), default=[0.0, 0.25, 0.5])
    p.add_argument("--classes", type=csv_list(int), default=None, help="default: all")
    p.add_argument("--per-condition", type=int, default=16, help="samples per labeled image")
    p.add_argument("--inference-steps", type=int, default=None,
                   help="DDIM steps (default: the preset's sampling.num_inference_steps)")
    p.add_argument("--real-per-class", type=int, default=500,
                   help="held-out real images per class for diversity and NN distance")
    p.add_argument("--reference-width", type=int, default=16)
    p.add_argument("--reference-epochs", type=int, default=4)
    p.add_argument("--reference-cache", type=Path, default=Path("runs/_cache/reference"))
    p.add_argument("--out", type=Path, default=Path("runs/_bench/faithfulness"),
                   help="cells are saved here; reruns skip finished ones")
    args = p.parse_args()
    for name, allowed in (("scopes", SCOPES), ("token_sets", TOKEN_SETS)):
        bad = set(getattr(args, name)) - set(allowed)
        if bad:
            p.error(f"--{name.replace('_', '-')} {sorted(bad)}: choose from {', '.join(allowed)}")
    if any(not 0 <= m <= 1 for m in args.mask_ratios):
        p.error("--mask-ratios must be in [0, 1]")
    torch.set_num_threads(args.threads)
    config = load_bench_config(args)
    args.inference_steps = args.inference_steps or config.sampling.num_inference_steps

    sweep = Sweep(config, args)
    ref_acc = sweep.reference.test_accuracy
    base = base_model_label(config.base_model)
    print(f"preset {config.preset}; base {base}; encoder {sweep.encoder.encoder_id} "
          f"({sweep.encoder.num_tokens} tokens); device {sweep.device}, threads {args.threads}")
    print(f"classes {sweep.classes}, {config.labels_per_class} labeled/class, "
          f"{args.per_condition} samples/condition, DDIM-{args.inference_steps}, tuning batch "
          f"{config.tuning.batch_size}, lr {config.tuning.lr}, "
          f"train_mask_ratio {config.tuning.train_mask_ratio}, "
          f"cond_dropout {config.tuning.cond_dropout}")
    if sweep.neighbor_metrics:
        m = sweep.neighbor_metrics
        print(f"unlabeled neighbours: {config.neighbors.per_image} per labeled image from a pool "
              f"of {m['neighbor_pool']}, {m['neighbors']} found, {m['neighbor_purity']:.3f} of "
              f"them of the condition's class; self_share {config.neighbors.self_share}")
    if config.filter.enabled:
        print(f"filter: {sweep.filter_info} ({config.filter.model_dump()}); the figures are those "
              "of the samples it keeps")
    print(f"reference classifier: test accuracy {ref_acc:.4f} ({sweep.reference.path})"
          + ("" if ref_acc >= MIN_REFERENCE_ACCURACY else
             f"  WARNING: below {MIN_REFERENCE_ACCURACY}; raise --reference-epochs/-width"))

    # Everything a cell's result depends on besides its own parameters.
    dump = config.model_dump(mode="json", exclude={"progress", "device", "preset"})
    if not config.filter.enabled:
        dump.pop("filter")  # cells measured before the filter existed stay valid
    else:  # a cell depends on the filter's code too: a change to it must not reuse old cells
        import pipeline.generate.synthetic_filter as filter_module

        dump["filter_code"] = digest(Path(filter_module.__file__).read_text())
    fixed = {"config": dump,
             "base": base_fingerprint(config.base_model), "classes": sweep.classes, "per_condition": args.per_condition,
             "inference_steps": args.inference_steps, "real_per_class": args.real_per_class,
             "reference": str(sweep.reference.path)}
    rows = []
    unet = scheduler = None
    for (steps, scope, kind), cells in cell_rows(args):
        keys = {cell: digest({**fixed, "steps": steps, "scope": scope, "tokens": kind,
                              "guidance": cell[0], "mask": cell[1]}) for cell in cells}
        done = {cell: read_json(args.out / "cells" / f"{k}.json") for cell, k in keys.items()}
        tuned = None
        for (g, m), key in keys.items():
            row = done[(g, m)]
            if row is None:
                if tuned is None:
                    if unet is None:
                        unet, scheduler = sweep.load_base()
                    tuned = sweep.tune(scope, kind, steps, unet, scheduler)
                row = {"steps": steps, "scope": scope, "tokens": kind, "guidance": g, "mask": m,
                       "tune_s": tuned["tune_s"], "adapters": tuned["adapters"],
                       "adapter_params": tuned["adapter_params"].get("adapter"),
                       **sweep.run_cell(tuned, scheduler, kind, g, m)}
                image_grid_png(row.pop("grid"), args.out / "grids" / f"{key}.png",
                               f"steps {steps}, {scope}, {kind} tokens, guidance {g:g}, "
                               f"mask {m:g}")
                row["grid"] = f"grids/{key}.png"
                atomic_write_json(args.out / "cells" / f"{key}.json", row)
            row["ok"] = "yes" if meets_targets(row) else ""
            rows.append(row)
            if not config.progress:
                continue
            print(f"  done: steps {steps} {scope} {kind} g={g:g} m={m:g}: consistency "
                  f"{row['consistency']:.3f}, div/real {row['div_ratio']:.3f}", flush=True)

    columns = [("steps", "tune steps", ""), ("scope", "scope", ""), ("tokens", "tokens", ""),
               ("guidance", "guidance", "g"), ("mask", "mask", "g"),
               ("consistency", "consistency", ".3f"),
               *([("raw_consistency", "before filter", ".3f"), ("kept", "kept", ".2f")]
                 if config.filter.enabled else []),
               ("div_ratio", "div/real", ".3f"),
               ("nn_ratio", "nn/real", ".3f"), ("copies", "copies", ".3f"),
               ("img_per_s", "img/s", ".1f"), ("tune_s", "tune s", ".0f"),
               ("ok", "meets targets", "")]
    print()
    print(markdown_table(rows, columns))
    best = max(rows, key=lambda r: (meets_targets(r), r["consistency"]))
    per_class = [{"class": pc["class"], **{k: pc[k] for k in ("consistency", "div_ratio",
                                                              "nn_ratio", "copies")}}
                 for pc in best["per_class"]]
    print(f"\nbest cell: steps {best['steps']}, {best['scope']}, {best['tokens']} tokens, "
          f"guidance {best['guidance']:g}, mask {best['mask']:g}: consistency "
          f"{best['consistency']:.3f}, div/real {best['div_ratio']:.3f}, copies "
          f"{best['copies']:.3f} ({'meets' if meets_targets(best) else 'misses'} the targets: "
          f"consistency >= {TARGETS['consistency']}, div/real >= {TARGETS['div_ratio']}, "
          f"no copies)")
    print(f"per class, best cell (grid: {args.out / best.get('grid', '')}):")
    print(markdown_table(per_class, [("class", "class", ""), ("consistency", "consistency", ".3f"),
                                     ("div_ratio", "div/real", ".3f"),
                                     ("nn_ratio", "nn/real", ".3f"), ("copies", "copies", ".3f")]))
    atomic_write_json(args.out / "summary.json",
                      {"fixed": fixed, "reference_accuracy": ref_acc,
                       "neighbors": sweep.neighbor_metrics, "filter": sweep.filter_info,
                       "rows": [{k: v for k, v in r.items() if k != "per_class"} for r in rows],
                       "best": {k: v for k, v in best.items() if k != "per_class"}})
    print(f"cells and summary.json: {args.out}")


if __name__ == "__main__":
    main()
