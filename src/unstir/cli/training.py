"""`unstir train`, `unstir ema`, `unstir distill` and `unstir train-classifier`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..losses import TIME_SAMPLINGS, WEIGHTINGS
from ..parametrization import PREDICTIONS
from ..processes import PROCESSES
from ..data import IMAGE_SETS, TOY_2D
from ..grids import GRIDS
from .common import add_device, add_processes, add_quiet, add_seed

def int_list(text: str) -> list:
    """'64,128,128' -> [64, 128, 128]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 64,128,128; got {text!r}")


def train_cmd(args) -> int:
    """Train a score model by denoising score matching and write a run folder (safetensors checkpoints,
    config, log.jsonl). Under `torchrun --nproc_per_node=N` the same command trains data-parallel (DDP),
    each process on its own shard of every global batch."""
    from ..runs import read_run_info
    from ..training import TrainConfig, train

    if not hasattr(args, "out"):
        args.out = str(Path("runs") / Path(getattr(args, "data", "moons")).stem)
    if getattr(args, "posthoc_ema", None) == []:  # the bare flag: EDM2's two profiles
        from ..ema import SIGMA_RELS

        args.posthoc_ema = list(SIGMA_RELS)
    fields = {f for f in TrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in fields}  # only the options on the command line
    resume = getattr(args, "resume", None)
    if resume == "auto":  # a requeued job: continue the run if there is one, else start it
        resume = (Path(args.out) / "run.json").exists()
    resume = bool(resume)
    if resume and (Path(args.out) / "run.json").exists():
        # Resume the recorded run; options given again must agree with it (checked by `train`).
        cfg = TrainConfig(**{**read_run_info(args.out)["config"], **given})
    else:
        cfg = TrainConfig(**given)
    if getattr(args, "reset_optimizer", False) and not getattr(args, "resume", None):
        raise ValueError("--reset-optimizer applies to --resume (a checkpoint without optimizer state)")
    result = train(cfg, args.out, resume=resume, progress=not getattr(args, "quiet", False),
                   reset_optimizer=getattr(args, "reset_optimizer", False))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run folder: {result.run} (step {result.step})")
    return 128 + result.interrupted if result.interrupted else 0  # the shell's code for the signal: 130, 143, ...


def ema_cmd(args) -> int:
    """Reconstruct the EMA of any relative length from a run's post-hoc EMA snapshots (Karras et al. 2024, EDM2,
    sec. 3: least squares over the stored power-function profiles) and write it as a new run folder, which
    samples, encodes and reports like any other. The fit's residual is recorded in its run.json; a length the
    snapshots cannot reach is refused, naming the range they can."""
    from ..ema import posthoc_run

    out = posthoc_run(args.run, args.sigma_rel, args.out, args.step)
    from ..runs import read_run_info

    rec = read_run_info(out)["posthoc"]
    print(f"EMA sigma_rel {rec['sigma_rel']:g} at step {rec['step']} from {rec['snapshots']} snapshots (profile "
          f"residual {rec['residual']:.2%}): run folder {out}")
    return 0


