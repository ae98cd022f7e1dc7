"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models", EDM2,
sec. 3 and appendix C): choose the EMA length after training.

A power-function EMA with exponent gamma averages the weights seen up to step t with the profile

    p(tau; t, gamma) = (gamma + 1) tau^gamma / t^(gamma + 1)   on 0 < tau <= t                       (EDM2 eq. 2)

whose width relative to t is sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))            (EDM2 eq. 3).
It is kept by the update theta_hat <- beta theta_hat + (1 - beta) theta with beta = (1 - 1/t)^(gamma + 1) at
step t = 1, 2, ... (EDM2 eq. 4; at t = 1 it is the weights themselves). Unlike a constant decay it forgets the
random initialisation at a rate set by the length of training, so one sigma_rel suits short and long runs.

During training (``TrainConfig.posthoc_ema``) unstir keeps one such EMA per stored profile (EDM2 stores two,
sigma_rel 0.05 and 0.10) and writes all of them every ``posthoc_every`` steps to ``ema-<step>.safetensors`` in
the run folder (float32, one key per profile and parameter). Afterwards, any profile (t_r, gamma_r) is
approximated in the span of the stored ones by least squares in L2 over tau (EDM2 appendix C.2):

    A_ij = <p_i, p_j>,  b_i = <p_i, p_r>,  x = A^-1 b,  theta_r = sum_i x_i theta_hat_i

with the closed-form inner product <p(.; t_a, g_a), p(.; t_b, g_b)> = (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b
+ 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)). Where this differs from EDM2's released code
(``solve_posthoc_coefficients``): times are optimizer steps, not images seen (the same profiles at a constant
batch size); only snapshots taken at or before the target step are used (EDM2 passes all it is given); and the
fit's relative residual ||p_r - sum_i x_i p_i|| / ||p_r|| is computed, and a length the snapshots cannot reach
within ``MAX_RESIDUAL`` is refused, naming the range they can. As in EDM2 the weights are renormalised to sum
to 1, so constant weights are reproduced exactly.

Measured on a random walk with drift (tests/test_ema.py): 20 snapshots of (0.05, 0.10) over 2000 steps
reconstruct sigma_rel 0.07 within 0.03 % of its distance from the raw weights, 0.03 and 0.15 within 0.8 % and
0.05 %; with 4 snapshots the residual passes 5 % and the error reaches 10-120 %: keep ``posthoc_every`` at a
twentieth of the run or less (the default).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SIGMA_RELS = (0.05, 0.10)  # EDM2's two stored profiles
SIGMA_REL_MAX = 0.28  # gamma ~ 0.06: sigma_rel of a uniform average over the whole run is 1/sqrt(12) = 0.2887
MAX_RESIDUAL = 0.05  # the largest relative L2 residual of a reconstructed profile that is accepted
SNAPSHOT = re.compile(r"ema-(\d+)\.safetensors")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile of relative width ``sigma_rel`` (EDM2 eq. 3 solved for
    gamma: the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0)."""
    s = check_sigma_rel(sigma_rel)
    t = s**-2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 3."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def check_sigma_rel(value) -> float:
    """A relative EMA length in (0, SIGMA_REL_MAX]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX}] (the EMA's width relative to the run's length; "
                         f"EDM2 stores 0.05 and 0.10), got {value!r}")
    return float(value)


