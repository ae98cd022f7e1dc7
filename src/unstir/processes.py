"""Forward noise processes as continuous-time objects.

Every process has the Gaussian marginal x_t = alpha(t) x0 + sigma(t) eps for t in [t_min, T], and the
SDE dx = f(x, t) dt + g(t) dw that produces it:

    f(x, t) = (d log alpha / dt) x
    g(t)^2  = d sigma^2 / dt - 2 sigma^2 d log alpha / dt

(Song et al. 2021, eqs. 11 and 33; for VP, f = -beta/2 x and g^2 = beta as in Ho et al. 2020's
discrete chain). The log-SNR is lambda(t) = log(alpha / sigma), strictly decreasing, so it
has an inverse t(lambda) which the grids and solvers use.

Schedule quantities are computed in float64; callers cast at their boundary.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch

from ._checks import as_time, check_choice, expand_as
from ._random import randn

Tensor = torch.Tensor


def _softplus(x: Tensor) -> Tensor:
    return torch.nn.functional.softplus(x)


# --- log alpha schedules shared by VP and sub-VP ----------------------------------------------------


class LinearBeta:
    """beta(t) = beta_min + t (beta_max - beta_min); log alpha = -1/4 t^2 (bmax - bmin) - 1/2 t bmin."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (beta_min > 0 and beta_max > 0 and math.isfinite(beta_min) and math.isfinite(beta_max)):
            raise ValueError(
                f"beta_min and beta_max must be positive and finite, got beta_min={beta_min}, beta_max={beta_max}"
            )
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def dlog_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # Root of 1/4 d t^2 + 1/2 bmin t + log_alpha = 0 in the cancellation-free form.
        d = self.beta_max - self.beta_min
        return -2.0 * log_alpha / (0.5 * self.beta_min + torch.sqrt(0.25 * self.beta_min**2 - d * log_alpha))

    def config(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


class CosineSchedule:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))."""

    def __init__(self, s: float = 0.008):
        if not (0 <= s < 1):
            raise ValueError(f"cosine offset s must be in [0, 1), got {s}")
        self.s = float(s)
        self._log_c0 = math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))

    def _angle(self, t: Tensor) -> Tensor:
        return math.pi / 2 * (t + self.s) / (1 + self.s)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(torch.cos(self._angle(t))) - self._log_c0

    def dlog_alpha(self, t: Tensor) -> Tensor:
        return -torch.tan(self._angle(t)) * math.pi / (2 * (1 + self.s))

    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        return 2 * (1 + self.s) / math.pi * torch.acos(torch.exp(log_alpha + self._log_c0)) - self.s

    def config(self) -> dict:
        return {"s": self.s}


class DiscreteSchedule:
    """The DDPM schedule from a beta array, as a continuous-time VP schedule.

    Step i (the network's integer label, 0 <= i < N) sits at t_i = (i + 1) / N, where
    alpha_bar = cumprod(1 - beta)[i] exactly. Between steps the log-SNR is linear in t, so
    d log alpha / dt = sigma^2 d lambda / dt is constant on each segment.
    """

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2:
            raise ValueError(f"a discrete schedule needs at least 2 betas, got {betas.numel()}")
        bad = ~((betas > 0) & (betas < 1))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"every beta must lie in the open interval (0, 1); beta[{i}] = {betas[i].item()}")
        self.betas = betas
        self.n = betas.numel()
        self.alpha_bar = torch.cumprod(1 - betas, 0)
        self.knots_t = torch.arange(1, self.n + 1, dtype=torch.float64) / self.n
        self.knots_lambda = 0.5 * (torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar))
        self._slopes = torch.diff(self.knots_lambda) * self.n
        self._on = {torch.device("cpu"): (self.knots_t, self.knots_lambda, self._slopes)}

    def _tables(self, device) -> tuple[Tensor, Tensor, Tensor]:
        """(knot times, knot log-SNRs, slopes) on ``device`` (t's: copied there once, then kept)."""
        if device not in self._on:
            self._on[device] = tuple(v.to(device) for v in self._on[torch.device("cpu")])
        return self._on[device]

    def _segment(self, t: Tensor) -> Tensor:
        return torch.clamp(torch.floor(t * self.n).long() - 1, 0, self.n - 2)

    def log_snr(self, t: Tensor) -> Tensor:
        i = self._segment(t)
        knots_t, knots_lambda, slopes = self._tables(t.device)
        return knots_lambda[i] + (t - knots_t[i]) * slopes[i]

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * _softplus(-2 * self.log_snr(t))

    def dlog_alpha(self, t: Tensor) -> Tensor:
        sigma2 = torch.sigmoid(-2 * self.log_snr(t))
        return sigma2 * self._tables(t.device)[2][self._segment(t)]

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # lambda is decreasing in t: search the negated knots, which increase.
        knots_t, knots_lambda, slopes = self._tables(lam.device)
        i = torch.clamp(torch.searchsorted(-knots_lambda, -lam.contiguous()) - 1, 0, self.n - 2)
        return knots_t[i] + (lam - knots_lambda[i]) / slopes[i]

    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        return self.t_from_log_snr(log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha)))

    def config(self) -> dict:
        return {"betas": self.betas.tolist()}


