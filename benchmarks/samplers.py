"""unstir's samplers against diffusers' schedulers, side by side, on the exact score of oracle cases.

Both sides are driven by the exact eps of the discrete DDPM schedule (linear betas 1e-4..0.02, 1000
steps) and start from the same noise. For each case and NFE it reports the endpoint error against a
tight reference solve of the PF ODE, the sliced-W2 to exact samples (with the two-sample floor) and the
mode-weight error; then the per-step overhead of each sampler loop with a near-free model.

    make bench            # or: .venv/bin/python benchmarks/samplers.py [--quick]

Seeds: the evaluation noise (seed 2026), exact samples (2027) and floors (3000+) are fresh: not the
seeds used to choose the default grids (benchmarks/default_grids.py: 0 and 1) nor those the tuned grids
are fitted on (1000). Tuned grids (``unstir.tune_grid``, 256 prior samples, at most 200 trial grids) are
judged on the fresh noise, and on a second case they were not fitted on (the transfer table).

diffusers' DDIM and DDPM clip x0 to [-1, 1] by default (clip_sample=True), which is wrong for unbounded
data: it is turned off here. diffusers' DPM-Solver++ and UniPC return NaN with linspace spacing at 1000
steps: a table shows it next to unstir's solvers on the same grid. Each diffusers scheduler runs in every configuration it offers that a user
would pick (spacings, Karras sigmas, uniform-lambda steps); the best per NFE is taken.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import unstir  # noqa: E402
from common import cases, endpoint_error, mode_weight_error, reference, sliced_w2, two_sample_floor  # noqa: E402
from unstir import oracle  # noqa: E402
from unstir.tuning import tune_grid  # noqa: E402

warnings.filterwarnings("ignore")
NFES = (5, 6, 8, 10, 15, 20)
TUNED_NFES = (5, 6, 8, 10)
TUNED = ("dpm++2m", "ipndm")
SEED_NOISE, SEED_EXACT, SEED_FLOOR, SEED_TUNE = 2026, 2027, 3000, 1000
PROCESS = unstir.make_process("ddpm")
COMMON = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


# --- diffusers side ---------------------------------------------------------------------------------


def diffusers_configs():
    """name -> (factory(), evaluations per step, deterministic?)."""
    import diffusers as d

    cfg = {}
    for sp in ("leading", "trailing", "linspace"):
        cfg[f"DDIM {sp}"] = (lambda sp=sp: d.DDIMScheduler(**COMMON, clip_sample=False, set_alpha_to_one=True,
                                                           timestep_spacing=sp), 1, True)
        cfg[f"DDPM {sp}"] = (lambda sp=sp: d.DDPMScheduler(**COMMON, clip_sample=False, timestep_spacing=sp), 1, False)
        cfg[f"Euler {sp}"] = (lambda sp=sp: d.EulerDiscreteScheduler(**COMMON, timestep_spacing=sp), 1, True)
        cfg[f"Heun {sp}"] = (lambda sp=sp: d.HeunDiscreteScheduler(**COMMON, timestep_spacing=sp), 2, True)
    cfg["Euler karras"] = (lambda: d.EulerDiscreteScheduler(**COMMON, use_karras_sigmas=True), 1, True)
    cfg["Heun karras"] = (lambda: d.HeunDiscreteScheduler(**COMMON, use_karras_sigmas=True), 2, True)
    for order in (2, 3):
        for label, kw in (("", {}), (" trailing", {"timestep_spacing": "trailing"}),
                          (" karras", {"use_karras_sigmas": True}), (" lu", {"use_lu_lambdas": True})):
            cfg[f"DPM++{order}M{label}"] = (lambda o=order, kw=kw: d.DPMSolverMultistepScheduler(
                **COMMON, solver_order=o, algorithm_type="dpmsolver++", final_sigmas_type="zero", **kw), 1, True)
    for label, kw in (("", {}), (" trailing", {"timestep_spacing": "trailing"}), (" karras", {"use_karras_sigmas": True})):
        cfg[f"UniPC{label}"] = (lambda kw=kw: d.UniPCMultistepScheduler(**COMMON, solver_order=2,
                                                                        final_sigmas_type="zero", **kw), 1, True)
    return cfg


def run_diffusers(factory, eps_fn, z, nfe, per_step, generator=None):
    """The standard diffusers loop; returns (x0, model calls)."""
    sched = factory()
    steps = (nfe + 1) // 2 if per_step == 2 else nfe
    sched.set_timesteps(steps)
    x = z * sched.init_noise_sigma
    calls = 0
    kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t)
        eps = eps_fn(xin, t)
        calls += 1
        x = sched.step(eps, t, x, **kw).prev_sample
    return x, calls


def exact_eps_for_diffusers(gm):
    def eps(x, label):
        t = (float(label) + 1) / PROCESS.num_steps  # label i sits at t = (i + 1)/N (unstir.DDPM)
        return gm.eps(x, min(max(t, PROCESS.t_min), PROCESS.T), PROCESS)
    return eps


# --- unstir side ------------------------------------------------------------------------------------

UNSTIR = {  # name -> (sampler, options, evaluations per step, deterministic?); default grids unless named
    "ddim": ("ddim", {}, 1, True),
    "ode_euler": ("ode_euler", {}, 1, True),
    "ode_heun": ("ode_heun", {}, 2, True),
    "edm (churn 0)": ("edm", {"churn": 0.0}, 2, True),
    **{f"{s} {g}": (s, {"grid": g}, 1, True) for s in ("dpm++2m", "dpm++3m", "deis", "unipc", "ipndm")
       for g in unstir.GRIDS},
    **{f"dpm++2m taylor {g}": ("dpm++2m", {"grid": g, "form": "taylor"}, 1, True) for g in ("cubic", "log_snr")},
    **{f"unipc2 {g}": ("unipc", {"order": 2, "grid": g}, 1, True) for g in ("quadratic", "cubic", "log_snr")},
    "ddpm": ("ddpm", {}, 1, False),
    "euler_maruyama": ("euler_maruyama", {}, 1, False),
    "edm (churn)": ("edm", {}, 2, False),
}


def run_unstir(model, x_T, name, nfe, generator=None):
    sampler, opts, per_step, _ = UNSTIR[name]
    steps = (nfe + 1) // 2 if per_step == 2 else nfe
    r = unstir.sample(model, PROCESS, x_T, sampler=sampler, steps=steps, generator=generator, **opts)
    return r.x, r.nfe


# --- tables -----------------------------------------------------------------------------------------


def fmt(v):
    return f"{v:9.2e}" if math.isfinite(v) else "      nan"


def bench_cases():
    """The oracle cases (those of benchmarks/common.py) and a 64-D mixture."""
    return cases() + [("mix64d", oracle.random_mixture(64, 6, seed=0))]


def tuned_grids(quick: bool):
    """(case, sampler, nfe) -> TunedGrid, each fitted on 256 prior samples (seed 1000) of its case."""
    out = {}
    for cname, gm in bench_cases():
        model = gm.denoiser(PROCESS)
        for sampler in TUNED:
            for nfe in TUNED_NFES if not quick else (5,):
                tg = tune_grid(model, sampler, nfe, n=256, max_evals=40 if quick else 200, seed=SEED_TUNE,
                               dtype=torch.float64)
                out[(cname, sampler, nfe)] = tg
                print(f"  tuned {cname} {sampler} NFE {nfe}: {tg.error_start:.3e} ({tg.start}) -> {tg.error:.3e} "
                      f"on the fitting batch; {tg.evaluations} evaluations, {tg.seconds:.1f} s", file=sys.stderr)
    return out


def quality(n: int, nfes, tuned) -> list[str]:
    lines = []
    dcfg = diffusers_configs()
    for cname, gm in bench_cases():
        model = gm.denoiser(PROCESS)
        z = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(SEED_NOISE), dtype=torch.float64)
        x_T = PROCESS.prior_std * z
        ref = reference(model, PROCESS, x_T)
        exact = gm.sample(n, torch.Generator().manual_seed(SEED_EXACT))
        floors = two_sample_floor(lambda i: gm.sample(n, torch.Generator().manual_seed(SEED_FLOOR + i)), exact)
        floor = sum(floors) / len(floors)
        rows = {}
        for name, (sampler, opts, per_step, det) in UNSTIR.items():
            for nfe in nfes:
                x, calls = run_unstir(model, x_T, name, nfe, torch.Generator().manual_seed(3))
                rows.setdefault(("unstir", name, det), {})[nfe] = (calls, x)
        for sampler in TUNED:
            for nfe in nfes:
                tg = tuned.get((cname, sampler, nfe))
                if tg is not None:
                    r = unstir.sample(model, PROCESS, x_T, sampler=sampler, grid=tg.grid)
                    rows.setdefault(("unstir", f"{sampler} tuned", True), {})[nfe] = (r.nfe, r.x)
                else:
                    rows.setdefault(("unstir", f"{sampler} tuned", True), {})[nfe] = (0, None)
        eps_fn = exact_eps_for_diffusers(gm)
        for name, (factory, per_step, det) in dcfg.items():
            for nfe in nfes:
                try:
                    x, calls = run_diffusers(factory, eps_fn, z, nfe, per_step, torch.Generator().manual_seed(3))
                except Exception as err:  # a configuration diffusers rejects at this step count
                    x, calls = torch.full_like(z, float("nan")), -1
                    print(f"  diffusers {name} at NFE {nfe}: {type(err).__name__}: {err}", file=sys.stderr)
                rows.setdefault(("diffusers", name, det), {})[nfe] = (calls, x)
        first = len(lines)
        lines.append(f"\n### {cname} (d={gm.dim}, n={n}); sliced-W2 floor {floor:.3e}; the tight ODE solve itself "
                     f"(the limit of every deterministic sampler): {sliced_w2(ref, exact) / floor:.2f} x floor\n")
        for metric in ("endpoint error", "sliced-W2", "mode-weight error"):
            lines.append(f"{metric}:\n```")
            lines.append(f"{'side':9s} {'sampler':20s} " + " ".join(f"{'NFE ' + str(k):>9s}" for k in nfes))
            best = {}
            for (side, name, det), by_nfe in rows.items():
                if metric == "endpoint error" and not det:
                    continue
                vals = []
                for nfe in nfes:
                    calls, x = by_nfe[nfe]
                    if x is None:  # not tuned at this NFE
                        v = float("nan")
                    elif not torch.isfinite(x).all():
                        v = float("nan")
                    elif metric == "endpoint error":
                        v = endpoint_error(x, ref)
                    elif metric == "sliced-W2":
                        v = sliced_w2(x, exact)
                    else:
                        v = mode_weight_error(gm, x)
                    vals.append(v)
                    if det and metric == "endpoint error" and math.isfinite(v):
                        key = (side, nfe)
                        if v < best.get(key, (math.inf, ""))[0]:
                            best[key] = (v, name)
                lines.append(f"{side:9s} {name:20s} " + " ".join(fmt(v) for v in vals))
            lines.append("```")
            if metric == "endpoint error":
                lines.append("best deterministic per NFE (unstir / diffusers = ratio; named grids only, then with "
                             "the tuned grids):")
                for nfe in nfes:
                    named = min(((v, k) for k, v in named_best(rows, ref, nfe).items()), default=None)
                    u, dd = best.get(("unstir", nfe)), best.get(("diffusers", nfe))
                    if u and dd and named:
                        sw = sliced_w2(rows[("unstir", u[1], True)][nfe][1], exact) / floor
                        lines.append(f"- NFE {nfe}: named {named[1]} {named[0]:.3e} = {named[0] / dd[0]:.2f}; "
                                     f"with tuned: {u[1]} {u[0]:.3e} = {u[0] / dd[0]:.2f} "
                                     f"(diffusers {dd[1]} {dd[0]:.3e}); its sliced-W2 {sw:.2f} x floor")
        print("\n".join(lines[first:]), flush=True)
    return lines


def named_best(rows, ref, nfe) -> dict:
    """unstir's deterministic rows on named grids: name -> endpoint error at ``nfe``."""
    out = {}
    for (side, name, det), by_nfe in rows.items():
        x = by_nfe[nfe][1]
        if side == "unstir" and det and "tuned" not in name and x is not None and torch.isfinite(x).all():
            out[name] = endpoint_error(x, ref)
    return out


