"""Masked sampling: DDIMPipeline parity, seeding independent of batching, diversity vs mask."""

import copy

import pytest
import torch
from diffusers import DDIMPipeline, DDPMScheduler, EulerDiscreteScheduler

from anl_core.inject import ANLConfig, attach_anl
from anl_core.sampling import MASK_STREAM, image_generators, masked_sample

pytestmark = pytest.mark.usefixtures("anl_single_thread")  # tiny models: 1 thread is faster


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_zero_adapter_with_guidance_one_matches_ddim_pipeline(anl_unet_factory, eta):
    unet = anl_unet_factory(seed=3)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = attach_anl(unet, ANLConfig(token_dim=8, num_tokens=4, context_dim=16, head_dim=8))
    tokens = torch.randn(1, 4, 8)
    ours = masked_sample(model, scheduler, tokens, num_per_condition=3, mask_ratio=0.5,
                         guidance=1.0, num_inference_steps=8, seed=11, eta=eta, progress=False)
    # DDIMPipeline draws image j's initial (and per-step) noise from generator j when given a
    # list; ours seeds image j of condition 0 from image_generators(seed, 0, j): same draws.
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=3, generator=image_generators(11, 0, range(3)), eta=eta,
               num_inference_steps=8, output_type="pt").images  # (B, C, H, W) in [0, 1]
    ours01 = (ours / 2 + 0.5).clamp(0, 1)
    assert ours01.shape == ref.shape
    assert (ours01 - ref).abs().max().item() < 1e-4


def test_images_do_not_depend_on_batch_size_or_other_conditions(anl_tuned):
    m, s, tok = anl_tuned["model"], anl_tuned["scheduler"], anl_tuned["tokens"]
    kw = {"num_per_condition": 3, "mask_ratio": 0.5, "guidance": 2.0, "num_inference_steps": 5,
          "seed": 4, "progress": False}
    full = masked_sample(m, s, tok[:2], batch_size=6, **kw)
    assert full.shape == (6, 1, 8, 8)
    torch.testing.assert_close(masked_sample(m, s, tok[:2], batch_size=4, **kw), full,
                               atol=1e-5, rtol=1e-5)
    alone = masked_sample(m, s, tok[1:2], condition_ids=[1], batch_size=2, **kw)
    torch.testing.assert_close(alone, full[3:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], full[1])  # fresh noise and mask per sample


def test_full_mask_or_zero_guidance_is_unconditional(anl_tuned):
    m, s, tok = anl_tuned["model"], anl_tuned["scheduler"], anl_tuned["tokens"]
    kw = {"num_per_condition": 2, "num_inference_steps": 5, "seed": 1, "progress": False}
    a = masked_sample(m, s, tok[:2], mask_ratio=1.0, guidance=3.0, **kw)
    b = masked_sample(m, s, tok[2:], mask_ratio=0.2, guidance=0.0, **kw)
    c = masked_sample(m, s, tok[:2], mask_ratio=0.0, guidance=1.0, **kw)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - c).abs().max() > 1e-2  # the tuned adapter really is conditional


def _mean_pairwise_distance(samples, k):
    s = samples.reshape(-1, k, samples[0].numel())
    d = torch.cdist(s, s)
    return (d.sum((1, 2)) / (k * (k - 1))).mean().item()


def test_higher_mask_ratio_gives_more_diverse_samples(anl_tuned):
    m, s, tok = anl_tuned["model"], anl_tuned["scheduler"], anl_tuned["tokens"]
    div = {r: _mean_pairwise_distance(
        masked_sample(m, s, tok, num_per_condition=6, mask_ratio=r, guidance=2.0,
                      num_inference_steps=10, seed=0, batch_size=24, progress=False), 6)
        for r in (0.0, 0.5, 1.0)}
    assert div[0.0] < div[0.5] < div[1.0], div
    assert div[1.0] > 1.1 * div[0.0], div