class PowerEMA:
    """Power-function EMAs of ``params`` for several sigma_rel, updated after each optimizer step."""

    def __init__(self, params, sigma_rels):
        self.params = list(params)
        self.sigma_rels = tuple(check_sigma_rel(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.averages = [[p.detach().clone() for p in self.params] for _ in self.gammas]

    @torch.no_grad()
    def update(self, t: int) -> None:
        """Fold in the weights after optimizer step ``t`` (1, 2, ...): beta = (1 - 1/t)^(gamma + 1)."""
        for gamma, avg in zip(self.gammas, self.averages):
            beta = (1 - 1 / t) ** (gamma + 1)
            torch._foreach_lerp_(avg, self.params, 1 - beta)

    def state(self, names) -> dict[str, torch.Tensor]:
        """The averages by key '<profile index>.<parameter name>' (float32 on the CPU), for a checkpoint or
        snapshot; profile i has length ``sigma_rels[i]``."""
        return {f"{i}.{n}": a.detach().float().contiguous().cpu()
                for i, avg in enumerate(self.averages) for n, a in zip(names, avg)}

    def load(self, names, tensors: dict) -> None:
        for i, avg in enumerate(self.averages):
            for n, a in zip(names, avg):
                a.copy_(tensors[f"{i}.{n}"])


def p_dot_p(t_a, g_a, t_b, g_b):
    """<p(.; t_a, g_a), p(.; t_b, g_b)> in L2(0, inf), broadcasting (float64 arrays)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_hi = np.where(t_a <= t_b, g_b, g_a)  # the exponent of the later profile: (lo / hi)^g_hi / hi stays finite
    return (g_a + 1) * (g_b + 1) * (lo / hi) ** g_hi / ((g_a + g_b + 1) * hi)


def solve(snapshots, target) -> tuple[np.ndarray, float]:
    """Least-squares weights x of the stored profiles ``snapshots`` [(t_i, gamma_i)] for ``target`` (t_r, gamma_r),
    and the fit's relative L2 residual."""
    t = np.array([s[0] for s in snapshots], dtype=np.float64)
    g = np.array([s[1] for s in snapshots], dtype=np.float64)
    A = p_dot_p(t[:, None], g[:, None], t[None, :], g[None, :])
    b = p_dot_p(t, g, target[0], target[1])
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / x.sum()  # EDM2's renormalisation: constant weights are reproduced exactly
    rr = p_dot_p(target[0], target[1], target[0], target[1])
    residual2 = max(float(rr - 2 * x @ b + x @ A @ x), 0.0)
    return x, math.sqrt(residual2 / rr)


def snapshots(run) -> list[tuple[int, Path]]:
    """The post-hoc EMA snapshots of a run folder, by step."""
    found = [(int(m.group(1)), p) for p in Path(run).glob("ema-*.safetensors") if (m := SNAPSHOT.fullmatch(p.name))]
    return sorted(found)


def write_snapshot(run: Path, step: int, ema: PowerEMA, names) -> None:
    """``ema-<step>.safetensors``: the post-hoc EMA profiles after ``step``, atomically; its header names the step
    and the profiles' lengths in the order of the keys' indices."""
    from .runs import atomic_write

    tensors = ema.state(names)
    meta = {"step": str(step), "sigma_rels": ",".join(repr(s) for s in ema.sigma_rels)}
    atomic_write(Path(run) / f"ema-{step}.safetensors", lambda p: save_file(tensors, str(p), metadata=meta))


def _profiles(run: Path) -> list[tuple[int, Path, tuple[float, ...]]]:
    """(step, file, stored sigma_rels) of each snapshot, read from the files' headers (no weights loaded)."""
    from safetensors import safe_open

    from .runs import regular_file

    out = []
    for step, path in snapshots(run):
        try:
            with safe_open(str(regular_file(path)), "pt") as f:
                meta = f.metadata() or {}
            rels = tuple(check_sigma_rel(float(v)) for v in meta.get("sigma_rels", "").split(",") if v)
            if int(meta.get("step", -1)) != step or not rels:
                raise ValueError("its header does not match its name")
        except Exception as err:  # safetensors' own errors for a damaged file
            raise ValueError(f"post-hoc EMA snapshot {str(path)!r} cannot be read ({err}); delete it or retrain")
        out.append((step, path, rels))
    return out


def plan(run, sigma_rel: float, step: int | None = None):
    """Check a reconstruction before any weights are read: the snapshots to use [(step, file, rels)], their
    least-squares weights (one per (snapshot, profile)), the target step and the fit's residual."""
    run = Path(run)
    sigma_rel = check_sigma_rel(sigma_rel)
    found = _profiles(run)
    if not found:
        raise ValueError(f"{str(run)!r} stores no post-hoc EMA snapshots (ema-<step>.safetensors); train with "
                         f"--posthoc-ema to keep them")
    last = found[-1][0]
    if step is None:
        step = last
    if isinstance(step, bool) or not isinstance(step, int) or not (found[0][0] <= step <= last):
        raise ValueError(f"--step must be an integer between the first and last snapshot, {found[0][0]} and {last}, "
                         f"got {step!r}")
    used = [f for f in found if f[0] <= step]
    profiles = [(s, sigma_rel_to_gamma(r)) for s, _, rels in used for r in rels]
    x, residual = solve(profiles, (step, sigma_rel_to_gamma(sigma_rel)))
    if residual > MAX_RESIDUAL:
        grid = np.linspace(0.01, SIGMA_REL_MAX, 55)
        ok = [g for g in grid if solve(profiles, (step, sigma_rel_to_gamma(g)))[1] <= MAX_RESIDUAL]
        reach = f"they reconstruct sigma_rel {min(ok):.3g} to {max(ok):.3g}" if ok else "they reconstruct none"
        raise ValueError(f"--sigma-rel {sigma_rel:g} is beyond what the {len(used)} snapshots of {str(run)!r} up to step "
                         f"{step} can reconstruct (the fit leaves {residual:.1%} of the profile, more than "
                         f"{MAX_RESIDUAL:.0%}); {reach}")
    return used, x, step, residual


def reconstruct(run, sigma_rel: float, step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA of relative length ``sigma_rel`` at ``step`` (default: the last snapshot's), by parameter name,
    from a run's snapshots; and a record {sigma_rel, step, residual, snapshots}."""
    from .runs import load_tensors

    used, x, step, residual = plan(run, sigma_rel, step)
    total: dict[str, torch.Tensor] = {}
    k = 0
    for _, path, rels in used:
        tensors = load_tensors(path)
        for i, _ in enumerate(rels):
            prefix = f"{i}."
            for name, v in tensors.items():
                if name.startswith(prefix):
                    key = name[len(prefix):]
                    total[key] = total.get(key, 0) + float(x[k]) * v.double()
            k += 1
    record = {"sigma_rel": sigma_rel, "step": step, "residual": residual, "snapshots": len(used)}
    return {k: v.float() for k, v in total.items()}, record


def posthoc_run(run, sigma_rel: float, out, step: int | None = None) -> Path:
    """Write a run folder ``out`` whose weights are the EMA of relative length ``sigma_rel`` at ``step``
    reconstructed from ``run``'s snapshots: it samples, encodes and reports like any run. run.json is the
    source's, with a 'posthoc' record of what was reconstructed. Everything is checked before anything is
    written; ``out`` must be new or empty."""
    from .runs import (LOCK_FILE, MOMENTS_FILE, load_run, read_run_info, run_lock, save_checkpoint,
                       write_run_info)

    run, out = Path(run), Path(out)
    info = read_run_info(run)
    plan(run, sigma_rel, step)  # the cheap checks first: no weights read for a refused length
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty folder; name a new one")
    model = load_run(run)  # the network as recorded, with the EMA's buffers
    net = model.net
    weights, record = reconstruct(run, sigma_rel, step)
    names = dict(net.named_parameters())
    if set(weights) != set(names):
        missing = sorted(set(names) - set(weights))[:3] or sorted(set(weights) - set(names))[:3]
        raise ValueError(f"the snapshots of {str(run)!r} do not match its network (first differences: {missing})")
    with torch.no_grad():
        for name, p in names.items():
            p.copy_(weights[name])
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(out, "ema"):
            if (run / MOMENTS_FILE).exists():
                (out / MOMENTS_FILE).write_bytes((run / MOMENTS_FILE).read_bytes())
            save_checkpoint(out, record["step"], net, copy.deepcopy(net), torch.optim.AdamW(net.parameters()),
                            torch.Generator().manual_seed(0))
            info = {k: v for k, v in info.items() if k != "format"}
            write_run_info(out, {**info, "posthoc": {**record, "source": str(run.resolve())}})
    except BaseException:
        if created:
            for p in out.iterdir():
                p.unlink()
            out.rmdir()
        raise
    return out
