"""Solvers of the probability-flow ODE.

The same ODE in three sets of coordinates:

* in t:                       dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)     (ode_euler, ode_heun)
* in xbar = x/alpha,
  sbar = sigma/alpha:         d xbar / d sbar = eps(x, t)                  (ddim, deis, edm; ode_rk45 in lambda)
* in lambda = log(alpha/sigma),
  exact in its linear part:   x_s = (sigma_s/sigma_t) x_t + sigma_s int e^lambda x0 d lambda   (dpm++)

``dpmpp`` with ``eta > 0`` integrates the reverse SDE in the same coordinates (DPM-Solver++ SDE): the one
stochastic solver here, because it is the same exponential integrator with a heavier linear term.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .._checks import check_choice
from ..pf_ode import LogSNRField
from .._random import BrownianNoise
from ..teleport import GaussianReference
from .base import check_finite, coef, integrate, noise_like

Tensor = torch.Tensor


def ode_euler(model, x, grid, *, generator=None, callback=None):
    """Euler on dx/dt = f - 1/2 g^2 score. First order."""
    def step(x, t, s):
        out = model(x, t)
        return x.add(out.velocity, alpha=s - t), out

    return integrate(model, x, grid, step, callback)


def ode_heun(model, x, grid, *, generator=None, callback=None):
    """Heun (explicit trapezoid) on dx/dt = f - 1/2 g^2 score. Second order, two evaluations per step."""
    def step(x, t, s):
        out = model(x, t)
        d1 = out.velocity
        x_euler = torch.add(x, d1, alpha=s - t)  # fused: x + (s - t) d1
        d2 = model(x_euler, s).velocity
        return torch.add(x, d1 + d2, alpha=0.5 * (s - t)), out

    return integrate(model, x, grid, step, callback)


def check_tolerances(rtol, atol) -> None:
    """An adaptive solver's tolerances: finite numbers >= 0, not both 0 (no step could then be accepted)."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0: no step could meet them; use e.g. rtol = atol = 1e-5")


def ode_rk45(model, x, grid, *, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
             progress: bool = False, generator=None, callback=None):
    """Adaptive Runge-Kutta (Dormand-Prince 5(4) by default, through torchdiffeq) on the PF ODE in
    log-SNR time, d xbar / d lambda = -sbar eps(alpha xbar, t(lambda)) (``unstir.pf_ode.LogSNRField``).

    The cost is set by ``rtol`` and ``atol``, not by the grid: the grid's positive points are only the
    output times (for the callback), and a final 0 adds the denoising step. The grid may also ascend
    (t_min -> T: encoding). ``unstir.sample`` counts the evaluations used; ``progress`` shows a bar.
    """
    from torchdiffeq import odeint

    check_tolerances(rtol, atol)
    times = grid[grid > 0].tolist()
    if grid[-1] == 0 and times[-1] != model.process.t_min:
        times.append(model.process.t_min)  # [T, 0] (steps=1): still solve down to t_min before denoising
    lams = torch.tensor([coef(model, t).log_snr for t in times], dtype=torch.float64, device=x.device)
    from tqdm import tqdm

    bar = tqdm(total=1000, disable=not progress, desc="PF ODE (of the log-SNR range)", unit="",
               bar_format="{l_bar}{bar}| {elapsed} {postfix}", mininterval=0.5)
    field = LogSNRField(model, x.dtype, bar=bar, span=(lams[0].item(), lams[-1].item()))
    # The solver state and its time stay in float64 (torchdiffeq casts time to the state's dtype).
    xbar = x.to(torch.float64) / coef(model, times[0]).alpha
    if len(times) > 1:
        # step_t lands the solver on the last time instead of stepping past the end of the process, and
        # first_step skips the initial-step probe, which could also leave it.
        options = {"step_t": lams[-1:], "first_step": 0.02 * abs((lams[-1] - lams[0]).item())}
        try:
            xbars = odeint(field, xbar, lams, rtol=rtol, atol=atol, method=method, options=options)
        except AssertionError as err:  # torchdiffeq's step-size underflow
            raise ValueError(f"the adaptive solver's step size underflowed (rtol {rtol:g}, atol {atol:g}): the "
                             f"tolerances cannot be met in float64 arithmetic; use rtol or atol >= 1e-12 ({err})") from None
    else:
        xbars = xbar[None]
    bar.close()
    xs = [(coef(model, t).alpha * xb).to(x.dtype) for t, xb in zip(times, xbars)]
    check_finite(xs[-1], f"the end of the adaptive solve (t = {times[-1]:.6g})")
    if callback is not None:
        for i, (t, xi) in enumerate(zip(times, xs)):
            callback({"i": i, "t": t, "x": xi, "x0": model(xi, t).x0})
    return model(xs[-1], times[-1]).x0 if grid[-1] == 0 else xs[-1]


