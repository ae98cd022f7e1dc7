"""The two demonstrations behind `unstir demo` and `unstir oracle`: a trained model and the exact score,
each sampled with several samplers and compared with data, with figures."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import figures, oracle
from ._checks import check_device
from .metrics import mode_weights, sliced_w2, two_sample_floor
from .processes import make_process
from .samplers import sample

DEMO_SAMPLERS = ("ddpm", "ddim", "euler_maruyama", "pc", "dpm++2m", "unipc")


def _flag(name: str) -> str:
    """The option as the user typed it: -n, --train-steps."""
    return "-n" if name == "n" else "--" + name.replace("_", "-")


ORACLE_FIGURES = ("marginals.png", "samples.png", "trajectories.png")
DEMO_FIGURES = ("samples.png", "trajectories.png")


def oracle_demo(args) -> int:
    """The core on the exact score of a Gaussian mixture: marginals, score field, samplers, trajectories."""
    for name in ("n", "steps", "paths"):
        if getattr(args, name) < 1:
            raise ValueError(f"{_flag(name)} must be a positive integer, got {getattr(args, name)}")
    if args.paths > args.n:
        raise ValueError(f"--paths ({args.paths}) cannot exceed -n ({args.n})")
    process = make_process(args.process)
    device = check_device(args.device)
    mixture = oracle.random_mixture(2, 5, seed=args.seed) if args.data == "random" else oracle.EXAMPLES[args.data]()
    mixture = mixture.to(device)
    out = figure_folder(args, ORACLE_FIGURES)
    model = mixture.denoiser(process)
    n, steps = args.n, args.steps
    t_show = [process.t_min, 0.1 * process.T, 0.3 * process.T, 0.6 * process.T, process.T]
    figures.marginals_and_scores(mixture, process, t_show, out / "marginals.png")

    exact = mixture.sample(n, torch.Generator().manual_seed(args.seed)).float()
    floors = two_sample_floor(lambda i: mixture.sample(n, torch.Generator().manual_seed(args.seed + 10 + i)), exact)
    x_T = process.prior_sample((n, 2), torch.Generator().manual_seed(args.seed + 2), device=device)
    panels = {"exact p_0": exact}
    rows = []
    for name in tqdm(DEMO_SAMPLERS, desc="sampling", unit="sampler", disable=args.quiet):
        start = time.perf_counter()
        r = sample(model, process, x_T, sampler=name, steps=steps, generator=torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
        panels[f"{name} ({r.nfe} NFE)"] = r.x
        w_err = (mode_weights(mixture, r.x) - mixture.weights).abs().max().item()
        rows.append((name, r.nfe, sliced_w2(r.x, exact), w_err, seconds))
    figures.scatter_panels(panels, out / "samples.png")

    few = x_T[: args.paths]
    figures.trajectories(_sde_and_ode_paths(model, few, steps, args.seed), out / "trajectories.png")

    print(f"\n{mixture!r} data '{args.data}', process {process!r}, {n} samples, {steps} steps")
    print(f"sliced-W2 two-sample floor: {_floor_text(floors)}\n")
    print(f"{'sampler':16s} {'NFE':>4s} {'sliced-W2':>10s} {'mode-weight err':>16s} {'seconds':>8s}")
    for name, nfe, sw2, w_err, seconds in rows:
        print(f"{name:16s} {nfe:4d} {sw2:10.4f} {w_err:16.4f} {seconds:8.2f}")
    print(f"\nfigures: {out / 'marginals.png'}, {out / 'samples.png'}, {out / 'trajectories.png'}")
    return 0


def _sde_and_ode_paths(model, x_T, steps: int, seed: int) -> dict:
    """Reverse-SDE and PF-ODE trajectories from the same noise, for ``figures.trajectories``."""
    paths = {}
    for label, name, n in (("reverse SDE (Euler-Maruyama)", "euler_maruyama", 200),
                           ("PF ODE (DPM-Solver++ 2M)", "dpm++2m", steps)):
        ts, xs = [], []
        with torch.no_grad():
            result = sample(model, None, x_T, sampler=name, steps=n, generator=torch.Generator().manual_seed(seed),
                            callback=lambda s: (ts.append(s["t"]), xs.append(s["x"])))
        paths[label] = (ts + [0.0], torch.stack(xs + [result.x]))
    return paths


MAIN_SAMPLERS = {"ddpm": 50, "ddim": 20, "euler_maruyama": 50, "pc": 25, "dpm++2m": 20}


def _floor_text(floors: list[float]) -> str:
    return f"{sum(floors) / len(floors):.4f}, range {min(floors):.4f}-{max(floors):.4f} over {len(floors)} fresh samples"


DEFAULT_PARENT = "runs"  # the defaults (runs/demo, runs/oracle) may create it; any other --out's parent must exist


def figure_folder(args, names) -> Path:
    """--out of demo and oracle, checked before any work: its parent exists (as for every other --out; only the
    default's ``runs/`` is created), and the figures ``names`` it would write are not there already unless
    --force. Returns the folder, created."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder for the figures")
    if not out.parent.is_dir() and str(out.parent) != DEFAULT_PARENT:
        raise ValueError(f"the folder of --out, {str(out.parent)!r}, does not exist; create it first")
    there = [name for name in names if (out / name).exists()]
    if there and not getattr(args, "force", False):
        raise ValueError(f"{str(out)!r} already holds {', '.join(there)}; pass --force to replace them or choose "
                         f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fresh_run(args) -> Path:
    """OUT/run, emptied when it holds an earlier run and --force is given."""
    run = Path(args.out) / "run"
    if run.exists():
        # Never delete what unstir did not make: only a run folder (run.json), and only when asked to.
        if not args.force:
            raise ValueError(f"{str(run)!r} already exists; pass --force to replace it or choose another --out")
        if not (run / "run.json").exists():
            raise ValueError(f"{str(run)!r} exists and is not a unstir run folder; refusing to delete it even with --force")
        shutil.rmtree(run)
    return run


def demo(args) -> int:
    """The main job: train a score model on 2-D data, sample it with DDPM, DDIM, the reverse SDE,
    predictor-corrector and DPM-Solver++, and compare each to held-out data. With --images: 600 steps of
    shapes32 (32x32 colour) training (about 2 minutes on 2 CPU cores), its samples scored against the floor
    of real images."""
    from .data import toy_2d
    from .runs import load_run
    from .training import TrainConfig, train

    if args.train_steps is None:
        args.train_steps = IMAGE_DEMO_STEPS if args.images else 3000
    if args.n is None:
        args.n = IMAGE_DEMO_N if args.images else 2000
    if args.process is None:  # flow matching on images: it learned shapes32 fastest (benchmarks/images_results.md)
        args.process = "rf" if args.images else "vp"
    for name in ("n", "train_steps", "paths", "classifier_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{_flag(name)} must be a positive integer, got {getattr(args, name)}")
    if args.images:
        if args.data is not None:
            raise ValueError(f"--images trains on shapes32; --data {args.data} names a 2-D set (leave it out)")
        return image_demo(args)
    args.data = args.data or "moons"
    out = figure_folder(args, DEMO_FIGURES)
    run = _fresh_run(args)
    cfg = TrainConfig(data=args.data, process=args.process, steps=args.train_steps, seed=args.seed,
                      batch_size=512, device=args.device)
    print(f"training on '{args.data}' ({args.process}, {args.train_steps} steps, batch {cfg.batch_size})")
    result = train(cfg, run, progress=not args.quiet)
    model = load_run(run, device=args.device)
    held_out = toy_2d(args.data, args.n, seed=args.seed + 1000)
    floors = two_sample_floor(lambda i: toy_2d(args.data, args.n, seed=args.seed + 2000 + i), held_out)
    x_T = model.process.prior_sample((args.n, 2), torch.Generator().manual_seed(args.seed), device=args.device)
    panels, rows = {"held-out data": held_out}, []
    for name, steps in tqdm(MAIN_SAMPLERS.items(), desc="sampling", unit="sampler", disable=args.quiet):
        with torch.no_grad():
            r = sample(model, None, x_T, sampler=name, steps=steps, generator=torch.Generator().manual_seed(args.seed))
        panels[f"{name} ({r.nfe} NFE)"] = r.x.cpu()
        rows.append((name, r.nfe, sliced_w2(r.x.cpu(), held_out)))
    figures.scatter_panels(panels, out / "samples.png")
    figures.trajectories(_sde_and_ode_paths(model, x_T[: args.paths], 20, args.seed), out / "trajectories.png")
    rate = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["steps_per_s"]
    print(f"\ntrained {result.step} steps at {rate:.0f} steps/s; run folder {run}")
    print(f"sliced-W2 to {args.n} held-out points (two-sample floor {_floor_text(floors)}):")
    print(f"{'sampler':16s} {'NFE':>4s} {'sliced-W2':>10s}")
    for name, nfe, sw2 in rows:
        print(f"{name:16s} {nfe:4d} {sw2:10.4f}")
    print(f"\nfigures: {out / 'samples.png'}, {out / 'trajectories.png'}")
    return 0


IMAGE_DEMO_STEPS, IMAGE_DEMO_N = 600, 500


def image_demo(args) -> int:
    """shapes32: train the U-Net (widths 32,64,64, batch 32; by default flow matching, --process rf with a
    velocity prediction and logit-normal training times) for --train-steps, sample -n images with
    DPM-Solver++(2M) at 20 NFE, and score them with the factor classifier (``unstir.quality``; trained for
    --classifier-steps and kept in OUT) against held-out real images: validity, coverage, FD, precision and
    recall. A few minutes is far from converged: the numbers say how far."""
    from safetensors.torch import load_file, save_file

    from . import data, quality
    from .distributed import sample_sharded
    from .runs import load_run
    from .training import TrainConfig, train

    out = figure_folder(args, ("samples.png",))
    run = _fresh_run(args)
    cfg = TrainConfig(data="shapes32", process=args.process, steps=args.train_steps, seed=args.seed,
                      prediction="velocity" if args.process == "rf" else "eps",
                      # logit-normal times (Esser et al. 2024) learned shapes32 faster (benchmarks/images_results.md)
                      time_sampling="logit-normal" if args.process == "rf" else "uniform",
                      widths=(32, 64, 64), batch_size=32, lr=1e-3, warmup=min(200, args.train_steps // 10),
                      device=args.device)
    print(f"training on 'shapes32' ({args.process}, {cfg.prediction} prediction, {cfg.time_sampling} times, "
          f"{args.train_steps} steps, "
          f"batch {cfg.batch_size}, U-Net widths 32,64,64)")
    train(cfg, run, progress=not args.quiet)
    weights = out / f"factor-classifier-{args.classifier_steps}.safetensors"
    clf = quality.ShapesClassifier()
    if weights.exists():
        clf.load_state_dict(load_file(weights))
    else:
        clf = quality.train_shapes_classifier(args.classifier_steps, seed=args.seed, progress=not args.quiet)
        save_file(clf.state_dict(), weights)
    clf.eval()
    model = load_run(run, device=args.device)
    with torch.no_grad():
        x, nfe = sample_sharded(model, args.n, seed=args.seed, batch_size=250, sampler="dpm++2m", steps=20,
                                progress=not args.quiet, device=args.device)
    figures.image_grid(data.from_unit_range(x[:64].clamp(-1, 1)), out / "samples.png")
    reference = data.shapes32(args.n, args.seed + 1).x
    rows = {"held-out real (floor)": quality.shapes32_quality(data.load("shapes32-test", n=args.n, seed=args.seed).x,
                                                              clf, reference),
            f"dpm++2m ({nfe} NFE)": quality.shapes32_quality(x, clf, reference)}
    rate = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["steps_per_s"]
    print(f"\ntrained {args.train_steps} steps at {rate:.1f} steps/s; run folder {run}")
    print(f"{args.n} samples against {args.n} training images, in the factor classifier's features "
          f"({weights.name}):")
    print(f"{'':24s} {'validity':>8s} {'coverage':>8s} {'FD':>8s} {'precision':>9s} {'recall':>7s}")
    for name, q in rows.items():
        print(f"{name:24s} {q['validity']:8.3f} {q['coverage']:8.3f} {q['fd']:8.1f} {q['precision']:9.3f} "
              f"{q['recall']:7.3f}")
    print(f"\nsamples: {out / 'samples.png'}; a longer run: benchmarks/images.py")
    return 0
