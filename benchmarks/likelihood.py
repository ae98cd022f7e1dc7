"""Likelihood, encoding and interpolation benchmark.

0. The default accuracy on the oracle cases (vp, subvp, ve, rf) with the exact prior: error and cost.
1. Oracle cases (d = 2, 16, 64; vp, subvp, ve): per-sample error of unstir.log_likelihood against the exact
   log p_{t_min}(x), per dimension, against NFE, for several tolerances, exact and Hutchinson divergence.
   Fresh samples (seed 123), not those of the tests; the default tolerance (1e-5, score_sde's) was not tuned.
2. The peers' recipe rebuilt with unstir's pieces (score_sde's likelihood: RK45 in t at rtol = atol = 1e-5,
   one Rademacher probe for the whole solve, one RMS error norm over the batch), on the same cases, and
   how much a sample's result moves when its batch mates change, for both.
3. Digits: an unconditional U-Net trained on the 1500 training digits; bits/dim of the 297 held-out digits
   (17 levels, dequantised) next to two baselines computed the same way; an interpolation strip and an
   encode/decode round trip of real digits.

    .venv/bin/python benchmarks/likelihood.py --out benchmarks/likelihood_results.md
    .venv/bin/python benchmarks/likelihood.py --only-default --out benchmarks/likelihood_default_results.md
    .venv/bin/python benchmarks/likelihood.py --tuning --out benchmarks/likelihood_tuning_results.md
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import unstir
from unstir import data, figures
from unstir.likelihood import log_likelihood
from unstir.oracle import random_mixture, ring, unequal_2d
from unstir.pf_ode import divergence, draw_probes

HERE = Path(__file__).parent


def cases():
    return [(2, unequal_2d(), 200), (16, random_mixture(16, 4, seed=3), 200), (64, random_mixture(64, 4, seed=3), 30)]


def peers_recipe(model, x, generator):
    """score_sde's likelihood, rebuilt: dopri5 in t from t_min to T on dx/dt = u and d(logp)/dt = v^T J v with
    ONE Rademacher probe v fixed over the solve, rtol = atol = 1e-5, torchdiffeq's RMS norm over the batch."""
    from torchdiffeq import odeint

    p = model.process
    d = x[0].numel()
    v = draw_probes("rademacher", 1, x, generator)
    nfe = 0

    def field(t, state):
        nonlocal nfe
        nfe += 1
        tt = min(max(t.item(), p.t_min), p.T)  # torchdiffeq's first-step probe may look past T
        u, div = divergence(lambda z: model(z, tt).velocity, state[:, :d], v)
        return torch.cat([u, div], 1)

    ts = torch.tensor([p.t_min, p.T], dtype=torch.float64)
    end = odeint(field, torch.cat([x, torch.zeros(x.shape[0], 1, dtype=x.dtype)], 1), ts, rtol=1e-5, atol=1e-5,
                 method="dopri5")[-1]
    return p.prior_logp(end[:, :d]) + end[:, d], nfe


def oracle_table() -> list[str]:
    lines = ["## 1. Per-sample error against the exact log-density (nats per dimension)", "",
             "max and mean over the samples of |log p - exact| / d; NFE = evaluations of the augmented field;",
             "Hutchinson with 8 Rademacher probes (its own estimator noise included).", "",
             "| d | process | divergence | rtol=atol | NFE | max err/dim | mean err/dim | <= 0.01 in <= 100 NFE |",
             "|---|---|---|---|---|---|---|---|"]
    for d, gm, n in cases():
        for name in ("vp", "subvp", "ve"):
            p = unstir.make_process(name)
            model = gm.denoiser(p)
            x = gm.sample(n, torch.Generator().manual_seed(123))
            exact = gm.marginal_log_prob(x, p.t_min, p)
            for div in ("exact", "hutchinson"):
                if div == "hutchinson" and d == 64:
                    continue
                for tol in (1e-2, 1e-3, 1e-4, 1e-5):
                    r = log_likelihood(model, x, divergence=div, rtol=tol, atol=tol,
                                       generator=torch.Generator().manual_seed(5))
                    err = (r.nats - exact).abs() / d
                    ok = "yes" if err.max() <= 0.01 and r.nfe <= 100 else "no"
                    lines.append(f"| {d} | {name} | {div} | {tol:.0e} | {r.nfe} | {err.max():.2e} | {err.mean():.2e} | {ok} |")
            est, nfe = peers_recipe(model, x, torch.Generator().manual_seed(5))
            err = (est - exact).abs() / d
            lines.append(f"| {d} | {name} | peers' recipe (1 probe, t, RMS) | 1e-05 | {nfe} | {err.max():.2e} | "
                         f"{err.mean():.2e} | {'yes' if err.max() <= 0.01 and nfe <= 100 else 'no'} |")
    return lines