def transfer(n: int, tuned) -> list[str]:
    """A tuned grid on a case it was not fitted on: each case's dpm++2m / ipndm grid at NFE 8 used on its
    partner case, against the partner's default grid and its own tuned grid (fresh noise)."""
    pairs = [("ring8", "unequal3"), ("unequal3", "ring8"), ("mix8d", "mix64d"), ("mix64d", "mix8d")]
    by_name = dict(bench_cases())
    lines = ["\n### transfer: a grid tuned on one case, used on another (NFE 8, fresh noise, endpoint error)\n",
             "```", f"{'fitted on':10s} {'used on':10s} {'sampler':8s} {'default':>10s} {'transferred':>12s} "
                    f"{'own tuned':>10s}"]
    for src, dst in pairs:
        gm = by_name[dst]
        model = gm.denoiser(PROCESS)
        x_T = PROCESS.prior_std * torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(SEED_NOISE),
                                              dtype=torch.float64)
        ref = reference(model, PROCESS, x_T)
        for sampler in TUNED:
            if (src, sampler, 8) not in tuned:
                continue
            errs = [endpoint_error(unstir.sample(model, PROCESS, x_T, sampler=sampler, steps=8, grid=g).x, ref)
                    for g in (None, tuned[(src, sampler, 8)].grid, tuned[(dst, sampler, 8)].grid)]
            lines.append(f"{src:10s} {dst:10s} {sampler:8s} " + " ".join(f"{e:10.3e}  " for e in errs))
    lines.append("```")
    print("\n".join(lines), flush=True)
    return lines


