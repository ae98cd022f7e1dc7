"""Which time grid each sampler should default to: the one with the lowest error at 10-20 NFE.

Deterministic samplers: mean endpoint error against a tight RK45 solve. Stochastic samplers: sliced-W2
to exact samples. Averaged (geometric mean) over the oracle cases, the processes vp/ve/ddpm and
NFE in {10, 15, 20}.

    .venv/bin/python benchmarks/default_grids.py [--only dpm++2m ipndm]

Variants with options (dpm++2m's two second-order forms) are rows of their own.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import unstir  # noqa: E402
from common import cases, endpoint_error, reference, sliced_w2  # noqa: E402
from unstir.samplers import SAMPLERS  # noqa: E402

TWO_EVALS = {"ode_heun", "edm"}  # 2 evaluations per step, minus one at the end
EXTRA = {"pc": 2, "annealed_langevin": 5}


def steps_for(sampler: str, nfe: int) -> int:
    if sampler in TWO_EVALS:
        return (nfe + 1) // 2
    return max(1, nfe // EXTRA.get(sampler, 1))


VARIANTS = {"dpm++2m (taylor)": ("dpm++2m", {"form": "taylor"})}


def rows(only):
    """(row name, sampler, options) for every registered sampler and variant, or those in ``only``."""
    out = [(name, name, {}) for name in SAMPLERS] + [(k, s, o) for k, (s, o) in VARIANTS.items()]
    return [r for r in out if not only or r[1] in only]


def main(n=1000, only=()):
    processes = ["vp", "ve", "ddpm"]
    scores: dict[tuple[str, str], list[float]] = {}
    for pname in processes:
        p = unstir.make_process(pname)
        for cname, gm in cases():
            model = gm.denoiser(p)
            x_T = p.prior_sample((n, gm.dim), torch.Generator().manual_seed(0), dtype=torch.float64)
            ref = reference(model, p, x_T)
            exact = gm.sample(n, torch.Generator().manual_seed(1))
            for row, sampler, opts in rows(only):
                spec = SAMPLERS[sampler]
                if sampler == "ode_rk45" or (spec.needs and not isinstance(p, spec.needs)):
                    continue
                for grid in unstir.GRIDS:
                    for nfe in (10, 15, 20):
                        r = unstir.sample(model, p, x_T, sampler=sampler, steps=steps_for(sampler, nfe), grid=grid,
                                          generator=torch.Generator().manual_seed(2), **opts)
                        err = sliced_w2(r.x, exact) if spec.stochastic else endpoint_error(r.x, ref)
                        scores.setdefault((row, grid), []).append(err if math.isfinite(err) else 1e3)
    print(f"{'sampler':18s} " + " ".join(f"{g:>10s}" for g in unstir.GRIDS) + "   best   (default)")
    for name, sampler, _ in rows(only):
        row = {g: scores[(name, g)] for g in unstir.GRIDS if (name, g) in scores}
        if not row:
            continue
        gmean = {g: math.exp(sum(math.log(max(v, 1e-12)) for v in vals) / len(vals)) for g, vals in row.items()}
        best = min(gmean, key=gmean.get)
        print(f"{name:18s} " + " ".join(f"{gmean[g]:10.3e}" for g in unstir.GRIDS)
              + f"   {best:8s} ({SAMPLERS[sampler].grid})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=(), help="samplers to measure (default: all)")
    main(only=ap.parse_args().only)
