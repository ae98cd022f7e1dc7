"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

Along a PF-ODE path, d/dt log p_t(x(t)) = -div u(x(t), t) (the instantaneous change of variables, Chen et
al. 2018), so

    log p_{t_min}(x) = log p_T(x_T) + int_{t_min}^{T} div u dt.

unstir integrates it in log-SNR time lambda, in coordinates taken relative to the exact flow of a reference
Gaussian N(m, C), C = U diag(l) U^T: the data's moments when given (``moments``; ``unstir train`` stores them),
N(0, I) otherwise. With rho = sigma/alpha and xbar = x/alpha the PF ODE is d xbar/d rho = eps(x, t) for every
process; for Gaussian data eps = rho (C + rho^2 I)^-1 (xbar - m), whose flow keeps each eigen-coordinate
z_k = u_k^T (xbar - m) proportional to s_k = sqrt(l_k + rho^2) (the flow of ``unstir.teleport``). So the state
is the whitened w_k = z_k / s_k, constant along the reference's flow, and the log-density is carried as
l = log p(xbar) + sum_k log s_k, constant for the reference too:

    dw_k/d lambda = -rho (u_k^T eps - rho w_k / s_k) / s_k,
    dl/d lambda   = rho (div_xbar eps - sum_k rho / s_k^2),   div_xbar eps = alpha div_x eps,

(lambda = log(alpha/sigma) here, d rho/d lambda = -rho). Both right-hand sides are the model's departure from
the reference Gaussian: nearly 0 at high noise, where p_t is nearly Gaussian, so the adaptive solver crosses
that part in a few growing steps instead of following the exponential growth of xbar (at equal
tolerances on the tuning cases, 10-25% fewer evaluations per sample than the plain xbar state, in a one-off
comparison during development; for Gaussian data with their own moments the whole solve takes 3-4 steps). It is a change of variables, not an approximation: any reference gives
the exact result, only the cost differs (tests/test_likelihood.py). Adding the Jacobians of x = alpha xbar
and of the whitening at both ends,

    log p_{t_min}(x) = log pi(x_T) + d log(alpha_T / alpha_{t_min}) + sum_k log(s_k(T) / s_k(t_min))
                       + int_{lambda(t_min)}^{lambda(T)} -dl/d lambda d lambda,

with pi the prior N(0, sigma_T^2 I) standing in for p_T (their gap is reported as ``prior``'s mismatch in
the tests and shrinks as T grows). The rotation by U costs 2 d^2 operations per sample and evaluation.

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

**Batch independence and cost.** torchdiffeq's adaptive step control takes one error norm over the whole
batch, so in the peers' code a sample's likelihood depends on its batch mates (at loose tolerances by as much
as the global error, measured in benchmarks/likelihood_results.md). Here every sample has its own step sizes
and its own error control (torchode's batched Dormand-Prince, Lienen & Guennemann 2022): the model is
evaluated once per stage at per-sample times, but a sample's steps depend on its own error only, so the same x
gives the same result in any batch (tests/test_likelihood.py). The model is evaluated on the samples still
running only (torchode's solver evaluates every sample at every stage; ``_method`` tells the field which are
running), so a batch costs the mean of its samples' evaluations, not the slowest sample's; the slowest sets
the number of sequential calls (``nfe``).

**Accuracy and cost.** ``accuracy`` (default 0.01 nats per dimension) sets the error control; ``rtol``/``atol``
override the state's tolerances it implies. The choices, each measured on the tuning cases ring(),
random_mixture(16, 4, seed=11) and random_mixture(64, 4, seed=11), not those judged
(``benchmarks/likelihood.py --tuning`` prints the sweep):

* the whitened state w is controlled at atol = accuracy / 80 and rtol = 0: w is O(1) in every direction, so
  one absolute tolerance is scale-free and does not depend on how the axes are rotated (a relative term made
  the 2-D ring's cost depend on a mode's angle);
* the log-density is integrated as its own component, scaled so that the controller allows a local error of
  accuracy / 10 nats per dimension per step in it (with one RMS norm over d + 1 components its error was
  barely controlled in low d);
* a PI step-size controller (Soderlind 2003; torchode's ``PIDController`` with pcoeff 0.4, icoeff 0.3)
  instead of the integral one: fewer rejected steps, and at equal tolerance errors 3-10 times smaller.

On the tuning cases (other draws) this gives a p90 per-sample error of at most 0.0034 nats/dim at a mean of
at most 83 evaluations per sample; the earlier default (the plain xbar state at rtol = atol = accuracy / 20)
had p90 up to 0.015 at up to 85. Measured on the held-out cases: benchmarks/likelihood_default_results.md.
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
from .teleport import GaussianReference

Tensor = torch.Tensor
DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
# the error control that ``accuracy`` (nats per dimension) sets: state tolerances, and the local error allowed
# per step in the log-density (module docstring; chosen on the tuning cases)
RTOL, ATOL, PER_STEP = 0.0, 1 / 80, 1 / 10


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
                   prior_logp: Callable[[Tensor], Tensor] | None = None, moments=None,
                   batch_size: int | None = None, generator: torch.Generator | None = None, progress: bool = False) -> LikelihoodResult:
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
        if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol)
                                         and (tol >= 0 if name == "rtol" else tol > 0)):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'rtol' else 'positive'} number, "
                             f"got {tol!r}")
    rtol = accuracy * RTOL if rtol is None else rtol
    atol = accuracy * ATOL if atol is None else atol
    d = x[0].numel()
    if moments is not None:
        from .teleport import Moments

        if not isinstance(moments, Moments):
            raise TypeError(f"moments must be unstir.teleport.Moments (the data's mean and covariance), got "
                            f"{type(moments).__name__}")
        if moments.dim != d:
            raise ValueError(f"the moments have {moments.dim} values per sample, the data {d}")
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
                    None if v is None else v[:, i:i + step], rtol, atol, accuracy * PER_STEP, prior_logp, moments,
                    progress)
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


