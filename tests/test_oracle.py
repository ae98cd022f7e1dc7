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