def distill_cmd(args) -> int:
    """Distil a trained run into one that samples in --nfe DDIM steps: progressive distillation (Salimans & Ho
    2022), halving the teacher's --teacher-steps round by round, each round's student taking one step where its
    teacher took two. The output is a run like any other (sample, encode, report); `unstir sample` uses the grid it
    was distilled for. A killed distillation continues with --resume, exactly as training does."""
    from ..distill import distill

    if not args.resume and (args.run is None or args.nfe is None):
        raise ValueError("distill needs --run (the teacher) and --nfe (the student's steps), or --resume")
    if not args.resume and (Path(args.run) / "run.json").exists():
        from ..runs import read_run_info

        prediction = read_run_info(args.run)["config"].get("prediction")
        if prediction in ("eps", "score") and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: the teacher predicts {prediction}; its student keeps that, and x0 = (z - sigma eps) / alpha "
                  f"is unstable near T at few steps (on the oracle a 2-step eps student was 3x further from the "
                  f"exact map than a v student): distil a v, x0, velocity or edm run for the fewest steps",
                  file=sys.stderr)
    result = distill(args.run, args.out, nfe=args.nfe, teacher_steps=args.teacher_steps, grid=args.grid,
                     steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=getattr(args, "seed", None),
                     device=getattr(args, "device", None),
                     checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run folder: {result.run} (step {result.step}); sample it with `unstir sample --run {result.run}`")
    return 128 + result.interrupted if result.interrupted else 0


def train_classifier_cmd(args) -> int:
    """Train a noise-conditional classifier p_t(y | x_t) on labelled data (digits, moons, ...) for classifier
    guidance: `unstir sample --run R --classifier C --class 3 --guidance 2`."""
    from ..training import TrainConfig, train_classifier

    cfg = TrainConfig(data=args.data, process=args.process, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, device=args.device)
    run = train_classifier(cfg, args.out, progress=not args.quiet, force=args.force)
    from ..runs import read_run_info

    accuracy = read_run_info(run).get("accuracy", {})
    if accuracy:
        print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    print(f"classifier folder: {run}")
    return 0


def register(sub) -> None:
    # Options left out are absent from args (SUPPRESS), so --resume can tell what the user asked to change.
    tr = sub.add_parser("train", help="train a score model (torchrun for several processes)", description=train_cmd.__doc__,
                        argument_default=argparse.SUPPRESS)
    tr.add_argument("--data", help=f"{', '.join(TOY_2D + IMAGE_SETS)} (`unstir list`), a folder of PNG/JPEG images "
                    "(8- or 16-bit, scaled to [-1, 1]) or a .npy file: vectors as given, float images as given "
                    "(expected in [-1, 1]), integer images as 8-bit levels 0..255 or uint16 (default: moons)")
    tr.add_argument("--out", help="run folder (refused if it already holds a run, unless --resume; default: "
                    "runs/<data name>)")
    tr.add_argument("--process", choices=sorted(PROCESSES), help="forward process (default: vp)")
    tr.add_argument("--prediction", choices=list(PREDICTIONS),
                    help="what the network predicts (default: eps; velocity is flow matching, e.g. with --process rf; "
                         "edm is EDM's preconditioned network, c_skip x + c_out F, for every process)")
    tr.add_argument("--weighting", choices=["auto", *WEIGHTINGS],
                    help="loss weighting: DDPM's simple eps loss, sigma^2 (score_sde), g^2 with importance-"
                         "sampled t, the flow-matching velocity loss, Min-SNR-gamma, or EDM's 1 / c_out^2 (unit "
                         "weight on F) (default: velocity for --prediction velocity, edm for --prediction edm, "
                         "else simple)")
    tr.add_argument("--snr-gamma", dest="snr_gamma", type=float,
                    help="gamma of --weighting min-snr: the eps error's weight is min(SNR, gamma) / SNR (default: 5)")
    tr.add_argument("--time-sampling", dest="time_sampling", choices=list(TIME_SAMPLINGS),
                    help="how training times are drawn: uniform, logit-normal (Esser et al. 2024: more of the batch "
                         "at intermediate noise levels) or log-normal (EDM's noise levels, see --log-normal); not "
                         "with --weighting likelihood (default: uniform)")
    tr.add_argument("--logit-normal", dest="logit_normal", type=float, nargs=2, metavar=("MEAN", "STD"),
                    help="with --time-sampling logit-normal: mean and std of logit(u) (default: 0 1)")
    tr.add_argument("--log-normal", dest="log_normal", type=float, nargs=2, metavar=("P_MEAN", "P_STD"),
                    help="with --time-sampling log-normal: mean and std of ln(sigma / alpha), EDM's noise levels "
                         "(default: -1.2 1.2)")
    tr.add_argument("--sigma-data", dest="sigma_data", type=float,
                    help="with --prediction edm or --weighting edm: the data's standard deviation in EDM's "
                         "preconditioning (default: 0.5, EDM's for images in [-1, 1])")
    tr.add_argument("--steps", type=int, help="optimizer steps in total (default: 4000)")
    tr.add_argument("--batch-size", dest="batch_size", type=int,
                    help="global batch size, split across processes (default by the data: 512 for vectors, 128 "
                    "for images up to 16 px, 32 above)")
    tr.add_argument("--lr", type=float, help="AdamW peak learning rate (default: 2e-3)")
    tr.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine decay; must be shorter than the "
                    "run (default: 200, or a tenth of a run shorter than 2000 steps)")
    tr.add_argument("--grad-clip", dest="grad_clip", type=float, help="gradient-norm clipping (default: 1.0)")
    tr.add_argument("--ema-decay", dest="ema_decay", type=float,
                    help="EMA of the weights, used for sampling (default: 0.999)")
    tr.add_argument("--posthoc-ema", dest="posthoc_ema", type=float, nargs="*", metavar="SIGMA_REL",
                    help="keep EDM2's power-function EMA profiles of these relative lengths and write them every "
                         "--posthoc-every steps, so `unstir ema` can choose the EMA length after training (no "
                         "value: EDM2's 0.05 0.10)")
    tr.add_argument("--posthoc-every", dest="posthoc_every", type=int,
                    help="steps between post-hoc EMA snapshots (default: a twentieth of --steps)")
    add_seed(tr, "data, initialisation and noise", default=argparse.SUPPRESS)
    tr.add_argument("--size", type=int, help="resize/crop images to this size (image data only)")
    tr.add_argument("--mode", choices=["L", "RGB"], help="image colour mode (default: L)")
    tr.add_argument("--class-conditional", dest="class_conditional", action="store_true",
                    help="condition the network on the data set's class labels (digits, moons, circles, ring, "
                         "unequal_2d), for classifier-free guidance")
    tr.add_argument("--label-dropout", dest="label_dropout", type=float,
                    help="with --class-conditional: share of labels trained as the null label (default: 0.1)")
    tr.add_argument("--discrete", action="store_true", help="integer DDPM timesteps (process ddpm)")
    tr.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                    help="steps between checkpoints (default: 1000; one is always written at the end)")
    tr.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    add_processes(tr)
    tr.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU and CUDA)")
    tr.add_argument("--net", choices=["unstir", "diffusers"], help="image network: unstir's U-Net (unstir.nets.UNet) "
                    "or diffusers' UNet2DModel trained directly (needs diffusers), the same options below (default: "
                    "unstir; benchmarks/images_results.md compares them)")
    tr.add_argument("--width", type=int, help="vector data's MLP: hidden width (default: 128)")
    tr.add_argument("--depth", type=int, help="vector data's MLP: residual blocks (default: 3)")
    tr.add_argument("--widths", type=int_list, help="image U-Net: channels per level, a base width times the "
                    "channel multipliers, e.g. 64,128,128 (default: 32,64 below 32 px, else 64,128,128)")
    tr.add_argument("--res-blocks", dest="res_blocks", type=int, help="image U-Net: residual blocks per level "
                    "(default: 1)")
    tr.add_argument("--attention", type=int_list, help="image U-Net: resolutions with self-attention, e.g. 16 or "
                    "16,8 (default: only the middle, at the lowest resolution)")
    tr.add_argument("--dropout", type=float, help="image U-Net: dropout in the residual blocks (default: 0)")
    tr.add_argument("--accumulate", type=int, help="gradient accumulation: each process's share of a batch in this "
                    "many micro-batches, the same gradient in less memory (default: 1)")
    tr.add_argument("--channels-last", dest="channels_last", action="store_true",
                    help="images in channels-last (NHWC) memory layout")
    tr.add_argument("--compile", action="store_true", help="torch.compile the network (eager where no compiler works)")
    tr.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                    help="continue the run in --out exactly where it stopped, with its recorded settings (`--resume "
                         "auto`: resume if --out holds a run, else start one, for a requeued job); only "
                         "--steps, --checkpoint-every and --device may change. A longer --steps stretches the "
                         "cosine decay from the current learning rate to the new end (a finished run restarts it "
                         "from --lr: a warm restart); the change is recorded in run.json")
    tr.add_argument("--reset-optimizer", dest="reset_optimizer", action="store_true",
                    help="with --resume: accept a checkpoint that carries no optimizer state (AdamW restarts)")
    tr.add_argument("--threads", type=int, help="intra-op CPU threads (default: 1 for vector data, where one "
                    "thread is 18%% slower alone but 3x faster beside another job; torch's default for images)")
    tr.add_argument("--nonfinite", choices=["stop", "skip"],
                    help="a non-finite loss or gradient: stop naming the step (default), or skip the batch and "
                         "count it in log.jsonl")
    tr.add_argument("--quiet", action="store_true", help="no progress bars (notices and warnings still show)")
    tr.set_defaults(func=train_cmd)

    em = sub.add_parser("ema", help="choose the EMA length after training (EDM2's post-hoc EMA): a new run",
                        description=ema_cmd.__doc__)
    em.add_argument("--run", required=True, help="a run trained with --posthoc-ema")
    em.add_argument("--sigma-rel", dest="sigma_rel", type=float, required=True,
                    help="the EMA's length relative to the training so far (EDM2: 0.05 to 0.2 are typical)")
    em.add_argument("--out", required=True, help="the new run folder (new or empty)")
    em.add_argument("--step", type=int, help="reconstruct the EMA at this step (default: the last snapshot's)")
    em.set_defaults(func=ema_cmd)

    di = sub.add_parser("distill", help="distil a run into one that samples in 1-8 steps (progressive distillation)",
                        description=distill_cmd.__doc__)
    di.add_argument("--run", help="the teacher: a trained run (not needed with --resume)")
    di.add_argument("--nfe", type=int, help="the student's model evaluations (DDIM steps), e.g. 1, 2 or 4")
    di.add_argument("--out", required=True, help="the student's run folder (new or empty; with --resume, the run "
                    "to continue)")
    di.add_argument("--teacher-steps", dest="teacher_steps", type=int,
                    help="the teacher's DDIM steps in the first round: --nfe times a power of two (default: the "
                         "smallest such number >= 64)")
    di.add_argument("--grid", choices=list(GRIDS),
                    help="the spacing of the distillation grid (default: log_snr)")
    di.add_argument("--steps", type=int, help="optimizer steps over all rounds, shared evenly (default: half the "
                    "teacher's training; a step costs about 1.7 training steps)")
    di.add_argument("--lr", type=float, help="AdamW peak learning rate of each round (default: a quarter of the "
                    "teacher's; the student trains without dropout)")
    di.add_argument("--batch-size", dest="batch_size", type=int, help="batch size (default: the teacher's)")
    di.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                    help="data and noise of the distillation (default: the teacher's)")
    di.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                    help="steps between checkpoints (default: the teacher's)")
    di.add_argument("--device", default=argparse.SUPPRESS, help="cpu, cuda, ... (default: the teacher's)")
    di.add_argument("--resume", action="store_true", help="continue the distillation in --out where it stopped")
    add_processes(di)
    add_quiet(di)
    di.set_defaults(func=distill_cmd)

    tc = sub.add_parser("train-classifier", help="train a noise-conditional classifier for classifier guidance",
                        description=train_classifier_cmd.__doc__)
    tc.add_argument("--data", default="digits", help="labelled data: digits, moons, circles, ring, unequal_2d "
                    "(default: digits)")
    tc.add_argument("--out", required=True, help="folder for the classifier")
    tc.add_argument("--force", action="store_true", help="replace the classifier in --out (never a model run)")
    tc.add_argument("--process", default="vp", choices=sorted(PROCESSES), help="the model's process (default: vp)")
    tc.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    tc.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="batch size (default: 256)")
    tc.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default: 1e-3)")
    add_seed(tc, "data, initialisation and noise")
    add_device(tc)
    add_quiet(tc)
    tc.set_defaults(func=train_classifier_cmd)
