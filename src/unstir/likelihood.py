"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

Along a PF-ODE path, d/dt log p_t(x(t)) = -div u(x(t), t) (the instantaneous change of variables, Chen et
al. 2018), so

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^{T} div u dt.

unstir integrates it in log-SNR time with scaled state xbar = x / alpha (``unstir.pf_ode``), where the field
is G = -sbar eps and div_xbar G = -sigma div_x eps, and adds the Jacobian of x = alpha xbar at both ends:

    log p_{t_min}(x) = log pi(x_T) + d log(alpha_T / alpha_{t_min}) + int_{lambda(t_min)}^{lambda(T)} div G d lambda,

with pi the prior N(0, sigma_T^2 I) standing in for p_T (their gap is reported as ``prior``'s mismatch in
the tests and shrinks as T grows).

**Coordinates and units.** ``nats`` is the log-density of x, taken as a sample at t_min, in the model's own
coordinates (the [-1, 1] scaling of images, or vectors as given). ``bits_per_dim`` for continuous data is
-nats / (d ln 2), which can be negative (a density can exceed 1).

**Quantised data.** With ``levels=L`` the data are declared to be L evenly spaced values k 2/(L-1) - 1,
k = 0 .. L-1, the way unstir scales integer images (8-bit: L = 256; scikit-learn's digits: L = 17). Each
value stands for the bin of width Delta = 2/(L-1) around it; x is dequantised with uniform noise across its
bin (Uria et al. 2013; Theis et al. 2016), and log P(k) >= E_u[log p(x + u)] + d log Delta, so

    bits_per_dim = -(nats + d log Delta) / (d ln 2) = -nats / (d ln 2) + log2((L - 1) / 2),

an upper bound on the discrete data's bits/dim. The offset is that of the declared L, nothing else (for
8-bit data log2(127.5) = 6.99; score_sde's "+7" assumes 8-bit data scaled to [-1, 1] with bins of 2/256).
Image data without ``levels`` are refused unless ``continuous=True`` says the density is wanted.

**Batch independence.** torchdiffeq's adaptive step control takes one error norm over the whole batch, so
in the peers' code a sample's likelihood depends on its batch mates (at loose tolerances by as much as the
global error, measured in benchmarks/likelihood_results.md). Here every sample has its own step sizes and
its own error control (torchode's batched Dormand-Prince, Lienen & Guennemann 2022): the model is still
evaluated once per stage for the whole batch, at per-sample times, but a sample's steps depend on its own
error only, so the same x gives the same result in any batch (tests/test_likelihood.py).

**Accuracy and cost.** ``accuracy`` (default 0.01 nats per dimension) sets the error control; ``rtol``/``atol``
override the state's tolerances it implies. Three choices, each measured (benchmarks/likelihood.py;
tuning cases ring(), random_mixture(16, 4, seed=11) and random_mixture(64, 4, seed=11), not those judged):

* the state x is controlled at rtol = atol = accuracy / 20;
* the log-density is integrated as its own component, scaled so that the controller allows a local error of
  accuracy / 10 nats per dimension per step in it (with one RMS norm over d + 1 components its error was
  barely controlled in low d: at rtol 1e-3, p90 errors of 0.026-0.037 on the 2-D ring);
* a PI step-size controller (Soderlind 2003; torchode's ``PIDController`` with pcoeff 0.4, icoeff 0.3)
  instead of the integral one: almost no rejected steps, and at equal tolerance errors 3-10 times smaller.

Measured on the held-out cases (benchmarks/likelihood_default_results.md: unequal_2d, 200 samples;
random_mixture(16, 4, seed=3), 200; random_mixture(64, 4, seed=3), 30; vp, sub-VP, VE, rf; exact prior):
p90 per-sample error 0.0005-0.0075 nats/dim (median 0.0002-0.0009). A sample's own steps take 55-73
evaluations at the median (9-12 steps of 6); the batch runs until its slowest sample is done, 79-127
evaluations (reported as ``nfe``; per sample in ``sample_nfe``). score_sde's tolerance (rtol = atol = 1e-5,
the earlier default) costs 151-205 evaluations for a p90 of 0.00002-0.00025; ``accuracy=1e-3`` sits between
(p90 0.0001-0.001, 73-109 at the median).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from ._checks import check_choice
from ._random import draw
from .parametrization import in_graph
from .pf_ode import divergence as divergence_of
from .pf_ode import draw_probes
from .processes import coefficients

Tensor = torch.Tensor
DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


@dataclass
class LikelihoodResult:
    """Per-sample results of ``log_likelihood`` (tensors of shape (batch,), float64)."""

    nats: Tensor           # log p_{t_min}(x) in the model's coordinates (of the dequantised x with levels)
    bits_per_dim: Tensor   # -nats/(d ln 2), or the discrete data's bits/dim with levels (module docstring)
    prior: Tensor          # log pi(x_T), the prior's log-density at the encoded point
    divergence: Tensor     # the rest: d log(alpha_T/alpha_t_min) + the integrated divergence
    nfe: int               # evaluations of the augmented field for the batch (each: one forward, one batched
                           # backward), i.e. those of its slowest sample; with batch_size, the costliest part's
    sample_nfe: Tensor     # the evaluations each sample's own steps needed (6 per Dormand-Prince step, + 1)
    stderr: Tensor | None  # Hutchinson: standard error of nats over the probes (None if exact)
    latent: Tensor         # x_T, the PF-ODE encoding of x
    levels: int | None

    def mean(self) -> tuple[float, float]:
        """(mean bits/dim, its standard error over the batch)."""
        b = self.bits_per_dim
        return b.mean().item(), (b.std() / math.sqrt(b.numel())).item() if b.numel() > 1 else float("nan")


def log_likelihood(model, x: Tensor, *, y: Tensor | int | None = None, divergence: str = "auto",
                   probes: int = 8, probe: str = "rademacher", accuracy: float = 0.01,
                   rtol: float | None = None, atol: float | None = None,
                   levels: int | None = None, continuous: bool = False,
                   prior_logp: Callable[[Tensor], Tensor] | None = None, batch_size: int | None = None,
                   generator: torch.Generator | None = None, progress: bool = False) -> LikelihoodResult:
    """The model's log-likelihood of each sample of ``x`` (shape (batch, *data_shape)), by the PF ODE.

    ``divergence``: 'exact' (default for d <= 64), 'hutchinson' (default above) with ``probes`` probes of
    kind ``probe`` per sample, drawn once from ``generator`` and fixed over the solve. ``accuracy``: the
    target error in nats per dimension that sets the adaptive solver's error control; ``rtol``/``atol``
    override its tolerances on the state (per sample, see the module docstring). ``levels``: the data are quantised
    to that many levels in [-1, 1] and are dequantised here (``generator`` draws the noise).
    ``prior_logp`` replaces the prior's log-density at T (tests use the oracle's exact log p_T).
    ``batch_size`` splits the work into independent solves.
    """
    from .samplers import check_labels

    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("probe", probe, PROBES)
    x = _check_data(model, x, levels, continuous)
    for name, tol in (("accuracy", accuracy), ("rtol", rtol), ("atol", atol)):
        if tol is None and name != "accuracy":
            continue
        if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a positive number, got {tol!r}")
    rtol = accuracy / 20 if rtol is None else rtol
    atol = accuracy / 20 if atol is None else atol
    d = x[0].numel()
    kind = ("exact" if d <= 64 else "hutchinson") if divergence == "auto" else divergence
    if kind == "hutchinson" and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    y = check_labels(model, y, x.shape[0], x.device)
    if levels is not None:
        u = draw(lambda s, g: torch.rand(s, generator=g, dtype=x.dtype), x.shape, generator, x.device)
        x = x + (u - 0.5) * (2.0 / (levels - 1))
    v = draw_probes(probe, probes, x, generator) if kind == "hutchinson" else None
    step = batch_size or x.shape[0]
    parts = [_solve(model, x[i:i + step], None if y is None else y[i:i + step],
                    None if v is None else v[:, i:i + step], rtol, atol, accuracy / 10, prior_logp, progress)
             for i in range(0, x.shape[0], step)]
    prior, rest, latent, sample_nfe = (torch.cat([p[k] for p in parts]) for k in (0, 1, 2, 4))
    per_probe = prior[:, None] + rest
    nats = per_probe.mean(1)
    stderr = per_probe.std(1) / math.sqrt(probes) if kind == "hutchinson" and probes > 1 else None
    bpd = -nats / (d * math.log(2))
    if levels is not None:
        bpd = bpd + math.log2((levels - 1) / 2)
    return LikelihoodResult(nats, bpd, prior, rest.mean(1), max(p[3] for p in parts), sample_nfe, stderr, latent,
                            levels)


def _solve(model, x, y, probes, rtol, atol, per_step, prior_logp, progress):
    """One adaptive solve of the augmented ODE for a batch, every sample with its own steps (torchode):
    (prior term, rest per probe, x_T, nfe, per-sample nfe). The log-density components are integrated scaled by
    w = atol / (per_step d), so that the controller's bound atol + rtol |w logp| ~ atol on them allows a local
    error of ``per_step`` nats per dimension (w |logp| << 1)."""
    import torchode

    process = model.process
    batch, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    c0, cT = coefficients(process, process.t_min), coefficients(process, process.T)
    lam0, lamT = c0.log_snr, cT.log_snr
    bar = tqdm(total=1000, disable=not progress, desc="likelihood (of the log-SNR range, slowest sample)",
               unit="", bar_format="{l_bar}{bar}| {elapsed} {postfix}", mininterval=0.5)
    calls = 0

    def field(lam, state):
        nonlocal calls
        calls += 1
        lam = lam.clamp(min(lam0, lamT), max(lam0, lamT))
        c = process.coefficients(process.t_from_log_snr(lam))
        xbar = state[:, :d].reshape(batch, *shape)
        alpha = c.alpha.reshape(-1, *([1] * len(shape)))
        eps, div = divergence_of(lambda z: in_graph(model(z, process.t_from_log_snr(lam), y), "the likelihood").eps,
                                 (alpha * xbar).to(x.dtype), probes)
        done = round(1000 * ((lam - lam0) / (lamT - lam0)).min().item())
        if done > bar.n:
            bar.set_postfix(nfe=calls, refresh=False)
            bar.update(done - bar.n)
        return torch.cat([-(c.sigma / c.alpha)[:, None] * eps.to(torch.float64).flatten(1),
                          -(w * c.sigma)[:, None] * div.to(torch.float64).reshape(batch, -1)], 1)

    k = 1 if probes is None else probes.shape[0]
    w = atol / (per_step * d)
    state = torch.cat([x.to(torch.float64).flatten(1) / c0.alpha,
                       torch.zeros(batch, k, dtype=torch.float64, device=x.device)], 1)
    t_eval = torch.tensor([lam0, lamT], dtype=torch.float64, device=x.device).expand(batch, 2)
    term = torchode.ODETerm(field)
    controller = torchode.PIDController(atol=atol, rtol=rtol, pcoeff=0.4, icoeff=0.3, dcoeff=0.0, term=term)
    solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller)
    problem = torchode.InitialValueProblem(y0=state, t_eval=t_eval)
    dt0 = torch.full((batch,), 0.02 * (lamT - lam0), dtype=torch.float64, device=x.device)
    sol = solver.solve(problem, dt0=dt0)
    bar.close()
    if not (sol.status == 0).all():
        raise FloatingPointError(f"the likelihood ODE solve failed for {int((sol.status != 0).sum())} of {batch} "
                                 f"samples (torchode status {sol.status.unique().tolist()})")
    end = sol.ys[:, -1]
    x_T = (cT.alpha * end[:, :d]).reshape(batch, *shape)
    prior = (prior_logp or process.prior_logp)(x_T).to(torch.float64)
    rest = d * (math.log(cT.alpha) - math.log(c0.alpha)) + end[:, d:] / w
    return prior, rest, x_T, calls, 6 * sol.stats["n_steps"].to(torch.long).cpu() + 1


def _check_data(model, x, levels, continuous) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of shape (batch, *data_shape), got {type(x).__name__}")
    data_shape = getattr(model, "data_shape", None)
    if x.ndim < 2 or (data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape)):
        raise ValueError(f"x must have shape (batch, *{tuple(data_shape) if data_shape else 'data_shape'}), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point in the model's coordinates, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    if levels is not None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
        k = (x.double() + 1) * (levels - 1) / 2
        if k.min() < -1e-4 or k.max() > levels - 1 + 1e-4 or (k - k.round()).abs().max() > 1e-3:
            raise ValueError(f"with levels={levels} the data must be the values k*2/{levels - 1} - 1, k = 0..{levels - 1} "
                             f"(in [-1, 1]); got values in [{x.min().item():.4g}, {x.max().item():.4g}] off that lattice")
    elif x.ndim == 4 and not continuous:
        raise ValueError("image data are quantised: pass levels= (256 for 8-bit images, 17 for digits) to get "
                         "bits/dim of the discrete data, or continuous=True for the density of the values as "
                         "given (which can exceed 1: bits/dim can then be negative)")
    return x