def digits(run: Path | None, steps: int = 2000, n: int = 256) -> list[str]:
    """The trained digits U-Net: endpoint error against the model's own tight ODE solve (rtol 1e-6), default
    against tuned grid, on fresh noise (seed 2026; the grids are fitted on seed 1000). Trains the U-Net
    (``steps``, as benchmarks/training.py does) unless ``run`` names a digits run folder."""
    import tempfile

    from unstir.runs import load_run
    from unstir.training import TrainConfig, train

    if run is None:
        run = Path(tempfile.mkdtemp()) / "digits"
        t0 = time.perf_counter()
        train(TrainConfig(data="digits", steps=steps, batch_size=128, lr=1e-3, warmup=200, ema_decay=0.999), run,
              progress=False)
        print(f"  trained the digits U-Net ({steps} steps) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model = load_run(run)
    process = model.process
    x_T = process.prior_sample((n, *model.data_shape), torch.Generator().manual_seed(SEED_NOISE))
    with torch.no_grad():
        ref = unstir.sample(model, None, x_T, sampler="ode_rk45", rtol=1e-6, atol=1e-6,
                            grid=torch.tensor([process.T, process.t_min, 0.0], dtype=torch.float64))
    lines = [f"\n### digits U-Net ({run}), endpoint error per pixel (RMS) against its own ode_rk45 solve at rtol "
             f"1e-6 ({ref.nfe} NFE), {n} fresh samples\n", "```",
             f"{'sampler':8s} {'NFE':>4s} {'default grid':>13s} {'tuned grid':>11s} {'ratio':>6s} {'tuning cost':>22s}"]
    for sampler in TUNED:
        for nfe in (5, 8, 10):
            tg = tune_grid(model, sampler, nfe, n=128, max_evals=150, seed=SEED_TUNE)
            with torch.no_grad():
                errs = [(unstir.sample(model, None, x_T, sampler=sampler, steps=nfe, grid=g).x - ref.x).pow(2)
                        .flatten(1).mean(1).sqrt().mean().item() for g in (None, tg.grid)]
            lines.append(f"{sampler:8s} {nfe:4d} {errs[0]:13.3e} {errs[1]:11.3e} {errs[1] / errs[0]:6.2f} "
                         f"{tg.evaluations:6d} NFE x 128, {tg.seconds:4.0f} s")
            print(lines[-1], flush=True)
    lines.append("```")
    return lines


def thousand_steps(n: int = 200) -> list[str]:
    """The issue's warning: diffusers' DPM-Solver++ and UniPC with linspace spacing at 1000 steps. Both
    sides on ring8 from the same noise; a NaN shows as nan."""
    import diffusers as d

    gm = cases()[0][1]
    model = gm.denoiser(PROCESS)
    z = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = PROCESS.prior_std * z
    ref = reference(model, PROCESS, x_T)
    eps_fn = exact_eps_for_diffusers(gm)
    rows = [("diffusers DPM++2M linspace", lambda: run_diffusers(lambda: d.DPMSolverMultistepScheduler(
                **COMMON, final_sigmas_type="zero"), eps_fn, z, 1000, 1)[0]),
            ("diffusers DPM++3M linspace", lambda: run_diffusers(lambda: d.DPMSolverMultistepScheduler(
                **COMMON, solver_order=3, final_sigmas_type="zero"), eps_fn, z, 1000, 1)[0]),
            ("diffusers UniPC linspace", lambda: run_diffusers(lambda: d.UniPCMultistepScheduler(
                **COMMON, final_sigmas_type="zero"), eps_fn, z, 1000, 1)[0])]
    rows += [(f"unstir {s} uniform", lambda s=s: run_unstir(model, x_T, f"{s} uniform", 1000)[0])
             for s in ("dpm++2m", "dpm++3m", "unipc")]
    lines = ["\n### 1000 steps, linspace / uniform in t (ring8, n=%d)\n" % n, "```",
             f"{'sampler':30s} {'finite':>6s} {'endpoint error':>15s}"]
    for name, run in rows:
        x = run()
        ok = bool(torch.isfinite(x).all())
        lines.append(f"{name:30s} {str(ok):>6s} {fmt(endpoint_error(x, ref) if ok else float('nan')):>15s}")
    lines.append("```")
    print("\n".join(lines), flush=True)
    return lines


def overhead(steps: int = 50, repeats: int = 5) -> list[str]:
    """Per-step time of each loop with a near-free model (returns its input), batch 1 and 4096."""
    import diffusers as d

    lines = ["\n### per-step sampler overhead (near-free model, 50 steps, best of 5)\n", "```",
             f"{'pair':36s} {'batch':>6s} {'unstir us':>10s} {'diffusers us':>13s} {'ratio':>6s}"]
    model = unstir.Denoiser(lambda x, t: x, PROCESS)
    pairs = [
        ("ddim / DDIMScheduler", "ddim", {}, lambda: d.DDIMScheduler(**COMMON, clip_sample=False)),
        ("ddpm / DDPMScheduler", "ddpm", {}, lambda: d.DDPMScheduler(**COMMON, clip_sample=False)),
        ("ode_euler / EulerDiscrete", "ode_euler", {}, lambda: d.EulerDiscreteScheduler(**COMMON)),
        ("ode_heun / HeunDiscrete (2 evals)", "ode_heun", {}, lambda: d.HeunDiscreteScheduler(**COMMON)),
        ("dpm++2m / DPMSolverMultistep", "dpm++2m", {}, lambda: d.DPMSolverMultistepScheduler(**COMMON)),
        ("dpm++3m / DPMSolverMultistep(3)", "dpm++3m", {},
         lambda: d.DPMSolverMultistepScheduler(**COMMON, solver_order=3)),
        ("unipc / UniPCMultistep", "unipc", {}, lambda: d.UniPCMultistepScheduler(**COMMON)),
        ("deis / UniPCMultistep", "deis", {}, lambda: d.UniPCMultistepScheduler(**COMMON)),
    ]
    for batch in (1, 4096):
        z = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
        for label, sampler, opts, factory in pairs:
            def ours():
                unstir.sample(model, PROCESS, z, sampler=sampler, steps=steps, generator=torch.Generator(), **opts)

            def theirs():
                run_diffusers(factory, lambda x, t: x, z, steps, 1, torch.Generator())

            t_u = _best_time(ours, repeats) / steps * 1e6
            t_d = _best_time(theirs, repeats) / steps * 1e6
            lines.append(f"{label:36s} {batch:6d} {t_u:10.1f} {t_d:13.1f} {t_u / t_d:6.2f}")
    lines.append("```")
    print("\n".join(lines), flush=True)
    return lines


def _best_time(fn, repeats):
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples and NFEs (a smoke run)")
    ap.add_argument("--n", type=int, default=2000, help="samples per case")
    ap.add_argument("--skip-overhead", action="store_true", help="only the quality tables")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    ap.add_argument("--digits-run", type=Path, help="a trained digits run for the U-Net table (default: train one)")
    ap.add_argument("--skip-digits", action="store_true", help="no U-Net table")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    n, nfes = (200, (5, 10)) if args.quick else (args.n, NFES)
    tuned = tuned_grids(args.quick)
    import diffusers
    header = [f"unstir {unstir.__version__} vs diffusers {diffusers.__version__}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads"]
    print(header[0])
    lines = (header + (overhead() if not args.skip_overhead else []) + thousand_steps() + quality(n, nfes, tuned)
             + (transfer(n, tuned) if not args.quick else [])
             + (digits(args.digits_run, 100 if args.quick else 2000) if not args.skip_digits else []))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
