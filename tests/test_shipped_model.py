"""The shipped base models (data/models/fashion-mnist-ddpm-32 and -large) and their model cards.

The first tests load the committed model exactly as a user would, with diffusers' own
classes, and check it against the card; the last ones run the card's code on a tiny model
pretrained in the test, so the measuring code is tested even where the model is absent.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
# The demo's 1.1M model (CPU-sized) and the 6.8M one that fashion-mnist-40labels uses.
SHIPPED = ("fashion-mnist-ddpm-32", "fashion-mnist-ddpm-32-large",
           "fashion-mnist-ddpm-32-disjoint")
MAX_BYTES = 25 * 1000 * 1000
# model -> (KID bound, classes that must hold >= 2% of the samples); default (0.35, 10).
GUARDS = {"fashion-mnist-ddpm-32-disjoint": (0.55, 8)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    """A shipped model directory; skipped only when the model itself is absent."""
    model_dir = MODELS / request.param
    if not (model_dir / "unet" / "diffusion_pytorch_model.safetensors").exists():
        pytest.skip(f"no shipped base model in {model_dir}: train it with the `augment "
                    "pretrain` command in bench/RESULTS.md (Base models)")
    return model_dir


@pytest.fixture(scope="module")
def card(shipped):
    path = shipped / "card.json"
    assert path.exists(), (f"{path} is missing: write the model card with "
                           f"`python -m pipeline.report.model_card {shipped}`")
    return json.loads(path.read_text())


def test_diffusers_loads_and_samples_the_shipped_model(shipped):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    unet = UNet2DModel.from_pretrained(shipped / "unet")
    assert unet.config.in_channels == 1 and unet.config.sample_size == 32
    pipe = DDPMPipeline.from_pretrained(shipped)
    # fp16 on disk: sample in fp32 on CPU, with few DDIM steps from the shipped scheduler.
    ddim = DDIMPipeline(unet=pipe.unet.float(),
                        scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=8, num_inference_steps=10, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (8, 32, 32, 1)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    # The training images were 28x28 padded with black to 32x32: a trained model paints a
    # dark 2-pixel frame around a brighter centre; random weights give grey noise everywhere.
    frame = np.concatenate([images[:, :2].ravel(), images[:, -2:].ravel(),
                            images[:, 2:-2, :2].ravel(), images[:, 2:-2, -2:].ravel()])
    centre = images[:, 8:24, 8:24]
    assert frame.mean() < 0.25, f"frame mean {frame.mean():.2f}: not the padded data's frame"
    assert centre.mean() - frame.mean() > 0.25
    assert images.reshape(8, -1).std(axis=0).mean() > 0.05, "all samples look alike"


def test_card_matches_the_shipped_files(shipped, card):
    from diffusers import UNet2DModel

    weights = shipped / "unet" / "diffusion_pytorch_model.safetensors"
    sha = _sha256(weights)
    assert card["weights_sha256"] == sha, "weights changed since the card was written: rerun " \
        f"`python -m pipeline.report.model_card {shipped} --force`"
    training = json.loads((shipped / "training.json").read_text())
    assert training["weights_sha256"] == sha
    assert weights.stat().st_size <= MAX_BYTES and card["weights_bytes"] == weights.stat().st_size
    unet = UNet2DModel.from_pretrained(shipped / "unet")
    loaded = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    assert set(card["unet_config"]) == set(loaded)
    for key, value in card["unet_config"].items():
        expected = list(loaded[key]) if isinstance(loaded[key], tuple) else loaded[key]
        assert value == expected, f"unet config {key}: card {value!r}, model {expected!r}"
    assert card["weights_dtype"] == "float16"
    assert card["data_sha256"] == training["data_sha256"] and card["data_sha256_verified"]
    assert card["steps"] == training["steps"] and card["command"] == training["command"]


def test_card_readme_states_provenance_and_quality(shipped, card):
    from pipeline.report.model_card_readme import render_readme

    text = (shipped / "README.md").read_text()
    # The README is the Jinja template rendered from card.json, byte for byte (Markdown: no
    # HTML escaping of quotes or '>' in code and tables).
    assert render_readme(card) == text
    for needle in (card["command"], card["git_commit"], card["data_sha256"],
                   card["weights_sha256"], "samples.png", "KID", "Intended use"):
        assert needle in text, f"README.md lacks {needle!r}"
    assert (shipped / "samples.png").exists()
    # The card names the presets that use this model, read from their YAML.
    import yaml

    from pipeline.paths import PRESETS_DIR

    users = [p.stem for p in PRESETS_DIR.glob("*.yaml")
             if yaml.safe_load(p.read_text()).get("base_model") == f"data/models/{shipped.name}"]
    sweeps = [p.name for p in (PRESETS_DIR.parent / "sweeps").glob("*.yaml")
              if (yaml.safe_load(p.read_text()).get("set") or {}).get("base_model")
              == f"data/models/{shipped.name}"]
    from pipeline.config import AugmentConfig

    default = AugmentConfig.model_fields["base_model"].default == f"data/models/{shipped.name}"
    assert users or sweeps or default, f"no preset or sweep uses {shipped.name}: why ship it?"
    if default:
        assert "It is the default `base_model`" in text
    for name in users:
        assert f"`{name}`" in text, f"README.md does not name the {name} preset"
    for name in sweeps:
        assert f"`data/sweeps/{name}`" in text, f"README.md does not name the sweep {name}"
    q = card["quality"]
    assert q["n_samples"] >= 250 and 0.0 <= q["samples"]["confident_share"] <= 1.0
    assert sum(q["samples"]["confident_histogram"]) == \
        round(q["samples"]["confident_share"] * q["n_samples"])
    # Guards against shipping a worse model than the measured ones (KID 0.23 for the 1.1M and
    # 0.09 for the 6.8M model, with a real floor of 0.003; the CPU-trained model they replaced
    # was at 0.88 and the Fashion-MNIST test set is at 1.9 from MNIST digits): the samples stay
    # in the data's feature neighbourhood and the judge's top class spreads over every class.
    # The disjoint base was trained on a CPU, on half the images, for a third of the samples
    # the GPU bases saw (KID 0.47; sandals and sneakers under 1% of its samples): its own,
    # looser guard, so a worse retrain still fails.
    kid_max, classes = GUARDS.get(shipped.name, (0.35, 10))
    assert q["kid"] < kid_max and q["kid_real_train_vs_test"] < 0.05
    top = np.array(q["samples"]["argmax_histogram"])
    assert (top >= 0.02 * q["n_samples"]).sum() >= classes, f"samples miss some classes: {top}"


# --------------------------------------------------------------------------- the card's code


def test_confident_assignments_counts_only_confident_rows():
    from pipeline.report.model_card import confident_assignments

    probs = np.array([[0.95, 0.05, 0.0], [0.5, 0.5, 0.0], [0.0, 0.02, 0.98],
                      [0.0, 0.01, 0.99], [0.91, 0.09, 0.0]])
    out = confident_assignments(probs, 0.9)
    assert out["confident_share"] == pytest.approx(4 / 5)
    assert out["confident_histogram"] == [2, 0, 2]
    assert out["argmax_histogram"] == [3, 0, 2]
    assert out["classes_covered"] == 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_fashion_mnist):
    """A 2-step pretrain of a tiny U-Net on a 600-image slice of Fashion-MNIST's pool."""
    from pipeline.data.datasets import ImageDataset
    from pipeline.data.splits import make_split
    from pipeline.generate.pretrain import PretrainConfig, pretrain

    full = data_fashion_mnist
    ds = ImageDataset("fashion-mnist", full.class_names, full.train_images[:600],
                      full.train_labels[:600], full.test_images[:300], full.test_labels[:300])
    split = make_split(ds.train_labels, 4, 0, ds.num_classes)
    out = tmp_path_factory.mktemp("tiny-base")
    config = PretrainConfig(block_out_channels=(8, 16), attention_levels=(1,),
                            attention_head_dim=8, steps=2, batch_size=8, warmup_steps=1,
                            sample_steps=2, device="cpu")
    pretrain(ds.train_images[split.unlabeled_idx], out, config, progress=False,
             command=f"augment pretrain --dataset fashion-mnist --labels-per-class 4 "
                     f"--split-seed 0 --out {out}",
             source={"dataset": "fashion-mnist", "root": None, "labels_per_class": 4,
                     "split_seed": 0})
    return out, ds