def default_table() -> list[str]:
    """The default (accuracy = 0.01 nats/dim) on the held-out cases, all four continuous processes, with the
    exact log p_T as the prior so that only the solver errs: with the default reference N(0, I) and with the
    data's moments (estimated from 10,000 fresh draws, as `unstir train` stores them); beside a tenfold
    tighter target and score_sde's tolerance (rtol = atol = 1e-5, the earlier default)."""
    from unstir.teleport import Moments

    lines = ["## 0. The default accuracy (issue 19): per-sample error with the exact prior, and the cost", "",
             "error per dimension |log p - exact| / d over the samples (p50, p90, max); NFE per sample = the",
             "evaluations a sample's own steps need (mean, median, max). The model is evaluated on running",
             "samples only, so the mean is what the batch costs per sample; the max is the number of sequential",
             "calls (the batch's latency). Held-out cases: the choices were made on ring(),",
             "random_mixture(16 and 64, 4, seed=11) with other draws.", "",
             "| d | process | setting | p50 | p90 | max | NFE per sample (mean, median, max) | p90 <= 0.01, mean <= 100 |",
             "|---|---|---|---|---|---|---|---|"]
    for d, gm, n in cases():
        moments = Moments.of(gm.sample(10000, torch.Generator().manual_seed(99)))
        settings = (("default (accuracy 0.01)", {}), ("default, data moments", {"moments": moments}),
                    ("accuracy 0.001, data moments", {"accuracy": 1e-3, "moments": moments}),
                    ("rtol = atol = 1e-5", {"rtol": 1e-5, "atol": 1e-5}))
        for name in ("vp", "subvp", "ve", "rf"):
            p = unstir.make_process(name)
            x = gm.sample(n, torch.Generator().manual_seed(123))
            exact = gm.marginal_log_prob(x, p.t_min, p)
            for label, kw in settings:
                r = log_likelihood(gm.denoiser(p), x, prior_logp=lambda z: gm.marginal_log_prob(z, p.T, p), **kw)
                err = (r.nats - exact).abs() / d
                q = [err.quantile(v).item() for v in (0.5, 0.9)] + [err.max().item()]
                nfe = r.sample_nfe.float()
                ok = "yes" if q[1] <= 0.01 and nfe.mean() <= 100 else "no"
                lines.append(f"| {d} | {name} | {label} | {q[0]:.1e} | {q[1]:.1e} | {q[2]:.1e} | {nfe.mean():.0f}, "
                             f"{nfe.median():.0f}, {r.nfe} | {ok} |")
                print(lines[-1], flush=True)
    return lines + [""]


