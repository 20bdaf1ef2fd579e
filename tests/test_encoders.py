"""Condition encoders: a tiny in-process CLIP, and EfficientNet-Lite0 with its real weights."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anl_core.encoders import EncoderError, load_encoder


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8,
                              projection_dim=24)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_tokens_are_patches_plus_image_embedding(tiny_clip_dir):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    enc = load_encoder(str(tiny_clip_dir), device="cpu")
    assert (enc.num_tokens, enc.token_dim) == (17, 24)  # 4x4 patches + 1 embedding, projected
    imgs = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = enc.encode(imgs)
    assert tokens.shape == (3, 17, 24) and tokens.dtype == torch.float32

    # Same pixels as the reference processor (no resize at native size) -> same image embedding.
    uint8 = ((imgs + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    proc = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    pixels = proc(images=list(uint8.numpy()), return_tensors="pt")["pixel_values"]
    ref = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        want = ref(pixel_values=pixels).image_embeds
    got = enc.encode(uint8.permute(0, 3, 1, 2).float() / 127.5 - 1)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_clip_handles_grey_any_size_and_batches_consistently(tiny_clip_dir):
    enc = load_encoder(f"clip:{tiny_clip_dir}", device="cpu")
    assert enc.encoder_id == f"clip:{tiny_clip_dir}"
    grey = torch.rand(5, 1, 28, 20) * 2 - 1
    whole = enc.encode(grey, batch_size=5)
    parts = enc.encode(grey, batch_size=2)
    assert whole.shape == (5, 17, 24)
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[0], whole[1])
    # grey == the same image repeated on three channels
    torch.testing.assert_close(whole, enc.encode(grey.expand(-1, 3, -1, -1)))


def test_unknown_or_missing_encoders_fail_clearly(tmp_path):
    with pytest.raises(EncoderError, match="unknown encoder"):
        load_encoder("resnet-9000")
    with pytest.raises(EncoderError, match="could not load CLIP"):
        load_encoder(f"clip:{tmp_path}")
    with pytest.raises(EncoderError, match=r"expected images \(B, 1 or 3"):
        load_encoder("efficientnet-lite0@64", device="cpu").encode(torch.zeros(2, 4, 8, 8))


def _imagenet_samples(count):
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.fail("foolbox (dev dependency) ships the ImageNet sample images: pip install -e .[dev]")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    return files[:count]


def test_efficientnet_real_weights_recognise_imagenet_images():
    enc = load_encoder("efficientnet-lite0", device="cpu")
    assert (enc.encoder_id, enc.num_tokens, enc.token_dim) == ("efficientnet-lite0", 49, 1280)
    hits = 0
    files = _imagenet_samples(10)
    for f in files:
        img = np.array(Image.open(f).convert("RGB"))
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        tokens = enc.encode(x)
        # The packaged classifier head on the mean token checks weights + preprocessing.
        logits = enc.net._fc(tokens.mean(1))
        hits += int(f.stem.split("_")[2]) in logits.topk(5).indices[0].tolist()
    assert hits >= 8, f"only {hits}/{len(files)} ImageNet samples in the top 5"


def test_efficientnet_smaller_input_grey_any_size():
    enc = load_encoder("efficientnet-lite0@128", device="cpu")
    assert (enc.encoder_id, enc.num_tokens) == ("efficientnet-lite0@128", 16)
    tokens = enc.encode(torch.rand(3, 1, 28, 28) * 2 - 1)
    assert tokens.shape == (3, 16, 1280) and torch.isfinite(tokens).all()
    assert tokens.std(dim=0).mean() > 0  # different images, different tokens
