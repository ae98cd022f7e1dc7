"""Every sampler behind one front door, ``sample``.

Each sampler is a function ``sampler(model, x_T, grid, *, generator=None, callback=None, **options)``
returning x_0; ``SAMPLERS`` maps names to them with their default grid and the processes they support.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._checks import check_choice
from ..grids import GRIDS, check_grid, time_grid
from ..parametrization import Denoiser, Model, ModelOutput, model_device
from ..processes import VE, Process, coefficients
from .ode import deis, deis_gauss, dpmpp, ipndm, ode_euler, ode_heun, ode_rk45, unipc
from .stochastic import PREDICTORS, annealed_langevin, ddim, ddpm, edm, euler_maruyama, pc, restart, reverse_diffusion, sa_solver

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: the function, its default grid, whether it draws noise, (if it cannot run on
    every process) the process classes it needs, and its model evaluations per grid step with default
    options (the final denoising step costs one)."""

    fn: Callable
    grid: str
    stochastic: bool
    needs: tuple[type, ...] | None = None
    doc: str = field(default="", compare=False)
    evals: int = 1
    extra: Callable[[dict], int] | None = field(default=None, compare=False)  # evaluations beyond the grid's
    gaussian: bool = False  # takes the data's moments (``sample``'s teleport) as its reference Gaussian

    def nfe(self, steps: int, **options) -> int:
        """Model evaluations over a denoising grid of ``steps`` intervals with ``options`` (restart's restarts
        add theirs when the grid reaches its interval, which grids of more than one step do)."""
        return self.evals * (steps - 1) + 1 + (self.extra(options) if self.extra and steps > 1 else 0)


# Default grids: the lowest geometric-mean error at 10-20 NFE over the oracle cases and vp/ve/ddpm,
# measured by benchmarks/default_grids.py (table in benchmarks/RESULTS.md).
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm, "uniform", True, doc="DDPM ancestral sampling"),
    "ddim": Sampler(ddim, "quadratic", False, doc="DDIM, eta in [0, 1] (eta=0: PF-ODE Euler in sigma/alpha)"),
    "euler_maruyama": Sampler(euler_maruyama, "edm", True, doc="reverse SDE, Euler-Maruyama"),
    "reverse_diffusion": Sampler(reverse_diffusion, "quadratic", True, doc="reverse-diffusion predictor"),
    "pc": Sampler(pc, "log_snr", True, doc="predictor-corrector with Langevin corrector", evals=2),
    "annealed_langevin": Sampler(annealed_langevin, "edm", True, (VE,), doc="NCSN annealed Langevin", evals=5),
    "ode_euler": Sampler(ode_euler, "quadratic", False, doc="PF ODE, Euler in t"),
    "ode_heun": Sampler(ode_heun, "edm", False, doc="PF ODE, Heun in t", evals=2),
    "ode_rk45": Sampler(ode_rk45, "log_snr", False, doc="PF ODE, adaptive RK45 (torchdiffeq)"),
    "dpm++2m": Sampler(functools.partial(dpmpp, order=2), "cubic", False, doc="DPM-Solver++(2M)"),
    "dpm++3m": Sampler(functools.partial(dpmpp, order=3), "log_snr", False, doc="DPM-Solver++(3M)"),
    "deis": Sampler(deis, "quadratic", False, doc="DEIS rho-AB, order 3"),
    "ipndm": Sampler(ipndm, "quadratic", False, doc="iPNDM, Adams-Bashforth in sigma/alpha, order 4 (3 up to 10 steps)"),
    "unipc": Sampler(unipc, "cubic", False, doc="UniPC, order 3 predictor + corrector"),
    "deis_gauss": Sampler(deis_gauss, "log_snr", False, gaussian=True,
                          doc="DEIS around the data's Gaussian (its exact flow + Adams-Bashforth on the rest)"),
    "edm": Sampler(edm, "uniform", True, doc="EDM Heun with churn", evals=2),
    # Few-step stochastic samplers. Their grids: "blend" where it is at or near the oracle's best (above) and
    # raised validity on both learned image families at 6-10 NFE (benchmarks/RESULTS.md and
    # few_steps_images_results.md, 2026-12-07); dpm++3m_sde keeps log_snr (blend is worse on the oracle).
    "euler_ancestral": Sampler(functools.partial(ddim, eta=1.0), "blend", True,
                               doc="Euler-ancestral (k-diffusion): DDIM with eta, the same line"),
    "dpm++2m_sde": Sampler(functools.partial(dpmpp, order=2, eta=1.0), "blend", True,
                           doc="DPM-Solver++(2M) SDE, Brownian-path noise"),
    "dpm++3m_sde": Sampler(functools.partial(dpmpp, order=3, eta=1.0), "log_snr", True,
                           doc="DPM-Solver++(3M) SDE, Brownian-path noise"),
    "restart": Sampler(restart, "edm", True, doc="Restart sampling (Heun + K restarts of an interval)", evals=2,
                       extra=lambda o: 2 * o.get("restarts", 2) * o.get("restart_steps", 3)),
    "sa_solver": Sampler(sa_solver, "blend", True, doc="SA-Solver, stochastic Adams predictor-corrector"),
}


