"""Progressive distillation against the exact probability-flow map, and against the fast samplers at equal NFE.

The teacher is trained (flow matching, rf with velocity) on data drawn from a Gaussian mixture whose PF map is known
exactly (the oracle, RK45 at 1e-9). Each student is distilled with `unstir.distill.distill` at its defaults
(teacher steps 64, steps = half the teacher's, lr = half the teacher's), so none of its settings were chosen on
these seeds. Rows: the student at NFE K, the teacher with DDIM / dpm++2m / ipndm at the same K and with DDIM at
the 64 steps it was distilled from, and the exact map. Columns: mean endpoint distance to the exact map and to the
teacher's 64-step map, from the same 4000 prior draws (seed 4242, not used by any fit), sliced-W2 to 4000 fresh
exact samples against the two-sample floor, and the training / distillation minutes.

    .venv/bin/python benchmarks/distill.py --data unequal_2d --steps 4000 --nfe 1 2 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import endpoint_error, reference, sliced_w2, two_sample_floor
from unstir import oracle, sample
from unstir.distill import distill, distill_grid, sample_grid
from unstir.runs import load_moments, load_run
from unstir.training import TrainConfig, train
from unstir.tuning import pilot_grid

MIXTURES = {"unequal_2d": oracle.unequal_2d, "ring": oracle.ring}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="unequal_2d", choices=sorted(MIXTURES))
    ap.add_argument("--steps", type=int, default=4000, help="the teacher's training steps")
    ap.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="unstir-distill-"))
    mix = MIXTURES[args.data]()
    teacher = work / "teacher"
    tic = time.perf_counter()
    if not (teacher / "checkpoint.json").exists():
        train(TrainConfig(data=args.data, process="rf", prediction="velocity", steps=args.steps), teacher,
              progress=False)
    cost = {"teacher": (time.perf_counter() - tic) / 60}
    t_model = load_run(teacher)
    p = t_model.process
    exact = mix.denoiser(p)
    x_T = p.prior_sample((args.n, 2), torch.Generator().manual_seed(4242), dtype=torch.float64)
    fresh = mix.sample(args.n, torch.Generator().manual_seed(4243))
    floor = two_sample_floor(lambda i: mix.sample(args.n, torch.Generator().manual_seed(5000 + i)), fresh)
    with torch.no_grad():
        truth = reference(exact, p, x_T)
        taught = sample(t_model, x_T=x_T.float(), sampler="ddim", grid=distill_grid(p, 64)).x
    rows = []

    def row(name, x, nfe, minutes=""):
        rows.append((name, nfe, endpoint_error(x, truth), endpoint_error(x, taught), sliced_w2(x.double(), fresh),
                     minutes))

    with torch.no_grad():
        row("teacher, exact PF map (RK45 on the oracle)", truth, "-")
        row("teacher, DDIM 64 (what the students learn)", taught, 64, f"{cost['teacher']:.1f} (training)")
        row("teacher, RK45 at 1e-5", sample(t_model, x_T=x_T.float(), sampler="ode_rk45").x, "adaptive")
    for k in args.nfe:
        student = work / f"student{k}"
        tic = time.perf_counter()
        if not (student / "checkpoint.json").exists():
            distill(teacher, student, nfe=k, progress=False)
        minutes = (time.perf_counter() - tic) / 60
        s_model = load_run(student)
        spec = s_model.run_info["config"]["distill"]
        with torch.no_grad():
            row(f"student, DDIM {k} on its grid", sample(s_model, x_T=x_T.float(), sampler="ddim",
                                                          grid=sample_grid(p, spec)).x, k, f"{minutes:.1f}")
            row(f"teacher, DDIM {k} on the student's grid", sample(t_model, x_T=x_T.float(), sampler="ddim",
                                                                   grid=sample_grid(p, spec)).x, k)
            for name in ("dpm++2m", "ipndm"):
                if k >= 2:
                    row(f"teacher, {name} {k} (named grid)", sample(t_model, x_T=x_T.float(), sampler=name,
                                                                    steps=k).x, k)
            if k >= 2:  # what `unstir sample --nfe k` does: ipndm on a grid placed by a pilot run (teleportation)
                moments = load_moments(teacher)
                tg = pilot_grid(t_model, "ipndm", k, n=128, teleport=moments)
                row(f"teacher, `sample --nfe {k}` (ipndm, pilot grid)",
                    sample(t_model, x_T=x_T.float(), sampler="ipndm", grid=tg.grid,
                           teleport=moments if tg.teleport else None).x, k)
    print(f"\n{args.data}: teacher rf/velocity, {args.steps} steps; {args.n} prior draws (seed 4242); sliced-W2 "
          f"floor {sum(floor) / len(floor):.4f} (range {min(floor):.4f}-{max(floor):.4f})\n")
    print("| sampler | NFE | to the exact map | to the teacher's DDIM 64 | sliced-W2 to exact samples | minutes |")
    print("|---|---|---|---|---|---|")
    for name, nfe, e_exact, e_teacher, sw, minutes in rows:
        print(f"| {name} | {nfe} | {e_exact:.4f} | {e_teacher:.4f} | {sw:.4f} | {minutes} |")


if __name__ == "__main__":
    main()
