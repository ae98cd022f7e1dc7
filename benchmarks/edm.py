"""EDM preconditioning against today's image recipe at equal steps, and FD against the post-hoc EMA length (a
benchmark, not a test; issue 33, items 1, 2 and 4).

For each family (shapes32, patches32) and recipe, one run of --steps optimizer steps from seed 0 with the same
U-Net, batch, learning rate and constant-decay EMA, storing EDM2's post-hoc EMA profiles (0.05, 0.10):

* ``rf-velocity``: today's recipe (benchmarks/images.py): rf, velocity prediction, logit-normal times;
* ``rf-edm``: rf with EDM's preconditioning (prediction 'edm', loss weight 1/c_out^2, log-normal sigma): the
  same process, so the difference is the parametrisation and its noise levels;
* ``ve-edm``: EDM as published: VE, prediction 'edm', 1/c_out^2, log-normal sigma (P_mean -1.2, P_std 1.2).

Each run's EMA weights draw --n samples (dpm++2m, 20 NFE, seeds 2424.., which chose nothing) and are scored in
the shapes32 factor classifier's features: validity (shapes32 only: patches32 has no judge of validity), FD,
KID, precision and recall with 95 % bootstrap intervals (--resamples), beside the real-vs-real floor at the same
n (held-out test images against training images). On patches32 these features were trained on shapes, not
photographs: FD and KID there compare the recipes with each other, not with any published figure. Bits/dim of
--likelihood-n held-out images (PF ODE, dequantised) on both. Then FD against the EMA length: `unstir ema`'s
reconstruction at each --sigma-rels from the snapshots, on shapes32.

    .venv/bin/python benchmarks/edm.py [--steps 1500] [--out benchmarks/edm_results.md]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import unstir
from unstir import data, quality
from unstir.distributed import sample_sharded
from unstir.ema import posthoc_run
from unstir.runs import load_run
from unstir.training import TrainConfig, train

EVAL_SEED = 2424
RECIPES = {
    "rf-velocity": dict(process="rf", prediction="velocity", time_sampling="logit-normal"),
    "rf-edm": dict(process="rf", prediction="edm", time_sampling="log-normal"),
    "ve-edm": dict(process="ve", prediction="edm", time_sampling="log-normal"),
}


def train_one(job) -> tuple[str, str, float]:
    family, recipe, steps, work, threads = job
    run = Path(work) / f"{family}-{recipe}"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    torch.set_num_threads(threads)
    cfg = TrainConfig(data=family, widths=(32, 64, 64), batch_size=32, lr=2e-3, steps=steps, ema_decay=0.999,
                      checkpoint_every=10**9, log_every=50, threads=threads, posthoc_ema=(0.05, 0.10),
                      **RECIPES[recipe])
    t0 = time.perf_counter()
    train(cfg, run, progress=False)
    return family, recipe, (time.perf_counter() - t0) / 60


def score(model_or_run, clf, reference, n, resamples, family):
    model = load_run(model_or_run) if isinstance(model_or_run, Path) else model_or_run
    with torch.no_grad():
        x, _ = sample_sharded(model, n, seed=EVAL_SEED, batch_size=250, sampler="dpm++2m", steps=20)
    return quality.shapes32_quality(x, clf, reference, resamples=resamples), x


def fmt(name, s, floor=None, shapes=True):
    iv = s.get("intervals", {})
    cell = lambda k, f: f"{s[k]:{f}} [{iv[k][0]:{f}}, {iv[k][1]:{f}}]" if k in iv else f"{s[k]:{f}}"  # noqa: E731
    parts = [f"| {name} |"]
    if shapes:
        parts.append(f" {cell('validity', '.3f')} |")
    parts += [f" {cell('fd', '.1f')} |", f" {1e3 * s['kid']:.2f} [{1e3 * iv['kid'][0]:.2f}, {1e3 * iv['kid'][1]:.2f}] |"
              if "kid" in iv else f" {1e3 * s['kid']:.2f} |", f" {cell('precision', '.3f')} |", f" {cell('recall', '.3f')} |"]
    if floor is not None:
        parts.append(" yes |" if quality.overlap((s["fd"], *iv["fd"]), (floor["fd"], *floor["intervals"]["fd"]))
                     else " no |")
    return "".join(parts)


def bits_per_dim(run: Path, family: str, n: int) -> tuple[float, float]:
    model = load_run(run)
    held = data.load(data.HELD_OUT[family], n=n, seed=7).x
    r = unstir.log_likelihood(model, held, levels=256, generator=torch.Generator().manual_seed(0))
    return r.mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--families", default="shapes32,patches32")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--likelihood-n", type=int, default=16)
    ap.add_argument("--sigma-rels", default="0.03,0.05,0.08,0.12,0.2")
    ap.add_argument("--parallel", type=int, default=2, help="runs trained at once, one thread each")
    ap.add_argument("--work", type=Path, default=Path("/tmp/unstir_edm"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    families, recipes = args.families.split(","), args.recipes.split(",")
    for r in recipes:
        if r not in RECIPES:
            ap.error(f"--recipes: {r!r} is not one of {sorted(RECIPES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    jobs = [(f, r, args.steps, str(args.work), 1) for f in families for r in recipes]
    minutes = {}
    with ProcessPoolExecutor(args.parallel) as pool:
        for family, recipe, m in pool.map(train_one, jobs):
            minutes[family, recipe] = m
            print(f"trained {family} {recipe}: {m:.1f} min", flush=True)
    torch.set_num_threads(2)
    from benchmarks_images import factor_classifier  # noqa: E402  (benchmarks/images.py, imported by path)

    clf = factor_classifier(args.work, torch.device("cpu"))
    lines = [f"torch {torch.__version__}, CPU, runs trained {args.parallel} at a time on one thread each; U-Net widths "
             f"32,64,64, batch 32, lr 2e-3 (cosine), EMA 0.999, {args.steps} steps, seed 0; {args.n} samples per row "
             f"(dpm++2m, 20 NFE, seeds {EVAL_SEED}.., which chose nothing); 95 % bootstrap intervals from "
             f"{args.resamples} resamples; KID x 1e3.", ""]
    for family in families:
        shapes = family == "shapes32"
        reference = data.load(family, n=args.n, seed=0).x
        real = data.load(data.HELD_OUT[family], n=args.n, seed=0).x
        floor = quality.shapes32_quality(real, clf, reference, resamples=args.resamples)
        head = "| recipe | " + ("validity | " if shapes else "") + "FD | KID | precision | recall | FD overlaps floor | " \
            "bits/dim | train min |"
        lines += [f"### {family}", "", head, "|" + "---|" * (head.count("|") - 1),
                  fmt("floor (held-out real)", floor, shapes=shapes) + " - | | |"]
        for recipe in recipes:
            run = args.work / f"{family}-{recipe}"
            s, _ = score(run, clf, reference, args.n, args.resamples, family)
            bpd, se = bits_per_dim(run, family, args.likelihood_n)
            lines.append(fmt(recipe, s, floor, shapes) + f" {bpd:.3f} +- {se:.3f} | {minutes[family, recipe]:.1f} |")
            print(lines[-1], flush=True)
        lines.append("")
    if "shapes32" in families:
        lines += ["### FD against the post-hoc EMA length (shapes32)", "",
                  "| recipe | sigma_rel | residual | validity | FD | KID |", "|---|---|---|---|---|---|"]
        reference = data.load("shapes32", n=args.n, seed=0).x
        for recipe in recipes:
            run = args.work / f"shapes32-{recipe}"
            for sr in (float(v) for v in args.sigma_rels.split(",")):
                out = args.work / f"shapes32-{recipe}-ema{sr:g}"
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                posthoc_run(run, sr, out)
                s, _ = score(out, clf, reference, args.n, args.resamples, "shapes32")
                res = load_run(out).run_info["posthoc"]["residual"]
                iv = s["intervals"]
                lines.append(f"| {recipe} | {sr:g} | {res:.1%} | {s['validity']:.3f} [{iv['validity'][0]:.3f}, "
                             f"{iv['validity'][1]:.3f}] | {s['fd']:.1f} [{iv['fd'][0]:.1f}, {iv['fd'][1]:.1f}] | "
                             f"{1e3 * s['kid']:.2f} |")
                print(lines[-1], flush=True)
    lines += ["", f"total {(time.perf_counter() - t_start) / 60:.1f} min. Reproduce: `.venv/bin/python benchmarks/edm.py "
              f"--steps {args.steps}`"]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("benchmarks_images", Path(__file__).with_name("images.py"))
    sys.modules["benchmarks_images"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["benchmarks_images"])
    main()