@dataclass
class SampleResult:
    """Samples and what they cost: ``nfe`` model evaluations over ``grid``."""

    x: Tensor
    nfe: int
    grid: Tensor


class _Counted:
    """The model as a sampler sees it: labels ``y`` bound, evaluations counted, and with ``afs`` the first
    evaluation at T replaced by its analytic limit (``analytic_first_step``), which costs none."""

    def __init__(self, model, y, afs=False):
        self.model, self.process, self.y, self.nfe = model, model.process, y, 0
        self.afs = afs_mean(afs)

    def __call__(self, x, t, y=None):
        if self.afs is not None and isinstance(t, float) and t == self.process.T:
            mean, self.afs = self.afs, None
            return analytic_first_step(self.process, x, mean)
        self.nfe += 1
        return self.model(x, t, self.y if y is None else y)


def afs_mean(afs) -> Tensor | float | None:
    """``sample``'s ``afs`` as the data mean AFS assumes: None (off) for False/None, 0.0 for True (centred
    data), or the mean of a ``unstir.teleport.Moments`` or a tensor (of the data's shape or flattened)."""
    if afs is None or afs is False:
        return None
    if afs is True:
        return 0.0
    mean = afs if isinstance(afs, Tensor) else getattr(afs, "mean", None)
    if not isinstance(mean, Tensor):
        raise TypeError(f"afs must be a bool, a mean tensor or a unstir.teleport.Moments, got {type(afs).__name__}")
    if not torch.isfinite(mean).all():
        raise ValueError("the mean given to afs contains NaN or inf")
    return mean


def analytic_first_step(process: Process, x: Tensor, mean: Tensor | float | None = None) -> ModelOutput:
    """The analytical first step (AFS; Zhou et al. 2024, "Fast ODE-based sampling for diffusion models in
    around 5 steps", Sec. 3.3): the model's output at T replaced by its limit, at no evaluation.

    Derivation, for every process at once: Tweedie gives E[eps | x_T] = (x_T - alpha_T E[x0 | x_T]) / sigma_T
    exactly. At T the signal is drowned (alpha_T / sigma_T is 0.0066 on linear VP, 0.0064 on DDPM's 1000
    steps, 0.0084 on cosine VP, 0.0066 on sub-VP, 0.001 on rf, 1/sigma_max = 0.02 on VE at the defaults),
    so E[x0 | x_T] is the data mean m: eps_T = (x_T - alpha_T m) / sigma_T, in the paper's EDM coordinates
    d = (x - D(x)) / sigma with D = m. The paper takes D = 0 (centred data, as images in [-1, 1] nearly are);
    that is ``mean=None``. The error is alpha_T |E[x0 | x_T] - m| / sigma_T <= alpha_T R / sigma_T for data
    within radius R of m, and E[x0 | x_T] - m is itself O(alpha_T): for Gaussian data it is
    alpha_T C (alpha_T^2 C + sigma_T^2)^-1 (x_T - alpha_T m), so the mean removes the error's leading term and
    what is left is O(alpha_T^2 / sigma_T^2) (tests/test_samplers.py checks both on the oracle).

    What it replaces is the model's output, so every sampler and model takes it unchanged: a multistep solver
    keeps the analytic value in its history like any evaluation (the paper describes the first step only; this
    is our reading for multistep solvers). For a guided or conditional model the limit is the same x_T / sigma_T,
    with the class's or the posterior's mean in place of the data's in the error."""
    c = coefficients(process, process.T)
    if mean is None or (isinstance(mean, float) and mean == 0.0):
        return ModelOutput(x, process.T, c, x / c.sigma, "eps")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    if m.numel() != x[0].numel():
        raise ValueError(f"the AFS mean has {m.numel()} entries, the samples {x[0].numel()}")
    return ModelOutput(x, process.T, c, (x - c.alpha * m.reshape(x.shape[1:])) / c.sigma, "eps")


