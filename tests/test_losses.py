"""Denoising score matching on the oracle: the exact model is the minimiser, and its loss is known."""

import math

import pytest
import torch

import unstir
from unstir.losses import TimeSampler, dsm_loss
from unstir.oracle import GaussianMixture, unequal_2d


def _batch(process, gm, n, weighting="simple", seed=0, discrete=False):
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, g)
    t, w = TimeSampler(process, weighting, discrete=discrete).sample(n, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, t, w, noise


@pytest.mark.parametrize("name", ["vp", "ve", "subvp", "ddpm"])
@pytest.mark.parametrize("weighting", ["simple", "sigma2", "likelihood", "min-snr"])
def test_exact_model_is_the_minimum(name, weighting):
    """With common random numbers, every perturbation of the exact eps raises the loss: the exact model
    is the irreducible minimum E||eps - E[eps|x_t]||^2."""
    p, gm = unstir.make_process(name), unequal_2d()
    exact = gm.denoiser(p)
    batch = _batch(p, gm, 20000, weighting)
    base = dsm_loss(exact, *batch, weighting=weighting).item()
    for kind, f in [("scale", lambda e: 1.05 * e), ("bias", lambda e: e + 0.05), ("rotate", lambda e: e.flip(1) * 0.1 + e)]:
        model = unstir.Denoiser(lambda x, t, f=f: f(gm.eps(x, t, p)), p, "eps", time_dtype=torch.float64)
        assert dsm_loss(model, *batch, weighting=weighting).item() > base, kind


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_loss_is_the_same_for_every_output_type(prediction):
    p, gm = unstir.make_process("vp"), unequal_2d()
    batch = _batch(p, gm, 512)
    ref = dsm_loss(gm.denoiser(p), *batch).item()
    oracle_model = gm.denoiser(p)
    net = lambda x, t: getattr(oracle_model(x, t), prediction)  # noqa: E731
    model = unstir.Denoiser(net, p, prediction, time_dtype=torch.float64)
    assert dsm_loss(model, *batch).item() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("name", ["vp", "ve", "subvp"])
def test_exact_loss_at_fixed_t_matches_closed_form(name):
    """For Gaussian data N(mu, Sigma), E||eps - E[eps|x_t]||^2 / d = tr(I - sigma^2 C^-1) / d with
    C = alpha^2 Sigma + sigma^2 I, i.e. mean over eigenvalues l of alpha^2 l / (alpha^2 l + sigma^2)."""
    p = unstir.make_process(name)
    cov = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.8]], dtype=torch.float64)
    gm = GaussianMixture([1.0], torch.tensor([[0.3, -0.2, 1.0]]), cov[None])
    for t in (0.05, 0.3, 0.7):
        n = 100_000
        g = torch.Generator().manual_seed(1)
        x0 = gm.sample(n, g)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        tt = torch.full((n,), t, dtype=torch.float64)
        x_t = p.perturb(x0, tt, noise)
        per = (gm.eps(x_t, tt, p) - noise).square().mean(1)
        a, s = p.alpha(t).item(), p.sigma(t).item()
        lam = torch.linalg.eigvalsh(cov)
        closed = (a**2 * lam / (a**2 * lam + s**2)).mean().item()
        assert abs(per.mean().item() - closed) < 4 * per.std().item() / math.sqrt(n), (t, per.mean().item(), closed)
        w = torch.ones(n, dtype=torch.float64)
        assert dsm_loss(gm.denoiser(p), x0, tt, w, noise).item() == pytest.approx(per.mean().item(), rel=1e-12)


@pytest.mark.parametrize("discrete", [False, True])
def test_importance_sampling_keeps_the_likelihood_weighted_loss(discrete):
    """Drawing t ~ g^2/sigma^2 with the normaliser as weight is unbiased for the uniform-t g^2/sigma^2 loss:
    checked with a per-sample eps error f(t) = 1 + t/2 (eps errors are O(1) at every t, where importance
    sampling pays off because g^2/sigma^2 grows like 1/t near t_min)."""
    p = unstir.make_process("ddpm" if discrete else "vp")
    n = 200_000
    g = torch.Generator().manual_seed(0)
    plain = TimeSampler(p, "likelihood", discrete=discrete, importance=False)
    imp = TimeSampler(p, "likelihood", discrete=discrete, importance=True)
    t1, w1 = plain.sample(n, g)
    t2, w2 = imp.sample(n, g)
    f1, f2 = w1 * (1 + t1 / 2), w2 * (1 + t2 / 2)
    se = math.sqrt(f1.var().item() / n + f2.var().item() / n)
    assert abs(f1.mean().item() - f2.mean().item()) < 4 * se
    assert f2.var() < f1.var(), "importance sampling must reduce the variance"
    if discrete:
        labels = p.timestep(t2)
        assert torch.equal(labels, labels.round())


@pytest.mark.parametrize("name", ["vp", "ve", "subvp", "ddpm", "rf", "vp_cosine"])
def test_min_snr_weight_is_the_x0_loss_clipped_at_gamma(name):
    """Min-SNR-gamma (Hang et al. 2023): the weight on the x0 error is min(SNR, gamma). On the eps error that
    is min(SNR, gamma) / SNR, checked against alpha and sigma directly; and the weighted eps loss equals the
    min(SNR, gamma)-weighted x0 loss of the same (imperfect) model."""
    p = unstir.make_process(name)
    t, w = TimeSampler(p, "min-snr", snr_gamma=3.0).sample(4000, torch.Generator().manual_seed(0))
    snr = (p.alpha(t) / p.sigma(t)) ** 2
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(3.0, dtype=torch.float64)) / snr, rtol=1e-9)
    assert (w == 1).any() and (w < 0.5).any(), "the draws must cover both sides of SNR = gamma"
    gm = unequal_2d()
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(len(t), g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    model = unstir.Denoiser(lambda x, tt: 0.9 * gm.eps(x, tt, p), p, "eps", time_dtype=torch.float64)
    out = model(p.perturb(x0, t, noise), t)
    x0_loss = (torch.minimum(snr, torch.tensor(3.0, dtype=torch.float64)) * (out.x0 - x0).square().mean(1)).mean()
    assert dsm_loss(model, x0, t, w, noise, "min-snr").item() == pytest.approx(x0_loss.item(), rel=1e-9)


def test_bad_snr_gamma():
    for bad in (0, -1.0, float("inf"), True, "5"):
        with pytest.raises(ValueError, match=r"snr_gamma must be a positive number, got"):
            TimeSampler(unstir.make_process("vp"), "min-snr", snr_gamma=bad)


def test_snr_gamma_without_min_snr_is_refused(tmp_path):
    from unstir.training import TrainConfig, train

    with pytest.raises(ValueError, match=r"snr_gamma=3.0 is the gamma of the 'min-snr' weighting; this run's "
                                         r"weighting is 'simple'"):
        train(TrainConfig(data="moons", steps=2, snr_gamma=3.0), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"snr_gamma must be a positive number, got -1"):
        train(TrainConfig(data="moons", steps=2, weighting="min-snr", snr_gamma=-1), tmp_path / "x", progress=False)


def test_bad_weighting_name():
    with pytest.raises(ValueError, match=r"unknown weighting 'elbo'; choose one of"):
        TimeSampler(unstir.make_process("vp"), "elbo")
