"""Linear inverse problems y = A x0 + n, n ~ N(0, sigma_y^2 I): inpainting, colorization, super-resolution.

``Measurement`` holds A (a 0/1 mask, a matrix, or a pair of callables A and A^T), y and sigma_y. The
methods, each a wrapper over any model or an option of the samplers:

* ``replacement`` (Song et al. 2021, App. I.2): after every step to time s, the measured part of x is
  replaced by the measurement noised to s: x <- x + A^+ (alpha_s y + sigma_s A z - A x). A sampler option
  (``unstir.sample(..., project=m.replacement(generator))``), for any fixed-grid sampler.
* ``repaint`` (Lugmayr et al. 2022): replacement with DDPM steps, and resampling: every ``jump_length``
  steps the state is noised back up by as many steps and the stretch is run again, ``resamples`` times.
* ``dps(model, m, x_T, zeta=...)`` (Chung et al. 2023, Alg. 1): DDPM steps, each followed by
  x <- x - zeta_b grad_{x_t} ||y - A x0_hat(x_t)||^2 with zeta_b = zeta / ||y - A x0_hat||_b, the norm taken
  **per sample** (the reference code takes it over the whole batch, so a sample's update depends on its
  batch mates; here it does not). A sampler, not a score wrapper: the paper moves x itself.
* ``pigdm(model, m, data_var)`` (Song et al. 2023, pseudo-inverse guidance): adds
  (y - A x0_hat)^T (r_t^2 A A^T + sigma_y^2 I)^-1 A d x0_hat / d x_t, with r_t^2 = Var[x0 | x_t] of data
  N(mu, data_var I): exact for such data (tests/test_inverse.py). The Jacobian is back-propagated
  (``jacobian='vjp'``) or that of such data (default; see ``pigdm``).
* ``twisted_smc`` (Wu et al. 2023): particles proposed by PiGDM-guided DDPM steps and reweighted, the one
  method here that converges to the posterior (as its particles grow).

Every sampler here returns ``unstir.SampleResult(x, nfe, grid)``, with ``nfe`` the model evaluations spent
per output sample (SMC: particles x steps).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .guidance import keeps_graph
from .parametrization import ModelOutput, in_graph, model_device
from .processes import coefficients
from .samplers import SampleResult
from ._random import randn
from .samplers.base import noise_like
from .samplers.stochastic import _kernel, ddim_update, ddpm_step

Tensor = torch.Tensor


class Measurement:
    """y = A x + n with n ~ N(0, sigma_y^2 I).

    ``A``: a 0/1 mask of the data shape (observe the 1s), an (m, d) matrix acting on flattened samples, or a
    callable with ``At`` its adjoint (its pseudo-inverse through ``pinv=``, and ``aat=c`` when A A^T = c I). ``y``: shape
    (m,) or (batch, m) (for a mask: the observed values, in mask order, or a full-shape array whose
    unobserved entries are ignored)."""

    def __init__(self, A, y, sigma_y: float = 0.0, *, data_shape: tuple[int, ...], At: Callable | None = None,
                 pinv: Callable | None = None, aat: float | None = None):
        self.data_shape = tuple(data_shape)
        self.d = math.prod(self.data_shape)
        if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y) and sigma_y >= 0):
            raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
        self.sigma_y = float(sigma_y)
        self.mask = self.matrix = None
        self.aat = aat  # for a callable A with A A^T = aat I (pooling, channel averaging): PiGDM's inverse
        if callable(A):
            if At is None:
                raise ValueError("a callable A needs its adjoint At")
            self._A, self._At, self._pinv = A, At, pinv
        else:
            A = torch.as_tensor(A)
            if A.shape == self.data_shape:
                if not ((A == 0) | (A == 1)).all():
                    raise ValueError(f"a mask must hold only 0 and 1, got values {torch.unique(A)[:6].tolist()}")
                self.mask = A.bool().flatten()
                if not self.mask.any():
                    raise ValueError("the mask observes nothing (all 0)")
            elif A.ndim == 2 and A.shape[1] == self.d:
                self.matrix = A.to(torch.float64)
            else:
                raise ValueError(f"A must be a 0/1 mask of shape {self.data_shape}, an (m, {self.d}) matrix or a "
                                 f"callable; got shape {tuple(A.shape)}")
        y = torch.as_tensor(y, dtype=torch.float64)
        if self.mask is not None and y.shape[-len(self.data_shape):] == self.data_shape:
            y = y.reshape(*y.shape[:y.ndim - len(self.data_shape)], self.d)[..., self.mask]
        self.y = y
        self.m = y.shape[-1]
        expected = int(self.mask.sum()) if self.mask is not None else self.matrix.shape[0] if self.matrix is not None else None
        if expected is not None and self.m != expected:
            raise ValueError(f"y has {self.m} values per sample; A measures {expected}")
        if not torch.isfinite(self.y).all():
            raise ValueError("y contains NaN or inf")

    # the operator ------------------------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        if self.mask is not None:
            return flat[:, self.mask.to(x.device)]
        if self.matrix is not None:
            return flat @ self.matrix.to(x).T
        return self._A(x)

    def At(self, v: Tensor) -> Tensor:
        if self.mask is not None:
            out = v.new_zeros(v.shape[0], self.d)
            out[:, self.mask.to(v.device)] = v
            return out.reshape(-1, *self.data_shape)
        if self.matrix is not None:
            return (v @ self.matrix.to(v)).reshape(-1, *self.data_shape)
        return self._At(v)

    def pinv(self, v: Tensor) -> Tensor:
        """A^+ v (the least-norm solution of A x = v)."""
        if self.mask is not None:
            return self.At(v)
        if self.matrix is not None:
            A = self.matrix.to(v)
            return (torch.linalg.solve(A @ A.T, v.T).T @ A).reshape(-1, *self.data_shape)
        if self._pinv is None:
            raise ValueError("this method needs A's pseudo-inverse: pass pinv= for a callable A")
        return self._pinv(v)

    def observed(self, batch: int, x: Tensor) -> Tensor:
        return self.y.to(x).expand(batch, self.m)

    def check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"the measurement is for data of shape {self.data_shape}, got samples of shape "
                             f"{tuple(x.shape[1:])}")

    # methods -------------------------------------------------------------------------------------
    def replacement(self, generator: torch.Generator | None = None) -> Callable:
        """The replacement projection for ``unstir.sample(..., project=...)``: after each step to time s,
        the measured part becomes alpha_s y + sigma_s A z (a fresh z), the rest is kept."""
        def project(model, x: Tensor, s: float) -> Tensor:
            c = coefficients(model.process, s) if s > 0 else None
            y = self.observed(x.shape[0], x)
            if c is None:
                target = y
            else:
                z = randn(x.shape, generator, x.dtype, x.device)
                target = c.alpha * y + c.sigma * self.A(z)
            return x + self.pinv(target - self.A(x))
        return project


class _Guidance:
    """A model whose score adds an approximation of grad_x log p(y | x_t) (the Model protocol). When the caller
    differentiates (the likelihood's divergence, DPS's gradient through x0_hat) the added term stays in the
    graph, so every use sees the whole field."""

    def __init__(self, model, measurement: Measurement):
        self.model, self.measurement = model, measurement
        self.process, self.data_shape = model.process, getattr(model, "data_shape", None)
        self.num_classes = getattr(model, "num_classes", 0)

    def __call__(self, x: Tensor, t, y: Tensor | None = None) -> ModelOutput:
        self.measurement.check(x)
        differentiate = keeps_graph(x)
        with torch.enable_grad():
            xg = x if differentiate else x.detach().requires_grad_(True)
            out = self.model(xg, t, y)
            grad = self.log_likelihood_grad(xg, out, create_graph=differentiate)
        eps, grad = (out.eps, grad) if differentiate else (out.eps.detach(), grad.detach())
        # Adding grad to the score subtracts sigma * grad from eps (eps = -sigma score).
        return ModelOutput(x, t, out.c, eps - out.c.sigma * grad.to(x.dtype), "eps")


class PiGDM(_Guidance):
    def __init__(self, model, measurement, data_var: float, jacobian: str = "gaussian"):
        super().__init__(model, measurement)
        if not (isinstance(data_var, (int, float)) and data_var > 0 and math.isfinite(data_var)):
            raise ValueError(f"data_var must be a positive number, got {data_var!r}")
        if jacobian not in ("vjp", "gaussian"):
            raise ValueError(f"unknown jacobian {jacobian!r}; choose one of ['gaussian', 'vjp']")
        self.data_var, self.jacobian = float(data_var), jacobian

    def log_likelihood_grad(self, x, out, create_graph: bool = False):
        m = self.measurement
        c = out.c
        r2 = self.data_var * c.sigma**2 / (c.alpha**2 * self.data_var + c.sigma**2)
        r2 = r2 if isinstance(r2, float) else r2.flatten()[: x.shape[0]].reshape(-1, 1)
        resid = (m.observed(x.shape[0], x) - m.A(out.x0)).to(torch.float64)
        if m.mask is not None or m.aat is not None:
            v = resid / (r2 * (1.0 if m.mask is not None else m.aat) + m.sigma_y**2)
        elif m.matrix is not None:
            A = m.matrix.to(resid)
            r2b = torch.as_tensor(r2, dtype=torch.float64, device=A.device).reshape(-1, 1, 1)
            cov = r2b * (A @ A.T) + m.sigma_y**2 * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
            v = torch.linalg.solve(cov, resid[..., None])[..., 0]
        else:
            raise ValueError("pigdm needs A as a mask, a matrix, or a callable with aat= (A A^T = aat I)")
        if self.jacobian == "gaussian":
            # d x0_hat / d x_t = alpha r_t^2 / sigma^2 I for data N(mu, data_var I): no backpropagation.
            scale = c.alpha * r2 / c.sigma**2
            scale = scale if isinstance(scale, float) else scale.reshape(-1, *([1] * (x.ndim - 1)))
            return scale * m.At(v.to(x.dtype)).reshape(x.shape)
        # (d x0_hat / d x)^T A^T v, the vector-Jacobian product of x0_hat; with create_graph it is differentiable
        # in x through both the Jacobian and v.
        ax0 = m.A(in_graph(out, "pigdm(jacobian='vjp')").x0)
        return torch.autograd.grad(ax0, x, v.to(ax0.dtype), create_graph=create_graph)[0]


def pigdm(model, measurement: Measurement, data_var: float = 1.0, *, jacobian: str = "gaussian") -> PiGDM:
    """Pseudo-inverse guidance (module docstring); ``data_var`` is the per-coordinate data variance it assumes.

    ``jacobian``: 'vjp' back-propagates through the model for d x0_hat / d x_t (the paper's choice); 'gaussian'
    (default) uses that of data N(mu, data_var I), alpha r_t^2 / sigma^2 I. Both are exact for such data. With
    a trained network the vjp multiplies the network's error in d eps / d x by sigma^2 / alpha^2 in x0 (2e4 at
    T on the linear VP schedule) and diverged on the digits U-Net within 10 steps; the Gaussian Jacobian
    does not, and costs no backward pass. Where the model's Jacobian is accurate (the oracle) the vjp is the
    better guide on multimodal data (benchmarks/inverse_results.md: 0.01-0.1 against 0.3-0.6 TV).

    The result is a model like any other: for data N(mu, data_var I) it is the exact posterior's model, so its
    samples, encodings and likelihood are the posterior's (tests/test_composition.py)."""
    return PiGDM(model, measurement, data_var, jacobian)


