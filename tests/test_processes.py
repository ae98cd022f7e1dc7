"""Closed-form truths about the forward processes."""

import math

import pytest
import torch

import unstir
from unstir.processes import DDPM, VP, LinearBeta

from .conftest import ALL_PROCESSES


def times(p, n=9):
    # Interior points plus both ends.
    return torch.cat([torch.tensor([p.t_min, p.T], dtype=torch.float64),
                      torch.linspace(p.t_min, p.T, n + 2, dtype=torch.float64)[1:-1]])


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_marginal_matches_forward_sde_simulation(name):
    """Euler-Maruyama on dx = f dt + g dw from t_a, started from the exact marginal there, reaches the
    stated marginal mean alpha(t) x0 and variance sigma(t)^2 at later times, within 4 standard errors."""
    p = unstir.make_process(name)
    g = torch.Generator().manual_seed(0)
    n, steps, x0 = 20000, 2000, 1.5
    # Uniform in log-SNR, the process's own clock: beta dt = 2 sigma^2 d lambda stays small even where
    # the cosine schedule's beta(t) blows up near T.
    ts = unstir.time_grid(p, steps, "log_snr", denoise=False).flip(0)
    x = p.alpha(ts[0]) * x0 + p.sigma(ts[0]) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    checks = {steps // 4, steps // 2, steps}
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        # Midpoint g^2 keeps the variance increment exact to O(dt^2) on the geometric VE schedule.
        g2 = p.g2(t + 0.5 * dt)
        x = x + p.drift(x, t) * dt + torch.sqrt(g2 * dt) * torch.randn(n, 1, generator=g, dtype=torch.float64)
        if i + 1 in checks:
            a, s = p.alpha(ts[i + 1]).item(), p.sigma(ts[i + 1]).item()
            mean, var = x.mean().item(), x.var().item()
            assert abs(mean - a * x0) < 4 * s / math.sqrt(n) + 2e-3 * abs(a * x0), (name, i, mean, a * x0)
            assert abs(var - s**2) < 4 * s**2 * math.sqrt(2 / (n - 1)), (name, i, var, s**2)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_g2_and_drift_match_finite_differences(name):
    """g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt and f = (d log alpha/dt) x, by central differences."""
    p = unstir.make_process(name)
    h = 1e-6
    t = torch.linspace(p.t_min + 1e-3, p.T - 1e-3, 23, dtype=torch.float64)
    if name == "ddpm":  # keep the stencil inside one linear segment of the log-SNR
        t = (torch.floor(t * p.num_steps) + 0.5) / p.num_steps
    dlog_alpha = (torch.log(p.alpha(t + h)) - torch.log(p.alpha(t - h))) / (2 * h)
    dsigma2 = (p.sigma(t + h) ** 2 - p.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(p.drift_coef(t), dlog_alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.g2(t), dsigma2 - 2 * p.sigma(t) ** 2 * dlog_alpha, rtol=1e-6, atol=1e-6)
    x = torch.randn(23, 3, dtype=torch.float64)
    torch.testing.assert_close(p.drift(x, t), dlog_alpha[:, None] * x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_log_snr_inverse_round_trips(name):
    p = unstir.make_process(name)
    t = times(p, 50)
    lam = p.log_snr(t)
    assert (torch.diff(p.log_snr(torch.sort(t).values)) < 0).all(), "log-SNR must decrease"
    torch.testing.assert_close(p.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lam, torch.log(p.alpha(t) / p.sigma(t)), rtol=1e-12, atol=1e-12)


def test_stated_relations_hold():
    t = torch.linspace(1e-3, 1.0, 101, dtype=torch.float64)
    for name in ("vp", "vp_cosine", "ddpm"):
        p = unstir.make_process(name)
        tt = t.clamp(p.t_min, p.T)
        torch.testing.assert_close(p.alpha(tt) ** 2 + p.sigma(tt) ** 2, torch.ones_like(tt), rtol=0, atol=1e-14)
        torch.testing.assert_close(p.g2(tt), -2 * p.drift_coef(tt), rtol=1e-14, atol=0)
    vp, sub = unstir.make_process("vp"), unstir.make_process("subvp")
    torch.testing.assert_close(sub.alpha(t), vp.alpha(t), rtol=1e-15, atol=0)
    torch.testing.assert_close(sub.sigma(t), 1 - vp.alpha(t) ** 2, rtol=1e-13, atol=0)
    torch.testing.assert_close(sub.g2(t), vp.g2(t) * (1 - vp.alpha(t) ** 4), rtol=1e-13, atol=0)
    assert (sub.sigma(t) <= vp.sigma(t)).all()
    ve = unstir.make_process("ve", sigma_min=0.01, sigma_max=50.0)
    tv = t.clamp(ve.t_min, 1)
    torch.testing.assert_close(ve.alpha(tv), torch.ones_like(tv))
    torch.testing.assert_close(ve.sigma(tv), 0.01 * (50 / 0.01) ** tv, rtol=1e-13, atol=0)
    torch.testing.assert_close(ve.g2(tv), 2 * math.log(5000) * ve.sigma(tv) ** 2, rtol=1e-13, atol=0)


def test_discrete_alpha_bar_is_cumprod_at_integer_steps():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    p = DDPM(betas)
    i = torch.arange(1000)
    t = p.t_from_timestep(i)
    torch.testing.assert_close(p.alpha(t) ** 2, torch.cumprod(1 - betas, 0), rtol=1e-13, atol=0)
    torch.testing.assert_close(p.timestep(t), i.double(), rtol=0, atol=1e-9)
    # Between integer steps the log-SNR is the linear interpolation.
    mid = (t[:-1] + t[1:]) / 2
    torch.testing.assert_close(p.log_snr(mid), (p.log_snr(t[:-1]) + p.log_snr(t[1:])) / 2, rtol=1e-12, atol=1e-12)


def test_continuous_vp_agrees_with_discrete_schedule():
    """beta_i = beta(t_i)/N: log alpha_bar differs by the Riemann-sum and log(1 - beta) terms only,
    bounded by sum beta_i^2 + max beta."""
    disc = DDPM()
    cont = VP(LinearBeta(0.1, 20.0), t_min=disc.t_min)
    t = disc.t_from_timestep(torch.arange(1000))
    gap = (2 * torch.log(disc.alpha(t)) - 2 * torch.log(cont.alpha(t))).abs()
    bound = torch.cumsum(disc.schedule.betas**2, 0) + disc.schedule.betas.max()
    assert (gap <= bound).all()
    assert gap.max() < 0.1


def test_perturb_and_prior():
    p = unstir.make_process("vp")
    x0 = torch.randn(5, 3, dtype=torch.float64)
    eps = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(p.perturb(x0, t, eps), p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps)
    x = torch.randn(4, 2, dtype=torch.float64)
    s = p.prior_std
    expected = torch.distributions.Normal(0.0, s).log_prob(x).sum(1)
    torch.testing.assert_close(p.prior_logp(x), expected)
    ve = unstir.make_process("ve")
    assert ve.prior_std == pytest.approx(50.0, rel=1e-12)
    draw = ve.prior_sample((20000, 1), torch.Generator().manual_seed(0), dtype=torch.float64)
    assert draw.std().item() == pytest.approx(50.0, rel=4 * math.sqrt(0.5 / 20000))


def test_config_round_trip():
    from unstir.processes import process_from_config
    for name in ALL_PROCESSES:
        p = unstir.make_process(name)
        q = process_from_config(p.config())
        t = torch.linspace(p.t_min, p.T, 7, dtype=torch.float64)
        torch.testing.assert_close(q.alpha(t), p.alpha(t), rtol=0, atol=0)
        torch.testing.assert_close(q.sigma(t), p.sigma(t), rtol=0, atol=0)
