"""Screen the default's polish per NFE on the screening seeds (777..), never the evaluation seeds (2424..) of
benchmarks/few_steps_images.py: for each NFE, the CLI's default sampler on its pilot grid with teleportation,
placed with each --polish value (and with --named, on the sampler's named grid too, no pilot), then --n samples
judged as in that benchmark (validity and FD; the pilot batch's distance to the 100-step PF-ODE solution is what
the polish minimises). Uses the cached teachers of few_steps_images.py (--work).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/polish_screen.py --family shapes32 --steps 11000 --nfe 4 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import images  # noqa: E402  (benchmarks/images.py)

from unstir.cli.sampling import PILOT_N, POLISH, default_sampler  # noqa: E402
from unstir.distributed import sample_sharded  # noqa: E402
from unstir.runs import load_moments, load_run  # noqa: E402
from unstir.tuning import pilot_grid, steps_for_nfe  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    images.add_cached_teacher_args(ap)
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--polish", type=int, nargs="+", default=[0, POLISH])
    ap.add_argument("--named", action="store_true", help="also the sampler on its named grid, without a pilot")
    args = ap.parse_args()
    teacher, judge = images.cached_teacher(args)
    model, moments = load_run(teacher), load_moments(teacher)

    def screen(nfe, name, placing, minutes=0.0, **options):
        with torch.no_grad():
            x, _ = sample_sharded(model, args.n, seed=images.SCREEN_SEED, batch_size=250, device="cpu",
                                  sampler=name, **options)
        s = judge(x)
        print(json.dumps(dict(family=args.family, nfe=nfe, sampler=name, seed=images.SCREEN_SEED, **placing,
                              validity=round(s["validity"], 3), fd=round(s["fd"], 1),
                              minutes=round(minutes, 1))), flush=True)

    for nfe in args.nfe:
        name = default_sampler(nfe, moments=True)
        gauss = {"moments": moments} if name == "deis_gauss" else {}
        if args.named:
            screen(nfe, name, {"grid": "named"}, steps=steps_for_nfe(name, nfe), **gauss)
        for polish in args.polish:
            tic = time.perf_counter()
            g = pilot_grid(model, name, nfe, n=PILOT_N, teleport=moments, polish=polish, **gauss)
            screen(nfe, name, dict(polish=polish, pilot_error=round(g.error, 4), grid=[round(v, 4) for v in g.times]),
                   (time.perf_counter() - tic) / 60, grid=g.grid, teleport=moments if g.teleport else None, **gauss)


if __name__ == "__main__":
    main()
