"""Denoising score matching (Vincent 2011; Song et al. 2021, eq. 7), for any process and output type.

With x_t = alpha x0 + sigma eps, the regression target of the score is -eps / sigma, so

    lambda(t) || s_theta(x_t, t) + eps / sigma ||^2 = (lambda(t) / sigma^2) || eps_theta - eps ||^2

and every weighting is a factor w(t) = lambda(t) / sigma(t)^2 on the eps error (the model wrapper converts
whatever the network predicts to eps):

* ``simple``:     w = 1, mean over dimensions (DDPM's L_simple, Ho et al. 2020).
* ``sigma2``:     lambda = sigma^2, i.e. w = 1 summed over dimensions (score_sde's default). The two are
                  the same objective up to the constant dimension count; both are offered by name.
* ``likelihood``: lambda = g(t)^2, i.e. w = g^2 / sigma^2 (Song et al. 2021b): the weighted loss bounds
                  the negative log-likelihood. ``importance=True`` draws t from p(t) ~ g^2/sigma^2 and
                  weighs by the normaliser, an unbiased estimate of the same loss with lower variance.
                  As a training objective it is that bound's t-dependent part up to constants: the factor
                  1/2, the prior term and the sum over dimensions (here a mean) are left out.
* ``velocity``:   w = (g^2 / 2 sigma)^2, i.e. || u_theta - u ||^2 with u = alpha' x0 + sigma' eps, mean over
                  dimensions: the conditional flow-matching loss (Lipman et al. 2023; Liu et al. 2023), since
                  the velocity is f x + g^2/(2 sigma) eps. It is evaluated in velocity coordinates, so the
                  large factor near T on the rectified-flow process costs no precision.
* ``min-snr``:    w = min(SNR, gamma) / SNR with SNR = alpha^2 / sigma^2 and gamma = ``snr_gamma`` (5 by
                  default), mean over dimensions: Min-SNR-gamma (Hang et al. 2023, eq. 12). The paper writes
                  it on the x0 error, w_x0 = min(SNR, gamma); since ||x0 - x0_theta||^2 = ||eps - eps_theta||^2
                  / SNR, that is this factor on the eps error for every prediction type. Their v form,
                  min(SNR, gamma) / (SNR + 1) on ||v - v_theta||^2 with v = alpha eps - sigma x0, is the same
                  loss only where alpha^2 + sigma^2 = 1 (vp, ddpm, vp_cosine); on rf, ve and subvp it is not, and
                  unstir uses eq. 12 as written (the x0 form). It is ``simple`` at noise levels with SNR <= gamma
                  and gives the
                  low-noise levels, where the eps error is large and says little about the sample, less weight.
* ``edm``:        lambda_x0 = 1 / c_out^2 on the x0 error (Karras et al. 2022, sec. 5, eq. 8 and Table 1), i.e. unit
                  weight on the error of EDM's raw output F, mean over dimensions; it is evaluated in F coordinates
                  (``ModelOutput.edm``, target (sigma x0 - alpha sd^2 eps) / (sd r), r^2 = sigma^2 + alpha^2 sd^2),
                  for any prediction type, and is EDM's loss with ``prediction='edm'``.

t is uniform on [t_min, T], or uniform over the integer steps on a discrete DDPM process
(``discrete=True``). With ``time_sampling="logit-normal"`` it is instead t_min + (T - t_min) u with
logit(u) ~ N(m, s^2), ``logit_normal=(m, s)``, (0, 1) by default: Esser et al. (2024, sec. 3.1), which ranked
among the best rectified-flow variants they compared. It spends the training batch on intermediate noise levels,
where the prediction is hardest; in expectation it is the uniform loss with the extra weight pi(t). On a
discrete process u is floored to an integer step. The paper draws u on (0, 1) with t = u; here u is mapped
linearly onto [t_min, T], which on ``rf`` (t_min = 1e-3, T = 1 - 1e-3) differs from it by at most 1e-3 in t.
With ``time_sampling="log-normal"`` the noise level sigma~ = sigma / alpha = exp(-log_snr) is log-normal, ln
sigma~ ~ N(P_mean, P_std^2), ``log_normal=(P_mean, P_std)``, (-1.2, 1.2) by default: EDM's training noise
distribution (Karras et al. 2022, Table 1), for every process through its log-SNR (on VE, sigma~ is EDM's sigma);
draws outside the process's [sigma~(t_min), sigma~(T)] are clamped to its ends (on 've' with sigma in [0.01, 50],
0.25 % of the draws). It is refused on discrete DDPM timesteps, which have no continuum of levels to draw from.
Both are refused with the ``likelihood`` weighting, which draws t from its own density to estimate the
likelihood bound.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_positive
from .processes import DDPM, Process

Tensor = torch.Tensor

WEIGHTINGS = ("simple", "sigma2", "likelihood", "velocity", "min-snr", "edm")
TIME_SAMPLINGS = ("uniform", "logit-normal", "log-normal")


class TimeSampler:
    """Draws training times for a process and weighting, with the matching per-sample weights."""

    def __init__(self, process: Process, weighting: str = "simple", *, discrete: bool = False,
                 importance: bool = True, table_size: int = 4096, snr_gamma: float = 5.0,
                 time_sampling: str = "uniform", logit_normal: tuple[float, float] = (0.0, 1.0),
                 log_normal: tuple[float, float] = (-1.2, 1.2)):
        check_choice("weighting", weighting, WEIGHTINGS)
        self.snr_gamma = check_positive("snr_gamma", snr_gamma)
        self.time_sampling, self.logit_normal = time_sampling, check_time_sampling(time_sampling, logit_normal,
                                                                                   weighting)
        self.log_normal = check_logit_normal(log_normal, "log_normal")
        if discrete and not isinstance(process, DDPM):
            raise ValueError(f"discrete=True needs a 'ddpm' process, got {process.name!r}")
        if discrete and time_sampling == "log-normal":
            raise ValueError("time_sampling='log-normal' draws a continuous noise level; discrete DDPM timesteps "
                             "have none between their steps: use time_sampling='uniform' or 'logit-normal'")
        self.process, self.weighting, self.discrete = process, weighting, discrete
        self.importance = importance and weighting == "likelihood"
        if self.importance:
            # Inverse-CDF table of p(t) ~ g^2/sigma^2, on a grid dense near t_min where it peaks.
            u = torch.linspace(0, 1, table_size, dtype=torch.float64)
            if discrete:
                t = process.t_from_timestep(torch.arange(process.num_steps))
                dens = self._w(t)
                self._t, self._cdf = t, torch.cumsum(dens, 0) / dens.sum()
                self._norm = dens.mean().item()
            else:
                t = process.t_min * (process.T / process.t_min) ** u
                dens = self._w(t)
                cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                                 torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * torch.diff(t), 0)])
                self._norm = cdf[-1].item() / (process.T - process.t_min)
                self._t, self._cdf = t, cdf / cdf[-1]

    def _w(self, t: Tensor) -> Tensor:
        return self.process.g2(t) / self.process.sigma(t) ** 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(t, w): n times (float64) and the weight of each sample's squared eps error."""
        p = self.process
        if self.time_sampling == "log-normal":  # ln sigma~ = -log_snr ~ N(P_mean, P_std^2), clamped to [t_min, T]
            m, s = self.log_normal
            lo, hi = p.log_snr(p.T).item(), p.log_snr(p.t_min).item()
            lam = -(m + s * torch.randn(n, generator=generator, dtype=torch.float64))
            t = p.t_from_log_snr(lam.clamp(lo, hi))
            return t, self._weights(t)
        if self.time_sampling == "logit-normal":
            m, s = self.logit_normal
            u = torch.sigmoid(m + s * torch.randn(n, generator=generator, dtype=torch.float64))
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.importance:
            if self.discrete:
                t = self._t[torch.searchsorted(self._cdf, u).clamp(max=len(self._t) - 1)]
            else:
                i = torch.searchsorted(self._cdf, u).clamp(1, len(self._t) - 1)
                c0, c1 = self._cdf[i - 1], self._cdf[i]
                t = self._t[i - 1] + (u - c0) / (c1 - c0).clamp_min(1e-300) * (self._t[i] - self._t[i - 1])
                t = t.clamp(p.t_min, p.T)
            return t, torch.full((n,), self._norm, dtype=torch.float64)
        if self.discrete:
            t = p.t_from_timestep(torch.floor(u * p.num_steps).clamp(max=p.num_steps - 1))
        else:
            t = p.t_min + (p.T - p.t_min) * u
        return t, self._weights(t)

    def _weights(self, t: Tensor) -> Tensor:
        if self.weighting == "likelihood":
            return self._w(t)
        if self.weighting == "min-snr":  # min(SNR, gamma) / SNR = min(1, gamma / SNR)
            return (self.snr_gamma * torch.exp(-2 * self.process.log_snr(t))).clamp(max=1.0)
        return torch.ones(t.shape[0], dtype=torch.float64)


