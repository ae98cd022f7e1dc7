"""Where the 3072-D gap to diffusers comes from: the pilot's placement (GITS's one-step proxy) against a grid fitted
by Nelder-Mead to the endpoint error itself (``unstir.tune_grid``), for ipndm from T on the image-dimension oracle of
benchmarks/few_steps.py (``oracle.image_mixture(seed=5)``, the same 256 noise draws, seed 2026, and the same tight
reference). Both placements use their own pilot noise (seed 0), never the evaluation noise.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/placement_image.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import unstir  # noqa: E402
from common import endpoint_error, reference  # noqa: E402
from samplers import PROCESS  # noqa: E402
from unstir import oracle  # noqa: E402
from unstir.tuning import pilot_grid  # noqa: E402

warnings.filterwarnings("ignore")


def main():
    im = oracle.image_mixture(seed=5)
    model = oracle.LowRankMixture(im.weights, im.means, im.diag, im.factors).denoiser(PROCESS)
    z = torch.randn(256, im.dim, generator=torch.Generator().manual_seed(2026), dtype=torch.float64)
    x_T = PROCESS.prior_std * z
    ref = reference(model, PROCESS, x_T)

    def error(grid):
        return endpoint_error(unstir.sample(model, PROCESS, x_T, sampler="ipndm", grid=grid).x, ref)

    print("| NFE | named grid | pilot (GITS + free end) | Nelder-Mead (tune_grid, 64 samples, <= 300 grids) | its cost |")
    print("|---|---|---|---|---|")
    for nfe in (4, 5, 6, 8, 10):
        pilot = pilot_grid(model, "ipndm", nfe, dtype=torch.float64)
        tic = time.perf_counter()
        fit = unstir.tune_grid(model, "ipndm", nfe, n=64, max_evals=300, dtype=torch.float64)
        seconds = time.perf_counter() - tic
        print(f"| {nfe} | {error(unstir.time_grid(PROCESS, nfe, 'quadratic')):.3f} | {error(pilot.grid):.3f} | "
              f"{error(fit.grid):.3f} | {fit.evaluations} x {fit.n} evaluations, {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