def dpmpp(model, x, grid, *, order: int = 2, form: str = "midpoint", eta: float = 0.0, noise: str = "brownian",
          generator=None, callback=None):
    """DPM-Solver++ multistep (Lu et al. 2022, Alg. 2 and its third-order extension), data prediction.

    With h = lambda_s - lambda_t, phi_1 = e^{-h} - 1, phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2 and
    D0 = x0(lambda_t) the current prediction, D1 ~ h x0', D2 ~ h^2 x0'' divided differences of the last
    three predictions in lambda:

        x_s = (sigma_s/sigma_t) x_t - alpha_s phi_1 D0 + alpha_s c_1 D1 - alpha_s phi_3 D2.

    Second order has two published forms of c_1, both of order 2 (``form``):

    * ``"midpoint"`` (default): c_1 = -phi_1 / 2, i.e. Lu et al. (2022b) Algorithm 2's
      D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev; diffusers' and k-diffusion's DPM++(2M) (diffusers:
      solver_type="midpoint").
    * ``"taylor"``: c_1 = phi_2, the exact integral of the linear term (Lu et al. 2022a's DPM-Solver-2
      form; diffusers: solver_type="heun").

    The default was chosen by measurement: on the oracle cases at 10-20 NFE (benchmarks/default_grids.py)
    the midpoint form's error is lower on every grid, and on fresh seeds at 5-20 NFE (benchmarks/samplers.py)
    on three of four cases. The h^2 term (order 3) integrates (u^2/2) x0'' against e^{u-h}, so
    D2 = 2 (D1_0 - D1_1) / (r0 + r1). The DPM-Solver reference code, k-diffusion and diffusers use half of
    that, which leaves a third-order local error and makes their 3M converge at order 2; this one
    converges at order 3 (tests/test_samplers.py::test_convergence_order). The first steps warm up at
    lower order.

    ``eta > 0`` is the SDE form (SDE-DPM-Solver++, Lu et al. 2022b, Sec. 5 and App. B, at eta = 1; k-diffusion's
    ``sample_dpmpp_2m_sde``/``3m_sde`` for any eta): the reverse SDE whose noise is eta times the PF ODE's
    distance from DDPM. Its linear part is integrated exactly as well, the data term's kernel becoming
    (1 + eta) e^{-(1 + eta)(h - u)}, so every phi above is taken at h_eta = (1 + eta) h, the state's factor is
    (sigma_s/sigma_t) e^{-eta h}, and the step adds sigma_s sqrt(1 - e^{-2 eta h}) z. At eta = 1 and first
    order this is DDPM's posterior step exactly (tests/test_samplers.py). z is the Brownian path's increment
    over [s, t] (``noise="brownian"``, ``unstir._random.BrownianNoise``: the same path whatever the grid, as
    k-diffusion's Brownian tree) or a fresh draw per step (``noise="fresh"``, as diffusers' sde-dpmsolver++;
    cheaper on a CPU at image size). Where this differs from k-diffusion: the 3M correction uses the full
    D2 above (theirs halves it), and the Brownian time is the process's t, not sigma.

    Measured on learned image models (gratings32, a rf/velocity U-Net, 200 samples, seeds 777..): the 3M SDE
    diverges at few steps, validity 0.00 at 6 and 10 steps (dpm++2m_sde: 0.51, 0.97), 0.99 at 15 and 1.00 at 20.
    Its order-3 extrapolation multiplies differences of x0 predictions that carry the injected noise by up to
    ~1.6 at h_eta ~ 6; neither k-diffusion's halved D2 nor diffusers' lower order at the last steps rescues it
    (validity <= 0.04 at 10 steps with either or both). ``unstir sample`` prints a notice below 15 steps.
    """
    _check_order(order, (1, 2, 3))
    check_choice("form", form, ("midpoint", "taylor"))
    check_choice("noise", noise, ("brownian", "fresh"))
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: the PF ODE, 1: DDPM's noise), got {eta!r}")
    eta = float(eta)
    hist: list[tuple[float, Tensor]] = []  # (lambda, x0) of previous evaluations, newest last
    brownian = BrownianNoise(x, generator, model.process.T) if eta and noise == "brownian" else None

    def step(x, t, s):
        out = model(x, t)
        ct, cs = coef(model, t), coef(model, s)
        h = cs.log_snr - ct.log_snr
        he = (1 + eta) * h
        phi1 = math.expm1(-he)
        phi2 = phi1 / he + 1
        phi3 = phi2 / he - 0.5
        m0 = out.x0
        x_s = (cs.sigma / ct.sigma * math.exp(-eta * h)) * x - (cs.alpha * phi1) * m0
        k = min(order, len(hist) + 1)
        if k >= 2:
            lam1, m1 = hist[-1]
            r0 = (ct.log_snr - lam1) / h
            d1_0 = (m0 - m1) / r0
            if k == 2:
                c1 = -0.5 * phi1 if form == "midpoint" else phi2
                x_s = x_s + (cs.alpha * c1) * d1_0
            else:
                lam2, m2 = hist[-2]
                r1 = (lam1 - lam2) / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = 2 * (d1_0 - d1_1) / (r0 + r1)
                x_s = x_s + (cs.alpha * phi2) * d1 - (cs.alpha * phi3) * d2
        if eta:
            z = brownian(t, s) if brownian is not None else noise_like(x, generator)
            x_s = x_s + (cs.sigma * math.sqrt(-math.expm1(-2 * eta * h))) * z
        hist.append((ct.log_snr, m0))
        del hist[:-2]
        return x_s, out

    return integrate(model, x, grid, step, callback)


