"""The Gaussian-mixture oracle against autograd, Monte Carlo and closed forms."""

import math

import pytest
import torch

import unstir
from unstir.oracle import GaussianMixture, random_mixture, ring, unequal_2d

from .conftest import ALL_PROCESSES

MIXTURES = {"ring": ring(), "unequal_2d": unequal_2d(), "random_5d": random_mixture(5, 3, seed=2)}


@pytest.mark.parametrize("name", ALL_PROCESSES)
@pytest.mark.parametrize("mix", list(MIXTURES))
def test_score_is_autograd_of_log_density(name, mix):
    p, gm = unstir.make_process(name), MIXTURES[mix]
    g = torch.Generator().manual_seed(0)
    for t in [p.t_min, p.t_min * 1.5, 0.1, 0.5, 0.9 * p.T, p.T]:
        x0 = gm.sample(16, g)
        x = p.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
        logp = gm.marginal_log_prob(x, t, p)
        (auto,) = torch.autograd.grad(logp.sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), t, p), auto, rtol=1e-8, atol=1e-8)


def test_log_prob_matches_torch_distributions():
    gm = unequal_2d()
    comps = torch.distributions.MultivariateNormal(gm.means, gm.covs)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gm.weights), comps)
    x = torch.randn(50, 2, dtype=torch.float64)
    torch.testing.assert_close(gm.log_prob(x), mix.log_prob(x), rtol=1e-12, atol=1e-12)
    # And p_t is the mixture with means alpha mu and covariances alpha^2 Sigma + sigma^2 I.
    p, t = unstir.make_process("subvp"), 0.4
    a, s = p.alpha(t).item(), p.sigma(t).item()
    comps_t = torch.distributions.MultivariateNormal(a * gm.means, a**2 * gm.covs + s**2 * torch.eye(2, dtype=torch.float64))
    mix_t = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gm.weights), comps_t)
    torch.testing.assert_close(gm.marginal_log_prob(x, t, p), mix_t.log_prob(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_eps_is_the_posterior_mean_of_the_noise(name):
    """Tweedie: E[eps | x_t] equals the oracle's eps, within 4 standard errors of a self-normalised
    importance-sampling estimate drawn from p_0 (weights N(x_t; alpha x0, sigma^2 I))."""
    p, gm = unstir.make_process(name), unequal_2d()
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x0s = gm.sample(n, g)
    t = p.t_from_log_snr(torch.tensor(0.0)).item()  # alpha = sigma: a well-mixed noise level
    a, s = p.alpha(t).item(), p.sigma(t).item()
    x_t = p.perturb(gm.sample(4, g), t, torch.randn(4, 2, generator=g, dtype=torch.float64))
    exact = gm.eps(x_t, t, p)
    for j in range(4):
        eps_i = (x_t[j] - a * x0s) / s
        logw = -0.5 * (eps_i**2).sum(1)
        w = torch.softmax(logw, 0)
        est = (w[:, None] * eps_i).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (eps_i - est) ** 2).sum(0))
        assert (se < 0.02).all(), "the Monte Carlo estimate must be informative"
        assert ((est - exact[j]).abs() < 4 * se).all(), (name, j, est, exact[j], se)


def test_sampling_statistics():
    gm = unequal_2d()
    n = 100_000
    x, labels = gm.sample(n, torch.Generator().manual_seed(0), return_labels=True)
    counts = torch.bincount(labels, minlength=3).double() / n
    tol = 4 * torch.sqrt(gm.weights * (1 - gm.weights) / n)
    assert ((counts - gm.weights).abs() < tol).all()
    mean = (gm.weights[:, None] * gm.means).sum(0)
    assert ((x.mean(0) - mean).abs() < 4 * x.std(0) / math.sqrt(n)).all()
    k0 = x[labels == 0]
    torch.testing.assert_close(torch.cov(k0.T), gm.covs[0], rtol=0, atol=4 * 0.15 * math.sqrt(2 / len(k0)))


