"""The `unstir` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import figures, oracle
from .demos import demo, oracle_demo
from .grids import GRIDS
from .losses import WEIGHTINGS
from .parametrization import PREDICTIONS
from .processes import PROCESSES
from .samplers import SAMPLERS, sample

def train_cmd(args) -> int:
    """Train a score model by denoising score matching and write a run folder (safetensors checkpoints,
    config, log.jsonl). Under `torchrun --nproc_per_node=N` the same command trains data-parallel (DDP),
    each process on its own shard of every global batch."""
    from .training import TrainConfig, train

    fields = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    result = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run folder: {result.run} (step {result.step})")
    return 0


def sample_cmd(args) -> int:
    """Sample from a trained run and write a PNG (grid of images or scatter plot) or a .npy array."""
    from .data import from_unit_range
    from .runs import load_run

    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        raise SystemExit(f"--out must end in .png or .npy, got {str(out)!r}")
    model = load_run(args.run, ema=not args.no_ema, device=args.device)
    shape = (args.n, *model.data_shape)
    with torch.no_grad():
        r = sample(model, None, shape, sampler=args.sampler, steps=args.steps, grid=args.grid,
                   generator=torch.Generator().manual_seed(args.seed))
    x = r.x.cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, x.numpy())
    elif x.ndim == 4:
        figures.image_grid(from_unit_range(x), out)
    else:
        figures.scatter_panels({f"{args.sampler} ({r.nfe} NFE)": x[:, :2]}, out)
    print(f"{args.n} samples with {args.sampler} ({r.nfe} model evaluations) -> {out}")
    return 0


def list_choices(args) -> int:
    print("processes:", ", ".join(sorted(PROCESSES)))
    print("grids:    ", ", ".join(GRIDS))
    print("samplers:")
    for name, spec in SAMPLERS.items():
        print(f"  {name:18s} {spec.doc} (default grid: {spec.grid})")
    print("oracle data:", ", ".join(oracle.EXAMPLES))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unstir", description="Score-based diffusion: one learned score, every "
                                 "correct way to use it.")
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("demo", help="the main job: train on 2-D data, sample with five samplers, figures",
                       description=demo.__doc__)
    m.add_argument("--out", default="runs/demo", help="folder for the run and figures (default: runs/demo)")
    m.add_argument("--data", default="moons", choices=["moons", "swiss_roll", "circles", "checkerboard", "ring",
                                                       "unequal_2d"])
    m.add_argument("--process", default="vp", choices=sorted(PROCESSES))
    m.add_argument("--train-steps", dest="train_steps", type=int, default=3000, help="training steps (default: 3000)")
    m.add_argument("-n", type=int, default=2000, help="samples per sampler (default: 2000)")
    m.add_argument("--paths", type=int, default=6, help="trajectories to draw (default: 6)")
    m.add_argument("--seed", type=int, default=0, help="seed for training, noise and held-out data (default: 0)")
    m.set_defaults(func=demo)
    d = sub.add_parser("oracle", help="samplers on the exact score of a Gaussian mixture, with figures",
                       description=oracle_demo.__doc__)
    d.add_argument("--out", default="runs/oracle", help="folder for the figures (default: runs/oracle)")
    d.add_argument("--process", default="vp", choices=sorted(PROCESSES))
    d.add_argument("--data", default="unequal_2d", choices=[k for k in oracle.EXAMPLES if k != "random"])
    d.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20)")
    d.add_argument("-n", type=int, default=2000, help="samples per sampler (default: 2000)")
    d.add_argument("--paths", type=int, default=6, help="trajectories to draw (default: 6)")
    d.add_argument("--seed", type=int, default=0, help="seed for the samples and the noise (default: 0)")
    d.set_defaults(func=oracle_demo)
    tr = sub.add_parser("train", help="train a score model (torchrun for several processes)", description=train_cmd.__doc__)
    tr.add_argument("--data", default="moons", help="moons, swiss_roll, circles, checkerboard, ring, unequal_2d, "
                    "digits, a folder of images or a .npy file (default: moons)")
    tr.add_argument("--out", required=True, help="run folder (refused if it already holds a run, unless --resume)")
    tr.add_argument("--process", default="vp", choices=sorted(PROCESSES), help="forward process (default: vp)")
    tr.add_argument("--prediction", default="eps", choices=list(PREDICTIONS),
                    help="what the network predicts (default: eps; velocity is flow matching, e.g. with --process rf)")
    tr.add_argument("--weighting", default="auto", choices=["auto", *WEIGHTINGS],
                    help="loss weighting: DDPM's simple eps loss, sigma^2 (score_sde), g^2 with importance-"
                         "sampled t, or the flow-matching velocity loss (default: velocity for --prediction "
                         "velocity, else simple)")
    tr.add_argument("--steps", type=int, default=4000, help="optimizer steps in total (default: 4000)")
    tr.add_argument("--batch-size", dest="batch_size", type=int, default=512,
                    help="global batch size, split across processes (default: 512)")
    tr.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (default: 2e-3)")
    tr.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, then cosine decay (default: 200)")
    tr.add_argument("--grad-clip", dest="grad_clip", type=float, default=1.0,
                    help="gradient-norm clipping (default: 1.0)")
    tr.add_argument("--ema-decay", dest="ema_decay", type=float, default=0.999,
                    help="EMA of the weights, used for sampling (default: 0.999)")
    tr.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and noise (default: 0)")
    tr.add_argument("--size", type=int, help="resize/crop images to this size")
    tr.add_argument("--mode", default="L", choices=["L", "RGB"], help="image colour mode")
    tr.add_argument("--class-conditional", dest="class_conditional", action="store_true",
                    help="condition the U-Net on the data set's class labels (e.g. digits)")
    tr.add_argument("--discrete", action="store_true", help="integer DDPM timesteps (process ddpm)")
    tr.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=1000,
                    help="steps between checkpoints (default: 1000; one is always written at the end)")
    tr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    tr.add_argument("--bf16", action="store_true", help="bf16 autocast")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=train_cmd)
    sa = sub.add_parser("sample", help="sample from a trained run", description=sample_cmd.__doc__)
    sa.add_argument("--run", required=True, help="run folder written by `unstir train`")
    sa.add_argument("--sampler", default="dpm++2m", choices=sorted(SAMPLERS),
                    help="see `unstir list` (default: dpm++2m)")
    sa.add_argument("--steps", type=int, default=20, help="grid intervals; the model evaluations are reported (default: 20)")
    sa.add_argument("--grid", choices=list(GRIDS), help="time grid (default: the sampler's)")
    sa.add_argument("-n", type=int, default=1000, help="number of samples (default: 1000)")
    sa.add_argument("--out", required=True, help="samples.png (grid or scatter) or samples.npy")
    sa.add_argument("--seed", type=int, default=0, help="seed for the noise (default: 0)")
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sa.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    sa.set_defaults(func=sample_cmd)
    ls = sub.add_parser("list", help="list processes, grids and samplers")
    ls.set_defaults(func=list_choices)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