def _reference_sample(model, scheduler, tokens, k, mask_ratio, guidance, steps, seed):
    """The diffusers pipeline loop written out for one condition: set the timesteps, scale
    noise from image_generators by init_noise_sigma, and at each step mix a conditional pass
    (a ``mask_ratio`` share of tokens swapped for the null token, the mask drawn by a
    randperm from the image's mask-stream generator) with a null pass by the guidance."""
    shape = (k, model.unet.config.in_channels, 8, 8)
    gens = image_generators(seed, 0, range(k))
    scheduler.set_timesteps(steps)
    x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])
    x = x * scheduler.init_noise_sigma
    n = tokens.shape[1]
    masks = torch.zeros(k, n, dtype=torch.bool)
    for j, g in enumerate(image_generators(seed, 0, range(k), stream=MASK_STREAM)):
        masks[j, torch.randperm(n, generator=g)[:round(mask_ratio * n)]] = True
    cond = model.context(tokens.expand(k, -1, -1), masks)
    null = model.context(None, batch_size=k)
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            e_c, e_n = model(inp, t, context=cond), model(inp, t, context=null)
            x = scheduler.step(e_n + guidance * (e_c - e_n), t, x, generator=gens).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_any_diffusers_scheduler_is_accepted(anl_tuned, spacing):
    # ddim=False samples with the scheduler as given: image for image what the diffusers
    # loop with that scheduler gives, guidance and masks included. "leading" spacing starts
    # below the top training sigma, so the initial noise must be scaled after set_timesteps.
    m, tok = anl_tuned["model"], anl_tuned["tokens"]
    cfg = anl_tuned["scheduler"].config
    euler = EulerDiscreteScheduler.from_config(cfg, timestep_spacing=spacing)
    assert euler.config.timestep_spacing == spacing
    kw = {"num_per_condition": 2, "mask_ratio": 0.5, "num_inference_steps": 6, "seed": 7,
          "ddim": False, "progress": False}
    out = masked_sample(m, euler, tok[:1], guidance=1.5, **kw)
    ref = _reference_sample(m, copy.deepcopy(euler), tok[:1], 2, 0.5, 1.5, 6, 7)
    assert out.shape == (2, 1, 8, 8)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # The guidance scale reaches the images: a stronger one moves them.
    assert (masked_sample(m, euler, tok[:1], guidance=3.0, **kw) - out).abs().max() > 1e-2


def _counting_backend():
    """A torch.compile backend that counts the graphs it is given (one per compile)."""
    import torch._dynamo

    torch._dynamo.reset()
    built = []

    def counting_backend(gm, example_inputs):
        built.append(gm)
        return gm.forward  # run the captured graph as is (aot_eager-like, no codegen)

    return built, counting_backend


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_compiled_sampling_matches_eager_and_compiles_once(anl_tuned, guidance):
    """The compiled step: the same images as eager (a padded last batch included), one
    graph for every later call on the model, however many conditions a call has."""
    m, s, tok = copy.deepcopy(anl_tuned["model"]), anl_tuned["scheduler"], anl_tuned["tokens"]
    kw = {"num_per_condition": 3, "mask_ratio": 0.5, "guidance": guidance,
          "num_inference_steps": 4, "seed": 4, "batch_size": 4, "progress": False}
    built, backend = _counting_backend()
    eager = masked_sample(m, s, tok[:3], **kw)  # 9 images: batches of 4, 4 and a padded 1
    compiled = masked_sample(m, s, tok[:3], compile=backend, **kw)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert len(built) == 1
    alone = masked_sample(m, s, tok[1:2], condition_ids=[1], compile=backend, **kw)
    torch.testing.assert_close(alone, eager[3:6], atol=1e-5, rtol=1e-5)
    assert len(built) == 1  # no recompile for a call with another number of conditions


@pytest.mark.slow
def test_inductor_compiled_sampling_matches_eager(anl_tuned):
    """The real compiler the GPU runs use (inductor; about a minute to compile on 2 cores)."""
    m, s, tok = copy.deepcopy(anl_tuned["model"]), anl_tuned["scheduler"], anl_tuned["tokens"]
    kw = {"num_per_condition": 3, "mask_ratio": 0.5, "guidance": 2.0,
          "num_inference_steps": 4, "seed": 4, "batch_size": 4, "progress": False}
    eager = masked_sample(m, s, tok[:3], **kw)
    torch.testing.assert_close(masked_sample(m, s, tok[:3], compile=True, **kw), eager,
                               atol=1e-4, rtol=1e-4)