def test_posterior_is_bayes_rule_and_x0_is_tweedie():
    p, gm = unstir.make_process("vp"), ring()
    x = torch.randn(10, 2, dtype=torch.float64)
    t = 0.3
    a, s = p.alpha(t).item(), p.sigma(t).item()
    logn = torch.stack([torch.distributions.MultivariateNormal(a * gm.means[k], a**2 * gm.covs[k] + s**2 * torch.eye(2, dtype=torch.float64))
                        .log_prob(x) for k in range(gm.n_components)], 1)
    torch.testing.assert_close(gm.posterior(x, t, p), torch.softmax(torch.log(gm.weights) + logn, 1))
    # E[x0 | x_t] by Gaussian conditioning per component, not through the score (an independent route to
    # Tweedie's formula): E[x0 | x_t, k] = mu_k + a Sigma_k C_k^-1 (x_t - a mu_k), C_k = a^2 Sigma_k + s^2 I.
    eye = torch.eye(2, dtype=torch.float64)
    cond = torch.stack([gm.means[k] + (a * gm.covs[k] @ torch.linalg.solve(a**2 * gm.covs[k] + s**2 * eye,
                                                                         (x - a * gm.means[k]).T)).T
                        for k in range(gm.n_components)], 1)
    torch.testing.assert_close(gm.x0(x, t, p), (gm.posterior(x, t, p)[..., None] * cond).sum(1), rtol=1e-10, atol=1e-10)


def test_conditional_of_coordinates_matches_bayes():
    gm = random_mixture(3, 2, seed=5)
    mask = torch.tensor([True, False, True])
    vals = torch.tensor([0.3, -0.2], dtype=torch.float64)
    cond = gm.condition(mask, vals)
    # p(u | o) = p(o, u) / p(o): check on a few values of u.
    u = torch.randn(7, 1, dtype=torch.float64)
    full = torch.zeros(7, 3, dtype=torch.float64)
    full[:, mask] = vals
    full[:, ~mask] = u
    marg = GaussianMixture(gm.weights, gm.means[:, mask], gm.covs[:, mask][:, :, mask]).log_prob(vals[None])
    torch.testing.assert_close(cond.log_prob(u), gm.log_prob(full) - marg, rtol=1e-10, atol=1e-10)


def test_float32_inputs_keep_their_dtype():
    p, gm = unstir.make_process("vp"), ring()
    x = torch.randn(5, 2)
    out = gm.denoiser(p)(x, 0.5)
    assert out.eps.dtype == torch.float32 and out.x0.dtype == torch.float32