def sample(model, process: Process | None = None, x_T: Tensor | tuple | list | None = None, *,
           sampler: str = "dpm++2m", steps: int = 20, grid: str | Tensor | None = None, denoise: bool = True,
           y: Tensor | int | None = None, generator: torch.Generator | None = None, callback=None,
           project=None, dtype=torch.float32, device=None, afs=False, teleport=None,
           **options) -> SampleResult:
    """Draw samples by integrating the reverse process from ``x_T`` (a tensor) or from the prior (a shape).

    ``model`` is a ``unstir.Model`` (a ``Denoiser``, a guidance wrapper, an adapter), or any callable
    ``net(x, t)`` predicting eps, wrapped for ``process``. ``y`` holds class labels for a conditional model:
    one integer for the whole batch or a tensor of shape (batch,); every sampler passes it to every model
    call. ``grid`` is a grid name from ``unstir.GRIDS`` (default: the sampler's measured best), or an
    explicit descending tensor of times. ``project(model, x, s)``, if given, constrains the state after every
    step (e.g. ``Measurement.replacement()`` for inpainting; not with the adaptive ode_rk45). ``options`` go
    to the sampler (``eta``, ``order``, ``snr``, ...). ``afs=True`` replaces the first model evaluation at T by
    its analytic limit (``analytic_first_step``): one evaluation fewer for the same grid; ``afs=moments`` (a
    ``unstir.teleport.Moments``, or a mean tensor) takes the limit around the data's mean instead of 0. A prior drawn from a
    shape lands on ``device`` (default: the model's, ``model_device``), drawn on the generator's device (the CPU
    for a ``torch.Generator()``) and moved, so a seed gives the same noise on every device. ``teleport`` (a
    ``unstir.teleport.Moments`` of the data being sampled) with a grid that starts below T carries x_T from T to
    the grid's first point by the exact PF-ODE flow of the Gaussian with those moments (analytical
    teleportation, Wang & Vastola 2024), at no evaluation; ``pilot_grid(..., teleport=)`` places that point.
    ``deis_gauss`` integrates around that Gaussian at every step (N(0, I) without ``teleport``; its ``moments``
    option names another).
    """
    check_choice("sampler", sampler, SAMPLERS)
    if not isinstance(model, Model):
        if process is None:
            raise ValueError("a raw network needs a process: sample(net, process, ...)")
        model = Denoiser(model, process)
    if process is not None and model.process is not process:
        raise ValueError(f"process {process!r} is not the model's process {model.process!r}")
    process = model.process
    spec = SAMPLERS[sampler]
    if spec.needs is not None and not isinstance(process, spec.needs):
        raise ValueError(f"sampler {sampler!r} needs a process of type {[c.__name__ for c in spec.needs]}, "
                         f"got {process.name!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if grid is None or isinstance(grid, str):
        if grid is not None:
            check_choice("grid", grid, GRIDS)
        times = time_grid(process, steps, grid or spec.grid, denoise=denoise)
    else:
        times = check_grid(process, grid)
    if project is not None and sampler == "ode_rk45":
        raise ValueError("project= needs a fixed-grid sampler; ode_rk45 chooses its own steps")
    if afs_mean(afs) is not None and (sampler == "ode_rk45" or times[0] != process.T):
        raise ValueError("afs replaces the first evaluation at T on a fixed grid that starts there; "
                         f"sampler {sampler!r} on a grid starting at {float(times[0]):.6g} has none")
    if teleport is not None and not hasattr(teleport, "flow"):
        raise TypeError(f"teleport must be a unstir.teleport.Moments, got {type(teleport).__name__}")
    x = _initial(model, process, x_T, generator, dtype, model_device(model) if device is None else device)
    if teleport is not None and times[0] < process.T:
        x = teleport.flow(process, x, process.T, float(times[0]))
    if spec.gaussian and teleport is not None:
        options.setdefault("moments", teleport)
    return run_sampler(model, x, times, sampler, y=check_labels(model, y, x.shape[0], x.device),
                       generator=generator, callback=callback, project=project, afs=afs, **options)


def run_sampler(model, x: Tensor, times: Tensor, sampler: str, *, y: Tensor | None = None,
                generator: torch.Generator | None = None, callback=None, project=None, afs=False,
                **options) -> SampleResult:
    """Run a registered sampler over ``times`` (already checked) and count its evaluations. The grid may
    ascend for the deterministic samplers: that integrates the PF ODE upward (encoding)."""
    counted = _Counted(model, y, afs)
    counted.project = project
    x0 = SAMPLERS[sampler].fn(counted, x, times, generator=generator, callback=callback, **options)
    return SampleResult(x0, counted.nfe, times)


def check_labels(model, y, batch: int, device=None) -> Tensor | None:
    """Class labels as a long tensor of shape (batch,), checked against the model's ``num_classes``."""
    if y is None:
        return None
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise ValueError("class labels y were given, but the model takes no class input (num_classes = 0)")
    if isinstance(y, bool) or not isinstance(y, (int, Tensor)):
        raise TypeError(f"y must be an integer or a tensor of integers, got {type(y).__name__}")
    y = torch.as_tensor(y, device=device)
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"class labels must be integers, got dtype {y.dtype}")
    y = y.long().expand(batch) if y.ndim == 0 else y.long()
    if y.shape != (batch,):
        raise ValueError(f"y must be one label or have shape ({batch},), got shape {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}], got values in "
                         f"[{y.min().item()}, {y.max().item()}]")
    return y


