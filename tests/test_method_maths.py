"""The method's arithmetic, each against a value computed another way, so a slip in the code
cannot also be a slip in its test.

Guidance and scheduler handling in masked sampling (a hand loop that calls the model and the
scheduler itself), FixMatch's unlabeled term and mask, the label weights of the labeled loss,
and KID (an independent unbiased-MMD computation). Tiny models and arrays: seconds on CPU.
"""

from __future__ import annotations

import copy
import math
import typing

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from torch_helpers import FixedLogits, anl_make_unet, anl_one_thread

from anl_core.inject import ANLConfig, attach_anl
from anl_core.sampling import image_seed, masked_sample


@pytest.fixture(autouse=True)
def _one_thread():
    with anl_one_thread():
        yield


# --------------------------------------------------------------------------- masked sampling


def _conditional_model(seed: int = 0):
    """A tiny base with an adapter whose zero-initialised output layers are perturbed, so the
    conditional and the null prediction differ."""
    model = attach_anl(anl_make_unet(seed=3), ANLConfig(token_dim=8, num_tokens=4,
                                                        context_dim=16, head_dim=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.adapter.blocks.values():
            for layer in (block.to_out, block.ff.proj_out):
                layer.weight.copy_(0.3 * torch.randn(layer.weight.shape, generator=gen))
    return model.eval()


def _hand_sample(model, scheduler, tokens, k, guidance, steps, seed, scale=True,
                 combine=None, step_kwargs=None):
    """masked_sample with mask_ratio 0, written out: every image's noise from its own
    generator, a separate conditional and null model call per step, the guidance mix, and the
    scheduler's own scale_model_input and step."""
    sched = copy.deepcopy(scheduler)
    gens = [torch.Generator().manual_seed(image_seed(seed, i, j))
            for i in range(len(tokens)) for j in range(k)]
    x = torch.cat([torch.randn((1, 1, 8, 8), generator=g) for g in gens])
    x = x * sched.init_noise_sigma
    cond = model.context(tokens.repeat_interleave(k, dim=0))  # mask ratio 0: nothing masked
    null = model.context(None, batch_size=len(x))
    combine = combine or (lambda c, n: n + guidance * (c - n))
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if scale else x
            eps = combine(model(inp, t, context=cond), model(inp, t, context=null))
            x = sched.step(eps, t, x, generator=gens, **(step_kwargs or {})).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("guidance", [2.0, 3.0])
def test_guided_ddim_step_mixes_null_plus_scaled_difference(guidance):
    model = _conditional_model()
    base = DDPMScheduler(num_train_timesteps=1000)
    tokens = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5))
    x0 = torch.zeros(1, 1, 8, 8)
    t = torch.tensor(500)
    with torch.no_grad():
        c, n = (model(x0, t, context=model.context(tokens[:1])),
                model(x0, t, context=model.context(None, batch_size=1)))
    assert (c - n).abs().max() > 0.05  # the adapter really is conditional

    ddim = DDIMScheduler.from_config(base.config)
    ours = masked_sample(model, base, tokens, num_per_condition=2, mask_ratio=0.0,
                         guidance=guidance, num_inference_steps=1, seed=7, progress=False)
    hand = _hand_sample(model, ddim, tokens, 2, guidance, 1, seed=7, step_kwargs={"eta": 0.0})
    wrong = _hand_sample(model, ddim, tokens, 2, guidance, 1, seed=7, step_kwargs={"eta": 0.0},
                         combine=lambda c, n: c + guidance * (c - n))
    assert (hand - wrong).abs().max() > 1e-3  # the check below can tell the two formulas apart
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=0)
    # A few steps too (the mix enters every step's model output).
    ours3 = masked_sample(model, base, tokens, num_per_condition=2, mask_ratio=0.0,
                          guidance=guidance, num_inference_steps=3, seed=7, progress=False)
    torch.testing.assert_close(ours3, _hand_sample(model, ddim, tokens, 2, guidance, 3, seed=7,
                                                   step_kwargs={"eta": 0.0}), atol=1e-5, rtol=0)


def _config_schedulers():
    """Each scheduler name ``sampling.scheduler`` accepts, with the diffusers class it means."""
    from pipeline.config_sections import SamplingSection

    known = {"ddim": DDIMScheduler}
    allowed = typing.get_args(SamplingSection.model_fields["scheduler"].annotation)
    missing = set(allowed) - set(known)
    assert not missing, f"sampling.scheduler allows {missing}: add them to this test"
    return [(name, known[name]) for name in allowed]