def _small_low_rank(seed=0, K=3, d=12, r=3):
    from unstir.oracle import LowRankMixture

    g = torch.Generator().manual_seed(seed)
    return LowRankMixture(torch.rand(K, generator=g, dtype=torch.float64) + 0.5,
                          torch.randn(K, d, generator=g, dtype=torch.float64),
                          0.1 + 0.2 * torch.rand(K, d, generator=g, dtype=torch.float64),
                          0.5 * torch.randn(K, d, r, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", ["vp", "ve", "rf"])
def test_low_rank_mixture_is_the_dense_mixture_by_woodbury(name):
    """The Woodbury/determinant-lemma evaluation equals the dense mixture with the same covariances
    diag(D) + U U^T (eigendecomposed) to float64 rounding: score, log-density of the noised data with one time
    and with a time per sample, the clean log-density and the posterior over components."""
    from unstir.oracle import GaussianMixture

    lr = _small_low_rank()
    dense = GaussianMixture(lr.weights, lr.means, lr.dense_covs())
    p = unstir.make_process(name)
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(64, 12, generator=g, dtype=torch.float64)
    for t in (0.3, 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)):
        assert (lr.score(x, t, p) - dense.score(x, t, p)).abs().max() < 1e-10
        assert (lr.marginal_log_prob(x, t, p) - dense.marginal_log_prob(x, t, p)).abs().max() < 1e-10
        assert (lr.posterior(x, t, p) - dense.posterior(x, t, p)).abs().max() < 1e-10
    assert (lr.log_prob(x) - dense.log_prob(x)).abs().max() < 1e-10
    assert (lr.x0(x, 0.4, p) - dense.x0(x, 0.4, p)).abs().max() < 1e-10


def test_image_mixture_score_is_the_gradient_of_its_log_density_at_3072_dimensions():
    """At d = 3072 there is no dense reference, so the score is checked against autograd of the log-density
    (computed by the determinant lemma, a separate path), and the samples' moments against the parameters:
    the mean image to 5 standard errors and the variance along a factor direction u (u^T C u / |u|^2 =
    D + |U^T u|^2 / |u|^2) within 10% at n = 2000."""
    from unstir.oracle import image_mixture

    im = image_mixture(seed=4)
    p = unstir.make_process("vp")
    x = im.sample(6, torch.Generator().manual_seed(0)).requires_grad_(True)
    xt = 0.8 * x.detach() + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xt.requires_grad_(True)
    (grad,) = torch.autograd.grad(im.marginal_log_prob(xt, 0.35, p).sum(), xt)
    assert (im.score(xt.detach(), 0.35, p) - grad).abs().max() < 1e-9
    assert im.denoiser(p).data_shape == (3, 32, 32) and x.shape == (6, 3, 32, 32)
    one = im.subset([0])
    s = one.sample(2000, torch.Generator().manual_seed(2)).flatten(1)
    sd = s.std(0)
    assert ((s.mean(0) - one.means[0]).abs() < 5 * sd / 2000**0.5 + 1e-12).float().mean() > 0.999
    u = one.factors[0, :, 0]
    var = ((s - one.means[0]) @ u).var() / (u @ u)
    expected = (one.diag[0] * u**2).sum() / (u @ u) + (one.factors[0].T @ u).pow(2).sum() / (u @ u)
    assert abs(var / expected - 1) < 0.1, (var, expected)


def test_samplers_converge_at_image_dimension_on_the_exact_score():
    """dpm++3m on the 3x32x32 mixture: the endpoint error to a tight RK45 solve falls with the steps, and at
    40 steps is below 1% of the data's per-image norm; the exact-score model runs through the same front door
    as a U-Net."""
    from unstir.oracle import image_mixture

    im = image_mixture(seed=1)
    p = unstir.make_process("vp")
    model = im.denoiser(p)
    x_T = p.prior_sample((8, 3, 32, 32), torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = unstir.sample(model, p, x_T, sampler="ode_rk45", steps=1, denoise=False, rtol=1e-7, atol=1e-7).x
    err = {n: (unstir.sample(model, p, x_T, sampler="dpm++3m", steps=n, denoise=False).x - ref).flatten(1).norm(dim=1)
           .mean().item() for n in (10, 40)}
    scale = ref.flatten(1).norm(dim=1).mean().item()
    assert err[40] < err[10] / 8 and err[40] < 0.01 * scale, (err, scale)


def test_low_rank_mixture_refuses_bad_parts():
    from unstir.oracle import LowRankMixture

    good = _small_low_rank()
    with pytest.raises(ValueError, match="diag must have shape"):
        LowRankMixture(good.weights, good.means, -good.diag, good.factors)
    with pytest.raises(ValueError, match="factors must have shape"):
        LowRankMixture(good.weights, good.means, good.diag, good.factors[:, :5])
    with pytest.raises(ValueError, match="data_shape"):
        LowRankMixture(good.weights, good.means, good.diag, good.factors, data_shape=(3, 5))
    with pytest.raises(NotImplementedError, match="dense GaussianMixture"):
        good.condition(torch.ones(12, dtype=torch.bool), torch.zeros(12))