def _lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """int_a^b l_j(u) du for the Lagrange basis polynomials l_j on ``nodes``.

    In y = (u - a)/(b - a) the weights solve sum_j w_j y_j^k = (b - a)/(k + 1), k < len(nodes): the
    rule integrates every polynomial of that degree exactly. A small, well-scaled Vandermonde system."""
    y = (np.asarray(nodes) - a) / (b - a)
    vander = np.vander(y, increasing=True).T
    moments = (b - a) / np.arange(1, len(nodes) + 1)
    return np.linalg.solve(vander, moments).tolist()


def _adams_bashforth(model, x, grid, order, weights, callback):
    """Multistep Adams-Bashforth on d xbar / d sbar = eps with the last ``order`` eps values (fewer while
    warming up): xbar_s = xbar_t + sum_j w_j eps_j, ``weights(nodes, sbar_t, sbar_s)`` giving the w_j."""
    hist: list[tuple[float, Tensor]] = []  # (sbar, eps), newest last

    def step(x, t, s):
        out = model(x, t)
        ct, cs = coef(model, t), coef(model, s)
        hist.append((ct.sigma_bar, out.eps))
        del hist[:-order]
        w = weights([n for n, _ in hist], ct.sigma_bar, cs.sigma_bar)
        xbar = x / ct.alpha + sum(wj * e for wj, (_, e) in zip(w, hist))
        return cs.alpha * xbar, out

    return integrate(model, x, grid, step, callback)


