"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of diffusion
models", Algorithm 2): a student that takes one DDIM step where its teacher took two, halved round by round
from the teacher's ``teacher_steps`` DDIM steps down to ``nfe``.

The algorithm, line by line, as unstir runs it (``TrainConfig.distill``, ``unstir distill``):

1. The student starts as the teacher (same network, same prediction type, its EMA weights).
2. For each round, N -> N/2 intervals of the distillation grid (``distill_grid``, nested: the grid of N/2
   intervals is every other point of the grid of N):
   a. draw data x, a student interval i uniformly (t = t_2i, t' = t_2i+1, t'' = t_2i+2 on the teacher's grid) and
      z_t = alpha_t x + sigma_t eps;
   b. the teacher takes two DDIM steps, z_t -> z_t' -> z_t'' (``ddim_update`` with no noise, the PF-ODE Euler step
      in sigma/alpha: the same line as ``unstir.sample(sampler="ddim")``);
   c. the target is the x0 with which one DDIM step from z_t lands on z_t'':
      x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t);
   d. the loss is the paper's truncated-SNR weighting in x space, max(alpha_t^2 / sigma_t^2, 1) ||x~ - x^(z_t)||^2;
   e. at the round's end the teacher becomes the student.

Where unstir differs from the paper, on purpose:

* The last interval ends at t'' = 0, unstir's denoising convention (``unstir.grids``): the teacher's second step
  returns its x0 prediction at t', and the target is that prediction (step c with sigma_t'' = 0). The paper's
  code takes the teacher's x0 prediction at t instead for this interval.
* Each round's teacher is the previous round's EMA (decay ``ema_decay``, restarted with each round), and the
  student restarts from it with fresh AdamW moments and the learning rate's warm-up and cosine decay over the
  round. The paper anneals the learning rate linearly to 0 within a round.
* The grid is any of unstir's named spacings (default ``log_snr``, whose points for the cosine VP schedule are
  close to the paper's uniform-in-t grid), not only uniform t.
