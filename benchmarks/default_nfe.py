"""What `unstir sample --nfe N` does by default (a pilot run of 128 samples places the grid, with analytical
teleportation from the data's moments, and Nelder-Mead polishes it, ``POLISH`` trial grids; the sampler is
deis_gauss up to NFE ``GAUSS_MAX_NFE`` and ipndm above), with both samplers at every NFE, against diffusers' best
configuration per NFE, in one run (issue 32's goal: at most 0.5x diffusers' best at NFE 4-10). The oracle stands in for the model, so the endpoint error against a tight solve of the same
noise is exact. Cases: the image-dimension mixture of benchmarks/few_steps.py (``--cases image``, d = 3072, 256
samples) and its five vector cases (``--cases vectors``, 1000 samples); none of them chose ``POLISH`` (that was
``oracle.image_mixture(seed=11)``, which also chose the default sampler per NFE), and "diffusers best" is chosen per NFE on the evaluation noise itself (an
optimistic selection for the peer).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/default_nfe.py --cases image vectors
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import unstir  # noqa: E402
from common import endpoint_error, reference  # noqa: E402
from few_steps import SEED_MOMENTS, SEED_NOISE, fresh_cases, image_case  # noqa: E402
from samplers import PROCESS, diffusers_configs, exact_eps_for_diffusers, run_diffusers  # noqa: E402
from unstir.cli.sampling import PILOT_N, POLISH, default_sampler  # noqa: E402
from unstir.teleport import Moments  # noqa: E402
from unstir.tuning import pilot_grid  # noqa: E402

warnings.filterwarnings("ignore")
NFES = (4, 5, 6, 8, 10)


def diffusers_best(gm, z, ref, nfe):
    best = (math.inf, "")
    for name, (factory, per_step, deterministic) in diffusers_configs().items():
        if not deterministic:
            continue
        try:
            x, _ = run_diffusers(factory, exact_eps_for_diffusers(gm), z, nfe, per_step)
            e = endpoint_error(x, ref) if torch.isfinite(x).all() else math.inf
        except Exception:  # a configuration diffusers rejects at this step count
            e = math.inf
        best = min(best, (e, name))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=["image", "vectors"], default=["image"])
    ap.add_argument("--polish", type=int, default=POLISH, help=f"trial grids (default: the CLI's, {POLISH})")
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help=f"default: {' '.join(map(str, NFES))}")
    args = ap.parse_args()
    import diffusers

    print(f"unstir {unstir.__version__} vs diffusers {diffusers.__version__}, torch {torch.__version__}; pilot "
          f"{PILOT_N} samples (seed 0), polish {args.polish}; endpoint error on fresh noise (seed {SEED_NOISE})\n")
    print("| case | NFE | ipndm | deis_gauss | the default | diffusers best | default / diffusers | "
          "default's cost (evaluations x 128, seconds) |")
    print("|---|---|---|---|---|---|---|---|")
    cases = ([image_case()] if "image" in args.cases else []) + (fresh_cases() if "vectors" in args.cases else [])
    for cname, gm in cases:
        model = gm.denoiser(PROCESS)
        n = 256 if gm.dim > 64 else 1000
        z = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(SEED_NOISE), dtype=torch.float64)
        x_T = PROCESS.prior_std * z
        ref = reference(model, PROCESS, x_T)
        moments = Moments.of(gm.sample(10000, torch.Generator().manual_seed(SEED_MOMENTS)))

        def error(tuned, sampler):
            gaussian = {"moments": moments} if sampler == "deis_gauss" else {}  # its reference, teleport or not
            r = unstir.sample(model, PROCESS, x_T, sampler=sampler, grid=tuned.grid,
                              teleport=moments if tuned.teleport else None, **gaussian)
            return endpoint_error(r.x, ref)

        def placed(sampler, nfe):
            tic = time.perf_counter()
            tuned = pilot_grid(model, sampler, nfe, n=PILOT_N, teleport=moments, dtype=torch.float64,
                               polish=args.polish)
            return tuned, time.perf_counter() - tic

        for nfe in args.nfe:
            placements = {s: placed(s, nfe) for s in ("ipndm", "deis_gauss")}
            errors = {s: error(tuned, s) for s, (tuned, _) in placements.items()}
            default = default_sampler(nfe, moments=True)
            d, dname = diffusers_best(gm, z, ref, nfe)
            tuned, seconds = placements[default]
            print(f"| {cname} | {nfe} | {errors['ipndm']:.3g} | {errors['deis_gauss']:.3g} | {default} | {d:.3g} "
                  f"({dname}) | {errors[default] / d:.2f} | {tuned.evaluations}, {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
