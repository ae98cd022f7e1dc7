"""A probe, not a feature: dpm++2m_sde at 10 NFE on explicit grids that blend a named grid with log_snr, on a cached
teacher of benchmarks/few_steps_images.py (screening seeds 777.., or the evaluation seeds with --evaluate).

On learned rf image models log_snr keeps the class proportions (fine at high noise) and the uniform or quadratic
grids keep the images valid (fine at low noise): benchmarks/few_steps_images_results.md. Each blend here is the
point-wise mean of the two grids' times, "<grid>+log_snr". Other probes: log_snr restarted from t = 0.95 or 0.9
below a first step from T; session 27's grids finer at high noise (`grids`). One JSON line per grid and eta.
The uniform+log_snr probe became unstir's named grid "blend" (the same points on rf; defined by the noise levels
for every process), which sampler_screen.py takes as grid=blend; this probe stays to reproduce the figures of
sessions 24 and 27.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grid_blend_screen.py --family shapes32 --steps 11000 \\
        --work /tmp/fsi -n 2000 --only uniform+log_snr --eta 0.25
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import images  # noqa: E402  (benchmarks/images.py)

from unstir.distributed import sample_sharded  # noqa: E402
from unstir.grids import time_grid  # noqa: E402
from unstir.runs import load_run  # noqa: E402

STEPS = 10


def grids(process) -> dict[str, list[float]]:
    named = {k: time_grid(process, STEPS, k).tolist() for k in ("uniform", "quadratic", "log_snr")}

    def log_snr_from(t_top: float) -> list[float]:  # T, then uniform in log-SNR from t_top to t_min, then 0
        a, b = math.log((1 - t_top) / t_top), math.log((1 - process.t_min) / process.t_min)
        inner = [1 / (1 + math.exp(a + (b - a) * i / (STEPS - 2))) for i in range(STEPS - 1)]
        return [named["log_snr"][0]] + inner + [0.0]

    out = {f"{k}+log_snr": [(u + v) / 2 for u, v in zip(named[k], named["log_snr"])] for k in ("uniform", "quadratic")}
    out.update({"log_snr from 0.95": log_snr_from(0.95), "log_snr from 0.9": log_snr_from(0.9)}, **named)
    # Session 27's probes of the class proportions (set by the first, high-noise steps): the blend moved towards
    # log_snr (the mean of blend and log_snr), and two hand-placed grids, one finer between t = 0.6 and 0.9,
    # one finer above 0.7; each keeps blend's last two points (0.001, 0).
    blend = out["uniform+log_snr"]
    out["blend+log_snr"] = [(u + v) / 2 for u, v in zip(blend, named["log_snr"])]
    out["fine 0.6-0.9"] = [named["log_snr"][0], 0.93, 0.86, 0.78, 0.69, 0.57, 0.40, 0.22, 0.08, process.t_min, 0.0]
    out["fine above 0.7"] = [named["log_snr"][0], 0.97, 0.92, 0.84, 0.70, 0.50, 0.30, 0.15, 0.06, process.t_min, 0.0]
    # the same with t_min's evaluation (where the model returns its input nearly unchanged) moved to t = 0.02; and
    # a grid uniform in the angle u of t = (1 + cos(pi u)) / 2 between T and t_min (fine at both ends)
    out["fine above 0.7, no t_min"] = out["fine above 0.7"][:-2] + [0.02, 0.0]
    top, bottom = math.acos(2 * named["log_snr"][0] - 1), math.acos(2 * process.t_min - 1)
    out["cosine"] = [(1 + math.cos(top + (bottom - top) * i / (STEPS - 1))) / 2 for i in range(STEPS)] + [0.0]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    images.add_cached_teacher_args(ap)
    ap.add_argument("--only", nargs="*", help="grid names (default: all)")
    ap.add_argument("--eta", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--evaluate", action="store_true", help=f"the evaluation seeds {images.EVAL_SEED}..")
    args = ap.parse_args()
    teacher, judge = images.cached_teacher(args)
    model = load_run(teacher)
    seed = images.EVAL_SEED if args.evaluate else images.SCREEN_SEED
    for name, times in grids(model.process).items():
        if args.only and name not in args.only:
            continue
        grid = torch.tensor(times, dtype=torch.float64)
        for eta in args.eta:
            with torch.no_grad():
                x, nfe = sample_sharded(model, args.n, seed=seed, batch_size=250, device="cpu",
                                        sampler="dpm++2m_sde", grid=grid, eta=eta)
            s = judge(x)
            print(json.dumps(dict(family=args.family, grid=name, eta=eta, nfe=nfe, seed=seed, n=args.n,
                                  validity=round(s["validity"], 3), fd=round(s["fd"], 1),
                                  class_tv=round(s["class_tv"], 3), times=[round(v, 3) for v in times])), flush=True)


if __name__ == "__main__":
    main()