* The student keeps the teacher's prediction type. The paper notes that an eps prediction is unstable at one or
  two steps (x0 = (z - sigma eps) / alpha divides by alpha_T ~ 0): distil x0, v, velocity or edm runs for the
  fewest steps. Measured on the exact oracle (a 2-D mixture, VP, 16 -> 2 steps, the test's recipe): an eps student
  lands 0.43 from the exact map, a v student 0.13 (the 16-step teacher: 0.13); `unstir distill` says so for eps
  and score teachers.
* The teacher is frozen and evaluated without dropout (``eval`` mode); the student trains without dropout, as
  the paper's released configurations ("same as teacher but with 0 dropout"), at a quarter of the teacher's
  learning rate (their CIFAR-10: 2e-4 -> 5e-5). Measured on gratings32 (one round 8 -> 4 of 1000 steps, seeds
  777..): validity 0.43 with the teacher's dropout 0.1 at half its rate, 0.48 at a tenth, 0.59 without dropout.
  A teacher trained at a high rate (gratings32's 2e-3) makes a quarter of it too high for a student that starts
  as its teacher: at that peak the batch loss rose from 0.002 to 0.005-0.010 before the decay brought it back.
  One round 8 -> 4 on the quadratic grid at 1e-4 gave validity 0.909 with ``eta=1`` on fresh seeds, against 0.87
  (screening seeds) at the default 5e-4 (benchmarks/few_steps_images_results.md, session 28). The default stays
  a quarter until a second family confirms it; pass ``lr`` (``--lr``).

A distilled run samples with DDIM on the grid it was distilled for (``sample_grid``); ``unstir sample`` chooses
it by default. Its state (``teacher.`` tensors beside the weights in each checkpoint) makes a killed
distillation resume exactly like training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_choice
from .grids import GRIDS, time_grid
from .processes import Process
from .samplers.stochastic import ddim_update

Tensor = torch.Tensor

TEACHER_STEPS_MIN = 64  # the default teacher grid: nfe times the smallest power of two reaching this


def default_teacher_steps(nfe: int) -> int:
    return nfe * 2 ** max(1, math.ceil(math.log2(TEACHER_STEPS_MIN / nfe))) if nfe < TEACHER_STEPS_MIN else 2 * nfe


def rounds(nfe: int, teacher_steps: int) -> int:
    """The number of halvings from ``teacher_steps`` to ``nfe``; refuses a pair that halving cannot join."""
    ratio = teacher_steps // nfe
    if teacher_steps % nfe or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(f"progressive distillation halves the teacher's steps round by round: --teacher-steps "
                         f"{teacher_steps} must be --nfe {nfe} times a power of two >= 2 (e.g. "
                         f"{default_teacher_steps(nfe)})")
    return ratio.bit_length() - 1


def check_distill(spec: dict, steps: int) -> dict:
    """``TrainConfig.distill``: {"teacher": run folder, "nfe": K, "teacher_steps": N, "grid": name}."""
    allowed = {"teacher", "nfe", "teacher_steps", "grid"}
    if not isinstance(spec, dict) or set(spec) != allowed:
        raise ValueError(f"distill must be a dict with the keys {sorted(allowed)}, got {spec!r}")
    for name in ("nfe", "teacher_steps"):
        value = spec[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    check_choice("grid", spec["grid"], GRIDS)
    n = rounds(spec["nfe"], spec["teacher_steps"])
    if steps < n:
        raise ValueError(f"--steps {steps} is fewer than the {n} rounds of halving from {spec['teacher_steps']} to "
                         f"{spec['nfe']} steps: give at least one step per round")
    return spec


def distill_grid(process: Process, steps: int, kind: str = "log_snr") -> Tensor:
    """The distillation grid of ``steps`` intervals: the named spacing at u = 1, 1 - 1/steps, ..., 1/steps, then
    0 (the denoising step). Unlike ``time_grid`` (whose last positive point is t_min), the grid of K intervals is
    every (N/K)-th point of the grid of N, which is what halving needs."""
    full = time_grid(process, steps + 1, kind)
    return torch.cat([full[:-2], full[-1:]])


def sample_grid(process: Process, spec: dict) -> Tensor:
    """The grid a distilled run samples on: ``nfe`` intervals of its distillation grid."""
    return distill_grid(process, spec["nfe"], spec["grid"])


def _alpha_sigma(process: Process, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t and sigma_t shaped to broadcast against ``like``; t = 0 means the data itself (1, 0)."""
    c = process.coefficients(t.clamp_min(process.t_min))
    zero = t == 0
    alpha = torch.where(zero, torch.ones_like(c.alpha), c.alpha)
    sigma = torch.where(zero, torch.zeros_like(c.sigma), c.sigma)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha.reshape(shape).to(like), sigma.reshape(shape).to(like)


def _ddim(model, z: Tensor, t: Tensor, s: Tensor, labels) -> Tensor:
    """One deterministic DDIM step per sample, t -> s (s = 0: the x0 prediction)."""
    alpha_s, sigma_s = _alpha_sigma(model.process, s, z)
    return ddim_update(model(z, t, labels), alpha_s, sigma_s, 0.0, 0.0, None)


def progressive_target(teacher, z: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor,
                       labels: Tensor | None = None) -> Tensor:
    """Steps b and c: the teacher's two DDIM steps z_t -> z_t' -> z_t'' and the x0 whose single DDIM step from z_t
    lands on z_t'' (per sample; t_next = 0 on the last interval, where it is the teacher's x0 at t')."""
    z_next = _ddim(teacher, _ddim(teacher, z, t, t_mid, labels), t_mid, t_next, labels)
    alpha_t, sigma_t = _alpha_sigma(teacher.process, t, z)
    alpha_s, sigma_s = _alpha_sigma(teacher.process, t_next, z)
    ratio = sigma_s / sigma_t
    return (z_next - ratio * z) / (alpha_s - ratio * alpha_t)


def progressive_loss(student, teacher, x0: Tensor, i: Tensor, grid: Tensor, noise: Tensor,
                     labels: Tensor | None = None) -> Tensor:
    """Algorithm 2's loss for one batch: ``i`` (batch,) indexes the student's intervals on ``grid``, the teacher's
    grid of twice as many (module docstring, steps a-d)."""
    grid, i = grid.to(x0.device), i.to(x0.device)
    t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    z = student.process.perturb(x0, t, noise)
    with torch.no_grad():
        target = progressive_target(teacher, z, t, t_mid, t_next, labels)
        alpha_t, sigma_t = _alpha_sigma(student.process, t, z)
        weight = (alpha_t / sigma_t).square().clamp_min(1.0).flatten()  # truncated SNR: max(SNR, 1)
    err = (student(z, t, labels).x0 - target).square().flatten(1).mean(1)
    return (weight * err).mean()


class Progressive:
    """The distillation's state inside ``unstir.training``: the round of each step, the frozen teacher (a copy of
    the student's network) and its grid."""

    def __init__(self, spec: dict, steps: int, process: Process, teacher: nn.Module, make_model):
        self.spec, self.steps, self.process = spec, steps, process
        self.rounds = rounds(spec["nfe"], spec["teacher_steps"])
        self.teacher_net = teacher.requires_grad_(False).eval()
        self.teacher = make_model(self.teacher_net)
        self._grids: dict[int, Tensor] = {}

    def start(self, r: int) -> int:
        """The first step of round ``r`` (the rounds share the steps as evenly as integers allow)."""
        return r * self.steps // self.rounds

    def round(self, step: int) -> int:
        return max(r for r in range(self.rounds) if self.start(r) <= step)

    def local(self, step: int) -> tuple[int, int]:
        """(steps into the round, the round's length)."""
        r = self.round(step)
        return step - self.start(r), self.start(r + 1) - self.start(r)

    def grid(self, step: int) -> Tensor:
        """The teacher's grid in the round of ``step``."""
        n = self.spec["teacher_steps"] >> self.round(step)
        if n not in self._grids:
            self._grids[n] = distill_grid(self.process, n, self.spec["grid"])
        return self._grids[n]

    def begin(self, step: int, net: nn.Module, ema: nn.Module, opt) -> bool:
        """At the first step of a round: the teacher and the student become the last round's EMA (in the first round
        all three are the teacher already), and AdamW's moments restart. Returns whether a round began."""
        if self.local(step)[0] != 0:
            return False
        with torch.no_grad():
            self.teacher_net.load_state_dict(ema.state_dict())
            net.load_state_dict(ema.state_dict())
        opt.state.clear()
        return True

    def draw(self, step: int, n: int, generator) -> Tensor:
        """The student intervals of ``n`` samples, uniform over the round's."""
        intervals = (self.spec["teacher_steps"] >> self.round(step)) // 2
        return torch.randint(intervals, (n,), generator=generator)


def distill(teacher, out, *, nfe: int | None = None, teacher_steps: int | None = None, grid: str | None = None,
            steps: int | None = None, lr: float | None = None, batch_size: int | None = None, seed: int | None = None,
            device: str | None = None, checkpoint_every: int | None = None, resume: bool = False,
            progress: bool = True, stop_after: int | None = None):
    """Distil the run ``teacher`` into a run ``out`` that samples in ``nfe`` DDIM steps (progressive distillation,
    module docstring), as ``unstir.training.train`` trains: the same checkpoints, lock, log and exact resume
    (``resume=True`` continues ``out`` with its recorded settings). Defaults: ``teacher_steps`` = nfe times the
    smallest power of two reaching 64; ``steps`` (over all rounds) = half the teacher's training, which costs about
    as much as 85 % of it (a step evaluates the teacher twice without gradients); ``lr`` = a quarter of the
    teacher's; no dropout (module docstring);
    the teacher's batch size, seed, EMA decay and device. Everything is checked before anything is written."""
    from pathlib import Path

    from .runs import read_run_info
    from .training import TrainConfig, train

    out = Path(out)
    if resume:
        if not (out / "run.json").exists():
            raise ValueError(f"nothing to resume: {str(out)!r} holds no run (no run.json)")
        recorded = read_run_info(out)["config"]
        if not recorded.get("distill"):
            raise ValueError(f"{str(out)!r} holds a run that is not a distillation; resume it with `unstir train`")
        given = {"--run": (None if teacher is None else str(teacher), recorded["distill"]["teacher"]),
                 "--nfe": (nfe, recorded["distill"]["nfe"]), "--grid": (grid, recorded["distill"]["grid"]),
                 "--teacher-steps": (teacher_steps, recorded["distill"]["teacher_steps"]),
                 "--lr": (lr, recorded["lr"]), "--batch-size": (batch_size, recorded["batch_size"]),
                 "--seed": (seed, recorded["seed"])}
        differ = [f"{k} {a} (the run has {b})" for k, (a, b) in given.items() if a is not None and a != b]
        if differ:
            raise ValueError(f"--resume continues the recorded distillation and cannot change {'; '.join(differ)}; "
                             f"only --steps, --checkpoint-every and --device may change")
        cfg = TrainConfig(**{**recorded, **({"steps": steps} if steps is not None else {}),
                             **({"device": device} if device is not None else {}),
                             **({"checkpoint_every": checkpoint_every} if checkpoint_every is not None else {})})
        return train(cfg, out, resume=True, progress=progress, stop_after=stop_after)
    teacher = Path(teacher)
    if not (teacher / "checkpoint.json").exists():
        raise ValueError(f"{str(teacher)!r} holds no trained run to distil (no checkpoint.json)"
                         + ("; its training has not reached its first checkpoint" if (teacher / "run.json").exists()
                            else ""))
    recorded = read_run_info(teacher)["config"]
    if recorded.get("distill"):
        raise ValueError(f"{str(teacher)!r} is itself distilled (to {recorded['distill']['nfe']} steps); distil the "
                         f"original teacher {recorded['distill']['teacher']!r} to the steps you want")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"--nfe must be an integer >= 1, got {nfe!r}")
    spec = {"teacher": str(teacher), "nfe": nfe, "grid": grid or "log_snr",
            "teacher_steps": default_teacher_steps(nfe) if teacher_steps is None else teacher_steps}
    defaults = TrainConfig()
    cfg = TrainConfig(**{**recorded, "distill": spec, "posthoc_ema": (), "posthoc_every": None, "schedule_changes": [],
                         "extra": {}, "steps": steps if steps is not None else max(1, recorded["steps"] // 2),
                         "lr": lr if lr is not None else recorded["lr"] / 4, "warmup": None, "dropout": 0.0,
                         "seed": recorded["seed"] if seed is None else seed,
                         "device": recorded.get("device", defaults.device) if device is None else device,
                         "checkpoint_every": checkpoint_every or recorded.get("checkpoint_every", 1000),
                         **({"batch_size": batch_size} if batch_size is not None else {})})
    cfg.validate()
    return train(cfg, out, progress=progress, stop_after=stop_after)