def check_time_sampling(time_sampling: str, logit_normal, weighting: str) -> tuple[float, float]:
    """A known time distribution that the weighting allows; returns the checked (m, s)."""
    check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    if time_sampling != "uniform" and weighting == "likelihood":
        raise ValueError(f"time_sampling={time_sampling!r} reweights the loss over t; the 'likelihood' weighting "
                         "keeps its own density of t (the likelihood bound's), so it needs time_sampling='uniform'")
    return check_logit_normal(logit_normal)


def check_logit_normal(value, name: str = "logit_normal") -> tuple[float, float]:
    """(m, s) of the logit-normal (or log-normal) time distribution: a finite mean and a positive std."""
    try:
        m, s = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (mean, std), got {value!r}") from None
    if not (math.isfinite(m) and math.isfinite(s) and s > 0):
        raise ValueError(f"{name} needs a finite mean and a std > 0, got {value!r}")
    return m, s


def dsm_loss(model, x0: Tensor, t: Tensor, w: Tensor, noise: Tensor, weighting: str = "simple",
             labels: Tensor | None = None) -> Tensor:
    """The weighted denoising score-matching loss of a batch, given its times, weights and noise.

    ``model`` is a ``Denoiser``; ``labels`` (optional) are passed to networks that take classes.
    """
    process = model.process
    x_t = process.perturb(x0, t, noise)
    out = model(x_t, t, y=labels)
    if weighting == "velocity":
        err = (out.velocity - (out.c.dalpha * x0 + out.c.dsigma * noise)).square().flatten(1)
    elif weighting == "edm":  # unit weight on F: (sigma x0 - alpha sd^2 eps) / (sd r), no division by alpha or sigma
        c, sd = out.c, out.sigma_data
        r = (c.sigma**2 + c.alpha**2 * sd**2) ** 0.5
        err = (out.edm - (c.sigma * x0 - (c.alpha * sd**2) * noise) / (sd * r)).square().flatten(1)
    else:
        err = (out.eps - noise).square().flatten(1)
    per_sample = err.sum(1) if weighting == "sigma2" else err.mean(1)
    return (w.to(per_sample) * per_sample).mean()
