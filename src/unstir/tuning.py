"""Time grids fitted to the model: ``tune_grid``.

A named grid (``unstir.grids``) spaces its points by a rule chosen for every model at once. At 5-10 model
evaluations the placement of the few points matters more than the solver (Sabour et al. 2024, "Align
Your Steps"; Watson et al. 2021 learned the DDPM grid the same way), so ``tune_grid`` places them for the
model at hand: it minimises the mean endpoint error of a deterministic sampler against a tight
adaptive solve of the same PF ODE, on a fixed batch of prior samples.

The grid is parametrised in log-SNR: with lambda_0 = lambda(T) and lambda_m = lambda(t_min) fixed, the
m increments are softmax(theta) * (lambda_m - lambda_0), theta_0 = 0, so every theta gives a strictly
decreasing grid in t with exact end points and the final denoising step to 0 (the convention of
``unstir.grids``). The m - 1 free parameters are fitted by Nelder-Mead (scipy), started from the best
named grid; the cost is bounded by ``max_evals`` objective evaluations and reported.

``pilot_grid`` is the cheap alternative, cheap enough to run by default (GITS: Chen et al. 2024, "On the
trajectory regularity of ODE-based diffusion sampling", Sec. 4 and their reference code): one fine teacher
solve of a few pilot samples, then dynamic programming over the teacher's time points for the coarse path
whose summed one-step (DDIM/Euler) errors are least. It costs ``fine`` evaluations of the pilot batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ._checks import check_choice
from .grids import GRIDS, check_grid, time_grid
from .parametrization import model_device
from .processes import coefficients
from .samplers import SAMPLERS, afs_mean, analytic_first_step, check_labels, run_sampler

Tensor = torch.Tensor

def tunable() -> list[str]:
    """Samplers whose grid can be tuned: the deterministic fixed-grid ones."""
    return sorted(k for k, v in SAMPLERS.items() if not v.stochastic and k != "ode_rk45") + ["edm"]


def gaussian_reference(sampler: str, options: dict, teleport=None) -> dict:
    """``deis_gauss``'s reference Gaussian, taken out of ``options`` (a tuned grid stores its options, and moments
    are not an option to store): {"moments": the ``moments`` option, else ``teleport``}, or {} for other samplers."""
    moments = options.pop("moments", None)
    if not SAMPLERS[sampler].gaussian:
        if moments is not None:
            raise ValueError(f"moments= is an option of the samplers {sorted(k for k, v in SAMPLERS.items() if v.gaussian)}, "
                             f"not of {sampler!r}")
        return {}
    return {"moments": teleport if moments is None else moments}


def check_deterministic(sampler: str, options: dict) -> None:
    """A grid is fitted to a deterministic fixed-grid sampler: refuse a stochastic one or its noisy options."""
    check_choice("sampler", sampler, tunable())
    if sampler == "edm" and options.get("churn", None) != 0:
        raise ValueError("edm draws noise unless churn=0; pass churn=0 to fit its grid")
    if sampler == "ddim" and options.get("eta", 0) != 0:
        raise ValueError("ddim with eta > 0 draws noise; a fitted grid needs a deterministic sampler (eta=0)")


def steps_for_nfe(sampler: str, nfe: int, **options) -> int:
    """Grid intervals that make ``sampler`` use exactly ``nfe`` model evaluations on a denoising grid."""
    spec = SAMPLERS[sampler]
    k, extra = spec.evals, spec.nfe(2, **options) - spec.evals - 1
    m = nfe - 1 - extra
    if m % k or m < (k if extra else 0):
        fixed = f" and {extra} for its restarts" if extra else ""
        raise ValueError(f"sampler {sampler!r} uses {k} evaluations per step, 1 for the final denoising "
                         f"step{fixed}, so its NFE is {k} m + {1 + extra}{' with m >= 1' if extra else ''}; got nfe={nfe}")
    return m // k + 1


def nfe_for_steps(sampler: str, steps: int, **options) -> int:
    """Model evaluations of ``sampler`` over a denoising grid of ``steps`` intervals (inverse of the above)."""
    return SAMPLERS[sampler].nfe(steps, **options)


@dataclass
class TunedGrid:
    """A grid fitted by ``tune_grid`` and what it cost. Errors are mean endpoint distances to the tight
    solve on the fitting batch: ``error_start`` for the best named grid (``start``), ``error`` for the
    tuned one. ``evaluations`` counts model calls on the batch of ``n``, the reference solve included."""

    sampler: str
    nfe: int
    times: list[float]
    start: str
    error_start: float
    error: float
    evaluations: int
    seconds: float
    n: int
    seed: int
    options: dict
    method: str = "nelder-mead"  # or "pilot" (``pilot_grid``)
    afs: bool = False            # fitted for sampling with the analytical first step
    teleport: bool = False       # starts below T: sample with teleport= (the data's Moments)

    @property
    def grid(self) -> Tensor:
        return torch.tensor(self.times, dtype=torch.float64)


def tune_grid(model, sampler: str = "dpm++2m", nfe: int = 8, *, n: int = 256, max_evals: int = 300,
              rtol: float = 1e-7, seed: int = 0, y=None, dtype=torch.float32, device=None, progress: bool = False,
              **options) -> TunedGrid:
    """Fit the points of an ``nfe``-evaluation grid for ``sampler`` to ``model`` (see the module docstring).

    ``n`` prior samples drawn with ``seed`` are the fitting batch; ``max_evals`` bounds the objective
    evaluations, each costing ``nfe`` model calls on the batch (about (max_evals + 5) * nfe calls plus the
    reference solve's). The batch has ``dtype`` (float64 for an oracle gives the cleanest errors); ``y``
    labels a conditional model's batch. ``options`` go to the sampler (``order``, ``form``, ``churn=0`` for ``edm``).
    Judge the result on noise it was not fitted on (``benchmarks/samplers.py`` does).
    """
    from tqdm import tqdm

    check_deterministic(sampler, options)
    for name, value, low in (("nfe", nfe, 3), ("n", n, 1), ("max_evals", max_evals, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must lie in (0, 1), got {rtol!r}")
    steps = steps_for_nfe(sampler, nfe)
    if steps < 3:
        raise ValueError(f"a grid of {steps} steps has no free point to tune: {sampler!r} needs nfe >= "
                         f"{nfe_for_steps(sampler, 3)}, got {nfe}")
    process, shape = model.process, getattr(model, "data_shape", None)
    if shape is None:
        raise ValueError("the model must declare its data_shape to be tuned on prior samples")
    t0 = time.perf_counter()
    gaussian = gaussian_reference(sampler, options)
    x_T = process.prior_sample((n, *shape), torch.Generator().manual_seed(seed), dtype=dtype,
                               device=model_device(model) if device is None else device)
    labels = check_labels(model, y, n, x_T.device)
    with torch.no_grad():
        ref = run_sampler(model, x_T, torch.tensor([process.T, process.t_min, 0.0], dtype=torch.float64),
                          "ode_rk45", y=labels, rtol=rtol, atol=rtol)
    spent = ref.nfe

    def error(grid: Tensor) -> float:
        nonlocal spent
        try:
            with torch.no_grad():
                r = run_sampler(model, x_T, grid, sampler, y=labels, **gaussian, **options)
        except FloatingPointError:  # the sampler diverged on this grid
            spent += nfe  # at most; it stopped where it diverged
            return math.inf
        spent += r.nfe
        return (r.x - ref.x).flatten(1).norm(dim=1).mean().item()

    starts = {g: error(time_grid(process, steps, g)) for g in GRIDS}
    start = min(starts, key=starts.get)
    tail = torch.tensor([process.t_min, 0.0], dtype=torch.float64)
    grid_of = lambda theta: torch.cat([torch.tensor([process.T], dtype=torch.float64),  # noqa: E731
                                       log_snr_points(process, theta), tail])
    # Start from the best named grid's log-SNR gaps.
    theta0 = log_snr_params(process, time_grid(process, steps, start)[1:-2])
    bar = tqdm(total=max_evals, disable=not progress, desc=f"tune {sampler} grid ({nfe} NFE)", unit="eval")

    def objective(theta):
        bar.update(1)
        grid = grid_of(theta)
        return error(grid) if (torch.diff(grid) < 0).all() else math.inf  # rounding can merge two points

    best_theta, best = theta0, starts[start]
    if max_evals > 0:
        theta, value = _nelder_mead(objective, theta0, max_evals)
        if value < best:
            best_theta, best = theta, value
    bar.close()
    grid = grid_of(best_theta) if best < starts[start] else time_grid(process, steps, start)
    return TunedGrid(sampler, nfe, grid.tolist(), start, starts[start], best, spent,
                     time.perf_counter() - t0, n, seed, dict(options))


GAMMAS = (1.0, 1.1, 1.2, 1.35, 1.5)  # pilot_grid's default GITS coefficients


def pilot_evaluations(nfe: int, *, fine: int = 100, teleport: bool = False, polish: int = 0,
                      gammas=GAMMAS) -> int:
    """The most model evaluations (per pilot sample) that ``pilot_grid`` spends: the ``fine`` teacher, every named
    grid and two paths per gamma (four with ``teleport``) at ``nfe`` each, and the polish's trial grids."""
    return fine + (len(GRIDS) + 2 * len(gammas) * (2 if teleport else 1) + polish) * nfe


def pilot_grid(model, sampler: str = "ipndm", nfe: int = 5, *, n: int = 64, fine: int = 100,
               gammas=GAMMAS, afs=False, seed: int = 0, y=None,
               dtype=torch.float32, device: str | torch.device | None = None, teleport=None, polish: int = 0,
               **options) -> TunedGrid:
    """A grid for ``sampler`` at ``nfe`` evaluations placed by a pilot run of the model (GITS, Chen et al.
    2024, Alg. 1), at a cost of at most ``pilot_evaluations`` evaluations of ``n`` pilot samples (paths found twice are
    run once), the polish's ``polish`` * ``nfe`` (step 6) included.

    1. Teacher: ``n`` prior samples (``seed``) solved on the ``fine``-step edm grid (deis, order 3); its
       states xbar_i = x_i / alpha_i and eps_i at every point t_i (t_min included) are kept.
    2. Cost of a coarse step from t_i to t_j: the mean distance, in the process-free coordinates
       xbar, between one DDIM step from the teacher's state, xbar_i + (sbar_j - sbar_i) eps_i, and the
       teacher's xbar_j (the eps are already known: no evaluation). With ``afs`` the step from T uses the
       analytic eps_T = (x_T - alpha_T m) / sigma_T (m = 0, or the mean ``afs`` gives), as the sampler will.
    3. Dynamic programming for the path T = t_0 > ... > t_K = t_min over the teacher's points with least
       summed cost, each later step's cost weighted by gamma per step (GITS's coefficient), K + 1 the
       grid's points before the final denoising step (one more with ``afs``). A second path per gamma ends
       anywhere: its last point t_K is free and the final denoising from it costs the distance of its x0
       prediction, xbar_K - sbar_K eps_K, to the teacher's sample (so ``nfe`` = 2, T > t_1 > 0, has a point
       to place; GITS always ends at t_min).
    4. One grid per gamma in ``gammas``, and every named grid, are run with ``sampler`` on the pilot batch;
       the one nearest the teacher's samples is returned (``error``; ``error_start`` is that of the
       sampler's named default grid, ``start``). So the result is never worse than the named default on
       the pilot batch.
    5. With ``teleport`` (the data's ``unstir.teleport.Moments``), paths may also start below T: x_T is
       carried to the path's first point t_j by the Gaussian's exact flow (no evaluation), at the cost of
       its mean distance to the teacher's xbar_j, and the dynamic programming chooses t_j with the rest of
       the path. Those grids join step 4's candidates; ``sample(..., grid=result.grid, teleport=moments)``
       runs the winner (``result.teleport`` says whether it starts below T).
    6. With ``polish`` > 0, Nelder-Mead refines the ``POLISH_STARTS`` (3) best candidates of step 4, each for
       at most ``polish // 3`` trial grids, on step 4's own objective (the pilot batch's distance to the
       teacher's samples): the points between T and the final step to 0 move in log-SNR (softmax gaps, as in
       ``tune_grid``), the last point before 0 is free, and with ``teleport`` so is the first. The best of
       all is returned, so polishing never loses on the pilot batch. It costs up to ``polish`` * ``nfe`` more
       evaluations of the batch. Why: the Euler step is a poor proxy for a multistep solver's long steps. At
       d = 3072 the dynamic programming's best path ends ipndm's 4-6 NFE grids near t = 0.5, while the endpoint
       error is lowest with a long step down to t ~ 0.02 and a short one after it; the simplex from the pilot's
       winner alone stays in the first basin, and from its 2nd and 3rd candidates (which end near 0) it finds the
       second (benchmarks/few_steps_image_results.md).

    Where it differs from the paper (Chen et al. 2024 stop at step 3 with one gamma): the teacher is deis-3 on the edm grid (they use their own solvers on
    polynomial grids); the cost is their "l2" metric for every sampler (they also apply the Euler-cost grid
    to iPNDM); and gamma is chosen per model from ``gammas`` by step 4 instead of fixed (their code sweeps it
    for Stable Diffusion only). Step 4 was added because the Euler cost is only a proxy for a multistep
    solver's error: on the tuning cases (not those of the benchmark) no single gamma won for every sampler.
    Judge it on fresh noise (``benchmarks/few_steps.py`` does).
    """
    check_deterministic(sampler, options)
    gaussian = gaussian_reference(sampler, options, teleport)
    afs_arg, mean = afs, afs_mean(afs)  # mean None: no AFS; 0.0: centred; a tensor: around the data's mean
    afs = mean is not None
    if teleport is not None and afs:
        raise ValueError("afs replaces the evaluation at T and teleport starts below T: pass one of them")
    if teleport is not None and not hasattr(teleport, "flow"):
        raise TypeError(f"teleport must be a unstir.teleport.Moments, got {type(teleport).__name__}")
    if teleport is not None:
        teleport.eig()  # a covariance that is not positive semi-definite is refused before the teacher runs
    for name, value, low in (("nfe", nfe, 2), ("n", n, 1), ("fine", fine, 8), ("polish", polish, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    gammas = tuple(gammas)
    if not gammas or not all(isinstance(g, (int, float)) and 0 < g < math.inf for g in gammas):
        raise ValueError(f"gammas must be positive numbers, got {gammas!r}")
    steps = steps_for_nfe(sampler, nfe) + (1 if afs else 0)
    if steps < 2:
        raise ValueError(f"a grid of {steps} step has no free point to place: {sampler!r} needs more than "
                         f"{nfe} evaluations")
    if fine < 2 * steps:
        raise ValueError(f"fine must be at least twice the grid's {steps} steps, got {fine}")
    process, shape = model.process, getattr(model, "data_shape", None)
    if shape is None:
        raise ValueError("the model must declare its data_shape for a pilot run on prior samples")
    t0 = time.perf_counter()
    x_T = process.prior_sample((n, *shape), torch.Generator().manual_seed(seed), dtype=dtype,
                               device=model_device(model) if device is None else device)
    labels = check_labels(model, y, n, x_T.device)
    teacher_grid = time_grid(process, fine, "edm")
    xbar, eps = [], []

    def keep(state):
        c = coefficients(process, state["t"])
        x = state["x"].to(torch.float64).flatten(1)
        xbar.append(x / c.alpha)
        eps.append((x - c.alpha * state["x0"].to(torch.float64).flatten(1)) / c.sigma)

    with torch.no_grad():
        teacher = run_sampler(model, x_T, teacher_grid, "deis", y=labels, callback=keep, order=3)
    spent = teacher.nfe
    if afs:
        eps[0] = analytic_first_step(process, x_T.to(torch.float64), mean).eps.flatten(1)
    sbar = [coefficients(process, t).sigma_bar for t in teacher_grid[:-1].tolist()]
    X, E = torch.stack(xbar), torch.stack(eps)  # (m, n, d) over the m points T .. t_min
    cost = euler_costs(X, E, sbar)
    # the final denoising step from point i: its x0 prediction xbar_i - sigma_bar_i eps_i against the teacher's
    # sample (0 at t_min, where the teacher's own last step is this one)
    x_end = teacher.x.to(torch.float64).flatten(1)
    final = np.array([(X[i] - sbar[i] * E[i] - x_end).norm(dim=1).mean().item() for i in range(len(sbar))])

    def error(g: Tensor) -> float:
        nonlocal spent
        with torch.no_grad():
            try:
                x = teleport.flow(process, x_T, process.T, float(g[0])) if g[0] < process.T else x_T
                r = run_sampler(model, x, g, sampler, y=labels, afs=afs_arg, **gaussian, **options)
            except FloatingPointError:
                spent += nfe
                return math.inf
        spent += r.nfe
        return (r.x.to(torch.float64) - teacher.x.to(torch.float64)).flatten(1).norm(dim=1).mean().item()

    zero = teacher_grid.new_zeros(1)
    candidates = {name: time_grid(process, steps, name) for name in GRIDS}
    starts = [None]
    if teleport is not None:  # the teleport's distance to the teacher at each point (inf at T: no teleport)
        starts.append(np.array([math.inf] + [
            (teleport.flow(process, x_T, process.T, t).to(torch.float64).flatten(1) /
             coefficients(process, t).alpha - X[i]).norm(dim=1).mean().item()
            for i, t in enumerate(teacher_grid[1:-1].tolist(), start=1)]))
    for g in gammas:
        for start_cost in starts:
            for end_cost in (None, final):  # paths through t_min, and paths that denoise from a placed point
                path = tuple(_cheapest_path(cost, steps - 1, g, start_cost, end_cost))
                candidates.setdefault(path, torch.cat([teacher_grid[list(path)], zero]))
    errors = {k: error(g) for k, g in candidates.items()}
    start = SAMPLERS[sampler].grid
    best = min(errors, key=errors.get)
    grid, err = candidates[best], errors[best]
    if polish:
        ranked = sorted(errors, key=errors.get)[:min(POLISH_STARTS, polish)]
        for k in ranked:
            g, e = _polish(process, candidates[k], errors[k], error, polish // len(ranked),
                           free_start=teleport is not None)
            if e < err:
                grid, err = g, e
    return TunedGrid(sampler, nfe, grid.tolist(), start, errors[start], err, spent,
                     time.perf_counter() - t0, n, seed, dict(options), "pilot", afs, bool(grid[0] < process.T))


POLISH_STARTS = 3


def _polish(process, grid: Tensor, err: float, error, budget: int, free_start: bool) -> tuple[Tensor, float]:
    """Nelder-Mead from ``grid`` (error ``err``) on the pilot's own objective ``error``, for at most ``budget``
    evaluations of it. The points between T (free too with ``free_start``: a teleport) and the final denoising
    step to 0 move in log-SNR, parametrised as in ``tune_grid`` (softmax gaps between lambda(T) and
    lambda(t_min), so every parameter is a strictly ordered grid); the end point is free as in the free-end
    paths. Returns the better of the start and the polished grid."""
    head = [] if free_start else [process.T]
    theta0 = log_snr_params(process, grid[len(head):-1])  # the free points, decreasing in t
    grid_of = lambda theta: torch.cat([torch.tensor(head, dtype=torch.float64),  # noqa: E731
                                       log_snr_points(process, theta), torch.zeros(1, dtype=torch.float64)])

    def objective(theta):
        g = grid_of(theta)
        return error(g) if (torch.diff(g) < 0).all() else math.inf

    theta, value = _nelder_mead(objective, theta0, budget)
    return (grid_of(theta), value) if value < err else (grid, err)


def log_snr_points(process, theta: np.ndarray) -> Tensor:
    """len(theta) times strictly between T and t_min, decreasing: the log-SNR range lambda(T)..lambda(t_min) cut
    into len(theta) + 1 gaps in the proportions softmax([0, theta]), every point but the last end (so every
    theta is a strictly ordered grid). The parametrisation of ``tune_grid`` and of the pilot's polish."""
    lam_T, lam_min = float(process.log_snr(process.T)), float(process.log_snr(process.t_min))
    logits = np.concatenate([[0.0], theta])
    w = np.exp(logits - logits.max())
    points = lam_T + (lam_min - lam_T) * np.cumsum(w / w.sum())[:-1]
    return process.t_from_log_snr(torch.tensor(points, dtype=torch.float64))


def log_snr_params(process, points) -> np.ndarray:
    """The theta that ``log_snr_points`` maps to ``points`` (times decreasing in [t_min, T]); a point on T or
    t_min, or two on one another, start a thousandth of the range apart."""
    lam_T, lam_min = float(process.log_snr(process.T)), float(process.log_snr(process.t_min))
    lam = np.clip([float(process.log_snr(float(t))) for t in points], lam_T, lam_min)
    gaps = np.maximum(np.diff(np.concatenate([[lam_T], lam, [lam_min]])), 1e-3 * (lam_min - lam_T))
    return np.log(gaps / gaps[0])[1:]


def _nelder_mead(objective, theta0: np.ndarray, budget: int) -> tuple[np.ndarray, float]:
    """scipy's Nelder-Mead from ``theta0`` for at most ``budget`` evaluations: (best theta, its value). scipy's
    default first simplex moves a zero coordinate by 2.5e-4 only (a uniform start is all zeros); a step of 0.5
    in the logits moves a point by about a quarter of its interval."""
    from scipy.optimize import minimize

    simplex = np.vstack([theta0, theta0 + 0.5 * np.eye(theta0.size)])
    res = minimize(objective, theta0, method="Nelder-Mead",
                   options={"maxfev": budget, "adaptive": theta0.size > 4, "xatol": 1e-3, "fatol": 0.0,
                            "initial_simplex": simplex})
    return res.x, float(res.fun)


def euler_costs(X: Tensor, E: Tensor, sbar) -> np.ndarray:
    """GITS's cost matrix (Chen et al. 2024, Sec. 4): ``cost[i, j]`` (i < j) is the mean distance between one
    Euler step of the PF ODE in the scaled coordinates xbar = x / alpha, sigma_bar = sigma / alpha (a DDIM step:
    xbar_j ~ xbar_i + (sigma_bar_j - sigma_bar_i) eps_i) from the teacher's point i to point j, and the teacher's
    point j; inf elsewhere. ``X``, ``E``: (m, n, d) teacher states xbar and eps predictions at the m points;
    ``sbar``: their sigma_bar."""
    m = len(sbar)
    cost = np.full((m, m), np.inf)
    for i in range(m - 1):
        ds = torch.tensor(sbar[i + 1:], dtype=torch.float64)[:, None, None] - sbar[i]
        cost[i, i + 1:] = (X[i] + ds.to(X.device) * E[i] - X[i + 1:]).norm(dim=2).mean(1).cpu().numpy()
    return cost


def _cheapest_path(cost: np.ndarray, k: int, gamma: float, start: np.ndarray | None = None,
                   end: np.ndarray | None = None) -> list[int]:
    """Indices 0 = i_0 < i_1 < ... < i_k = m - 1 minimising sum_s gamma^s cost[i_s, i_{s+1}] (dynamic
    programming over (point, steps left), as GITS). With ``start`` (m,), i_0 is free: the path reaches it at
    ``start[i_0]`` and its k steps are weighted from gamma^1 on (the teleport is step 0). With ``end`` (m,), i_k
    is free too: the path leaves it by one more step (the final denoising) of cost ``end[i_k]``, weighted as the
    step after the k-th (so that a 2-evaluation grid T > t_1 > 0 can place t_1 above t_min)."""
    m = cost.shape[0]
    value = np.full((k + 1, m), np.inf)  # value[r, i]: least cost from point i to the end in r steps
    choice = np.zeros((k + 1, m), dtype=int)
    if end is None:
        value[0, m - 1] = 0.0
    else:
        value[0] = end
    for r in range(1, k + 1):
        for i in range(m - 1):
            total = cost[i, i + 1:] + gamma * value[r - 1, i + 1:]
            j = int(np.argmin(total))
            value[r, i], choice[r, i] = total[j], i + 1 + j
    i = 0 if start is None else int(np.argmin(start[:m - 1] + gamma * value[k, :m - 1]))
    path = [i]
    for r in range(k, 0, -1):
        i = int(choice[r, i])
        path.append(i)
    return path


# --- stored grids in a run folder -------------------------------------------------------------------

GRIDS_FILE = "grids.json"


def _key(sampler: str, nfe: int, afs: bool = False, teleport: bool = False) -> str:
    """``sampler@nfe``, ``+afs`` for a grid placed for AFS, ``+tele`` for one placed with teleportation allowed."""
    return f"{sampler}@{nfe}" + ("+afs" if afs else "") + ("+tele" if teleport else "")


GRID_LOCK_WAIT = 30.0  # seconds a grid writer waits for another one


def save_tuned(run, tuned: TunedGrid, teleport: bool = False) -> Path:
    """Add (or replace) ``tuned`` in ``run/grids.json``, written atomically; ``teleport``: it was placed with
    teleportation allowed (its key says so, whether or not the winner starts below T)."""
    from .runs import atomic_write, remove_temporaries, run_lock

    path = Path(run) / GRIDS_FILE
    # Read, modify and write under the run's lock, so that concurrent writers (several `sample --nfe`, a
    # `tune-grid`) each keep their grid; a short holder is waited for, a training run is not. Holding it, any
    # temporary file left in the run (a writer killed inside its write) is stale: it is removed.
    with run_lock(run, "sample or tune-grid (storing a grid)", wait=GRID_LOCK_WAIT):
        remove_temporaries(Path(run))
        stored = _read_grids(path) if path.exists() else {}
        stored[_key(tuned.sampler, tuned.nfe, tuned.afs, teleport or tuned.teleport)] = asdict(tuned)
        atomic_write(path, lambda p: p.write_text(json.dumps(stored, indent=1)))
    return path


def load_tuned(run, process, sampler: str, nfe: int, afs: bool = False, teleport: bool = False) -> TunedGrid | None:
    """The grid stored for ``sampler`` at ``nfe`` evaluations (with the analytical first step if ``afs``; placed
    with teleportation allowed if ``teleport``, else the one placed from T) in ``run/grids.json``, validated, or
    None."""
    path = Path(run) / GRIDS_FILE
    if not path.exists():
        return None
    grids = _read_grids(path)
    keys = [_key(sampler, nfe, afs, True)] * teleport + [_key(sampler, nfe, afs)]
    key = next((k for k in keys if k in grids), None)
    if key is None:
        return None
    entry = grids[key]
    try:
        tuned = TunedGrid(**entry)
        check_grid(process, tuned.grid)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r}: the entry {key!r} is not a valid grid ({err}); "
                         f"delete it or tune again with `unstir tune-grid`") from None
    points = steps_for_nfe(sampler, nfe) + (2 if afs else 1)
    if tuned.grid[-1] != 0 or len(tuned.times) != points or tuned.afs != afs:
        raise ValueError(f"{str(path)!r}: the entry {key!r} has {len(tuned.times)} points, "
                         f"not the {points} of a denoising {nfe}-evaluation grid{' with AFS' if afs else ''}")
    if (tuned.grid[0] < process.T) != (tuned.teleport and key.endswith("+tele")):
        raise ValueError(f"{str(path)!r}: the entry {key!r} starts at t = {tuned.times[0]:.6g}, below T = "
                         f"{process.T:g}, without teleport (or says teleport and starts at T); delete it or place it "
                         f"again with `unstir tune-grid --method pilot`")
    return tuned


def _read_grids(path: Path) -> dict:
    from .runs import _read_json

    stored = _read_json(path)
    if not isinstance(stored, dict) or not all(isinstance(v, dict) for v in stored.values()):
        raise ValueError(f"{str(path)!r} must hold a JSON object of grids; delete it or tune again")
    return stored
