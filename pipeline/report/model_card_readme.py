"""The model card's README.md, rendered from card.json's content alone.

:mod:`pipeline.report.model_card` measures a base model and writes card.json; this module
only reads that record (and the shipped presets and sweep specs, to say which use the model),
so a card's README can be rendered again without the model, the data or a GPU. The page's
layout is the template ``pipeline/report/templates/model_card.md.j2``; its numbers are
written with :mod:`pipeline.report.render`'s formats, like every other report.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.paths import SWEEPS_DIR
from pipeline.report.render import duration, md_table, pct_or, render

MISSING = "n/a"  # how the card writes a figure it does not have


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    # The template puts the blank lines around a table itself.
    return md_table(rows, header).rstrip("\n")


def render_readme(card: dict) -> str:
    """The model card as Markdown (Hugging Face style front matter), from card.json's content."""
    q, s = card["quality"], card["quality"]["samples"]
    cfg, ucfg = card["card_config"], card["unet_config"]
    names = card["class_names"]
    real_hist, top = q["real_test_confident_histogram"], s["argmax_histogram"]
    per_class = _table(("class", "samples, confident", "samples, top class",
                        "real test images, confident"),
                       [(f"{c} {names[c]}", s["confident_histogram"][c], top[c], real_hist[c])
                        for c in range(len(names))])
    commit_when = "at training" if card.get("git_commit_source") == "training" else \
        "of the code when this card was written"
    unet_json = json.dumps(ucfg, indent=2, sort_keys=True)
    verified = "recomputed from the dataset and the split: " + (
        "matches" if card["data_sha256_verified"] else "**does not match** (data changed?)")
    budget = (
        "It was trained on a CPU for a short budget: its samples are blotchier, brighter and "
        "less varied than a converged model's (compare the KID, the confident share and the "
        "mean intensity with the real-image column). Retrain it with the same command on a "
        "GPU with more steps (`--set steps=...`) for better quality."
        if str(card["device"]).startswith("cpu") else
        f"It was trained for {card['steps']:,} steps only: compare the KID with its floor; "
        "more steps (`--set steps=...`) give a better model.")
    pc = card["pretrain_config"]
    retrain = (
        f"Training stopped at its wall-clock budget (`time_limit_s`) after {card['steps']:,} of "
        f"the {pc['steps']:,} scheduled steps, so the cosine learning-rate schedule had not "
        "decayed; the same command on other hardware stops at another step. Drop "
        "`time_limit_s` (or raise it) for a longer, reproducible run; on a GPU it trains in bf16."
        if card.get("stopped_by_time_limit") else
        "The same command retrains it (same seed, same data); on a GPU it also trains in bf16. "
        "Pass `--set steps=...` for a longer run.")
    made = _table(("", ""), [
        ("command", f"`{card['command']}`"),
        ("code", f"git commit `{card['git_commit']}` ({commit_when})"),
        ("data", (f"{_pool_sentence(card)}: {card['num_images']:,} images, no labels, no "
                  "test images")),
        ("data sha256", f"`{card['data_sha256']}` ({verified})"),
        ("training", (f"{card['steps']:,} steps, batch {pc['batch_size']}, AdamW lr {pc['lr']}, "
                      f"{pc['beta_schedule']} betas, {pc['num_train_timesteps']} timesteps, "
                      f"EMA (max decay {pc['ema_max_decay']}), random flips")),
        ("final loss", (f"{card['final_loss']:.4f} (mean noise-prediction MSE over the last "
                        "200 steps)")),
        ("wall time", (f"{duration(card['wall_s'], MISSING)} "
                       f"({card['steps_per_s'] or MISSING} steps/s)")),
        ("device", card["device"]),
        ("weights", (f"`unet/diffusion_pytorch_model.safetensors`, "
                     f"{card['weights_bytes'] / 1e6:.1f} MB, sha256 `{card['weights_sha256']}`")),
    ])
    figures = _table(("figure", "samples", "real images (the floor)"), [
        (f"KID x 100 on `{q['feature_space']}` pooled features",
         f"{100 * q['kid']:.2f} +- {100 * q['kid_std']:.2f}",
         (f"{100 * q['kid_real_train_vs_test']:.2f} +- "
          f"{100 * q['kid_real_train_vs_test_std']:.2f} (training images)")),
        (f"assigned to a class with probability > {cfg['confidence']}",
         pct_or(s["confident_share"], MISSING, 1),
         f"{pct_or(q['real_test_confident_share'], MISSING, 1)} (test images)"),
        ("classes covered (>= a fifth of a uniform share of those)",
         f"{s['classes_covered']} of {len(names)}", ""),
        ("mean pixel intensity (0..1)", f"{q.get('mean_intensity', float('nan')):.3f}",
         f"{q.get('real_test_mean_intensity', float('nan')):.3f} (test images)"),
    ])
    return render("model_card.md.j2", card=card, q=q, cfg=cfg, ucfg=ucfg, made=made,
                  retrain=retrain, figures=figures, per_class=per_class, unet_json=unet_json,
                  budget=budget, used_by=_used_by(card["location"]),
                  trained_on=("on the base half of " if (card.get("pool") or {}).get("half")
                              else "on the unlabeled pool of ") + card["dataset"],
                  reference_accuracy=pct_or(q["reference_test_accuracy"], MISSING, 1)) + "\n"


def _pool_sentence(card: dict) -> str:
    """Which training images the model saw, from the card's pool record (cards written
    before halves existed carry labels_per_class and split_seed at the top)."""
    pool = card.get("pool") or {k: card[k] for k in ("labels_per_class", "split_seed")}
    if pool.get("half"):
        return (f"the {pool['half']} half of {card['dataset']}'s training images (class-"
                f"stratified, half_seed {pool['half_seed']}); presets with `task_images: "
                f"task-half` and that half_seed draw labels, pool and validation from the "
                "other half only")
    return (f"{card['dataset']} training images minus the {pool['labels_per_class']}-per-class "
            f"labeled split (seed {pool['split_seed']})")


def _used_by(location: str) -> str:
    """A sentence naming the presets and sweep specs whose base_model is this folder."""
    from pipeline.config import ConfigError, available_presets, load_config
    from pipeline.paths import resolve_path

    here = resolve_path(location).resolve()
    names = []
    for name in available_presets():
        try:
            config = load_config(name)
        except ConfigError:
            continue
        if not config.pretrains_base and resolve_path(config.base_model).resolve() == here:
            names.append(f"`{name}`")
    sweeps = sorted(f"`data/sweeps/{p.name}`" for p in SWEEPS_DIR.glob("*.yaml")
                    if _sweep_base(p) is not None and resolve_path(_sweep_base(p)).resolve()
                    == here)
    said = []
    if names:
        presets = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        said.append(f"It is the base model of the {presets} preset{'s' if len(names) > 1 else ''}.")
    if sweeps:
        said.append(f"The sweep {' and '.join(sweeps)} uses it.")
    from pipeline.config import AugmentConfig

    if resolve_path(AugmentConfig.model_fields["base_model"].default).resolve() == here:
        said.append("It is the default `base_model`: `augment init` and a preset of one's own "
                    "use it unless they name another.")
    return " ".join(said) or "No shipped preset uses it as its base model."


def _sweep_base(path: Path) -> str | None:
    import yaml

    spec = yaml.safe_load(path.read_text()) or {}
    return (spec.get("set") or {}).get("base_model")
