"""Inverse problems on the oracle: how far each published method lands from the exact posterior.

For y = A x0 + n on a Gaussian mixture the posterior is another Gaussian mixture
(GaussianMixture.posterior_given; noiseless coordinate observations: GaussianMixture.condition), so each
method's samples can be compared with exact posterior samples: the total-variation distance of the mode
weights (components assigned by the exact posterior's own classifier) and sliced-W2 over its two-sample
floor (mean of 5 fresh exact pairs). Method settings are the papers' or unstir's defaults, not tuned on
these cases (DPS at two scales, since its paper tunes per task). Samplers: DDPM ancestral on a uniform grid.
Twisted SMC (Wu et al. 2023, twisted by PiGDM's Gaussian) is the one consistent method: its error falls with
the number of particles; its cost is NFE x particles.

    .venv/bin/python benchmarks/inverse.py --out benchmarks/inverse_results.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import unstir
from unstir.inverse import Measurement, dps, pigdm, repaint, twisted_smc
from unstir.metrics import sliced_w2
from unstir.oracle import unequal_2d, random_mixture

HERE = Path(__file__).parent
N = 2000


def cases():
    g = torch.Generator().manual_seed(11)
    two, sixteen = unequal_2d(), random_mixture(16, 4, seed=5)
    proj16 = torch.randn(4, 16, generator=g, dtype=torch.float64) / 4
    return [
        ("2-D, x[0] observed, noiseless", two, torch.tensor([1, 0]), torch.tensor([0.2]), 0.0),
        ("2-D, x[0] observed, sigma_y 0.2", two, torch.tensor([[1.0, 0.0]]), torch.tensor([0.2]), 0.2),
        ("2-D, projection 0.6 x0 + 0.8 x1, sigma_y 0.2", two, torch.tensor([[0.6, 0.8]]), torch.tensor([0.9]), 0.2),
        ("16-D, 8 coordinates observed, noiseless", sixteen, (torch.arange(16) < 8).long(),
         sixteen.means[0, :8] + 0.1, 0.0),
        ("16-D, random 4x16 projection, sigma_y 0.1", sixteen, proj16, proj16 @ sixteen.means[1], 0.1),
    ]


def exact_posterior(gm, A, y, sigma_y):
    if sigma_y == 0:  # a noiseless mask: the Schur-complement conditional, embedded back into the full vector
        observed = A.bool()
        cond = gm.condition(observed, y)

        def draw(n, g):
            x = torch.empty(n, gm.dim, dtype=torch.float64)
            x[:, observed] = y.double()
            x[:, ~observed] = cond.sample(n, g)
            return x

        return draw, cond, ~observed
    post = gm.posterior_given(A, y, sigma_y)
    return (lambda n, g: post.sample(n, g)), post, torch.ones(gm.dim, dtype=torch.bool)


def run_methods(gm, A, y, sigma_y, steps, p):
    m = Measurement(A, y, sigma_y, data_shape=(gm.dim,))
    model = gm.denoiser(p)
    x_T = p.prior_sample((N, gm.dim), torch.Generator().manual_seed(123), dtype=torch.float64)
    data_var = gm.sample(20000, torch.Generator().manual_seed(5)).var(0).mean().item()
    kw = dict(sampler="ddpm", steps=steps, dtype=torch.float64)
    out = {}
    if A.ndim == 1:  # replacement and RePaint paste coordinates
        r = unstir.sample(model, p, x_T, project=m.replacement(torch.Generator().manual_seed(1)),
                          generator=torch.Generator().manual_seed(2), **kw)
        out["replacement"] = (r.x, r.nfe)
        r = repaint(model, m, x_T, steps, jump_length=10, resamples=10, generator=torch.Generator().manual_seed(3))
        out["RePaint (jump 10, 10 resamples)"] = (r.x, r.nfe)
    for zeta in (0.3, 1.0):
        r = dps(model, m, x_T, steps, zeta=zeta, generator=torch.Generator().manual_seed(4))
        out[f"DPS (Alg. 1, zeta' {zeta})"] = (r.x, r.nfe)
    for jac in ("vjp", "gaussian"):
        r = unstir.sample(pigdm(model, m, data_var, jacobian=jac), p, x_T, generator=torch.Generator().manual_seed(5), **kw)
        out[f"PiGDM ({jac} Jacobian, data_var {data_var:.2f})"] = (r.x, r.nfe)
    for k in ((16, 64) if gm.dim <= 2 else (16,)):
        r = twisted_smc(model, m, N, steps, particles=k, data_var=data_var, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(6))
        out[f"twisted SMC ({k} particles)"] = (r.x, r.nfe)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "inverse_results.md"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    p = unstir.make_process("vp")
    lines = ["# Inverse problems against the exact posterior", "", f"`.venv/bin/python benchmarks/inverse.py --out {args.out}`",
             "", f"{N} samples per method; vp process; DDPM ancestral steps. TV: total-variation distance of the mode",
             "weights from the exact posterior's; SW2 / floor: sliced-W2 to exact posterior samples over the",
             "two-sample floor (mean of 5 exact pairs). Lower is better; 1.0 is indistinguishable from exact.", ""]
    for title, gm, A, y, sigma_y in cases():
        draw, post, free = exact_posterior(gm, A, y, sigma_y)
        ref = draw(N, torch.Generator().manual_seed(900))
        floor = sum(sliced_w2(draw(N, torch.Generator().manual_seed(901 + i)), ref) for i in range(5)) / 5
        lines += [f"## {title}", "", f"exact posterior mode weights {[round(w, 3) for w in post.weights.tolist()]}; "
                  f"SW2 floor {floor:.4f}", "", "| method | steps | NFE | TV of mode weights | SW2 / floor |",
                  "|---|---|---|---|---|"]
        for steps in (50, 200) if gm.dim <= 2 else (50, 100):
            for name, (x, nfe) in run_methods(gm, A, y, sigma_y, steps, p).items():
                if not torch.isfinite(x).all():
                    lines.append(f"| {name} | {steps} | {nfe} | diverged | diverged |")
                    continue
                w = unstir.metrics.mode_weights(post, x[:, free])
                tv = 0.5 * (w - post.weights).abs().sum().item()
                lines.append(f"| {name} | {steps} | {nfe} | {tv:.3f} | {sliced_w2(x, ref) / floor:.2f} |")
        lines.append("")
    lines.append(f"total {time.perf_counter() - t0:.0f} s")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
