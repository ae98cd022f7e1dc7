"""Samplers of the reverse SDE and its relatives (DDPM, DDIM, Euler-Maruyama, PC, Langevin, EDM, Restart,
SA-Solver).

All work in the process's own (alpha, sigma); a step from t down to s uses

    a = alpha_t / alpha_s,  b^2 = sigma_t^2 - a^2 sigma_s^2     (the forward kernel x_t | x_s),
    sigma_post = sigma_s b / sigma_t                           (std of the posterior q(x_s | x_t, x0)).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._checks import check_choice
from .base import coef, integrate, langevin, noise_like

Tensor = torch.Tensor


def _kernel(model, t: float, s: float) -> tuple[float, float, float]:
    """(a, b, sigma_post) for the step t -> s; see the module docstring."""
    ct, cs = coef(model, t), coef(model, s)
    a = ct.alpha / cs.alpha
    b2 = max(ct.sigma**2 - (a * cs.sigma) ** 2, 0.0)
    return a, math.sqrt(b2), cs.sigma * math.sqrt(b2) / ct.sigma


def ddim_update(out, alpha_s: float, sigma_s: float, std_dir: float, std_noise: float, z: Tensor | None) -> Tensor:
    """DDIM, Song et al. (2021a) eq. 12:  x_s = alpha_s x0 + sqrt(sigma_s^2 - std^2) eps + std z.

    With std = 0 this is alpha_s x0 + sigma_s eps, which is exactly one Euler step of the probability-flow
    ODE written in xbar = x / alpha and sbar = sigma / alpha, where it reads d xbar / d sbar = eps:
    xbar_s = xbar_t + (sbar_s - sbar_t) eps (Song et al. 2021a, eq. 14; tested in tests/test_samplers.py).
    """
    sigma_dir = sigma_s if std_dir == 0.0 else math.sqrt(max(sigma_s**2 - std_dir**2, 0.0))  # sigma_s: per sample too
    x = alpha_s * out.x0 + sigma_dir * out.eps
    return x if std_noise == 0.0 else x + std_noise * z


def ddim_step(model, x, t, s, *, eta: float = 0.0, generator=None):
    out = model(x, t)
    cs = coef(model, s)
    std = eta * _kernel(model, t, s)[2]
    return ddim_update(out, cs.alpha, cs.sigma, std, std, noise_like(x, generator) if std else None), out


def ddpm_step(model, x, t, s, *, variance: str = "posterior", generator=None):
    out = model(x, t)
    cs = coef(model, s)
    _, b, post = _kernel(model, t, s)
    # The mean is always the posterior mean; 'beta' only widens the noise to the forward std b (Ho et al. 2020).
    return ddim_update(out, cs.alpha, cs.sigma, post, post if variance == "posterior" else b,
                       noise_like(x, generator)), out


def euler_maruyama_step(model, x, t, s, *, generator=None):
    """dx = [f - g^2 score] dt + g dw, integrated backwards with dt = s - t < 0."""
    out = model(x, t)
    c = coef(model, t)
    dt = s - t
    return x + (c.drift * x - c.g2 * out.score) * dt + math.sqrt(c.g2 * -dt) * noise_like(x, generator), out


def reverse_diffusion_step(model, x, t, s, *, generator=None):
    """Song et al.'s reverse-diffusion predictor: x_s = x - f_i + G_i^2 score + G_i z with the forward
    discretisation x_t = a x_s + b z (f_i = (a - 1) x, G_i = b)."""
    out = model(x, t)
    a, b, _ = _kernel(model, t, s)
    return (2 - a) * x + b**2 * out.score + b * noise_like(x, generator), out


PREDICTORS = {
    "euler_maruyama": euler_maruyama_step,
    "reverse_diffusion": reverse_diffusion_step,
    "ddpm": ddpm_step,
    "ddim": ddim_step,
}


def ddpm(model, x, grid, *, variance: str = "posterior", generator=None, callback=None):
    """DDPM ancestral sampling: x_s ~ q(x_s | x_t, x0 = E[x0 | x_t]), with the posterior variance or,
    with ``variance='beta'``, the forward variance b^2 (beta_t on the discrete schedule)."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    return integrate(model, x, grid, lambda x, t, s: ddpm_step(model, x, t, s, variance=variance,
                                                              generator=generator), callback)


def ddim(model, x, grid, *, eta: float = 0.0, generator=None, callback=None):
    """DDIM with eta in [0, 1]: eta = 0 is the deterministic PF-ODE Euler step, eta = 1 is DDPM."""
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    return integrate(model, x, grid, lambda x, t, s: ddim_step(model, x, t, s, eta=float(eta),
                                                              generator=generator), callback)