def _check_order(order, allowed):
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(f"order must be one of {list(allowed)}, got {order!r}")


def deis(model, x, grid, *, order: int = 3, generator=None, callback=None):
    """DEIS in its rho-AB form (Zhang & Chen 2023): variable-step Adams-Bashforth on
    d xbar / d sbar = eps, integrating exactly the polynomial through the last ``order`` eps values:

        xbar_s = xbar_t + sum_j w_j eps_j,   w_j = int_{sbar_t}^{sbar_s} l_j(u) du.

    Order 1 is DDIM; order 4 is the variable-step iPNDM (Zhou et al. 2024's iPNDM_v)."""
    _check_order(order, (1, 2, 3, 4))
    return _adams_bashforth(model, x, grid, order, _lagrange_integrals, callback)


def deis_gauss(model, x, grid, *, order: int = 3, moments=None, generator=None, callback=None):
    """DEIS around the data's Gaussian: the exact PF-ODE flow of N(m, C) (the data's moments, ``moments``; N(0, I)
    without) as the linear part of an exponential integrator, Adams-Bashforth on what is left.

    In xbar = x / alpha and sbar = sigma / alpha the PF ODE is d xbar / d sbar = eps. For Gaussian data
    N(m, U diag(l) U^T), in y = U^T (xbar - m), eps is linear per direction, eps_G = sbar y / (l + sbar^2), and its
    flow scales y by sqrt((l + sbar^2) / (l + sbar_0^2)) (the map analytical teleportation applies once, Wang &
    Vastola 2024). With r = U^T eps - eps_G the rest, variation of constants gives, per direction k,

        y_k(s) = sqrt((l_k + s^2) / (l_k + t^2)) y_k(t) + int_t^s sqrt((l_k + s^2) / (l_k + u^2)) r_k(u) du,

    and r is replaced by the polynomial through its last ``order`` values (fewer while warming up), whose
    integrals against the kernel have closed forms (``_gauss_weights``). So the sampler is exact on Gaussian data
    at any number of steps, and its error elsewhere is that of extrapolating the residual, not eps. The interval
    to a final 0 is integrated the same way (the x0 prediction would be its order-1 step with a zero kernel).

    Where it comes from and where it differs: DEIS (Zhang & Chen 2023, Sec. 4) is an exponential integrator whose
    linear part is the process's drift f(t) x, with the Lagrange (rho-AB) extrapolation of eps used here for the
    residual (with C = 0 and m = 0 this sampler's linear part vanishes and it is ``deis``); the Gaussian linear
    part is unstir's, in the spirit of DPM-Solver-v3 (Zheng et al. 2023), which fits a per-dimension linear part
    from model statistics. Cost beyond the model: two products with U (d x d) per step."""
    _check_order(order, (1, 2, 3, 4))
    d = x[0].numel()
    if moments is not None and getattr(moments, "dim", None) != d:
        raise ValueError(f"deis_gauss: the moments have {getattr(moments, 'dim', '?')} values per sample, the samples {d}")
    ref = GaussianReference(moments, d, x.device)
    evals = np.ones(d) if moments is None else moments.eig()[0].numpy()  # for the weights, on the CPU
    mean = 0.0 if ref.mean is None else ref.mean
    hist: list[tuple[float, Tensor]] = []  # (sbar, residual r in the rotated coordinates), newest last
    last = [None, -1, None]  # the state the previous step returned, its version and y: not rotated again unless
    # something (a projection) replaced or changed it in place

    def step(x, t, s):
        out = model(x, t)
        ct = coef(model, t)
        sb, sb1, alpha1 = ct.sigma_bar, 0.0, 1.0
        if s != 0.0:
            cs = coef(model, s)
            sb1, alpha1 = cs.sigma_bar, cs.alpha
        y = last[2] if x is last[0] and x._version == last[1] else ref.rotate(x.flatten(1).to(torch.float64) / ct.alpha - mean)
        hist.append((sb, ref.rotate(out.eps.flatten(1).to(torch.float64)) - sb * y / (ref.evals + sb * sb)))
        del hist[:-order]
        w = torch.as_tensor(_gauss_weights([n for n, _ in hist], sb, sb1, evals)).to(x.device)
        y = ((ref.evals + sb1 * sb1) / (ref.evals + sb * sb)).sqrt() * y + sum(wj * r for wj, (_, r) in zip(w, hist))
        x1 = (alpha1 * (ref.unrotate(y) + mean)).to(x.dtype).reshape(x.shape)
        last[:] = x1, x1._version, y
        return x1, out

    return integrate(model, x, grid, step, callback, denoise_last=False)


