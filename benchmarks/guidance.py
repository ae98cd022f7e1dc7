"""Guidance at high scales (issue 33, item 3): what the guidance interval, CFG rescale, APG and autoguidance do as
the scale grows, beside plain classifier-free guidance, on the exact oracle and on the digits.

1. Oracle: ``unequal_2d`` with classes [0, 1, 1] (class 1 is components 1 and 2, weights 0.3 and 0.1, so 0.75 and
   0.25 within the class); conditional and unconditional scores exact. Each wrapper samples n points of class 1
   (dpm++2m, 20 NFE, the same noise in every row) and is scored by its mode weights (the share of samples the
   mixture's posterior assigns to components 1 and 2; the class's own are 0.75/0.25, and whatever lands in
   component 0 leaks into the other class) and sliced-W2 against n fresh points of the class's own mixture
   (floor: another n fresh points). Autoguidance's guide is the exact model of the same mixture with every
   covariance doubled: a blurrier model, as an under-trained network is.
2. Digits: the class-conditional U-Net of benchmarks/conditional.py (label dropout 0.1) and, as autoguidance's
   guide, the same network trained for a fifth of the steps. 50 samples per class: accuracy of the
   LogisticRegression judge on the requested class, and diversity (mean pairwise distance within a class).

Settings are the papers' defaults or round numbers, chosen before any run (none was tuned on these seeds): the
interval covers sigma/alpha in (0.3, 5] on the oracle and digits; rescale phi = 0.7 (Lin et al. 2024's
recommendation); APG eta = 0, momentum -0.5, norm threshold 0 (off) (Sadat et al. 2024's defaults are eta 0,
beta -0.5, r 15 at 64x64 x 4 latent size; at our sizes the threshold is left off).

    .venv/bin/python benchmarks/guidance.py [--steps 2000] [--out benchmarks/guidance_results.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import unstir
from unstir.guidance import autoguidance, cfg
from unstir.metrics import mode_weights, sliced_w2
from unstir.quality import bootstrap, overlap
from unstir.oracle import GaussianMixture, unequal_2d
from unstir.training import TrainConfig, train

HERE = Path(__file__).parent
SCALES = (1.0, 2.0, 4.0, 8.0)
INTERVAL = (0.3, 5.0)
APG = {"eta": 0.0, "momentum": -0.5, "norm_threshold": 0.0}
RESAMPLES = 200  # half-samples behind each 95 % interval (unstir.quality.bootstrap)


def wrappers(model, guide, scale):
    return {"cfg": cfg(model, scale=scale), f"cfg, interval {INTERVAL}": cfg(model, scale=scale, interval=INTERVAL),
            "cfg, rescale 0.7": cfg(model, scale=scale, rescale=0.7), "apg": cfg(model, scale=scale, apg=APG),
            "autoguidance": autoguidance(model, guide, scale=scale)}


def oracle_part(n: int) -> list[str]:
    vp = unstir.make_process("vp")
    gm = unequal_2d()
    classes = [0, 1, 1]
    target = gm.subset([1, 2])
    blurry = GaussianMixture(gm.weights, gm.means, 2 * gm.covs)
    model, guide = gm.class_conditional_denoiser(vp, classes), blurry.class_conditional_denoiser(vp, classes)
    x_T = vp.prior_sample((n, 2), torch.Generator().manual_seed(11), dtype=torch.float64)
    ref = target.sample(n, torch.Generator().manual_seed(12)).double()
    floor = sliced_w2(target.sample(n, torch.Generator().manual_seed(13)).double(), ref)
    lines = ["## 1. Oracle: class 1 of unequal_2d (own mode weights 0.75 / 0.25 within the class)", "",
             f"n = {n}, dpm++2m, 20 NFE. Mode weights: share of samples in components 0 (the other class), 1 and 2. "
             f"Sliced-W2 floor (fresh class samples): {floor:.4f}.", "",
             "| guidance | scale | comp. 0 (leak) | comp. 1 | comp. 2 | sliced-W2 [95 % interval] | overlaps cfg's |",
             "|---|---|---|---|---|---|---|"]
    for scale in SCALES:
        plain = None
        for name, wrapped in wrappers(model, guide, scale).items():
            x = unstir.sample(wrapped, None, x_T, sampler="dpm++2m", steps=20, y=1, dtype=torch.float64).x.detach()
            w = mode_weights(gm, x)
            iv = bootstrap(sliced_w2, ref, x, resamples=RESAMPLES, bounds=(0.0, float("inf")))
            plain = plain or iv
            lines.append(f"| {name} | {scale:g} | {w[0]:.3f} | {w[1]:.3f} | {w[2]:.3f} | {iv[0]:.4f} [{iv[1]:.4f}, "
                         f"{iv[2]:.4f}] | {'' if iv is plain else 'yes' if overlap(iv, plain) else 'no'} |")
            print(lines[-1], flush=True)
    return lines + [""]


def digits_part(steps: int, work: Path) -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("conditional", HERE / "conditional.py")
    conditional = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conditional)
    base = dict(data="digits", batch_size=128, lr=1e-3, warmup=200, ema_decay=0.999, class_conditional=True)
    runs = {}
    for name, length in (("digits_cond", steps), ("digits_cond_weak", steps // 5)):
        run = work / name
        if not (run / "checkpoint.json").exists():
            train(TrainConfig(steps=length, **{**base, "warmup": min(200, length // 10)}), run, progress=False)
        runs[name] = unstir.load_run(run)
    model, guide = runs["digits_cond"], runs["digits_cond_weak"]
    judge = conditional._judge()
    labels = torch.arange(10).repeat_interleave(conditional.PER_CLASS)
    x_T = model.process.prior_sample((len(labels), 1, 8, 8), torch.Generator().manual_seed(0))
    lines = ["## 2. Digits: accuracy and diversity against the scale", "",
             f"{conditional.PER_CLASS} samples per class, dpm++2m, 20 NFE, the same noise in every row; guide for "
             f"autoguidance: the same network after {steps // 5} of the {steps} steps.", "",
             "| guidance | scale | accuracy [95 % interval] | accuracy overlaps cfg's | diversity |",
             "|---|---|---|---|---|"]
    for scale in SCALES:
        plain = None
        for name, wrapped in wrappers(model, guide, scale).items():
            with torch.no_grad():
                x = unstir.sample(wrapped, None, x_T, steps=20, y=labels).x
            right = torch.as_tensor(judge.predict(((x.clamp(-1, 1) + 1) / 2).flatten(1).numpy())) == labels
            flags = right.double()[:, None]
            iv = bootstrap(lambda a, b: float(b.mean()), flags, flags, resamples=RESAMPLES, bounds=(0.0, 1.0))
            plain = plain or iv
            lines.append(f"| {name} | {scale:g} | {iv[0]:.3f} [{iv[1]:.3f}, {iv[2]:.3f}] | "
                         f"{'' if iv is plain else 'yes' if overlap(iv, plain) else 'no'} | "
                         f"{conditional._diversity(x, labels):.3f} |")
            print(lines[-1], flush=True)
    real = unstir.data.load("digits-test")
    lines.append(f"| held-out real digits | | {conditional._accuracy(judge, real.x, real.labels):.3f} | "
                 f"{conditional._diversity(real.x, real.labels):.3f} |")
    return lines + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=4000, help="oracle samples per row")
    ap.add_argument("--steps", type=int, default=2000, help="training steps of the digits model")
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    lines = ["# Guidance at high scales", "", f"`.venv/bin/python benchmarks/guidance.py --steps {args.steps}`", ""]
    lines += oracle_part(args.n)
    if not args.skip_digits:
        lines += digits_part(args.steps, args.work)
    lines.append(f"total {(time.perf_counter() - t0) / 60:.1f} min (training included when the runs are not in "
                 f"{args.work})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