def skipping_table(repeats: int = 3) -> list[str]:
    """Wall time of the default solve with finished samples skipped against torchode's own behaviour (every
    sample evaluated at every stage until the slowest is done), alternated, the same results."""
    import torchode

    import unstir.likelihood as L

    class EveryRow(torchode.Dopri5):
        running = None  # the field then evaluates the whole batch

    lines = ["## Skipping finished samples: wall time against evaluating the whole batch until the slowest is done",
             "", "median of 3 alternated runs each; the same draws as section 0", "",
             "| d | process | n | mean NFE per sample | slowest | skipping s | whole batch s | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    saved = L._method
    for d, gm, n in cases():
        p = unstir.make_process("vp")
        x = gm.sample(n, torch.Generator().manual_seed(123))
        times = {"skip": [], "all": []}
        for _ in range(repeats):
            for kind in ("skip", "all"):
                L._method = saved if kind == "skip" else (lambda: EveryRow)
                t0 = time.perf_counter()
                r = log_likelihood(gm.denoiser(p), x)
                times[kind].append(time.perf_counter() - t0)
        L._method = saved
        skip, whole = (float(np.median(times[k])) for k in ("skip", "all"))
        lines.append(f"| {d} | vp | {n} | {r.sample_nfe.float().mean():.0f} | {r.nfe} | {skip:.2f} | {whole:.2f} | "
                     f"{skip / whole:.2f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def tuning_table() -> list[str]:
    """The sweep that chose the default error control, on the tuning cases (not those of section 0): the
    state's absolute tolerance and the log-density's per-step allowance as fractions of the accuracy, with
    and without the data's moments; the worst cell over d = 2, 16, 64 and vp, sub-VP, VE, rf."""
    import unstir.likelihood as L
    from unstir.teleport import Moments

    lines = ["## Tuning sweep (the cases the default was chosen on)", "",
             "ring(), random_mixture(16 and 64, 4, seed=11), draws of seed 7; worst over the 12 cells", "",
             "| state | atol | log-density per step | reference | worst p90 err/dim | worst mean NFE | worst max NFE |",
             "|---|---|---|---|---|---|---|"]
    tuning = [(2, ring(), 200), (16, random_mixture(16, 4, seed=11), 200), (64, random_mixture(64, 4, seed=11), 30)]
    saved = L.RTOL, L.ATOL, L.PER_STEP
    configs = [(rt, a, per, ref) for rt in (0.0, 1 / 20) for a in ((1 / 20,) if rt else (1 / 30, 1 / 50, 1 / 80))
               for per in ((1 / 10,) if rt else (1 / 10, 1 / 30)) for ref in ("N(0, I)", "data")]
    for rt, a, per, ref in configs:
        L.RTOL, L.ATOL, L.PER_STEP = rt, a, per
        worst = [0.0, 0.0, 0]
        for d, gm, n in tuning:
            moments = Moments.of(gm.sample(10000, torch.Generator().manual_seed(98))) if ref == "data" else None
            for name in ("vp", "subvp", "ve", "rf"):
                p = unstir.make_process(name)
                x = gm.sample(n, torch.Generator().manual_seed(7))
                exact = gm.marginal_log_prob(x, p.t_min, p)
                r = log_likelihood(gm.denoiser(p), x, moments=moments,
                                   prior_logp=lambda z: gm.marginal_log_prob(z, p.T, p))
                worst = [max(worst[0], ((r.nats - exact).abs() / d).quantile(0.9).item()),
                         max(worst[1], r.sample_nfe.float().mean().item()), max(worst[2], r.nfe)]
        state = "whitened, rtol 0" if rt == 0 else "whitened, rtol = atol"
        lines.append(f"| {state} | accuracy/{round(1 / a)} | accuracy/{round(1 / per)} | {ref} | {worst[0]:.1e} | "
                     f"{worst[1]:.0f} | {worst[2]} |")
        print(lines[-1], flush=True)
    L.RTOL, L.ATOL, L.PER_STEP = saved
    return lines + [""]


def batch_dependence() -> list[str]:
    out = ["", "## 2. The same 5 samples alone and with 400 batch mates (wide: 3 N(0, I); far: shifted by 30)", "",
           "largest change of a sample's log-likelihood between the two batches, nats (vp, exact score);",
           "unstir at rtol = atol = 1e-3 and at its default 1e-5, the peers' recipe at its 1e-5", "",
           "| case | mates | unstir 1e-3 | unstir 1e-5 | peers' recipe |", "|---|---|---|---|---|"]
    p = unstir.make_process("vp")
    for case, gm in (("unequal_2d", unequal_2d()), ("ring8", ring())):
        model = gm.denoiser(p)
        probe = gm.sample(5, torch.Generator().manual_seed(321))
        for kind, shift in (("wide", 0.0), ("far", 30.0)):
            mates = 3.0 * torch.randn(400, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64) + shift
            row = []
            for fn in (lambda b: log_likelihood(model, b, rtol=1e-3, atol=1e-3).nats[:5],
                       lambda b: log_likelihood(model, b).nats[:5],
                       lambda b: peers_recipe(model, b, torch.Generator().manual_seed(5))[0][:5]):
                row.append((fn(probe) - fn(torch.cat([probe, mates]))).abs().max().item())
            out.append(f"| {case} | {kind} | {row[0]:.1e} | {row[1]:.1e} | {row[2]:.1e} |")
    return out


def digits_section(steps: int, work: Path) -> list[str]:
    from unstir.training import TrainConfig, train

    run = work / "digits_uncond"
    if not (run / "checkpoint.json").exists():
        cfg = TrainConfig(data="digits", steps=steps, batch_size=128, lr=1e-3, warmup=200, ema_decay=0.999)
        train(cfg, run, progress=False)
    model = unstir.load_run(run)
    train_x, test = data.digits("train").x, data.load("digits-test")
    x, levels, d = test.x, test.levels, 64
    delta = 2.0 / (levels - 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        r = log_likelihood(model, x, levels=levels, divergence="hutchinson", probes=4, rtol=1e-4, atol=1e-4,
                           batch_size=100, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    bpd, se = r.mean()
    # Baseline 1: independent per-pixel categorical over the 17 levels (add-one smoothing), fitted on train.
    k_tr = ((train_x + 1) / delta).round().long().flatten(1)
    k_te = ((x + 1) / delta).round().long().flatten(1)
    counts = torch.stack([torch.bincount(k_tr[:, j], minlength=levels) for j in range(d)]).double() + 1
    probs = counts / counts.sum(1, keepdim=True)
    cat_bits = -torch.log2(probs[torch.arange(d), k_te]).mean(1)
    # Baseline 2: one full-covariance Gaussian fitted to the dequantised training digits, scored on the
    # dequantised held-out digits with the same bin-width offset (mean over 8 dequantisation draws).
    g = torch.Generator().manual_seed(1)
    deq = lambda z: z.double().flatten(1) + (torch.rand(z.flatten(1).shape, generator=g, dtype=torch.float64) - 0.5) * delta  # noqa: E731
    fit = deq(train_x)
    mvn = torch.distributions.MultivariateNormal(fit.mean(0), torch.cov(fit.T))
    gauss_nats = torch.stack([mvn.log_prob(deq(x)) for _ in range(8)]).mean(0)
    gauss_bits = -(gauss_nats + d * math.log(delta)) / (d * math.log(2))
    lines = ["", "## 3. Digits: bits/dim of the 297 held-out digits (17 levels, uniform dequantisation)", "",
             f"U-Net ({steps} training steps on the 1500 training digits), Hutchinson (4 probes), rtol = atol = 1e-4,",
             f"{r.nfe} evaluations of the augmented ODE over 3 batches, {seconds:.0f} s. Same offset log2(16/2) = 3 bits for all.", "",
             "| model | bits/dim | s.e. |", "|---|---|---|",
             f"| unstir U-Net (PF-ODE likelihood) | {bpd:.3f} | {se:.3f} |",
             f"| independent per-pixel categorical | {cat_bits.mean():.3f} | {cat_bits.std() / math.sqrt(len(cat_bits)):.3f} |",
             f"| one full-covariance Gaussian | {gauss_bits.mean():.3f} | {gauss_bits.std() / math.sqrt(len(gauss_bits)):.3f} |",
             f"| (uniform over the 17 levels) | {math.log2(17):.3f} | |"]
    # Interpolation strips and an encode/decode round trip of real held-out digits.
    with torch.no_grad():
        strips = [unstir.interpolate(model, x[i], x[j], frames=8).x for i, j in ((0, 1), (2, 3), (4, 5), (6, 7))]
        enc = unstir.encode(model, x[:10])
        dec = unstir.decode(model, enc.z)
    figures.image_grid(data.from_unit_range(torch.cat(strips).clamp(-1, 1)), HERE / "digits_interpolation.png", ncol=8)
    z_show = (enc.z / 3).clamp(-1, 1)  # latents at T ~ N(0, I), shown at 3 standard deviations per side
    figures.image_grid(data.from_unit_range(torch.cat([x[:10], z_show, dec.x.clamp(-1, 1)])),
                       HERE / "digits_roundtrip.png", ncol=10)
    rel = ((dec.x - x[:10]).flatten(1).norm(dim=1) / x[:10].flatten(1).norm(dim=1)).max().item()
    lines += ["", "Interpolation (slerp between the latents of held-out digits 0-1, 2-3, 4-5, 6-7): "
              "benchmarks/digits_interpolation.png.",
              f"Round trip of 10 held-out digits (rows: data, latents / 3, decoded): benchmarks/digits_roundtrip.png; "
              f"largest relative error {rel:.1e} ({enc.nfe} + {dec.nfe} NFE)."]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "likelihood_results.md"))
    ap.add_argument("--digits-steps", type=int, default=2000)
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--only-default", action="store_true", help="only section 0 (the default accuracy)")
    ap.add_argument("--tuning", action="store_true", help="only the sweep that chose the default error control")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    flags = ["--only-default"] if args.only_default else ["--tuning"] if args.tuning else []
    lines = ["# Likelihood benchmark", "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/likelihood.py', *flags, '--out', args.out])}`", ""]
    lines += tuning_table() if args.tuning else default_table() + skipping_table()
    if not (args.only_default or args.tuning):
        lines += oracle_table()
        lines += batch_dependence()
        lines += digits_section(args.digits_steps, Path(args.work))
    lines += ["", f"total {time.perf_counter() - t0:.0f} s"]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
