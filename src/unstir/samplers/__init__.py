"""Every sampler behind one front door, ``sample``.

Each sampler is a function ``sampler(model, x_T, grid, *, generator=None, callback=None, **options)``
returning x_0; ``SAMPLERS`` maps names to them with their default grid and the processes they support.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..grids import GRIDS, check_grid, time_grid
from ..parametrization import Denoiser
from ..processes import VE, Process
from .ode import deis, dpmpp, ode_euler, ode_heun, ode_rk45, unipc
from .stochastic import PREDICTORS, annealed_langevin, ddim, ddpm, edm, euler_maruyama, pc, reverse_diffusion

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: the function, its default grid, whether it draws noise, and (if it cannot
    run on every process) the process classes it needs."""

    fn: Callable
    grid: str
    stochastic: bool
    needs: tuple[type, ...] | None = None
    doc: str = field(default="", compare=False)


# Default grids: the lowest geometric-mean error at 10-20 NFE over the oracle cases and vp/ve/ddpm,
# measured by benchmarks/default_grids.py (table in benchmarks/RESULTS.md).
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm, "uniform", True, doc="DDPM ancestral sampling"),
    "ddim": Sampler(ddim, "quadratic", False, doc="DDIM, eta in [0, 1] (eta=0: PF-ODE Euler in sigma/alpha)"),
    "euler_maruyama": Sampler(euler_maruyama, "edm", True, doc="reverse SDE, Euler-Maruyama"),
    "reverse_diffusion": Sampler(reverse_diffusion, "quadratic", True, doc="reverse-diffusion predictor"),
    "pc": Sampler(pc, "log_snr", True, doc="predictor-corrector with Langevin corrector"),
    "annealed_langevin": Sampler(annealed_langevin, "edm", True, (VE,), doc="NCSN annealed Langevin"),
    "ode_euler": Sampler(ode_euler, "quadratic", False, doc="PF ODE, Euler in t"),
    "ode_heun": Sampler(ode_heun, "edm", False, doc="PF ODE, Heun in t"),
    "ode_rk45": Sampler(ode_rk45, "log_snr", False, doc="PF ODE, adaptive RK45 (torchdiffeq)"),
    "dpm++2m": Sampler(functools.partial(dpmpp, order=2), "cubic", False, doc="DPM-Solver++(2M)"),
    "dpm++3m": Sampler(functools.partial(dpmpp, order=3), "log_snr", False, doc="DPM-Solver++(3M)"),
    "deis": Sampler(deis, "quadratic", False, doc="DEIS rho-AB, order 3"),
    "unipc": Sampler(unipc, "cubic", False, doc="UniPC, order 3 predictor + corrector"),
    "edm": Sampler(edm, "uniform", True, doc="EDM Heun with churn"),
}


@dataclass
class SampleResult:
    """Samples and what they cost: ``nfe`` model evaluations over ``grid``."""

    x: Tensor
    nfe: int
    grid: Tensor


class _Counted:
    """Counts the model evaluations a sampler makes."""

    def __init__(self, model):
        self.model, self.process, self.nfe = model, model.process, 0

    def __call__(self, x, t):
        self.nfe += 1
        return self.model(x, t)


def sample(model, process: Process | None = None, x_T: Tensor | tuple | list | None = None, *,
           sampler: str = "dpm++2m", steps: int = 20, grid: str | Tensor | None = None, denoise: bool = True,
           generator: torch.Generator | None = None, callback=None, dtype=torch.float32, **options) -> SampleResult:
    """Draw samples by integrating the reverse process from ``x_T`` (a tensor) or from the prior (a shape).

    ``model`` is a ``Denoiser`` (or any callable ``net(x, t)`` predicting eps, wrapped for ``process``).
    ``grid`` is a grid name from ``unstir.GRIDS`` (default: the sampler's measured best), or an explicit
    descending tensor of times. ``options`` go to the sampler (``eta``, ``order``, ``snr``, ...).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not isinstance(model, Denoiser) and not hasattr(model, "process"):
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
        if grid is not None and grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
        times = time_grid(process, steps, grid or spec.grid, denoise=denoise)
    else:
        times = check_grid(process, grid)
    x = _initial(model, process, x_T, generator, dtype)
    counted = _Counted(model)
    x0 = spec.fn(counted, x, times, generator=generator, callback=callback, **options)
    return SampleResult(x0, counted.nfe, times)


def _initial(model, process: Process, x_T, generator, dtype) -> Tensor:
    data_shape = getattr(model, "data_shape", None)
    if x_T is None:
        raise ValueError("give x_T (a tensor) or a shape (batch, *data_shape)")
    if isinstance(x_T, (tuple, list, torch.Size)):
        shape = tuple(int(s) for s in x_T)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (batch, *data_shape) with positive sizes, got {shape}")
        x = process.prior_sample(shape, generator, dtype=dtype)
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


__all__ = ["SAMPLERS", "PREDICTORS", "Sampler", "SampleResult", "sample", "ddpm", "ddim", "euler_maruyama",
           "reverse_diffusion", "pc", "annealed_langevin", "ode_euler", "ode_heun", "ode_rk45", "dpmpp", "deis", "unipc",
           "edm"]
