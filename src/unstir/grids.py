"""Time grids: the discretisation T = t_0 > t_1 > ... > t_N of the reverse-time integration.

The convention, the same for every grid and every sampler:

* ``steps`` is the number of intervals, N. The grid has N + 1 points, descending.
* The first point is exactly ``process.T``.
* With ``denoise=True`` (the default) the last point is 0.0: points t_0 .. t_{N-1} span [t_min, T]
  (t_{N-1} = t_min exactly when N >= 2; with N = 1 the grid is [T, 0]), and the final interval
  t_{N-1} -> 0 is the denoising step: the sample is the model's x0 prediction at t_{N-1}.
  For first-order samplers this makes the number of model evaluations equal N.
* With ``denoise=False`` the last point is exactly ``process.t_min`` and the samples keep the
  small noise level sigma(t_min).

The spacings (all between T and t_min):

* ``uniform``:   uniform in t.
* ``quadratic``: t = t_min + (T - t_min) u^2 with u uniform (dense near the data, as in DDIM).
* ``cubic``:     t = t_min + (T - t_min) u^3, denser still near the data. On the oracle cases it gives the
                 multistep solvers (UniPC, DPM-Solver++) their lowest error at 10-20 NFE
                 (benchmarks/default_grids.py).
* ``log_snr``:   uniform in lambda = log(alpha / sigma) (DPM-Solver's choice).
* ``edm``:       Karras et al. (2022), eq. 5, in the noise level sigma/alpha = exp(-lambda):
                 (s_max^(1/rho) + u (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7.
* ``blend``:     the point-wise mean of two grids in s = sigma / (alpha + sigma), the noise level as a
                 rectified-flow time (s = t on rf): the grid uniform in s and the log_snr grid. Uniform in s
                 takes long steps in log-SNR near the data; log_snr crowds the ends (on rf with T = 0.999 it puts
                 3 of 10 points above t = 0.9) and takes long steps between, where the images form. The mean
                 lies between the two. Defined by the noise levels only, so the same for every process;
                 measured in benchmarks/RESULTS.md (oracle) and few_steps_images_results.md (learned models).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice
from .processes import Process

Tensor = torch.Tensor

GRIDS = ("uniform", "quadratic", "cubic", "log_snr", "edm", "blend")
_TIME_POWER = {"uniform": 1, "quadratic": 2, "cubic": 3}  # t - t_min proportional to u^power


def time_grid(process: Process, steps: int, kind: str = "log_snr", *, denoise: bool = True,
              rho: float = 7.0) -> Tensor:
    """A descending float64 grid of ``steps + 1`` times; see the module docstring for the convention."""
    check_choice("grid", kind, GRIDS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    n_points = steps if denoise else steps + 1
    # u runs from 1 (at T) to 0 (at t_min).
    u = torch.linspace(1.0, 0.0, n_points, dtype=torch.float64) if n_points > 1 else torch.ones(1, dtype=torch.float64)
    t = _spacing(process, kind, u, rho)
    # Pin the end points exactly: inverse maps may be off by an ulp.
    t[0] = process.T
    if n_points > 1:
        t[-1] = process.t_min
    if denoise:
        t = torch.cat([t, t.new_zeros(1)])
    return t


def _spacing(process: Process, kind: str, u: Tensor, rho: float) -> Tensor:
    """The times of spacing ``kind`` at positions u in [0, 1] (1 at T, 0 at t_min)."""
    T, t_min = process.T, process.t_min
    if kind in _TIME_POWER:
        return t_min + (T - t_min) * u ** _TIME_POWER[kind]
    lam_T, lam_min = process.log_snr(T).item(), process.log_snr(t_min).item()
    if kind in ("log_snr", "blend"):
        lam = lam_min + (lam_T - lam_min) * u
        if kind == "blend":  # mean in s = sigmoid(-lambda) of the log_snr grid and the grid uniform in s
            s_T, s_min = 1 / (1 + math.exp(lam_T)), 1 / (1 + math.exp(lam_min))
            s = 0.5 * (torch.sigmoid(-lam) + s_min + (s_T - s_min) * u)
            lam = torch.log1p(-s) - torch.log(s)
    else:
        s_max, s_min = math.exp(-lam_T), math.exp(-lam_min)  # grids are CPU float64 by design
        lam = -rho * torch.log(s_min ** (1 / rho) + u * (s_max ** (1 / rho) - s_min ** (1 / rho)))
    return process.t_from_log_snr(lam.clamp(lam_T, lam_min))


def check_grid(process: Process, grid: Tensor) -> Tensor:
    """Validate a user-supplied grid: 1-D, strictly decreasing, inside [t_min, T] with an optional final 0."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"a time grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}")
    if not (torch.diff(grid) < 0).all():
        raise ValueError(f"a time grid must be strictly decreasing, got {grid.tolist()}")
    inner = grid[:-1] if grid[-1] == 0 else grid
    if inner.min() < process.t_min - 1e-12 or inner.max() > process.T + 1e-12:
        raise ValueError(f"grid points must lie in [t_min, T] = [{process.t_min:g}, {process.T:g}] "
                         f"(a final 0 means denoise), got {grid.tolist()}")
    return grid