_METHOD = None


def _method():
    """torchode's Dormand-Prince, told which samples are still running, so that the field evaluates the
    model on those only: a finished sample costs nothing while its batch mates go on (torchode itself
    evaluates every sample at every stage and discards the finished ones' results)."""
    global _METHOD
    if _METHOD is None:
        import torchode

        class Dopri5SkippingFinished(torchode.Dopri5):
            running = None

            def step(self, term, running, y0, t0, dt, state, *, stats, args):
                self.running = running
                return super().step(term, running, y0, t0, dt, state, stats=stats, args=args)

        _METHOD = Dopri5SkippingFinished
    return _METHOD


def _solve(model, x, y, probes, rtol, atol, per_step, prior_logp, moments, progress):
    """One adaptive solve of the augmented ODE for a batch, every sample with its own steps (torchode), in
    the coordinates relative to the reference Gaussian's flow (module docstring): (prior term, rest per
    probe, x_T, calls, per-sample nfe). The log-density component is integrated scaled by
    w = atol / (per_step d), so that the controller's bound on it allows a local error of ``per_step`` nats
    per dimension per step."""
    import torchode

    process = model.process
    batch, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    c0, cT = coefficients(process, process.t_min), coefficients(process, process.T)
    lam0, lamT = c0.log_snr, cT.log_snr
    ref = GaussianReference(moments, d, x.device)
    bar = tqdm(total=1000, disable=not progress, desc="likelihood (of the log-SNR range, slowest sample)",
               unit="", bar_format="{l_bar}{bar}| {elapsed} {postfix}", mininterval=0.5)
    calls = 0

    def field(lam, state):
        nonlocal calls
        calls += 1
        running = method.running
        rows = None if running is None or bool(running.all()) else running.nonzero().squeeze(1)
        out = torch.zeros_like(state)
        if rows is not None:
            if rows.numel() == 0:
                return out
            lam, state = lam[rows], state[rows]
        lam = lam.clamp(min(lam0, lamT), max(lam0, lamT))
        t = process.t_from_log_snr(lam)
        c = process.coefficients(t)
        rho = c.sigma / c.alpha
        s = ref.scale(rho)
        xbar = ref.unwhiten(state[:, :d], rho)
        z = (c.alpha[:, None] * xbar).to(x.dtype).reshape(-1, *shape)
        yy = y if y is None or rows is None or y.ndim == 0 else y[rows]
        pp = probes if probes is None or rows is None else probes[:, rows]
        eps, div = divergence_of(lambda q: in_graph(model(q, t, yy), "the likelihood").eps, z, pp)
        # the model's eps against the reference Gaussian's, rho (C + rho^2)^-1 (xbar - m) = rho w / s in its
        # eigenbasis
        gap = ref.rotate(eps.to(torch.float64).flatten(1)) - rho[:, None] * state[:, :d] / s
        div_gap = c.alpha[:, None] * div.to(torch.float64).reshape(z.shape[0], -1) \
            - (rho[:, None] * s.pow(-2)).sum(1, keepdim=True)
        value = torch.cat([-rho[:, None] * gap / s, -(w * rho)[:, None] * div_gap], 1)
        done = round(1000 * ((lam - lam0) / (lamT - lam0)).min().item())
        if done > bar.n:
            bar.set_postfix(nfe=calls, refresh=False)
            bar.update(done - bar.n)
        if rows is None:
            return value
        out[rows] = value
        return out

    k = 1 if probes is None else probes.shape[0]
    w = atol / (per_step * d)
    rho0, rhoT = (torch.tensor([c.sigma / c.alpha], dtype=torch.float64, device=x.device) for c in (c0, cT))
    state = torch.cat([ref.whiten(x.to(torch.float64).flatten(1) / c0.alpha, rho0),
                       torch.zeros(batch, k, dtype=torch.float64, device=x.device)], 1)
    t_eval = torch.tensor([lam0, lamT], dtype=torch.float64, device=x.device).expand(batch, 2)
    term = torchode.ODETerm(field)
    method = _method()(term=term)
    controller = torchode.PIDController(atol=atol, rtol=rtol, pcoeff=0.4, icoeff=0.3, dcoeff=0.0, term=term)
    solver = torchode.AutoDiffAdjoint(method, controller)
    problem = torchode.InitialValueProblem(y0=state, t_eval=t_eval)
    dt0 = torch.full((batch,), 0.02 * (lamT - lam0), dtype=torch.float64, device=x.device)
    sol = solver.solve(problem, dt0=dt0)
    bar.close()
    if not (sol.status == 0).all():
        raise FloatingPointError(f"the likelihood ODE solve failed for {int((sol.status != 0).sum())} of {batch} "
                                 f"samples (torchode status {sol.status.unique().tolist()})")
    end = sol.ys[:, -1]
    x_T = (cT.alpha * ref.unwhiten(end[:, :d], rhoT)).reshape(batch, *shape)
    prior = (prior_logp or process.prior_logp)(x_T).to(torch.float64)
    # log p(x) = log p_T(x_T) + d log(alpha_T / alpha_0) + sum_k log(s_k(T) / s_k(t_min)) + the integrated gap
    jacobian = d * (math.log(cT.alpha) - math.log(c0.alpha)) + (ref.scale(rhoT).log() - ref.scale(rho0).log()).sum()
    rest = jacobian + end[:, d:] / w
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
