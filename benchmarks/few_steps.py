"""Sampling in 3 to 10 evaluations: what ``unstir sample`` does on a trained run, against diffusers' best.

For each fresh case (none of them used to choose a default or the pilot grid's candidates: those were
ring(), random_mixture(16, 4, seed=11) and random_mixture(64, 6, seed=11), noise seed 555) and each NFE, the
endpoint error (mean distance to a tight solve of the same PF ODE from the same noise) of:

* unstir, per deterministic multistep sampler (ipndm: its default, order 3 up to 10 steps; ipndm4: order 4; deis4: DEIS of order 4, the variable-step iPNDM), from T,
  with the analytical first step (``afs``), or from below T by analytical teleportation (``tele``: the
  Gaussian with the mean and covariance of 10,000 data draws, standing in for a training set; the pilot
  chooses where to land):
  - ``named``: the sampler's default named grid;
  - ``pilot``: the automatic grid of ``unstir.tuning.pilot_grid`` (GITS-style dynamic programming over a
    100-step teacher run of 64 pilot samples, seed 0), which ``unstir sample --nfe N`` computes and caches;
* diffusers: every scheduler configuration of benchmarks/samplers.py, the best per NFE.

No offline tuning (``tune_grid``) is used. Also the sliced-W2 of unstir's best to exact samples, against the
two-sample floor, beside that of the tight solve from the same noise (the most any sampler of this ODE can
reach). Driven by the exact eps of the discrete DDPM schedule, as benchmarks/samplers.py.

    .venv/bin/python benchmarks/few_steps.py [--n 2000] [--out benchmarks/few_steps_results.md]
    .venv/bin/python benchmarks/few_steps.py --cases image --n 256 --no-tune --out benchmarks/few_steps_image_results.md
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
from common import endpoint_error, reference, sliced_w2, two_sample_floor  # noqa: E402
from samplers import PROCESS, diffusers_configs, exact_eps_for_diffusers, run_diffusers  # noqa: E402
from unstir import oracle  # noqa: E402
from unstir.teleport import Moments  # noqa: E402
from unstir.tuning import pilot_grid  # noqa: E402

warnings.filterwarnings("ignore")
NFES = (3, 4, 5, 6, 8, 10)
# name -> (sampler, options): deis order 4 is the variable-step iPNDM (Zhou et al. 2024's iPNDM_v)
SAMPLERS = {"ipndm": ("ipndm", {}), "ipndm4": ("ipndm", {"order": 4}), "deis": ("deis", {}), "deis4": ("deis", {"order": 4}),
            "dpm++2m": ("dpm++2m", {}), "unipc": ("unipc", {})}
SEED_NOISE, SEED_EXACT, SEED_FLOOR, SEED_MOMENTS = 2026, 2027, 3000, 2028


def image_case():
    """The 3x32x32 low-rank mixture (issue 32's image-dimension oracle), flattened to d = 3072; seed 5 was never
    used to choose anything."""
    im = oracle.image_mixture(seed=5)
    return ("img3072", oracle.LowRankMixture(im.weights, im.means, im.diag, im.factors))


def fresh_cases():
    return [("unequal3", oracle.unequal_2d()), ("ring6", oracle.ring(6, 1.5, 0.08)),
            ("mix8d", oracle.random_mixture(8, 4, seed=0)), ("mix16d", oracle.random_mixture(16, 5, seed=7)),
            ("mix64d", oracle.random_mixture(64, 6, seed=0))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="samples per case")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    ap.add_argument("--no-tune", action="store_true", help="leave out the Nelder-Mead comparison (tune_grid)")
    ap.add_argument("--cases", choices=["vectors", "image", "all"], default="vectors", help="the five vector cases "
                    "(default), the 3x32x32 low-rank mixture (about 1 s per evaluation of 2000 samples on one core), "
                    "or both")
    args = ap.parse_args()
    import diffusers

    lines = [f"unstir {unstir.__version__} vs diffusers {diffusers.__version__}, torch {torch.__version__}; "
             f"n = {args.n} fresh samples per case; endpoint error (mean distance to the tight solve)", ""]
    summary = ["| case | NFE | unstir best (grid) | diffusers best | ratio | unstir SW2 / floor | tight solve SW2 / floor |",
               "|---|---|---|---|---|---|---|"]
    tuned_rows = ["| case | NFE | pilot: error (fresh noise) | pilot: cost | Nelder-Mead: error (fresh noise) | "
                  "Nelder-Mead: cost |", "|---|---|---|---|---|---|"]
    dcfg = diffusers_configs()
    cases = {"vectors": fresh_cases(), "image": [image_case()], "all": fresh_cases() + [image_case()]}[args.cases]
    for cname, gm in cases:
        model = gm.denoiser(PROCESS)
        z = torch.randn(args.n, gm.dim, generator=torch.Generator().manual_seed(SEED_NOISE), dtype=torch.float64)
        x_T = PROCESS.prior_std * z
        ref = reference(model, PROCESS, x_T)
        exact = gm.sample(args.n, torch.Generator().manual_seed(SEED_EXACT))
        floors = two_sample_floor(lambda i: gm.sample(args.n, torch.Generator().manual_seed(SEED_FLOOR + i)), exact)
        floor = sum(floors) / len(floors)
        # the "training set": moments of 10,000 draws (analytical teleportation's Gaussian)
        moments = Moments.of(gm.sample(10000, torch.Generator().manual_seed(SEED_MOMENTS)))
        rows, pilot_cost = {}, []
        t_case = time.perf_counter()
        for label, (sampler, opts) in SAMPLERS.items():
            print(f"{cname}: {label} ({time.perf_counter() - t_case:.0f} s)", file=sys.stderr, flush=True)
            for start in ("", "afs", "tele"):
                afs, tele = start == "afs", moments if start == "tele" else None
                for nfe in NFES:
                    if not tele:
                        r = unstir.sample(model, PROCESS, x_T, sampler=sampler, steps=nfe + afs, afs=afs, **opts)
                        rows.setdefault((label, start, "named"), {})[nfe] = r.x
                    t0 = time.perf_counter()
                    tg = pilot_grid(model, sampler, nfe, afs=afs, teleport=tele, dtype=torch.float64, **opts)
                    pilot_cost.append((tg.evaluations, time.perf_counter() - t0))
                    r = unstir.sample(model, PROCESS, x_T, sampler=sampler, grid=tg.grid, afs=afs, teleport=tele,
                                      **opts)
                    assert r.nfe == nfe, (sampler, start, nfe, r.nfe)
                    rows.setdefault((label, start, "pilot"), {})[nfe] = r.x
        eps_fn = exact_eps_for_diffusers(gm)
        dbest = {}
        for name, (factory, per_step, det) in dcfg.items():
            if not det:
                continue
            for nfe in NFES:
                try:
                    x, _ = run_diffusers(factory, eps_fn, z, nfe, per_step)
                    e = endpoint_error(x, ref) if torch.isfinite(x).all() else math.inf
                except Exception:  # a configuration diffusers rejects at this step count
                    e = math.inf
                if e < dbest.get(nfe, (math.inf, ""))[0]:
                    dbest[nfe] = (e, name)
        lines += [f"### {cname} (d = {gm.dim}); sliced-W2 floor {floor:.3e}", "", "```",
                  f"{'sampler':22s} " + " ".join(f"{'NFE ' + str(k):>9s}" for k in NFES)]
        errs = {}
        for (sampler, start, grid), by in rows.items():
            errs[(sampler, start, grid)] = {k: endpoint_error(x, ref) for k, x in by.items()}
            label = f"{sampler} {start} {grid}".replace("  ", " ")
            lines.append(f"{label:22s} " + " ".join(f"{errs[(sampler, start, grid)][k]:9.2e}" for k in NFES))
        lines.append(f"{'diffusers best':22s} " + " ".join(f"{dbest[k][0]:9.2e}" for k in NFES))
        lines += ["```", f"pilot grid cost: {max(c for c, _ in pilot_cost)} evaluations of 64 samples at most, "
                         f"{max(s for _, s in pilot_cost):.1f} s at most", ""]
        for nfe in NFES:
            key = min(errs, key=lambda k: errs[k][nfe])
            e = errs[key][nfe]
            sw = sliced_w2(rows[key][nfe], exact) / floor
            label = f"{key[0]} {key[1]} {key[2]}".replace("  ", " ")
            summary.append(f"| {cname} | {nfe} | {e:.3e} ({label}) | {dbest[nfe][0]:.3e} ({dbest[nfe][1]}) | "
                           f"{e / dbest[nfe][0]:.2f} | {sw:.2f} | {sliced_w2(ref, exact) / floor:.2f} |")
        print("\n".join(lines[-(len(rows) + 8):]), flush=True)
        for nfe in () if args.no_tune else (4, 5, 6):  # placement cost and error: pilot against Nelder-Mead
            pilot = pilot_grid(model, "ipndm", nfe, dtype=torch.float64)
            t0 = time.perf_counter()
            fit = unstir.tune_grid(model, "ipndm", nfe, n=256, max_evals=300, dtype=torch.float64)
            seconds = time.perf_counter() - t0
            e_fit = endpoint_error(unstir.sample(model, PROCESS, x_T, sampler="ipndm", grid=fit.grid).x, ref)
            tuned_rows.append(f"| {cname} | {nfe} | {errs[('ipndm', '', 'pilot')][nfe]:.3e} | {pilot.evaluations} x "
                              f"{pilot.n} samples, {pilot.seconds:.1f} s | {e_fit:.3e} | {fit.evaluations} x {fit.n} "
                              f"samples, {seconds:.1f} s |")
            print(tuned_rows[-1], flush=True)
    lines += ["### Summary: unstir's best (default or automatic grid) against diffusers' best", ""] + summary
    if not args.no_tune:
        lines += ["", "### Placing ipndm's grid from T: the pilot (GITS) against Nelder-Mead (tune_grid, 256 samples, "
                  "at most 300 trial grids), judged on the fresh noise", ""] + tuned_rows
    print("\n".join(summary))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
