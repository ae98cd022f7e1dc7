"""Image scale on shapes32 (a benchmark, not a test): quality against the floor as training goes on, bits/dim
against the compressor baselines, and training and sampling speed against diffusers.

1. A factor classifier (``unstir.quality``) is trained on fresh shapes32 draws (cached in --work); the floor is
   what held-out real images (shapes32-test) score against training images at the same sample size. Below it,
   the same real images changed in ways that keep every factor (noise, dimming, lighting, a 3x3 blur): how
   strict the judge is about what a sampler gets slightly wrong.
2. ``unstir.train`` on shapes32 for --minutes in all, in --segments equal parts, each resumed from the last
   (``--schedule cosine``: one run whose length fills the budget at a probe's rate, decaying to 0 at its end;
   ``constant``: each part lengthens the run, the learning rate stays); after each part the EMA weights sample --n images
   (dpm++2m, 20 NFE, per-sample seeds) and are scored: validity, coverage, class TV, FD, precision and recall.
   The learning curve says whether a missed goal is the time budget or the method. The last model is also
   sampled with ddpm (--ddpm-steps) and with each --screen sampler on other seeds (777..); the best of the
   screen by validity is then scored on the evaluation seeds, which never chose anything.
3. Bits/dim of held-out images (log_likelihood, default accuracy) beside the per-pixel categorical and
   lossless PNG / WebP on the same images.
4. Speed, same network and batch, the two sides alternating: training samples/s of ``unstir.train`` (from
   its log) against the plain diffusers loop (``UNet2DModel`` + ``DDPMScheduler.add_noise`` + MSE + AdamW),
   with diffusers' network at about the same parameter count and with unstir's; sampling time of
   ``unstir.sample`` against diffusers' DPMSolverMultistep loop at 20 NFE on the same network; and the
   trainer's options (bf16 autocast, channels_last, torch.compile) on a bare step; ``--speed-only`` runs only 4.

    .venv/bin/python benchmarks/images.py [--minutes 30] [--device cpu] [--out benchmarks/images_results.md]

Goals (issue 20): validity >= 0.9 and FD within 3x the floor after at most 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import unstir
from unstir import data, figures, nets, quality
from unstir.distributed import sample_sharded
from unstir.losses import TIME_SAMPLINGS, WEIGHTINGS
from unstir.parametrization import PREDICTIONS
from unstir.processes import PROCESSES
from unstir.runs import load_run
from unstir.samplers import SAMPLERS
from unstir.training import TrainConfig, train

HERE = Path(__file__).parent
CLASSIFIER_STEPS = 1500
EVAL_SEED = 2424  # sampling seeds; never used to choose a setting
SCREEN_SEED = 777  # sampling seeds on which --screen chooses a sampler


def factor_classifier(work: Path, device) -> quality.ShapesClassifier:
    from safetensors.torch import load_file, save_file

    path = work / f"factor-classifier-{CLASSIFIER_STEPS}.safetensors"
    if path.exists():
        clf = quality.ShapesClassifier()
        clf.load_state_dict(load_file(path))
    else:
        clf = quality.train_shapes_classifier(CLASSIFIER_STEPS, progress=True)
        save_file(clf.state_dict(), path)
    return clf.eval().to(device)


RESAMPLES = 200  # bootstrap resamples of every row's intervals (unstir.quality.bootstrap)
FLOOR: dict = {}  # the floor's scores, once measured: every later row says which of its intervals overlap it


def scores(x, clf, reference) -> dict:
    """``quality.shapes32_quality`` with 95 % intervals (KID: bootstrap; the rest: half-sampling)."""
    return quality.shapes32_quality(x, clf, reference, resamples=RESAMPLES)


def family_judge(family: str, work: Path, device, reference):
    """Scores of samples of a 32x32 family against ``reference`` images, with RESAMPLES intervals: shapes32 by the
    factor classifier (trained once, cached in ``work``), gratings32 in closed form (unstir.quality)."""
    if family == "shapes32":
        clf = factor_classifier(work, device)
        return lambda x: scores(x, clf, reference)
    return lambda x: quality.gratings32_quality(x, reference, resamples=RESAMPLES)


WORK = Path("/tmp/unstir_few_steps_images")  # where few_steps_images.py caches its teachers by default


def teacher_dir(work: Path, family: str, steps: int) -> Path:
    """The teacher of ``family`` that benchmarks/few_steps_images.py trains for ``steps`` steps and caches."""
    return work / f"{family}-teacher{steps}"


def add_cached_teacher_args(ap: argparse.ArgumentParser, n: int = 300) -> None:
    """--family, --steps, -n, --work and --reference of the scripts that screen on a cached teacher."""
    ap.add_argument("--family", default="shapes32", choices=["shapes32", "gratings32"])
    ap.add_argument("--steps", type=int, required=True, help="the cached teacher's training steps")
    ap.add_argument("-n", type=int, default=n)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--reference", type=int, default=500, help="real images the FD, KID and precision/recall "
                    "compare against (default 500, the screens' until 2026-12-07)")


def cached_teacher(args) -> tuple[Path, object]:
    """(the cached teacher's run folder, the judge of its family) for ``add_cached_teacher_args``' arguments;
    exits with the command that makes the teacher when there is none."""
    teacher = teacher_dir(args.work, args.family, args.steps)
    if not (teacher / "checkpoint.json").exists():
        raise SystemExit(f"no teacher in {teacher}: run benchmarks/few_steps_images.py --family {args.family} "
                         f"--steps {args.steps} --work {args.work} first")
    reference = data.load(args.family, n=args.reference, seed=0).x
    return teacher, family_judge(args.family, args.work, torch.device("cpu"), reference)


def fmt_scores(name: str, s: dict) -> str:
    """One row: each figure with its 95 % interval, and which of validity, FD and KID overlap the floor's (the
    samples cannot be told from held-out real images there, at this n)."""
    iv = s.get("intervals", {})

    def cell(k, f, scale=1.0):
        if k not in iv:
            return f"{scale * s[k]:{f}}"
        return f"{scale * s[k]:{f}} [{scale * iv[k][0]:{f}}, {scale * iv[k][1]:{f}}]"

    near = [k for k in ("validity", "fd", "kid") if FLOOR and k in iv and s is not FLOOR
            and quality.overlap((s[k], *iv[k]), (FLOOR[k], *FLOOR["intervals"][k]))]
    return (f"{name:28s} {cell('validity', '.3f'):>21s} {s['coverage']:8.3f} {s['class_tv']:8.3f} "
            f"{cell('fd', '.1f'):>20s} {cell('kid', '.2f', 1e3):>20s} {cell('precision', '.3f'):>21s} "
            f"{cell('recall', '.3f'):>21s}  {','.join(near) or '-'}")


HEADER = (f"{'':28s} {'validity [95% CI]':>21s} {'coverage':>8s} {'class TV':>8s} {'FD [95% CI]':>20s} "
          f"{'KID x1e3 [95% CI]':>20s} {'precision [95% CI]':>21s} {'recall [95% CI]':>21s}  overlaps floor")


def judge_check(clf, reference, real: torch.Tensor) -> list[str]:
    """Held-out real images, changed without changing a factor, scored like samples."""
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    c = real.shape[1]
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(real, (1, 1, 1, 1), mode="replicate"),
                                      k.to(real).expand(c, 1, 3, 3), groups=c)
    changed = [("  real + noise, std 0.04", real + 0.04 * torch.randn(real.shape, generator=g).to(real)),
               ("  real, colours x 0.95", real * 0.95),
               ("  real, non-black +0.05", real + 0.05 * (real > -1)),
               ("  real, 3x3 binomial blur", blur)]
    return [fmt_scores(name, scores(x, clf, reference)) for name, x in changed]


def parse_spec(spec: str) -> tuple[str, int, dict]:
    """'name:steps[:key=value...]', e.g. 'edm:50:churn=40' or 'ipndm:10:grid=edm', as (sampler, steps, options):
    a value that reads as a number is one, true/false a bool (e.g. 'afs=true'), comma-separated numbers an explicit
    grid of times (e.g. 'grid=0.999,0.7,0.3,0', a descending tensor; steps must then be its number of intervals),
    any other (a grid name) a string."""
    name, steps, *kv = spec.split(":")

    def value(v: str):
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        if "," in v:
            times = torch.tensor([float(u) for u in v.split(",")], dtype=torch.float64)
            if len(times) != int(steps) + 1:
                raise ValueError(f"{spec}: an explicit grid of {len(times)} times has {len(times) - 1} steps, "
                                 f"not {steps}")
            return times
        try:
            return float(v)
        except ValueError:
            return v

    return name, int(steps), {k: value(v) for k, v in (item.split("=") for item in kv)}


def screen(args, model, clf, reference) -> list[str]:
    """Each --screen sampler on seeds SCREEN_SEED; the one with the highest validity there is then scored on the
    evaluation seeds, which took no part in the choice."""
    lines, best = [], None
    for spec in args.screen:
        name, steps, opts = parse_spec(spec)
        t0 = time.perf_counter()
        with torch.no_grad():
            x, nfe = sample_sharded(model, args.n, seed=SCREEN_SEED, batch_size=250, device=args.device,
                                    sampler=name, steps=steps, **opts)
        s = scores(x.to(args.device), clf, reference)
        lines.append(fmt_scores(f"  {spec} [{SCREEN_SEED}..]", s) + f"   NFE {nfe}, {time.perf_counter() - t0:.0f} s")
        print(lines[-1], flush=True)
        best = max(best or (s["validity"], spec), (s["validity"], spec))
    name, steps, opts = parse_spec(best[1])
    with torch.no_grad():
        x, nfe = sample_sharded(model, args.n, seed=EVAL_SEED, batch_size=250, device=args.device,
                                sampler=name, steps=steps, **opts)
    lines.append(fmt_scores(f"  chosen: {best[1]}", scores(x.to(args.device), clf, reference)) +
                 f"   NFE {nfe}, seeds {EVAL_SEED}..")
    print(lines[-1], flush=True)
    return lines


def train_and_score(args, clf, reference) -> tuple[list[str], Path, float]:
    run = args.work / "run"
    widths = tuple(int(w) for w in (args.diffusers_widths if args.net == "diffusers" else args.widths).split(","))
    base = dict(data="shapes32", net=args.net, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.schedule,
                ema_decay=args.ema, weighting=args.weighting, process=args.process, time_sampling=args.time_sampling,
                prediction=args.prediction, widths=widths, checkpoint_every=10**9, log_every=50,
                device=args.device, threads=args.threads)
    lines, rate, elapsed, steps = [], None, 0.0, 0
    budget = args.minutes * 60 / args.segments
    for part in range(args.segments):
        if rate is None:  # a probe of the real loop sets the run's length: its rate from step 20 to 80 (a
            # 20-step probe read 4.1 steps/s where the run then kept 2.5-3, so runs overran the budget by 40%)
            probe = args.work / "probe"
            t0 = time.perf_counter()
            train(TrainConfig(**{**base, "steps": 80, "warmup": 0, "log_every": 20}), probe, progress=False)
            log = [json.loads(line) for line in (probe / "log.jsonl").read_text().splitlines()]
            rate = (log[-1]["step"] - log[0]["step"]) / (log[-1]["elapsed_s"] - log[0]["elapsed_s"])
            budget -= (time.perf_counter() - t0) / args.segments
            # cosine: one run whose length fills the whole budget at the probe's rate, stopped (with a
            # checkpoint) after each part; constant: each part extends the run by its share of the budget.
            total = args.segments * max(2, int(rate * budget))
            if args.steps:  # a length given (another run's, for a comparison at equal steps)
                total, rate = args.steps, args.steps / (budget * args.segments)
        stop, previous = None, steps
        if args.schedule == "constant":
            steps += max(2, int(rate * budget))
            length = steps
        else:
            steps, length = total * (part + 1) // args.segments, total
            stop = steps - previous
            base["checkpoint_every"] = total // args.segments
        base.setdefault("warmup", min(200, steps // 2))  # fixed by the first part (a resumed run keeps it)
        t0 = time.perf_counter()
        train(TrainConfig(**{**base, "steps": length}), run, resume=part > 0, progress=False, stop_after=stop)
        elapsed += time.perf_counter() - t0
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        rate = log[-1]["steps_per_s"] if log else rate
        model = load_run(run, device=args.device)
        with torch.no_grad():
            x, nfe = sample_sharded(model, args.n, seed=EVAL_SEED, batch_size=250, device=args.device,
                                    sampler="dpm++2m", steps=20)
        s = scores(x.to(args.device), clf, reference)
        lines.append(fmt_scores(f"step {steps:5d} ({elapsed / 60:4.1f} min)", s) +
                     f"   loss {sum(e['loss'] for e in log[-5:]) / len(log[-5:]) if log else float('nan'):.4f}, "
                     f"{100 * (x.abs() > 1.02).double().mean():.1f}% of values outside [-1, 1]")
        print(lines[-1], flush=True)
    lines.append(f"training: {steps} steps in {elapsed / 60:.1f} min ({steps / elapsed:.2f} steps/s), budget "
                 f"{args.minutes:g} min" + ("" if elapsed <= 1.1 * args.minutes * 60 else " (OVER BUDGET: the machine "
                                             "ran slower than the probe, or --steps asked for more)"))
    print(lines[-1], flush=True)
    if args.ddpm_steps:  # the last model again with the stochastic ancestral sampler (same seeds)
        with torch.no_grad():
            xs, _ = sample_sharded(model, args.n, seed=EVAL_SEED, batch_size=250, device=args.device,
                                   sampler="ddpm", steps=args.ddpm_steps)
        lines.append(fmt_scores(f"  same, ddpm {args.ddpm_steps} steps", scores(xs.to(args.device), clf,
                                                                                       reference)))
        print(lines[-1], flush=True)
    if args.screen:
        lines += screen(args, model, clf, reference)
    figures.image_grid(data.from_unit_range(x[:64].clamp(-1, 1)), args.work / "samples.png")
    return lines, run, rate * args.batch_size


def bits_per_dim(run: Path, n: int, device) -> list[str]:
    model = load_run(run, device=device)
    held = data.load("shapes32-test", n=n, seed=7).x
    t0 = time.perf_counter()
    r = unstir.log_likelihood(model, held.to(device), levels=256, generator=torch.Generator().manual_seed(0))
    bpd, se = r.mean()
    train_x = data.shapes32(20000, 0).x
    return [f"{n} held-out shapes32-test images ({time.perf_counter() - t0:.0f} s, {r.nfe} evaluations):",
            f"  unstir (PF ODE, dequantised)   {bpd:.3f} +- {se:.3f} bits/dim",
            f"  per-pixel categorical (KT)     {quality.categorical_bits_per_dim(train_x, held):.3f}",
            f"  PNG (lossless, optimised)      {quality.file_bits_per_dim(held, 'PNG'):.3f}",
            f"  WebP (lossless, method 6)      {quality.file_bits_per_dim(held, 'WEBP'):.3f}"]


def diffusers_unet(widths):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
                       norm_num_groups=8)


def plain_loop(net, call, batch: int, device, steps: int = 12, lr: float = 1e-4, seed: int = 0):
    """The plain diffusers training loop (add_noise, MSE on eps, AdamW) for ``steps`` steps: (samples/s, the
    median step after the first; the eps MSE on a fixed held-out batch at the end)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr)
    train_x = data.shapes32(4096, 1).x
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x0 = train_x[torch.randint(len(train_x), (batch,))].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        loss = torch.nn.functional.mse_loss(call(net, sched.add_noise(x0, noise, t), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    held = data.load("shapes32-test", n=256, seed=11).x.to(device)
    g = torch.Generator().manual_seed(12)
    noise, t = torch.randn(held.shape, generator=g).to(device), torch.arange(256, device=device) * 1000 // 256
    with torch.no_grad():
        held_loss = torch.nn.functional.mse_loss(call(net, sched.add_noise(held, noise, t), t), noise).item()
    return batch / sorted(times[1:])[len(times[1:]) // 2], held_loss


def _seeded(factory, seed: int):
    torch.manual_seed(100 + seed)  # the network's initial weights
    return factory()


def speed(args, unstir_rate: float) -> list[str]:
    import diffusers

    widths = tuple(int(w) for w in args.widths.split(","))
    their_widths = tuple(int(w) for w in args.diffusers_widths.split(","))
    fresh = {"ours": lambda: nets.UNet(3, 32, widths).to(args.device),
             "theirs": lambda: diffusers_unet(their_widths).to(args.device)}
    calls = {"ours": lambda net, x, t: net(x, (t.float() + 1) / 1000),  # unstir's net takes t in (0, 1]
             "theirs": lambda net, x, t: net(x, t).sample}
    size = {k: sum(p.numel() for p in f().parameters()) for k, f in fresh.items()}
    rates = {"ours": [], "theirs": []}
    for _ in range(3):  # alternate, keep the best of each
        for k in rates:
            rates[k].append(plain_loop(fresh[k](), calls[k], args.batch_size, args.device)[0])
    rate = {k: max(v) for k, v in rates.items()}
    # Loss after equal steps, and after equal time (unstir's U-Net gets the steps it takes in diffusers' time),
    # each the mean over two seeds of network and batches.
    equal_time = round(args.compare_steps * rate["ours"] / rate["theirs"])
    runs = {"ours": args.compare_steps, "theirs": args.compare_steps, "ours, equal time": equal_time}

    def held_loss(k, steps):
        net = k.split(",")[0]
        return sum(plain_loop(_seeded(fresh[net], seed), calls[net], args.batch_size, args.device, steps, lr=1e-3,
                              seed=seed)[1] for seed in (0, 1)) / 2

    loss = {k: held_loss(k, steps) for k, steps in runs.items()}
    lines = [f"training, batch {args.batch_size}, diffusers {diffusers.__version__} (samples/s; plain loop = "
             "UNet2DModel-style loop: DDPMScheduler.add_noise + MSE on eps + AdamW):",
             f"  unstir.train, unstir U-Net {args.widths} ({size['ours']:,} params)         {unstir_rate:8.1f}",
             f"  plain loop, unstir U-Net                                  {rate['ours']:8.1f}   "
             f"unstir.train / this = {unstir_rate / rate['ours']:.2f}",
             f"  plain loop, UNet2DModel {args.diffusers_widths} ({size['theirs']:,} params) {rate['theirs']:8.1f}   "
             f"unstir.train / this = {unstir_rate / rate['theirs']:.2f}",
             f"held-out eps MSE after {args.compare_steps} plain-loop steps at lr 1e-3 (same data and batches; mean of "
             f"seeds 0 and 1): unstir U-Net {loss['ours']:.4f}, UNet2DModel {loss['theirs']:.4f}; after equal time "
             f"(unstir U-Net {equal_time} steps): {loss['ours, equal time']:.4f}"]
    ours = fresh["ours"]()
    # Sampling: the same network in both loops, 20 evaluations, batch --n.
    from diffusers import DPMSolverMultistepScheduler

    model = unstir.Denoiser(ours.eval(), unstir.make_process("vp"), data_shape=(3, 32, 32))
    z = torch.randn(args.n, 3, 32, 32, device=args.device)

    def theirs_sample():
        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000)
        sched.set_timesteps(20)
        x = z.clone()
        for t in sched.timesteps:
            x = sched.step(ours(x, (torch.full((len(x),), float(t), device=x.device) + 1) / 1000), t, x).prev_sample
        return x

    def ours_sample():
        return unstir.sample(model, None, z, sampler="dpm++2m", steps=20).x

    best = {"ours": math.inf, "theirs": math.inf}
    with torch.no_grad():
        for _ in range(3):
            for name, fn in (("ours", ours_sample), ("theirs", theirs_sample)):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    lines += [f"sampling {args.n} images, 20 NFE, the same U-Net (s): unstir dpm++2m {best['ours']:.2f}, diffusers "
              f"DPMSolverMultistep loop {best['theirs']:.2f}, ratio {best['ours'] / best['theirs']:.2f}"]
    return lines


def options(args) -> list[str]:
    """The trainer's image options on a bare forward + backward + AdamW step of the benchmark's U-Net (median
    of 6 after 2; compile: after its first call, whose time is the compile time): fp32, bf16 autocast,
    channels_last and torch.compile, the same batch."""
    widths = tuple(int(w) for w in args.widths.split(","))
    x, t = data.shapes32(args.batch_size, 3).x.to(args.device), torch.rand(args.batch_size, device=args.device)

    def step_ms(bf16=False, layout=torch.contiguous_format, compile=False):
        torch.manual_seed(0)
        net = nets.UNet(3, 32, widths).to(args.device, memory_format=layout)
        opt = torch.optim.AdamW(net.parameters(), 1e-4)
        call = torch.compile(net) if compile else net
        xx, times = x.contiguous(memory_format=layout), []
        for _ in range(8):
            t0 = time.perf_counter()
            with torch.autocast(args.device.type, torch.bfloat16, enabled=bf16):
                loss = (call(xx, t).float() - xx).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times[2:])[len(times[2:]) // 2], 1e3 * times[0]

    base, _ = step_ms()
    lines = [f"trainer options, bare step of the U-Net ({args.widths}), batch {args.batch_size} (ms; ratio to fp32):",
             f"  fp32                 {base:8.1f}"]
    print("\n".join(lines), flush=True)
    for name, kw in (("bf16 autocast", {"bf16": True}), ("channels_last", {"layout": torch.channels_last}),
                     ("torch.compile", {"compile": True})):
        try:
            ms, first = step_ms(**kw)
            extra = f"   (first call {first / 1e3:.1f} s)" if name == "torch.compile" else ""
            lines.append(f"  {name:20s} {ms:8.1f}   {ms / base:5.2f}{extra}")
        except Exception as err:  # a compiler that is missing here: say so, do not stop the benchmark
            lines.append(f"  {name:20s} failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        print(lines[-1], flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget in all (default 30)")
    ap.add_argument("--steps", type=int, default=0, help="the run's length in steps (default: what --minutes buy at a "
                    "probe's rate; with --schedule cosine)")
    ap.add_argument("--segments", type=int, default=3, help="evaluate after each of this many equal parts")
    ap.add_argument("--net", default="unstir", choices=["unstir", "diffusers"],
                    help="the network trained: unstir's U-Net (--widths) or diffusers' UNet2DModel (--diffusers-widths)")
    ap.add_argument("--ddpm-steps", type=int, default=100,
                    help="also score the last model with ddpm ancestral sampling at this many steps (0: no)")
    ap.add_argument("--screen", type=lambda v: [x for x in v.split(",") if x],
                    default="",
                    help=f"samplers tried on the last model with seeds {SCREEN_SEED}.. as name:steps[:key=value], "
                         f"comma-separated, e.g. ddpm:100,ddpm:200,edm:50:churn=40; the best by validity is then scored on the "
                         f"evaluation seeds (default: none; each row costs minutes on a CPU)")
    ap.add_argument("--widths", default="32,64,64")
    ap.add_argument("--diffusers-widths", default="32,48,56", help="UNet2DModel widths of about the same size")
    ap.add_argument("--compare-steps", type=int, default=300, help="plain-loop steps of each network for the loss")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="peak learning rate (default 2e-3: validity 0.97 against 0.87 for 1e-3 at equal steps, "
                         "images_results.md)")
    ap.add_argument("--process", default="rf", choices=sorted(PROCESSES),
                    help="forward process (default rf: flow matching learned fastest, images_results.md)")
    ap.add_argument("--prediction", default="velocity", choices=list(PREDICTIONS),
                    help="network output (default velocity)")
    ap.add_argument("--weighting", default="auto", choices=["auto", *WEIGHTINGS],
                    help="loss weighting (default: velocity for --prediction velocity, else simple)")
    ap.add_argument("--time-sampling", default="logit-normal", choices=list(TIME_SAMPLINGS),
                    help="training times: logit-normal (Esser et al. 2024; default: validity 0.87 against 0.82 "
                         "at equal steps, images_results.md) or uniform (better bits/dim)")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampled weights (default 0.999)")
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                    help="learning rate after warm-up: cosine to 0 at the budget's end (default) or constant")
    ap.add_argument("--no-speed", action="store_true", help="leave out the speed parts (parts 4)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-n", type=int, default=500, help="samples per evaluation (and for the floor)")
    ap.add_argument("--likelihood-n", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/unstir_images"))
    ap.add_argument("--out", type=Path, help="also write the report to this markdown file")
    ap.add_argument("--speed-only", action="store_true", help="only the speed parts: the trainer's options (bf16, ...) and the "
                    "diffusers comparison (the unstir.train rate is left out)")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    if args.net == "diffusers" and not (args.no_speed or args.speed_only):
        ap.error("--net diffusers needs --no-speed: the speed part's 'unstir.train' row times unstir's U-Net")
    for spec in args.screen:  # before any work
        try:
            name, steps, _ = parse_spec(spec)
        except ValueError:
            ap.error(f"--screen: {spec!r} is not name:steps[:key=value...]")
        if name not in SAMPLERS or steps < 1:
            ap.error(f"--screen: {spec!r} needs a sampler of {sorted(SAMPLERS)} and steps >= 1")
    if args.speed_only:
        print("\n".join(speed(args, float("nan"))), flush=True)
        options(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    for stale in ("run", "probe"):
        import shutil

        shutil.rmtree(args.work / stale, ignore_errors=True)
    t_start = time.perf_counter()
    clf = factor_classifier(args.work, args.device)
    reference = data.shapes32(args.n, 0).x.to(args.device)
    real = data.load("shapes32-test", n=args.n).x.to(args.device)
    lines = [f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; net {args.net}, widths "
             f"{args.diffusers_widths if args.net == 'diffusers' else args.widths}, "
             f"batch {args.batch_size}, lr {args.lr} ({args.schedule}), process {args.process}, {args.prediction} prediction, {args.weighting} weighting, {args.time_sampling} t, EMA {args.ema}; "
             f"{args.minutes:g} min of training; {args.n} samples per row; "
             f"sampling seeds {EVAL_SEED}.. (never used to choose a setting); 95 % intervals from {RESAMPLES} "
             f"resamples (KID: bootstrap; the rest: half-sampling, unstir.quality.bootstrap); 'overlaps floor' lists the "
             f"figures whose interval overlaps the held-out real images' (not told apart at this n)", "", "```", HEADER,
             fmt_scores("floor (shapes32-test)", FLOOR.update(scores(real, clf, reference)) or FLOOR),
             *judge_check(clf, reference, real)]
    print("\n".join(lines), flush=True)
    curve, run, rate = train_and_score(args, clf, reference)
    lines += curve + ["```", "", "```"]
    for part in (bits_per_dim(run, args.likelihood_n, args.device), [""],
                 [] if args.no_speed else speed(args, rate)):
        print("\n".join(part), flush=True)
        lines += part
    if not args.no_speed:
        lines += options(args)  # prints as it goes (torch.compile takes minutes on a CPU)
    lines += ["```", f"total {(time.perf_counter() - t_start) / 60:.1f} min; samples of the last row: "
              f"{args.work / 'samples.png'}"]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