def _gauss_weights(nodes: list[float], a: float, b: float, evals: np.ndarray) -> np.ndarray:
    """w[j, k] = int_a^b sqrt((l_k + b^2) / (l_k + u^2)) L_j(u) du for the Lagrange basis L_j on ``nodes`` and
    the eigenvalues l_k (``deis_gauss``), shape (len(nodes), len(evals)). In v = u / S (S the largest node) the
    basis is expanded in monomials v^p, p < 4, whose integrals against 1 / sqrt(l + v^2) are closed forms."""
    scale = max(abs(n) for n in nodes)
    v, va, vb = np.asarray(nodes) / scale, a / scale, b / scale
    lam = np.maximum(evals / scale**2, 1e-30)  # a zero eigenvalue: the kernel is 0 below u = 0, a limit

    def antiderivative(u, p):
        r, h = np.sqrt(lam + u * u), np.arcsinh(u / np.sqrt(lam))
        return (h, r, (u * r - lam * h) / 2, r**3 / 3 - lam * r)[p]

    monomials = np.linalg.inv(np.vander(v, len(v), increasing=True))  # [p, j]: the coefficient of v^p in L_j
    integrals = np.stack([antiderivative(vb, p) - antiderivative(va, p) for p in range(len(v))])  # (p, k)
    return (monomials.T @ integrals) * (scale * np.sqrt(lam + vb * vb))


# Adams-Bashforth coefficients for equal steps, newest eps last (Zhang & Chen 2023, Appendix; the PNDM
# "pseudo linear multistep" of Liu et al. 2022 without its Runge-Kutta warm start).
_AB_FIXED = {1: (1.0,), 2: (-1 / 2, 3 / 2), 3: (5 / 12, -16 / 12, 23 / 12),
             4: (-9 / 24, 37 / 24, -59 / 24, 55 / 24)}


def _fixed_weights(nodes, a, b):
    return [(b - a) * c for c in _AB_FIXED[len(nodes)]]


SHORT_RUN = 10  # ipndm: grids of at most this many steps default to order 3


def ipndm(model, x, grid, *, order: int | None = None, generator=None, callback=None):
    """iPNDM (Zhang & Chen 2023; measured best training-free solver at 10 NFE by Zhou et al. 2024):
    Adams-Bashforth of order ``order`` on d xbar / d sbar = eps with the equal-step coefficients
    (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24), warming up at lower order.

    ``order`` defaults to 4 (the paper's), and to 3 on grids of at most 10 steps: a lower cap for short runs,
    chosen on the tuning cases of benchmarks/few_steps.py (with teleported pilot grids order 3 was lower or
    equal in 13 of 15 (case, NFE 4-10) cells, e.g. random_mixture(64, 6, seed=11) at NFE 5: 0.44 against
    0.69) and confirmed on its fresh cases (benchmarks/RESULTS.md). The cap is unstir's: the paper's iPNDM
    runs at order 4 whatever the number of steps.

    The coefficients are exact for equal steps in sbar; on a grid whose steps vary smoothly they lose
    accuracy at second order in the step change, so the global order there is 2 (the variable-step
    form, ``deis`` with order 4, keeps order 4). Few-step accuracy is what it is for: at 8-15 NFE it has
    the lowest endpoint error of unstir's named-grid samplers on three of the four oracle cases in
    benchmarks/RESULTS.md (on fresh seeds)."""
    if order is None:
        order = 3 if len(grid) - 1 <= SHORT_RUN else 4
    _check_order(order, (1, 2, 3, 4))
    return _adams_bashforth(model, x, grid, order, _fixed_weights, callback)