def euler_maruyama(model, x, grid, *, generator=None, callback=None):
    """Euler-Maruyama on the reverse SDE (Anderson 1982; Song et al. 2021 eq. 6)."""
    return integrate(model, x, grid, lambda x, t, s: euler_maruyama_step(model, x, t, s, generator=generator),
                     callback)


def reverse_diffusion(model, x, grid, *, generator=None, callback=None):
    """The reverse-diffusion predictor on its own (Song et al. 2021, eq. 46)."""
    return integrate(model, x, grid, lambda x, t, s: reverse_diffusion_step(model, x, t, s, generator=generator),
                     callback)


def pc(model, x, grid, *, predictor: str = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.075,
       generator=None, callback=None):
    """Predictor-corrector (Song et al. 2021, Alg. 1): at each noise level the predictor moves t -> s, then
    ``corrector_steps`` Langevin steps correct at s. The step to a final 0 is the denoising step.
    snr = 0.075 is score_sde's CelebA value; its CIFAR-10 value 0.16 over-corrects the low-dimensional
    oracle cases (sliced-W2 stalls above the floor on VE)."""
    check_choice("predictor", predictor, PREDICTORS)
    if not (isinstance(corrector_steps, int) and corrector_steps >= 0):
        raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    predict = PREDICTORS[predictor]

    def step(x, t, s):
        x, out = predict(model, x, t, s, generator=generator)
        for _ in range(corrector_steps):
            x = langevin(model, x, s, snr=snr, generator=generator)
        return x, out

    return integrate(model, x, grid, step, callback)


def annealed_langevin(model, x, grid, *, steps_each: int = 5, step_scale: float = 0.5, generator=None,
                      callback=None):
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the grid's noise levels:
    at each level sigma_i, ``steps_each`` steps x <- x + (a_i/2) score + sqrt(a_i) z with
    a_i = step_scale sigma_i^2 (NCSN's epsilon sigma_i^2 / sigma_L^2 with epsilon = step_scale sigma_L^2).
    Levels t_1 .. t_N are relaxed on arrival (x_T from the prior already has level t_0 = T); a final 0
    is the denoising step at the last level. The defaults (5 steps of 0.5 sigma_i^2) gave the lowest
    sliced-W2 among the settings tried on the unequal_2d oracle at 200 levels (NCSN's 0.2 sigma_i^2 and
    100 steps per level cost far more evaluations)."""
    if not (isinstance(steps_each, int) and steps_each >= 1):
        raise ValueError(f"steps_each must be an integer >= 1, got {steps_each!r}")
    if not step_scale > 0:
        raise ValueError(f"step_scale must be positive, got {step_scale!r}")

    def step(x, t, s):
        a = step_scale * coef(model, s).sigma ** 2
        for _ in range(steps_each):
            out = model(x, s)
            x = x + 0.5 * a * out.score + math.sqrt(a) * noise_like(x, generator)
        return x, out

    return integrate(model, x, grid, step, callback)


def heun_step(model, xbar: Tensor, t: float, sbar_t: float, s: float):
    """Heun's step on the PF ODE d xbar / d sbar = eps from (t, sbar_t) to s (Karras et al. 2022, Alg. 1 lines
    5-8): returns (x_s, the model output at t). ``sbar_t`` may differ from sbar(t) by EDM's churn only through t."""
    ct, cs = coef(model, t), coef(model, s)
    out = model(ct.alpha * xbar, t)
    d = out.eps
    xbar_s = xbar + (cs.sigma_bar - sbar_t) * d
    d2 = model(cs.alpha * xbar_s, s).eps
    return cs.alpha * (xbar + (cs.sigma_bar - sbar_t) * 0.5 * (d + d2)), out


def _t_at(model, sbar: float) -> float:
    """The time whose sigma/alpha is ``sbar``, clamped to [0, T]'s range of noise levels."""
    process = model.process
    return min(process.t_from_log_snr(-math.log(sbar)).item(), process.T)