def _initial(model, process: Process, x_T, generator, dtype, device) -> Tensor:
    data_shape = getattr(model, "data_shape", None)
    if x_T is None:
        raise ValueError("give x_T (a tensor) or a shape (batch, *data_shape)")
    if isinstance(x_T, (tuple, list, torch.Size)):
        shape = tuple(int(s) for s in x_T)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (batch, *data_shape) with positive sizes, got {shape}")
        x = process.prior_sample(shape, generator, dtype=dtype, device=device)
    elif isinstance(x_T, Tensor):
        x = x_T
        if x.ndim < 2:
            raise ValueError(f"x_T must have shape (batch, *data_shape), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x_T contains NaN or inf")
    else:
        raise TypeError(f"x_T must be a tensor or a shape, got {type(x_T).__name__}")
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise ValueError(f"x_T has per-sample shape {tuple(x.shape[1:])}, the model expects {tuple(data_shape)}")
    return x


__all__ = ["SAMPLERS", "check_labels", "run_sampler", "PREDICTORS", "Sampler", "SampleResult", "sample", "ddpm", "ddim", "euler_maruyama",
           "reverse_diffusion", "pc", "annealed_langevin", "ode_euler", "ode_heun", "ode_rk45", "dpmpp", "deis", "deis_gauss", "ipndm", "unipc",
           "edm", "restart", "sa_solver"]