def _check_counts(**counts) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _start(model, measurement: Measurement, x_T: Tensor, y):
    """The shared preamble of the posterior samplers: checks, and the model with labels bound and calls counted."""
    from .samplers import _Counted, check_labels

    if not isinstance(x_T, Tensor) or x_T.ndim < 2:
        raise ValueError(f"x_T must be a tensor of shape (batch, *data_shape), got {getattr(x_T, 'shape', type(x_T))}")
    measurement.check(x_T)
    return _Counted(model, check_labels(model, y, x_T.shape[0], x_T.device))


def dps_step(model, measurement: Measurement, x: Tensor, t: float, s: float, *, zeta: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[Tensor, ModelOutput]:
    """One step of DPS (Chung et al. 2023, Alg. 1, lines 4-9), from t to s < t:

        x0_hat = E[x0 | x_t]  (Tweedie),   x'_s = the DDPM ancestral step (posterior mean + sigma_post z),
        x_s = x'_s - zeta_b grad_{x_t} ||y - A x0_hat(x_t)||^2,   zeta_b = zeta / ||y - A x0_hat(x_t)||_b.

    Two departures, both stated: the norm in zeta_b is each sample's own (the reference code takes one norm
    over the whole batch, so a sample's step depends on its batch mates); and the reference code's ``scale``
    multiplies grad ||r|| (un-squared). Since zeta grad ||r||^2 / ||r|| = 2 zeta grad ||r||, its scale is 2 zeta
    in the paper's convention used here. At s = 0 the ancestral step is x0_hat itself."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = in_graph(model(xg, t), "dps")
        sq = (measurement.observed(x.shape[0], x) - measurement.A(out.x0)).pow(2).sum(1)
        grad = torch.autograd.grad(sq.sum(), xg)[0]
    out = out.like(x, out.pred.detach())
    if s == 0.0:
        x_prime = out.x0
    else:
        cs, post = coefficients(model.process, s), _kernel(model, t, s)[2]
        x_prime = ddim_update(out, cs.alpha, cs.sigma, post, post, noise_like(x, generator))
    zeta_b = zeta / sq.detach().sqrt().clamp_min(1e-12)
    return x_prime - zeta_b.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) * grad, out


def dps(model, measurement: Measurement, x_T: Tensor, steps: int = 1000, *, zeta: float = 1.0,
        y: Tensor | int | None = None, generator: torch.Generator | None = None, callback=None) -> SampleResult:
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1): DDPM ancestral steps on a uniform grid of
    ``steps`` intervals (the paper's N = 1000), each followed by the measurement step of ``dps_step`` with
    step size zeta' = ``zeta``, including the final step to 0. DPS moves x itself, not the score, so it is a
    sampler of its own, not a model wrapper: added to the score, the step would be scaled by each sampler's
    score coefficient (0.002-0.18 per DDPM step on the linear VP schedule). The paper tunes zeta' per task.
    ``nfe`` counts model evaluations per sample (each with one backward pass)."""
    from .grids import time_grid
    from .samplers.base import check_finite

    _check_counts(steps=steps)
    if isinstance(zeta, bool) or not isinstance(zeta, (int, float)) or not math.isfinite(zeta) or zeta < 0:
        raise ValueError(f"zeta must be a finite number >= 0 (a negative step pushes samples away from the "
                         f"measurement), got {zeta!r}")
    counted = _start(model, measurement, x_T, y)
    grid = time_grid(model.process, steps, "uniform")
    times = grid.tolist()
    x = x_T
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        x_next, out = dps_step(counted, measurement, x, t, s, zeta=float(zeta), generator=generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": out.x0})
        check_finite(x_next, f"DPS step {i} (t = {t:.6g} -> {s:.6g})")
        x = x_next
    return SampleResult(x, counted.nfe, grid)


def repaint(model, measurement: Measurement, x_T: Tensor, steps: int = 250, *, jump_length: int = 10,
            resamples: int = 10, y: Tensor | int | None = None,
            generator: torch.Generator | None = None) -> SampleResult:
    """RePaint (Lugmayr et al. 2022, Alg. 1 with its jump schedule): DDPM steps on a uniform grid of ``steps``
    intervals with replacement after each, and every ``jump_length`` steps the stretch is re-noised and run
    again, ``resamples`` times in all (the paper's defaults: 250 steps, jumps of 10, 10 resamplings).
    ``nfe`` counts model evaluations per sample (steps x resamples)."""
    from .grids import time_grid

    _check_counts(steps=steps, jump_length=jump_length, resamples=resamples)
    model = _start(model, measurement, x_T, y)
    grid = time_grid(model.process, steps, "uniform")
    times = grid.tolist()
    project = measurement.replacement(generator)
    x, i = x_T, 0
    while i < steps:
        end = min(i + jump_length, steps)
        for r in range(resamples):
            for j in range(i, end):
                t, s = times[j], times[j + 1]
                if s == 0.0:
                    x = model(x, t).x0
                else:
                    x = ddpm_step(model, x, t, s, generator=generator)[0]
                x = project(model, x, s)
            if r < resamples - 1:
                x = renoise(model.process, x, times[end], times[i], generator)
        i = end
    return SampleResult(x, model.nfe, grid)


def renoise(process, x: Tensor, s: float, t: float, generator=None) -> Tensor:
    """A draw of the forward kernel q(x_t | x_s), t > s (s = 0: the data): alpha_t/alpha_s x + b z with
    b^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2. RePaint's jump back up the grid."""
    ct = coefficients(process, t)
    a_s, s_s = (1.0, 0.0) if s == 0 else coefficients(process, s)[:2]
    a = ct.alpha / a_s
    b = math.sqrt(max(ct.sigma**2 - (a * s_s) ** 2, 0.0))
    return a * x + b * randn(x.shape, generator, x.dtype, x.device)


def superres_operator(shape: tuple[int, ...], factor: int = 2) -> dict:
    """A = factor x factor average pooling of (C, H, W) images, as ``Measurement`` keyword arguments:
    A A^T = I / factor^2, so A^+ = factor^2 A^T (nearest upsampling)."""
    c, h, w = shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} must be divisible by the super-resolution factor {factor}")
    pool = torch.nn.functional.avg_pool2d

    def A(x):
        return pool(x.reshape(-1, *shape), factor).flatten(1)

    def At(v):
        up = v.reshape(-1, c, h // factor, w // factor).repeat_interleave(factor, 2).repeat_interleave(factor, 3)
        return up / factor**2

    return {"A": A, "At": At, "pinv": lambda v: At(v) * factor**2, "aat": 1.0 / factor**2}


def colorize_operator(shape: tuple[int, ...]) -> dict:
    """A = the mean over the colour channels of (C, H, W) images (grayscale), as ``Measurement`` keyword
    arguments: A A^T = I / C, so A^+ = C A^T."""
    c = shape[0]
    if c < 2:
        raise ValueError(f"colorization needs colour images, got {c} channel")

    def At(v):
        return (v.reshape(-1, 1, *shape[1:]) / c).expand(-1, c, *shape[1:])

    return {"A": lambda x: x.reshape(-1, *shape).mean(1).flatten(1), "At": At, "pinv": lambda v: At(v) * c,
            "aat": 1.0 / c}


def twisted_smc(model, measurement: Measurement, n: int, steps: int = 100, *, particles: int = 16,
                data_var: float = 1.0, jacobian: str = "gaussian", x_T: Tensor | None = None,
                y: Tensor | int | None = None, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32, device=None) -> SampleResult:
    """Sequential Monte Carlo with twisting (the twisted diffusion sampler, Wu et al. 2023, Alg. 1), twisted by
    PiGDM's Gaussian approximation p~_t(y | x_t) = N(y; A x0_hat(x_t), r_t^2 A A^T + sigma_y^2 I).

    For each of the ``n`` outputs, ``particles`` particles start from the prior (or ``x_T``, shape
    (n * particles, *data_shape), particle k of output i at row i * particles + k) weighted by the twist
    p~_T(y | x_T), as in Alg. 1; they follow DDPM steps of the PiGDM-guided model on a uniform grid; their
    weights carry the ratio of the unguided DDPM kernel to the guided proposal and the change of the twist,
    p~_s(y | x_s) / p~_t(y | x_t); at the end the twist is replaced by the exact likelihood N(y; A x0,
    sigma_y^2) (noiseless measurements: the known entries are pasted). Groups whose effective sample size
    falls below half are resampled (multinomially). As ``particles`` grows the output tends to the posterior
    of the model's DDPM chain given y: the only method here that is consistent (benchmarks/
    inverse_results.md). ``nfe`` counts model evaluations per output: particles x steps, each with a backward
    pass when ``jacobian='vjp'``. The prior particles land on ``device`` (default: the model's), drawn on the
    generator's device; resampling draws its indices on the CPU, where a ``torch.Generator()`` is."""
    from .grids import time_grid

    _check_counts(n=n, steps=steps, particles=particles)
    m, process = measurement, model.process
    shape = m.data_shape
    total = n * particles
    if x_T is None:
        x = process.prior_sample((total, *shape), generator, dtype=dtype,
                                 device=model_device(model) if device is None else device)
    else:
        if not isinstance(x_T, Tensor) or tuple(x_T.shape) != (total, *shape):
            raise ValueError(f"x_T must have shape ({total}, *{shape}) (n * particles initial particles), got "
                             f"{tuple(getattr(x_T, 'shape', ()))}")
        x = x_T
    model = _start(model, m, x, y)
    guide = PiGDM(model, m, data_var, jacobian)

    def twist(x, t):
        """(model output, log p~_t(y | x) up to a constant shared by all particles, its gradient in x)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = model(xg, t)
            grad = guide.log_likelihood_grad(xg, out)  # J^T A^T C^-1 (y - A x0_hat)
        resid = (m.observed(total, x) - m.A(out.x0.detach())).to(torch.float64)
        c = out.c
        r2 = data_var * c.sigma**2 / (c.alpha**2 * data_var + c.sigma**2)
        if m.matrix is not None:
            A = m.matrix.to(resid)
            cov = r2 * (A @ A.T) + m.sigma_y**2 * torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
            quad = (resid * torch.linalg.solve(cov, resid.T).T).sum(1)
        else:
            quad = resid.pow(2).sum(1) / (r2 * (1.0 if m.mask is not None else m.aat) + m.sigma_y**2)
        out = out.like(x, out.pred.detach())
        return out, -0.5 * quad, grad.detach()

    def mean(eps, x, t, s):
        """The DDPM step's mean for this eps (the shared ``ddim_update`` without noise), and its std."""
        cs, post = coefficients(process, s), _kernel(model, t, s)[2]
        return ddim_update(ModelOutput(x, t, coefficients(process, t), eps, "eps"), cs.alpha, cs.sigma, post, 0.0,
                           None), post

    def resample(x, out, logtw, grad, logw, t):
        """Multinomial resampling of the groups whose effective sample size fell below half (the indices drawn
        on the CPU, where the generator is)."""
        groups = logw.reshape(n, particles)
        w = torch.softmax(groups, 1).cpu()
        if not torch.isfinite(w).all():
            raise FloatingPointError(f"the particles' weights are NaN or inf at t = {t:.6g}: the model's output or "
                                     f"the measurement is not finite there (garbled weights? values of 1e30?)")
        low = 1.0 / (w**2).sum(1) < particles / 2
        if not low.any():
            return x, out, logtw, grad, logw
        pick = torch.multinomial(w[low], particles, replacement=True, generator=generator)
        index = torch.arange(total).reshape(n, particles)
        index[low] = torch.gather(index[low], 1, pick)
        index = index.flatten().to(x.device)
        low = low.to(x.device)
        out = out.like(out.x[index], out.pred[index])
        groups = groups.clone()
        groups[low] = 0.0
        return x[index], out, logtw[index], grad[index], groups.flatten()

    grid = time_grid(process, steps, "uniform")
    times = grid.tolist()
    out, logtw, grad = twist(x, times[0])
    logw = logtw.clone()  # Alg. 1: the initial particles are weighted by the twist p~_T(y | x_T)
    x, out, logtw, grad, logw = resample(x, out, logtw, grad, logw, times[0])
    for t, s in zip(times[:-1], times[1:]):
        if s == 0.0:
            x = out.x0
            if m.sigma_y > 0:
                logw += -0.5 * (m.observed(total, x) - m.A(x)).to(torch.float64).pow(2).sum(1) / m.sigma_y**2 - logtw
            else:
                x = x + m.pinv(m.observed(total, x) - m.A(x))
            break
        eps_u = out.eps
        mean_u, post = mean(eps_u, x, t, s)
        mean_g, _ = mean(eps_u - out.c.sigma * grad.to(eps_u.dtype), x, t, s)
        x = mean_g + post * randn(x.shape, generator, x.dtype, x.device)
        out, logtw_s, grad = twist(x, s)
        log_kernel = ((x - mean_g).pow(2) - (x - mean_u).pow(2)).flatten(1).sum(1).to(torch.float64) / (2 * post**2)
        logw = logw + log_kernel + logtw_s - logtw
        logtw = logtw_s
        x, out, logtw, grad, logw = resample(x, out, logtw, grad, logw, s)
    final = torch.softmax(logw.reshape(n, particles), 1).cpu()
    if not torch.isfinite(final).all():
        raise FloatingPointError("the particles' weights are NaN or inf at the end (t = 0): the measurement or the "
                                 "model's output is not finite there")
    chosen = torch.multinomial(final, 1, generator=generator)[:, 0]
    x = x.reshape(n, particles, *shape)[torch.arange(n, device=x.device), chosen.to(x.device)]
    return SampleResult(x, model.nfe * particles, grid)
