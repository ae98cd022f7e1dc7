"""Training quality and speed (a benchmark, not a test).

1. A 2-D oracle mixture: train, sample at 20 NFE, sliced-W2 to exact samples against the two-sample floor.
2. scikit-learn's digits: train the U-Net, save a grid of samples, and let a classifier trained on the
   real digits label them: class proportions and confidence.
3. Speed: training steps per second and the loop's overhead over a bare forward + backward pass.

    .venv/bin/python benchmarks/training.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import unstir
from unstir import data, figures, oracle
from unstir.losses import TimeSampler
from unstir.metrics import sliced_w2, two_sample_floor
from unstir.runs import load_run
from unstir.training import TrainConfig, build_net, train

HERE = Path(__file__).parent


def oracle_quality(steps: int, out: Path) -> list[str]:
    gm = oracle.unequal_2d()
    run = out / "oracle_run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(data="unequal_2d", steps=steps, n_data=50000)
    t0 = time.perf_counter()
    train(cfg, run, progress=False)
    seconds = time.perf_counter() - t0
    model = load_run(run)
    n = 4000
    exact = gm.sample(n, torch.Generator().manual_seed(1)).float()
    floor = float(np.mean(two_sample_floor(lambda i: gm.sample(n, torch.Generator().manual_seed(10 + i)), exact)))
    lines = [f"### 2-D oracle mixture (unequal_2d), {steps} steps in {seconds:.0f} s; floor {floor:.4f} (n={n})", "```"]
    for sampler in ("dpm++2m", "unipc", "ddim", "ddpm"):
        with torch.no_grad():
            r = unstir.sample(model, None, (n, 2), sampler=sampler, steps=20, generator=torch.Generator().manual_seed(0))
        sw = sliced_w2(r.x, exact)
        lines.append(f"{sampler:10s} NFE {r.nfe:3d}  sliced-W2 {sw:.4f}  = {sw / floor:.2f} x floor")
    lines.append("```")
    return lines


def digits_quality(steps: int, out: Path) -> list[str]:
    from sklearn.linear_model import LogisticRegression

    run = out / "digits_run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(data="digits", steps=steps, batch_size=128, lr=1e-3, warmup=200, ema_decay=0.999)
    t0 = time.perf_counter()
    train(cfg, run, progress=False)
    seconds = time.perf_counter() - t0
    model = load_run(run)
    with torch.no_grad():
        r = unstir.sample(model, None, (400, 1, 8, 8), sampler="dpm++2m", steps=20,
                          generator=torch.Generator().manual_seed(0))
    imgs = data.from_unit_range(r.x.clamp(-1, 1))
    figures.image_grid(imgs[:100], HERE / "digits_samples.png", ncol=10)
    real = data.digits()
    feats = ((real.x + 1) * 8).flatten(1).numpy()
    clf = LogisticRegression(max_iter=2000).fit(feats, real.labels.numpy())
    gen = ((r.x.clamp(-1, 1) + 1) * 8).flatten(1).numpy()
    proba = clf.predict_proba(gen)
    counts = np.bincount(proba.argmax(1), minlength=10) / len(gen)
    return [f"### digits: U-Net, {steps} steps in {seconds:.0f} s; 400 samples (dpm++2m, 20 NFE); grid in "
            "benchmarks/digits_samples.png", "```",
            f"class proportions (uniform = 0.10): {np.array2string(counts, precision=3)}",
            f"largest deviation from 0.10: {np.abs(counts - 0.1).max():.3f}",
            f"mean classifier confidence (max probability): {proba.max(1).mean():.3f}; "
            f"share with confidence > 0.9: {(proba.max(1) > 0.9).mean():.3f}",
            f"(the same classifier on the real digits: {clf.predict_proba(feats).max(1).mean():.3f})", "```"]


def speed(kind: str, steps: int = 200, repeats: int = 5, warmup: int = 10) -> str:
    """The training loop's cost over a bare forward + backward + AdamW step of the same network.

    End to end: steady-state steps/s of the real loop (``unstir.train``) against the bare step on a fixed
    batch, both after ``warmup`` steps; the two alternate ``repeats`` times and the best rate of each
    counts. On this shared 2-core machine single rates move by +-20%, so the work the loop adds per step
    is also timed piece by piece (best of 5 blocks): drawing the batch (indices, times, weights, noise),
    the perturbation x_t, gradient clipping and the EMA update."""
    cfg = TrainConfig(data=kind, steps=steps, batch_size=512 if kind == "moons" else 128, checkpoint_every=10**9,
                      log_every=warmup, n_data=20000)
    dataset = data.load(kind, n=20000)
    process = unstir.make_process("vp")
    net = build_net(cfg, dataset, process)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # as unstir.train configures it
    x, t = dataset.x[: cfg.batch_size], torch.rand(cfg.batch_size)

    def bare_step():
        opt.zero_grad(set_to_none=True)
        net(x, t).square().mean().backward()
        opt.step()

    loop, bare = 0.0, 0.0
    for _ in range(repeats):
        out = Path("/tmp/unstir_speed")
        shutil.rmtree(out, ignore_errors=True)
        train(cfg, out, progress=False)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        first, last = log[0], log[-1]  # the first entry is written after the warm-up steps
        loop = max(loop, (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"]))
        for _ in range(warmup):
            bare_step()
        t0 = time.perf_counter()
        for _ in range(steps - warmup):
            bare_step()
        bare = max(bare, (steps - warmup) / (time.perf_counter() - t0))

    g, times, ema = torch.Generator().manual_seed(0), TimeSampler(process, cfg.weighting), [p.detach().clone() for p in params]
    noise, t64 = torch.randn_like(x), t.double().clamp(process.t_min, process.T)

    def draw():
        idx = torch.randint(len(dataset.x), (cfg.batch_size,), generator=g)
        times.sample(cfg.batch_size, g)
        torch.randn(x.shape, generator=g)
        return dataset.x[idx]

    def ema_update():
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1e-3)

    bare_step()
    extras = {"batch draw": draw, "perturb": lambda: process.perturb(x, t64, noise),
              "clip": lambda: nn.utils.clip_grad_norm_(params, 1.0), "EMA": ema_update}
    ms = {name: _best_ms(fn) for name, fn in extras.items()}
    bare_ms = _best_ms(bare_step, 5 if kind == "digits" else 50)
    parts = ", ".join(f"{name} {v:.3f}" for name, v in ms.items())
    return (f"{kind:7s} batch {cfg.batch_size:4d}: loop {loop:7.1f} steps/s, bare forward+backward+AdamW "
            f"{bare:7.1f} steps/s, overhead {100 * (bare / loop - 1):5.1f}% (best of {repeats}, after {warmup} "
            f"warm-up steps)\n{'':7s} per step, timed alone (ms): bare step {bare_ms:.2f}; {parts}; "
            f"sum {sum(ms.values()):.3f} = {100 * sum(ms.values()) / bare_ms:.1f}% of the bare step")


def _best_ms(fn, n: int = 200, blocks: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = ap.parse_args()
    work = Path("/tmp/unstir_bench")
    work.mkdir(exist_ok=True)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads", "", "### training speed", "```",
             speed("moons", 50 if args.quick else 300), speed("digits", 20 if args.quick else 100), "```", ""]
    print("\n".join(lines), flush=True)
    for part in (oracle_quality(300 if args.quick else 6000, work), [""],
                 digits_quality(100 if args.quick else 2000, work)):
        print("\n".join(part), flush=True)
        lines += part
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