def edm(model, x, grid, *, churn: float = 10.0, s_tmin: float = 0.05, s_tmax: float = 50.0,
        s_noise: float = 1.003, generator=None, callback=None):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): Heun on the PF ODE in xbar = x/alpha and
    sbar = sigma/alpha, after raising the noise level by gamma = min(churn/N, sqrt(2) - 1) on levels in
    [s_tmin, s_tmax]. ``churn=0`` gives the deterministic Heun sampler (Alg. 1). Two departures from the
    paper's VE setting, both needed on bounded processes: the raised level sbar_hat is clamped to sbar(T) (a VP
    process has no noise level above its T), and the step to a final 0 is the plain denoising step of the
    grid convention, so the last step never churns."""
    if not churn >= 0 or not s_noise > 0:
        raise ValueError(f"need churn >= 0 and s_noise > 0, got churn={churn}, s_noise={s_noise}")
    n = grid.numel() - 1
    gamma_max = min(churn / n, math.sqrt(2) - 1)
    sbar_T = coef(model, model.process.T).sigma_bar

    def step(x, t, s):
        ct = coef(model, t)
        xbar, t_hat, sbar_hat = x / ct.alpha, t, ct.sigma_bar
        if gamma_max > 0 and s_tmin <= ct.sigma_bar <= s_tmax:
            sbar_hat = min(ct.sigma_bar * (1 + gamma_max), sbar_T)
            t_hat = _t_at(model, sbar_hat)
            xbar = xbar + math.sqrt(sbar_hat**2 - ct.sigma_bar**2) * s_noise * noise_like(x, generator)
        return heun_step(model, xbar, t_hat, sbar_hat, s)

    return integrate(model, x, grid, step, callback)


def restart(model, x, grid, *, interval: tuple = (0.06, 0.30), restarts: int = 2, restart_steps: int = 3,
            generator=None, callback=None):
    """Restart sampling (Xu et al. 2023, Alg. 1 with EDM's Heun as the ODE solver, their Sec. 5 set-up).

    The main pass is Heun on the PF ODE over ``grid``. On arriving at the grid point t_min whose noise level
    sbar = sigma/alpha is nearest (in log) to ``interval[0]``, it restarts ``restarts`` (K) times: jump forward
    to t_max, the time of sbar = ``interval[1]``, by the forward process's own kernel,
    x_{t_max} = (alpha_max/alpha_min) x + sqrt(sigma_max^2 - (alpha_max/alpha_min)^2 sigma_min^2) z (the
    paper's x + sqrt(t_max^2 - t_min^2) z on VE), then Heun back down to t_min over ``restart_steps`` steps
    of EDM's rho = 7 spacing in sbar. The added noise contracts the error the ODE has accumulated (their
    Thm. 2), at 2 * restarts * restart_steps more evaluations. The defaults are the paper's CIFAR-10 interval
    [0.06, 0.30] with K = 2 and 3 Heun steps (ComfyUI's and the reference A1111 script's first segment).
    Where it differs from the paper: one interval (theirs may list several), placed on the main grid's
    nearest point rather than the grid being built around it; noise is a fresh draw per restart. A grid
    with no point strictly between 0 and T (one step) has nothing to restart from and runs plain Heun."""
    lo, hi = interval
    if not 0 < lo < hi:
        raise ValueError(f"interval must be (sbar_min, sbar_max) with 0 < sbar_min < sbar_max, got {interval!r}")
    for name, v in (("restarts", restarts), ("restart_steps", restart_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "restarts" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'restarts' else 1}, got {v!r}")
    times = grid.tolist()
    inner = [t for t in times if 0.0 < t < model.process.T]
    t_min = min(inner, key=lambda t: abs(math.log(coef(model, t).sigma_bar / lo))) if inner else None
    t_max = _t_at(model, hi)
    rho = 7.0
    if t_min is not None and t_max > t_min:
        a, b = coef(model, t_max).sigma_bar ** (1 / rho), coef(model, t_min).sigma_bar ** (1 / rho)
        down = [t_max] + [_t_at(model, (a + (b - a) * k / restart_steps) ** rho) for k in range(1, restart_steps)]
        down.append(t_min)
    else:
        down = None  # the main grid never reaches below interval[1]: nothing to restart

    def step(x, t, s):
        x_s, out = heun_step(model, x / coef(model, t).alpha, t, coef(model, t).sigma_bar, s)
        if s == t_min and down is not None:
            for _ in range(restarts):
                fwd, std, _ = _kernel(model, t_max, t_min)
                x_s = fwd * x_s + std * noise_like(x_s, generator)
                for u, v in zip(down[:-1], down[1:]):
                    x_s = heun_step(model, x_s / coef(model, u).alpha, u, coef(model, u).sigma_bar, v)[0]
        return x_s, out

    return integrate(model, x, grid, step, callback)


def _exp_lagrange_weights(nodes: list[float], h: float, k: float) -> list[float]:
    """int_0^h k e^{-k (h - u)} l_j(u) du for the Lagrange basis l_j on ``nodes`` (offsets in lambda from the
    step's start), by 24-point Gauss-Legendre quadrature: the integrand is a polynomial of degree < 4 times
    an exponential with |k h| < 20 on any sensible grid, where the rule is exact to rounding."""
    q, w = np.polynomial.legendre.leggauss(24)
    u, w = 0.5 * h * (q + 1), 0.5 * h * w
    kernel = k * np.exp(-k * (h - u)) * w
    out = []
    for j, uj in enumerate(nodes):
        lj = np.prod([(u - um) / (uj - um) for m, um in enumerate(nodes) if m != j], axis=0)
        out.append(float(np.sum(kernel * lj)))
    return out


def sa_solver(model, x, grid, *, predictor_order: int = 2, corrector_order: int = 2, tau: float = 1.0,
              window: tuple = (0.2, 0.8), noise: str = "brownian", generator=None, callback=None):
    """SA-Solver (Xue et al. 2023, Alg. 1 with the SA-Predictor and SA-Corrector in data prediction, Sec. 4).

    The SDE with noise scale tau, dx = [f - (1 + tau^2)/2 g^2 score] dt + tau g dw, solved in lambda =
    log(alpha/sigma) with its linear part exact: over a step t -> s with h = lambda_s - lambda_t,

        x_s = (sigma_s/sigma_t) e^{-tau^2 h} x_t + alpha_s sum_j b_j x0_j + sigma_s sqrt(1 - e^{-2 tau^2 h}) z,
        b_j = int_0^h (1 + tau^2) e^{-(1 + tau^2)(h - u)} l_j(u) du,

    l_j the Lagrange basis of the x0 predictions interpolated in lambda. The predictor uses the last
    ``predictor_order`` predictions; the corrector re-solves the step with the prediction at its end point
    (the evaluation the next step needs anyway, so 1 NFE per step, as UniPC) and the ``corrector_order`` - 1
    before it, with the same z. tau = 0 is a deterministic Adams predictor-corrector of the PF ODE; DPM-Solver++
    SDE is the predictor alone at tau = 1. Defaults are diffusers' ``SASolverScheduler``: orders 2 and 2, tau = 1
    for t in [0.2 T, 0.8 T] (its 200 <= timestep <= 800 of 1000) and 0 outside (``window``). Where it differs
    from the paper: the b_j are computed by quadrature rather than the closed forms of its App. B; z is the
    Brownian path's increment (``noise="brownian"``, as dpm++2m_sde) or a fresh draw (``"fresh"``)."""
    from .._random import BrownianNoise

    for name, v in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if isinstance(v, bool) or v not in (1, 2, 3, 4):
            raise ValueError(f"{name} must be one of [1, 2, 3, 4], got {v!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 2.0:
        raise ValueError(f"tau must be in [0, 2] (0: the PF ODE, 1: the reverse SDE's noise), got {tau!r}")
    lo, hi = window
    if not 0.0 <= lo < hi:
        raise ValueError(f"window must be (lo, hi) fractions of T with 0 <= lo < hi, got {window!r}")
    check_choice("noise", noise, ("brownian", "fresh"))
    T = model.process.T
    brownian = BrownianNoise(x, generator, T) if tau and noise == "brownian" else None
    hist: list[tuple[float, Tensor]] = []  # (lambda, x0), newest last
    last = None  # (x_t, coefficients at t, tau on the step, z) of the previous predictor step

    def update(x, ct, cs, nodes, tau_step, z):
        h = cs.log_snr - ct.log_snr
        b = _exp_lagrange_weights([lam - ct.log_snr for lam, _ in nodes], h, 1 + tau_step**2)
        x_s = (cs.sigma / ct.sigma * math.exp(-tau_step**2 * h)) * x + cs.alpha * sum(bj * m for bj, (_, m) in
                                                                                        zip(b, nodes))
        return x_s if z is None else x_s + (cs.sigma * math.sqrt(-math.expm1(-2 * tau_step**2 * h))) * z

    def step(x, t, s):
        nonlocal last
        out = model(x, t)
        ct = coef(model, t)
        if last is not None:  # SA-Corrector of the previous step, with the new prediction at its end
            x_prev, c_prev, tau_prev, z_prev = last
            older = hist[len(hist) - (corrector_order - 1):] if corrector_order > 1 else []
            x = update(x_prev, c_prev, ct, older + [(ct.log_snr, out.x0)], tau_prev, z_prev)
        hist.append((ct.log_snr, out.x0))
        del hist[:-max(predictor_order, corrector_order)]
        tau_step = tau if lo * T <= t <= hi * T else 0.0
        z = None
        if tau_step:
            z = brownian(t, s) if brownian is not None else noise_like(x, generator)
        last = (x, ct, tau_step, z)
        return update(x, ct, coef(model, s), hist[-predictor_order:], tau_step, z), out

    return integrate(model, x, grid, step, callback)