@functools.lru_cache(maxsize=4096)
def _unipc_rhos(rks: tuple[float, ...], h: float, order: int, corrector: bool) -> tuple[float, ...]:
    """UniPC's coefficients (Zhao et al. 2023, Alg. 2 and 3, B(h) = e^h - 1 in data prediction): solve
    R rho = b with R_ij = r_j^(i-1) and b_i = i! phi_{i+1}(h) / B(h). Memoised: a grid used again
    (every batch of a sampling run) needs no new solves."""
    hh = -h
    big_b = math.expm1(hh)
    phi_k, fact = math.expm1(hh) / hh - 1, 1.0
    r = np.array(rks + (1.0,))
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(phi_k * fact / big_b)
        fact *= i + 1
        phi_k = phi_k / hh - 1 / fact
    R, b = np.stack(rows), np.array(b)
    if corrector:
        return (0.5,) if order == 1 else tuple(np.linalg.solve(R, b).tolist())
    return () if order == 1 else (0.5,) if order == 2 else tuple(np.linalg.solve(R[:-1, :-1], b[:-1]).tolist())


def _uni_update(x, c0, c1, models, k, m_new=None):
    """UniP (m_new None) or UniC (m_new = x0 prediction at the target) from c0 to c1 with the last k models:

        x_1 = (sigma_1/sigma_0) x - alpha_1 B(h) (m0 + sum_i rho_i (m_i - m0) / r_i [+ rho_c (m_new - m0)]),

    evaluated as one linear combination of x, m0, the older m_i and m_new (one fused op per tensor)."""
    lam0, m0 = models[-1]
    h = c1.log_snr - lam0
    rks = tuple((models[-1 - i][0] - lam0) / h for i in range(1, k))
    rhos = _unipc_rhos(rks, h, k, corrector=m_new is not None)
    terms = [(models[-1 - i][1], rho / r) for i, (rho, r) in enumerate(zip(rhos, rks), start=1)]
    if m_new is not None:
        terms.append((m_new, rhos[-1]))
    scale = -c1.alpha * math.expm1(-h)
    x1 = torch.add(x * (c1.sigma / c0.sigma), m0, alpha=scale * (1 - sum(w for _, w in terms)))
    for m, w in terms:
        x1.add_(m, alpha=scale * w)
    return x1


def unipc(model, x, grid, *, order: int = 3, generator=None, callback=None):
    """UniPC (Zhao et al. 2023), data prediction with B(h) = e^h - 1: a multistep predictor UniP of order
    ``order``, and the corrector UniC, which re-solves the last step with the model evaluation at its
    end point (the evaluation the next step needs anyway), raising the order by one at no extra NFE."""
    _check_order(order, (1, 2, 3))
    hist: list[tuple[float, Tensor]] = []  # (lambda, x0), newest last
    last = None  # (x, coefficients, order) at the start of the previous predictor step

    def step(x, t, s):
        nonlocal last
        out = model(x, t)
        ct = coef(model, t)
        if last is not None:
            x = _uni_update(last[0], last[1], ct, hist, last[2], m_new=out.x0)
        hist.append((ct.log_snr, out.x0))
        del hist[:-order]
        last = (x, ct, len(hist))
        return _uni_update(x, ct, coef(model, s), hist, len(hist)), out

    return integrate(model, x, grid, step, callback)