@pytest.mark.parametrize("name,cls", _config_schedulers())
def test_every_config_scheduler_matches_a_hand_loop(name, cls):
    """The stage calls masked_sample with the base's (DDPM) scheduler and ddim left on: it must
    sample with the configured scheduler built from the base's config, step by step."""
    model = _conditional_model(1)
    base = DDPMScheduler(num_train_timesteps=1000)
    tokens = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    ours = masked_sample(model, base, tokens, num_per_condition=2, mask_ratio=0.0, guidance=2.0,
                         num_inference_steps=4, seed=3, progress=False)
    hand = _hand_sample(model, cls.from_config(base.config), tokens, 2, 2.0, 4, seed=3)
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                                 DDPMScheduler])
def test_any_scheduler_with_ddim_off_matches_a_hand_loop(cls):
    """ddim=False samples with the scheduler as given; Euler's scale_model_input divides the
    input by sqrt(sigma^2 + 1), so leaving it out changes every image."""
    model = _conditional_model(2)
    sched = cls.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    tokens = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(4))
    ours = masked_sample(model, sched, tokens, num_per_condition=2, mask_ratio=0.0, guidance=1.5,
                         num_inference_steps=4, seed=9, ddim=False, progress=False)
    hand = _hand_sample(model, sched, tokens, 2, 1.5, 4, seed=9)
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=0)
    if cls is not DDPMScheduler:  # DDPM does not scale its input
        unscaled = _hand_sample(model, sched, tokens, 2, 1.5, 4, seed=9, scale=False)
        assert (unscaled - hand).abs().max() > 1e-2


# --------------------------------------------------------------------------- FixMatch