# --- processes --------------------------------------------------------------------------------------


class Process:
    """A forward diffusion process on [t_min, T] (see the module docstring for the equations).

    Subclasses define ``_log_alpha``, ``_log_sigma``, ``_dlog_alpha``, ``_g2`` and ``_t_from_log_snr``
    on float64 tensors; the public methods validate t and broadcast.
    """

    name = "process"

    def __init__(self, t_min: float, T: float):
        if not (0 < t_min < T) or not math.isfinite(T):
            raise ValueError(f"need 0 < t_min < T, got t_min={t_min}, T={T}")
        self.t_min, self.T = float(t_min), float(T)

    # public, validated ------------------------------------------------------------------------
    def alpha(self, t) -> Tensor:
        """alpha(t), the signal coefficient of the marginal."""
        return torch.exp(self._log_alpha(self._t(t)))

    def sigma(self, t) -> Tensor:
        """sigma(t), the noise coefficient of the marginal."""
        return torch.exp(self._log_sigma(self._t(t)))

    def log_snr(self, t) -> Tensor:
        """lambda(t) = log(alpha / sigma)."""
        t = self._t(t)
        return self._log_alpha(t) - self._log_sigma(t)

    def t_from_log_snr(self, log_snr) -> Tensor:
        """The inverse of ``log_snr``; raises if lambda is outside [lambda(T), lambda(t_min)]."""
        lam = torch.as_tensor(log_snr, dtype=torch.float64)
        lo, hi = self._log_snr_range
        tol = 1e-9 * max(1.0, abs(lo), abs(hi))
        if torch.isnan(lam).any() or lam.min() < lo - tol or lam.max() > hi + tol:
            raise ValueError(f"log-SNR must lie in [{lo:.6g}, {hi:.6g}] for {self.name}, got range "
                             f"[{lam.min().item():.6g}, {lam.max().item():.6g}]")
        return self._t_from_log_snr(lam).clamp(self.t_min, self.T)

    @functools.cached_property
    def _log_snr_range(self) -> tuple[float, float]:
        return self.log_snr(self.T).item(), self.log_snr(self.t_min).item()

    def coefficients(self, t) -> "Coefficients":
        """The whole coefficient record at t (scalar or (batch,)), as float64 tensors: alpha, sigma, log-SNR,
        d log alpha / dt and g^2, with alpha' and sigma' derived from them (``Coefficients``)."""
        t = self._t(t)
        la, ls = self._log_alpha(t), self._log_sigma(t)
        return Coefficients(torch.exp(la), torch.exp(ls), la - ls, self._dlog_alpha(t), self._g2(t))

    def drift_coef(self, t) -> Tensor:
        """d log alpha / dt, so that f(x, t) = drift_coef(t) x."""
        return self._dlog_alpha(self._t(t))

    def drift(self, x: Tensor, t) -> Tensor:
        """f(x, t) = (d log alpha / dt) x."""
        return expand_as(self.drift_coef(t), x) * x

    def g2(self, t) -> Tensor:
        """g(t)^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt."""
        return self._g2(self._t(t))

    def diffusion(self, t) -> Tensor:
        """g(t)."""
        return torch.sqrt(self.g2(t))

    def perturb(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        t = self._t(t, batch=x0.shape[0])
        return expand_as(self.alpha(t), x0) * x0 + expand_as(self.sigma(t), x0) * noise

    @property
    def prior_std(self) -> float:
        """The prior at T is N(0, sigma(T)^2 I) (alpha(T) x0 is negligible by construction)."""
        return self.sigma(self.T).item()

    def prior_sample(self, shape, generator: torch.Generator | None = None, dtype=torch.float32,
                     device=None) -> Tensor:
        """Draw x_T from the prior N(0, sigma(T)^2 I)."""
        return self.prior_std * randn(shape, generator, dtype, device)

    def prior_logp(self, x: Tensor) -> Tensor:
        """log N(x; 0, sigma(T)^2 I), summed over all but the batch dimension."""
        d = x[0].numel()
        s = self.prior_std
        return -0.5 * (x.flatten(1) ** 2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def config(self) -> dict:
        return {"name": self.name, "t_min": self.t_min, "T": self.T}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k not in ("name", "betas"))
        return f"{type(self).__name__}({args})"

    # helpers ------------------------------------------------------------------------------------
    def _t(self, t, batch: int | None = None) -> Tensor:
        return as_time(t, self.t_min, self.T, batch)


class VP(Process):
    """Variance preserving: alpha^2 + sigma^2 = 1, f = -beta(t)/2 x, g^2 = beta(t) = -2 d log alpha/dt."""

    name = "vp"

    def __init__(self, schedule=None, t_min: float = 1e-3, T: float = 1.0):
        self.schedule = schedule if schedule is not None else LinearBeta()
        super().__init__(t_min, T)

    def _log_alpha(self, t):
        return self.schedule.log_alpha(t)

    def _log_sigma(self, t):
        return 0.5 * torch.log(-torch.expm1(2 * self._log_alpha(t)))

    def _dlog_alpha(self, t):
        return self.schedule.dlog_alpha(t)

    def _g2(self, t):
        return -2 * self._dlog_alpha(t)

    def _t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(2 lambda) on a VP process.
        return self.schedule.t_from_log_alpha(-0.5 * _softplus(-2 * lam))

    def config(self) -> dict:
        return {**super().config(), "schedule": type(self.schedule).__name__, **self.schedule.config()}


class SubVP(VP):
    """sub-VP (Song et al. 2021, eq. 29): alpha as VP, sigma = 1 - alpha^2, g^2 = beta (1 - alpha^4)."""

    name = "subvp"

    def _log_sigma(self, t):
        return torch.log(-torch.expm1(2 * self._log_alpha(t)))

    def _g2(self, t):
        return -2 * self._dlog_alpha(t) * -torch.expm1(4 * self._log_alpha(t))

    def _t_from_log_snr(self, lam):
        # e^lambda = a / (1 - a^2)  =>  a = 2 e^lambda / (1 + sqrt(1 + 4 e^{2 lambda})).
        log_a = math.log(2.0) + lam - torch.log1p(torch.sqrt(1 + 4 * torch.exp(2 * lam)))
        return self.schedule.t_from_log_alpha(log_a)


class VE(Process):
    """Variance exploding (NCSN): alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t,
    g^2 = d sigma^2/dt = 2 log(sigma_max/sigma_min) sigma^2 (Song et al. 2021, eq. 30)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, T: float = 1.0):
        if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max / sigma_min)
        super().__init__(t_min, T)

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _log_sigma(self, t):
        return math.log(self.sigma_min) + t * self._log_ratio

    def _dlog_alpha(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2 * self._log_ratio * torch.exp(2 * self._log_sigma(t))

    def _t_from_log_snr(self, lam):
        return (-lam - math.log(self.sigma_min)) / self._log_ratio

    def config(self) -> dict:
        return {**super().config(), "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class RF(Process):
    """Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023): alpha = 1 - t, sigma = t.

    d log alpha/dt = -1/(1 - t), g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt = 2t/(1 - t), and
    lambda = log((1 - t)/t) with inverse t = sigmoid(-lambda). g^2 and the drift blow up at t = 1 (alpha = 0:
    x / alpha, the score's x0 and the reverse SDE are all undefined there), so T = 1 - 1e-3 by default:
    the prior N(0, T^2 I) then ignores a signal of 1e-3 x0. The PF-ODE velocity f x - g^2/2 score equals
    the flow-matching target alpha' x0 + sigma' eps = eps - x0.
    """

    name = "rf"

    def __init__(self, t_min: float = 1e-3, T: float = 1 - 1e-3):
        if not T < 1:
            raise ValueError(f"rf needs T < 1 (g^2 = 2t/(1-t) is infinite at t = 1), got T={T}")
        super().__init__(t_min, T)

    def _log_alpha(self, t):
        return torch.log1p(-t)

    def _log_sigma(self, t):
        return torch.log(t)

    def _dlog_alpha(self, t):
        return -1.0 / (1.0 - t)

    def _g2(self, t):
        return 2.0 * t / (1.0 - t)

    def _t_from_log_snr(self, lam):
        return torch.sigmoid(-lam)


class DDPM(VP):
    """The discrete DDPM schedule (Ho et al. 2020) as a VP process on [1/N, 1].

    ``timestep(t)`` gives the network's label (t N - 1, an integer at the N steps) and ``t_from_timestep``
    inverts it, so a network trained on integer steps can be driven by any sampler.
    """

    name = "ddpm"

    def __init__(self, betas=None, *, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000):
        if betas is None:
            if not (isinstance(num_steps, int) and num_steps >= 2):
                raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        schedule = DiscreteSchedule(betas)
        super().__init__(schedule, t_min=1.0 / schedule.n, T=1.0)

    @property
    def num_steps(self) -> int:
        return self.schedule.n

    @property
    def alpha_bar(self) -> Tensor:
        return self.schedule.alpha_bar

    def timestep(self, t) -> Tensor:
        """Continuous t -> the network's (fractional) timestep label; step i sits at t = (i + 1)/N."""
        return self._t(t) * self.num_steps - 1

    def t_from_timestep(self, i) -> Tensor:
        i = torch.as_tensor(i, dtype=torch.float64)
        if (i < 0).any() or (i > self.num_steps - 1).any():
            raise ValueError(f"timestep must lie in [0, {self.num_steps - 1}], got {i.tolist()}")
        return (i + 1) / self.num_steps

    def _t_from_log_snr(self, lam):
        return self.schedule.t_from_log_snr(lam)

    def config(self) -> dict:
        return {"name": self.name, "betas": self.schedule.betas.tolist()}


def _cosine(**kw) -> VP:
    s = kw.pop("s", 0.008)
    kw.setdefault("T", 0.9946)  # DPM-Solver's end point: log alpha stays finite and f bounded
    return VP(CosineSchedule(s), **kw)


def _linear(cls) -> Callable[..., Process]:
    def build(beta_min: float = 0.1, beta_max: float = 20.0, **kw):
        return cls(LinearBeta(beta_min, beta_max), **kw)
    return build


PROCESSES: dict[str, Callable[..., Process]] = {
    "vp": _linear(VP),
    "vp_cosine": _cosine,
    "subvp": _linear(SubVP),
    "ve": VE,
    "ddpm": DDPM,
    "rf": RF,
}


class Coefficients(NamedTuple):
    """Schedule quantities at one time: Python floats (``coefficients``, memoised, for samplers) or float64
    tensors (``Process.coefficients``). The time derivatives follow from the record itself:
    alpha' = alpha d log alpha/dt and sigma' = (g^2 + 2 sigma^2 d log alpha/dt) / (2 sigma)."""

    alpha: float
    sigma: float
    log_snr: float
    drift: float  # d log alpha / dt
    g2: float

    @property
    def dalpha(self):
        """d alpha / dt."""
        return self.alpha * self.drift

    @property
    def dsigma(self):
        """d sigma / dt, from g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt."""
        return (self.g2 + 2 * self.sigma**2 * self.drift) / (2 * self.sigma)

    def expand_as(self, x: Tensor) -> "Coefficients":
        """Per-sample tensor entries reshaped to broadcast against x (floats pass through)."""
        return Coefficients(*(v if isinstance(v, float) else expand_as(v, x) for v in self))

    @property
    def sigma_bar(self) -> float:
        """sigma / alpha = exp(-lambda): the noise level of x / alpha (EDM's sigma)."""
        return self.sigma / self.alpha


@functools.lru_cache(maxsize=1 << 16)
def coefficients(process: Process, t: float) -> Coefficients:
    """All schedule quantities at a scalar t, memoised: samplers revisit the same grid points."""
    tt = process._t(t)
    la, ls = process._log_alpha(tt), process._log_sigma(tt)
    return Coefficients(math.exp(la.item()), math.exp(ls.item()), (la - ls).item(),
                        process._dlog_alpha(tt).item(), process._g2(tt).item())


def make_process(name: str, **kwargs) -> Process:
    """Build a process by name: one of ``PROCESSES`` ('vp', 'vp_cosine', 'subvp', 've', 'ddpm', 'rf')."""
    check_choice("process", name, PROCESSES)
    return PROCESSES[name](**kwargs)


def process_from_config(config: dict) -> Process:
    """Rebuild a process from ``Process.config()``."""
    config = dict(config)
    name = config.pop("name")
    if name == "ddpm":
        return DDPM(config["betas"])
    if name in ("vp", "subvp"):
        schedule = config.pop("schedule")
        if schedule == "CosineSchedule":
            sched = CosineSchedule(config.pop("s"))
        else:
            sched = LinearBeta(config.pop("beta_min"), config.pop("beta_max"))
        return (VP if name == "vp" else SubVP)(sched, **config)
    return make_process(name, **config)