def test_model_card_measures_writes_and_reuses(tiny_model, monkeypatch):
    from pipeline.evaluate.reference import ReferenceConfig, train_reference
    from pipeline.report import model_card
    from pipeline.report.model_card import CardConfig, write_model_card

    model_dir, ds = tiny_model
    ref = train_reference(ds, ReferenceConfig(width=4, epochs=1, batch_size=64), "cpu",
                          progress=False)
    config = CardConfig(num_samples=12, sample_steps=2, sample_batch=5, num_real=40,
                        kid_subsets=3, kid_subset_size=12)
    path = write_model_card(model_dir, config, dataset=ds, reference=ref,
                            features=ref.features, device="cpu", progress=False)
    card = json.loads(path.read_text())
    assert card["weights_sha256"] == _sha256(model_dir / "unet" /
                                             "diffusion_pytorch_model.safetensors")
    assert card["data_sha256_verified"], "the pool hash must be recomputable from the split"
    assert card["weights_dtype"] == "float16" and card["unet_config"]["block_out_channels"] == \
        [8, 16]
    q = card["quality"]
    assert q["n_samples"] == 12 and q["n_real_test"] == 40
    assert np.isfinite(q["kid"]) and np.isfinite(q["kid_real_train_vs_test"])
    assert sum(q["samples"]["argmax_histogram"]) == 12
    assert sum(q["real_test_confident_histogram"]) == \
        round(q["real_test_confident_share"] * 40)
    readme = (model_dir / "README.md").read_text()
    assert card["weights_sha256"] in readme and "augment pretrain" in readme

    # Same weights and settings: the figures are reused, only README.md is rendered again.
    (model_dir / "README.md").unlink()

    def fail(*args, **kwargs):
        raise AssertionError("build_card ran although card.json matched")

    monkeypatch.setattr(model_card, "build_card", fail)
    write_model_card(model_dir, config, dataset=ds, reference=ref, features=ref.features)
    assert (model_dir / "README.md").read_text() == readme
    with pytest.raises(AssertionError, match="build_card ran"):
        write_model_card(model_dir, CardConfig(num_samples=6, sample_steps=2), dataset=ds,
                         reference=ref, features=ref.features)