def _ce(logits: torch.Tensor, target: int) -> float:
    """Cross-entropy of one row, by hand: log sum exp - the target's logit."""
    row = [float(v) for v in logits]
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_fixmatch_mask_targets_and_total_loss_by_hand():
    from pipeline.ssl import SSLConfig
    from pipeline.ssl.algorithms.base import Batch
    from pipeline.ssl.algorithms.fixmatch import FixMatch

    ln = math.log
    lb = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    # Weak-view probabilities (2/3, 1/6, 1/6), (1/20, 18/20, 1/20), (1/40, 1/40, 38/40), 1/3
    # each: at tau 0.7 rows 1 and 2 pass (hard targets 1 and 2), rows 0 and 3 do not.
    w = torch.tensor([[ln(4), 0.0, 0.0], [0.0, ln(18), 0.0], [0.0, 0.0, ln(38)],
                      [0.0, 0.0, 0.0]])
    s = torch.tensor([[3.0, 0.0, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    algo = FixMatch(SSLConfig(tau=0.7, lambda_u=1.5, hard_labels=True), num_classes=3)
    batch = Batch(x_lb=torch.zeros(2, 1, 2, 2), y_lb=torch.tensor([0, 1]),
                  w_lb=torch.tensor([1.0, 2.0]), x_ulb_w=torch.zeros(4, 1, 2, 2),
                  x_ulb_s=torch.zeros(4, 1, 2, 2))
    targets, mask = algo.pseudo_labels(w, batch)
    assert mask.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert targets[1:3].tolist() == [1, 2]
    out = algo.train_step(FixedLogits(torch.cat([lb, w, s])), batch)
    sup = (1.0 * _ce(lb[0], 0) + 2.0 * _ce(lb[1], 1)) / 2
    unsup = (_ce(s[1], 1) + _ce(s[2], 2)) / 4  # mean over all 4 unlabeled rows
    assert out.terms["sup_loss"].item() == pytest.approx(sup, rel=1e-6)
    assert out.terms["unsup_loss"].item() == pytest.approx(unsup, rel=1e-6)
    assert out.loss.item() == pytest.approx(sup + 1.5 * unsup, rel=1e-6)
    assert out.terms["mask_ratio"].item() == 0.5


def test_fixmatch_unlabeled_term_reaches_the_gradient():
    """A real (linear) model: the gradient with lambda_u = 1 minus the one with lambda_u = 0 is
    the gradient of the hand-computed unlabeled loss, which is not zero."""
    from pipeline.ssl import SSLConfig
    from pipeline.ssl.algorithms.base import Batch
    from pipeline.ssl.algorithms.fixmatch import FixMatch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        net[1].weight.mul_(8.0)  # confident enough for some rows to pass the threshold
    g = torch.Generator().manual_seed(1)
    batch = Batch(x_lb=torch.rand(4, 1, 2, 2, generator=g), y_lb=torch.tensor([0, 1, 2, 0]),
                  w_lb=torch.ones(4), x_ulb_w=torch.rand(8, 1, 2, 2, generator=g),
                  x_ulb_s=torch.rand(8, 1, 2, 2, generator=g))
    # The mask by hand: max softmax of the weak view >= tau.
    with torch.no_grad():
        zw = net(batch.x_ulb_w)
    p = torch.exp(zw - zw.max(1, keepdim=True).values)
    conf = (p / p.sum(1, keepdim=True)).max(1).values
    tau = float(conf.median())
    hand_mask = (conf >= tau).float()
    assert 0 < hand_mask.sum() < 8

    def grads(lambda_u):
        net.zero_grad()
        algo = FixMatch(SSLConfig(tau=tau, lambda_u=lambda_u, hard_labels=True), num_classes=3)
        out = algo.train_step(net, batch)
        out.loss.backward()
        assert out.terms["mask_ratio"].item() == pytest.approx(float(hand_mask.mean()))
        return [q.grad.clone() for q in net.parameters()]

    g1, g0 = grads(1.0), grads(0.0)
    net.zero_grad()
    zs = net(batch.x_ulb_s)
    log_p = zs - torch.logsumexp(zs, dim=1, keepdim=True)
    hard = zw.argmax(1)
    unsup = -(log_p[torch.arange(8), hard] * hand_mask).sum() / 8
    unsup.backward()
    g_unsup = [q.grad.clone() for q in net.parameters()]
    assert max(float(v.abs().max()) for v in g_unsup) > 1e-3
    for a, b, u in zip(g1, g0, g_unsup, strict=True):
        torch.testing.assert_close(a - b, u, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- label weights


def test_weighted_ce_by_hand():
    from pipeline.ssl.algorithms.base import weighted_ce

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 2, 2])
    weights = torch.tensor([1.0, 3.0, 0.5])
    hand = (1.0 * _ce(logits[0], 0) + 3.0 * _ce(logits[1], 2) + 0.5 * _ce(logits[2], 2)) / 3
    assert weighted_ce(logits, targets, weights).item() == pytest.approx(hand, rel=1e-6)
    assert weighted_ce(logits, targets, torch.zeros(3)).item() == 0.0


@pytest.mark.parametrize("algorithm", ["supervised", "fixmatch"])
def test_synthetic_weight_reaches_the_labeled_loss(data_fashion_mnist, tmp_path, algorithm):
    """b real + k synthetic labeled rows: the labeled loss is (sum of the real rows' CE +
    synthetic_weight * sum of the synthetic rows' CE) / b, computed here from the logits."""
    from pipeline.data.datasets import ImageDataset
    from pipeline.data.splits import make_split
    from pipeline.ssl import SSLConfig, build_net
    from pipeline.ssl.algorithms import get_algorithm
    from pipeline.ssl.arms import build_train_data
    from pipeline.ssl.trainer import Trainer

    fm = data_fashion_mnist
    ds = ImageDataset("fm-tiny", fm.class_names, fm.train_images[:300], fm.train_labels[:300],
                      fm.test_images[:20], fm.test_labels[:20])
    split = make_split(ds.train_labels, 2, seed=0)
    b, sw = 8, 3.0
    cfg = SSLConfig(net="cnn-tiny", steps=2, batch_size=b, mu=1, eval_every=2,
                    checkpoint_every=2, seed=0, device="cpu", synthetic_batch_share=0.5,
                    synthetic_weight=sw)
    k = round(0.5 * b)
    synth = (fm.train_images[1000:1050], fm.train_labels[1000:1050])
    data = build_train_data(ds, split, cfg, torch.device("cpu"), synth)
    net = build_net("cnn-tiny", 10, ds.image_shape, [0.5], [0.5], 0)
    trainer = Trainer(net, get_algorithm(algorithm)(cfg, 10), data, cfg, torch.device("cpu"),
                      tmp_path / "ckpt.pt", "x", False)
    batch = trainer.sample_batch()
    assert len(batch.y_lb) == b + k
    net.eval()  # BatchNorm on running statistics: the same logits in both calls below
    out = trainer.algorithm.train_step(net, batch)
    with torch.no_grad():
        logits = net(batch.x_lb)
    ce = [_ce(logits[i], int(batch.y_lb[i])) for i in range(b + k)]
    hand = (sum(ce[:b]) + sw * sum(ce[b:])) / b
    assert out.terms["sup_loss"].item() == pytest.approx(hand, rel=1e-5)
    if algorithm == "supervised":
        assert out.loss.item() == pytest.approx(hand, rel=1e-5)
    scale = (b + k) / b  # weighted_ce's mean over b + k rows, times (b + k) / b: a sum over b
    torch.testing.assert_close(batch.w_lb, torch.tensor([scale] * b + [sw * scale] * k))


# --------------------------------------------------------------------------- KID


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit sums over index pairs."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


class _RecordingRng:
    """A numpy Generator that records every ``choice`` (which rows each subset takes)."""

    def __init__(self, real, seed, calls):
        self._g, self._calls = real(seed), calls

    def choice(self, n, size=None, replace=True, **kw):
        idx = self._g.choice(n, size, replace=replace, **kw)
        self._calls.append((n, size, replace, np.asarray(idx)))
        return idx

    def __getattr__(self, name):
        return getattr(self._g, name)


@pytest.fixture
def kid_draws(monkeypatch):
    calls: list = []
    real = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng",
                        lambda seed=None: _RecordingRng(real, seed, calls))
    return calls


def test_kid_whole_sets_is_the_unbiased_mmd():
    from pipeline.evaluate.quality import kid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    same, same_std = kid(a, b, n_subsets=5, subset_size=30)
    assert same == pytest.approx(_mmd2_unbiased(a, b), rel=1e-9, abs=1e-12)
    assert same_std == 0.0 and abs(same) < 0.5  # one distribution: noise around 0
    shifted, _ = kid(a, b + 1.0, n_subsets=5, subset_size=30)
    assert shifted == pytest.approx(_mmd2_unbiased(a, b + 1.0), rel=1e-9)
    assert shifted > 5.0 and shifted > 10 * abs(same)


def test_kid_draws_n_subsets_of_subset_size(kid_draws):
    from pipeline.evaluate.quality import kid

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(25, 4)) + 0.5
    mean, std = kid(x, y, n_subsets=4, subset_size=9, seed=3)
    # x has exactly subset_size rows and is used whole; y gives 4 subsets of 9 distinct rows.
    assert [(n, size, replace) for n, size, replace, _ in kid_draws] == [(25, 9, False)] * 4
    values = [_mmd2_unbiased(x, y[idx]) for *_, idx in kid_draws]
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values), rel=1e-9) and std > 0
    kid_draws.clear()
    mean, _ = kid(rng.normal(size=(20, 4)), y, n_subsets=3, subset_size=6, seed=0)
    assert [(n, size) for n, size, *_ in kid_draws] == [(20, 6), (25, 6)] * 3


def test_quality_set_metrics_kid_is_synthetic_against_real(kid_draws):
    """The per-set KID compares the synthetic features with the real ones (not with
    themselves) and passes the config's subset count and size in the right places."""
    from pipeline.evaluate.quality import QualityConfig, _set_metrics

    rng = np.random.default_rng(2)
    synth, real = rng.normal(size=(9, 4)) + 1.0, rng.normal(size=(25, 4))
    cfg = QualityConfig(kid_subsets=4, kid_subset_size=9, seed=5)
    got = _set_metrics(synth, real, np.repeat(np.arange(3), 3), np.zeros(9, np.int64), 0, cfg)
    assert [(n, size) for n, size, *_ in kid_draws if n == 25] == [(25, 9)] * 4
    values = [_mmd2_unbiased(synth, real[idx]) for n, _, _, idx in kid_draws if n == 25]
    assert got["kid"] == pytest.approx(np.mean(values), rel=1e-9)
    assert got["kid_std"] == pytest.approx(np.std(values), rel=1e-9)
    assert got["kid"] > 0.5 and got["n"] == 9
