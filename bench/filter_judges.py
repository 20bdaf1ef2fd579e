"""How well does a filter separate right-class from wrong-class synthetic samples?

For finished runs (their ``samples/`` before any filter), prints per judge the share of
samples it keeps, its precision (share of kept samples that the reference classifier, trained
on every real label, assigns to their condition's class) and its recall (share of those
right-class samples it keeps). Judges:

* ``prototype``: the shards stage's test (``pipeline.generate.synthetic_filter``), in encoder space;
* ``run filter``: the run's own ``filter:`` (e.g. prototype + copies);
* ``spread``: scikit-learn label spreading (kNN graph) from the 40 labeled images over
  ``--pool`` real unlabeled images, in the same encoder space; a sample is kept when its
  spread label is its condition's;
* ``spread+pixels``: the same on encoder features concatenated with pixel vectors.

Each judge's accuracy on held-out real images (the run's validation split; test images for runs
without one) is printed too: it bounds how well it can judge.
Only the labeled images' labels are read by the judges.

    python -m bench.filter_judges runs/_bench/ssl_gain/runs/demo-266bdd04 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench.common import markdown_table
from pipeline.stages.inputs import load_tokens
from pipeline.stages.sample import sample_parts


def unit_encoder_features(encoder):
    """Pooled encoder tokens as unit vectors: the space the filter's prototype test uses."""
    from pipeline.evaluate.quality import encoder_features

    pooled = encoder_features(encoder)
    return lambda images: torch.nn.functional.normalize(
        torch.from_numpy(pooled(images)), dim=1).numpy()


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Centred unit vectors of the pixels: the space a pixel kNN classifier works in."""
    v = images.reshape(len(images), -1).astype(np.float32) / 255.0
    v -= v.mean(axis=1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)


def spreading(labeled: np.ndarray, labels: np.ndarray, pool: np.ndarray, k: int):
    from sklearn.semi_supervised import LabelSpreading

    x = np.concatenate([labeled, pool])
    y = np.concatenate([labels, np.full(len(pool), -1)])
    return LabelSpreading(kernel="knn", n_neighbors=k, alpha=0.8, max_iter=200).fit(x, y)


def judge_run(run: Path, args: argparse.Namespace) -> list[dict]:
    from anl_core.encoders import load_encoder
    from pipeline.evaluate.reference import ReferenceConfig, load_or_train_reference
    from pipeline.generate.neighbors import class_similarity, neighbor_pool
    from pipeline.generate.synthetic_filter import build_filter, keep_mask, prototype_margin
    from pipeline.runs import load_run_config
    from pipeline.stages.inputs import dataset_for, split_for
    config = load_run_config(run)
    ds, split, tok = dataset_for(config), split_for(run), load_tokens(run)
    parts = [np.load(p) for _, p in sample_parts(run, config)]
    images = np.concatenate([p["images"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    ref = load_or_train_reference(ds, args.reference_cache,
                                  ReferenceConfig(width=args.reference_width,
                                                  epochs=args.reference_epochs),
                                  exclude=split.val_idx)
    right = ref.predict(images) == labels
    encoder = load_encoder(config.encoder, device="cpu")
    if encoder.encoder_id != tok["encoder_id"]:
        raise SystemExit(f"{run}: tokens by {tok['encoder_id']}, config names {encoder.encoder_id}")
    # Judges are compared (a choice) on the run's validation images when it has them.
    if len(split.val_idx):
        pick = np.random.default_rng(0).permutation(split.val_idx)[:args.test_size]
        held_images, test_labels = ds.train_images[pick], ds.train_labels[pick]
    else:
        pick = np.random.default_rng(0).choice(len(ds.test_labels), args.test_size, replace=False)
        held_images, test_labels = ds.test_images[pick], ds.test_labels[pick]
    pool = ds.train_images[neighbor_pool(split.unlabeled_idx, args.pool, 0)]
    lab_imgs, lab_labels = ds.train_images[split.labeled_idx], split.labeled_labels
    feats = {name: (fn(lab_imgs), fn(pool), fn(images), fn(held_images))
             for name, fn in (("enc", unit_encoder_features(encoder)), ("pix", pixel_features))}

    judges: dict[str, tuple[np.ndarray, float | None]] = {}
    lab_t = torch.as_tensor(lab_labels)
    enc_lab, _, enc_syn, enc_test = (torch.as_tensor(a) for a in feats["enc"])
    margin = prototype_margin(enc_lab, lab_t, enc_syn, torch.as_tensor(labels))
    classes, sim = class_similarity(enc_lab @ enc_test.T, lab_t)
    judges["prototype"] = (keep_mask(margin, 0.0),
                           float((classes[sim.argmax(0)].numpy() == test_labels).mean()))
    keep, _ = build_filter(config.filter, ds, split, encoder, tok["tokens"], "cpu")
    judges[f"run filter ({config.filter.method}, copies {config.filter.copy_quantile})"] = \
        (keep(images, labels), None)
    concat = tuple(np.concatenate([e, p], axis=1) / np.sqrt(2)
                   for e, p in zip(feats["enc"], feats["pix"], strict=True))
    for name, (lab, pl, syn, te) in (("spread", feats["enc"]), ("spread+pixels", concat)):
        model = spreading(lab, lab_labels, pl, args.k)
        judges[name] = (model.predict(syn) == labels, float((model.predict(te) == test_labels).mean()))

    rows = []
    for name, (kept, acc) in judges.items():
        rows.append({"run": run.name, "judge": name, "test_acc": acc, "kept": kept.mean(),
                     "precision": right[kept].mean() if kept.any() else float("nan"),
                     "recall": kept[right].mean() if right.any() else float("nan")})
    print(f"{run.name}: {len(labels)} samples, {right.mean():.3f} of them of their "
          f"condition's class (reference test accuracy {ref.test_accuracy:.3f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories (with samples/)")
    p.add_argument("--pool", type=int, default=5000, help="unlabeled images to spread over")
    p.add_argument("--k", type=int, default=20, help="neighbours in the spreading graph")
    p.add_argument("--test-size", type=int, default=2000, help="held-out images for judge accuracy")
    p.add_argument("--reference-width", type=int, default=16)
    p.add_argument("--reference-epochs", type=int, default=4)
    p.add_argument("--reference-cache", type=Path, default=Path("runs/_cache/reference"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for run in args.runs for r in judge_run(run.resolve(), args)]
    print(markdown_table(rows, [("run", "run", "s"), ("judge", "judge", "s"),
                                ("test_acc", "accuracy on held-out real", ".3f"),
                                ("kept", "kept", ".3f"), ("precision", "precision", ".3f"),
                                ("recall", "recall", ".3f")]))


if __name__ == "__main__":
    main()