def test_samples_do_not_depend_on_the_batch_size(tiny_model):
    from pipeline.models import sample_base
    from pipeline.report.model_card import load_pipeline_unet

    unet, scheduler = load_pipeline_unet(tiny_model[0])
    a = sample_base(unet, scheduler, 6, steps=2, seed=3, batch_size=6, shape=(28, 28),
                    progress=False)
    b = sample_base(unet, scheduler, 6, steps=2, seed=3, batch_size=4, shape=(28, 28),
                    progress=False)
    c = sample_base(unet, scheduler, 6, steps=2, seed=4, batch_size=6, shape=(28, 28),
                    progress=False)
    assert a.shape == (6, 28, 28, 1) and a.dtype == np.uint8
    # Batched CPU kernels may round differently: allow one grey level, nothing more.
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_model_card_refuses_an_unfinished_model(tmp_path):
    from pipeline.report.model_card import ModelCardError, build_card

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ModelCardError, match="training.json"):
        build_card(tmp_path)


def test_pretrain_time_limit_stops_early_and_exports(tmp_path, data_fashion_mnist):
    """A zero-second budget trains no step yet still exports a loadable model, saying so."""
    from diffusers import UNet2DModel

    from pipeline.generate.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(block_out_channels=(8, 16), attention_levels=(1,),
                            attention_head_dim=8, steps=50, batch_size=8, warmup_steps=1,
                            sample_steps=2, device="cpu", time_limit_s=0.0)
    out = pretrain(data_fashion_mnist.train_images[:64], tmp_path / "base", config,
                   progress=False)
    record = json.loads((out / "training.json").read_text())
    assert record["stopped_by_time_limit"] is True
    assert record["steps"] == 0 < config.steps
    assert list(UNet2DModel.from_pretrained(out / "unet").config.block_out_channels) == [8, 16]


def test_pretrain_config_reads_exponent_numbers_from_set():
    """`--set lr=2e-4` is the string '2e-4' to YAML 1.1: the --set parser reads it as a float
    (YAML 1.2's rule), and the strict config refuses a number given as text."""
    from pipeline.config import parse_overrides
    from pipeline.generate.pretrain import PretrainConfig

    config = PretrainConfig(**parse_overrides(["lr=2e-4", "steps=10", "time_limit_s=1e2"]))
    assert config.lr == pytest.approx(2e-4) and isinstance(config.lr, float)
    assert config.steps == 10 and config.time_limit_s == pytest.approx(100.0)
    with pytest.raises(ValueError, match=r"lr\n.*valid number"):
        PretrainConfig(lr="fast")
    with pytest.raises(ValueError, match=r"steps\n.*valid integer"):
        PretrainConfig(steps="10")


def test_the_disjoint_base_never_saw_a_task_half_image():
    """fashion-mnist-ddpm-32-disjoint records the base half it was pretrained on; a task-half
    config on it passes pre-flight's overlap check, a whole-set one is refused."""
    from pipeline.config import load_config
    from pipeline.models import PreflightError
    from pipeline.preflight import check_disjoint

    model = MODELS / "fashion-mnist-ddpm-32-disjoint"
    pool = json.loads((model / "training.json").read_text())["pool"]
    assert (pool["half"], pool["half_seed"], pool["dataset"]) == ("base", 0, "fashion-mnist")
    base = str(model)
    assert check_disjoint(load_config("demo", {"base_model": base,
                                               "task_images": "task-half"}), model) == "disjoint"
    with pytest.raises(PreflightError, match="overlap"):
        check_disjoint(load_config("demo", {"base_model": base, "task_images": "all"}), model)

