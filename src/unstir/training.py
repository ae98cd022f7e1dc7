"""Training: AdamW with warm-up and clipping, an EMA of the weights, atomic safetensors checkpoints,
exact resume, and DistributedDataParallel under ``torchrun``.

What a run writes and how it is read back lives in ``unstir.runs``.

Reproducibility: every random draw (batch indices, times, noise) comes from one generator seeded by the
config and shared by all ranks; each rank takes its own slice of the global batch (its shard, as
DistributedSampler does). The gradient DDP averages is therefore the gradient of the global batch,
whatever the number of processes, and a resumed run continues the identical stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import data as data_mod
from . import nets
from ._checks import check_choice, check_device, check_positive
from .distributed import init as init_distributed
from .ema import PowerEMA, check_sigma_rel, write_snapshot
from .distributed import rank_world
from .distill import Progressive, check_distill, progressive_loss, rounds
from .losses import WEIGHTINGS, TimeSampler, check_logit_normal, check_time_sampling, dsm_loss
from .parametrization import PREDICTIONS, Denoiser, check_sigma_data
from .processes import PROCESSES, make_process
from .resources import check_memory, training_bytes
from .runs import (LOCK_FILE, MOMENTS_FILE, _read_json, checkpoint_tensors, load_checkpoint, read_run_info, regular_file,
                   remove_temporaries, run_lock, save_checkpoint, write_moments, write_run_info)

Tensor = torch.Tensor


@dataclass
class TrainConfig:
    data: str = "moons"
    process: str = "vp"
    prediction: str = "eps"
    weighting: str = "auto"  # 'velocity' (flow matching) for a velocity prediction, 'edm' for edm, else 'simple'
    snr_gamma: float = 5.0  # gamma of the 'min-snr' weighting (Hang et al. 2023)
    time_sampling: str = "uniform"  # or 'logit-normal' (Esser et al. 2024): see losses.TimeSampler
    logit_normal: tuple = (0.0, 1.0)  # (mean, std) of logit(u) with time_sampling='logit-normal'
    log_normal: tuple = (-1.2, 1.2)  # (P_mean, P_std) of ln sigma~ with time_sampling='log-normal' (EDM)
    sigma_data: float = 0.5  # the data scale of prediction 'edm' (EDM's preconditioning)
    steps: int = 4000
    batch_size: int | None = None  # default by the data (``default_batch_size``): 512 vectors, 128 small images, 32
    lr: float = 2e-3
    warmup: int | None = None  # default: 200, or a tenth of a run shorter than 2000 steps
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    # Post-hoc EMA (EDM2; ``unstir.ema``): power-function EMA profiles of these relative lengths, kept during
    # training and written every ``posthoc_every`` steps (default: a twentieth of the run) as ema-<step>.safetensors.
    posthoc_ema: tuple = ()
    posthoc_every: int | None = None
    seed: int = 0
    n_data: int = 20000
    size: int | None = None
    mode: str = "L"
    width: int = 128
    depth: int = 3
    # The image U-Net (``nets.UNet``): channels per level (a base width times the channel multipliers; default
    # by image size, ``default_widths``), residual blocks per level, attention resolutions, dropout.
    net: str = "unstir"  # images: unstir's U-Net, or "diffusers" (diffusers' UNet2DModel, same options)
    widths: tuple | None = None
    res_blocks: int = 1
    attention: tuple = ()
    dropout: float = 0.0
    class_conditional: bool = False
    label_dropout: float = 0.1  # with class_conditional: the share of labels replaced by the null label (for CFG)
    discrete: bool = False
    checkpoint_every: int = 1000
    log_every: int = 50
    nonfinite: str = "stop"  # a non-finite loss or gradient: 'stop' (naming the step) or 'skip' the batch
    threads: int | None = None  # intra-op threads; default: 1 for vector data (see _set_threads), torch's for images
    device: str = "cpu"
    bf16: bool = False
    accumulate: int = 1  # gradient accumulation: each rank's share of a batch in this many micro-batches
    channels_last: bool = False  # images in NHWC memory layout
    compile: bool = False  # torch.compile the network (eager, with a warning, where no compiler works)
    extra: dict = field(default_factory=dict)
    # Progressive distillation (``unstir.distill``): {"teacher": run, "nfe", "teacher_steps", "grid"}; empty: none.
    distill: dict = field(default_factory=dict)
    # Recorded when a resumed run changes its length (see ``train``): {"at", "steps", "lr", "previous_steps", "rule"}.
    schedule_changes: list = field(default_factory=list)

    def __post_init__(self):
        if self.warmup is None and isinstance(self.steps, int):
            self.warmup = min(200, self.steps // 10)
        if self.posthoc_every is None and self.posthoc_ema and isinstance(self.steps, int):
            self.posthoc_every = max(1, self.steps // 20)
        if self.weighting == "auto":
            self.weighting = {"velocity": "velocity", "edm": "edm"}.get(self.prediction, "simple")
        if isinstance(self.device, torch.device):  # recorded in run.json by its name
            self.device = str(self.device)

    def validate(self) -> None:
        check_choice("process", self.process, PROCESSES)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_positive("snr_gamma", self.snr_gamma)
        if self.snr_gamma != DEFAULTS.snr_gamma and self.weighting != "min-snr":
            raise ValueError(f"snr_gamma={self.snr_gamma} is the gamma of the 'min-snr' weighting; this run's weighting "
                             f"is {self.weighting!r}")
        if (check_time_sampling(self.time_sampling, self.logit_normal, self.weighting) != DEFAULTS.logit_normal
                and self.time_sampling != "logit-normal"):
            raise ValueError(f"logit_normal={tuple(self.logit_normal)} is the (mean, std) of time_sampling="
                             f"'logit-normal'; this run's time_sampling is {self.time_sampling!r}")
        if (check_logit_normal(self.log_normal, "log_normal") != DEFAULTS.log_normal
                and self.time_sampling != "log-normal"):
            raise ValueError(f"log_normal={tuple(self.log_normal)} is the (P_mean, P_std) of time_sampling="
                             f"'log-normal'; this run's time_sampling is {self.time_sampling!r}")
        check_sigma_data(self.sigma_data)
        if not isinstance(self.posthoc_ema, (tuple, list)):
            raise ValueError(f"posthoc_ema must be a list of relative EMA lengths, got {self.posthoc_ema!r}")
        for sigma_rel in self.posthoc_ema:
            check_sigma_rel(sigma_rel)
        if len(set(self.posthoc_ema)) != len(self.posthoc_ema):
            raise ValueError(f"posthoc_ema lists a length twice: {tuple(self.posthoc_ema)}")
        if self.posthoc_every is not None and not self.posthoc_ema:
            raise ValueError(f"posthoc_every={self.posthoc_every} is the interval of post-hoc EMA snapshots; this run "
                             f"keeps none (--posthoc-ema)")
        if self.posthoc_ema and not (isinstance(self.posthoc_every, int) and self.posthoc_every >= 1):
            raise ValueError(f"posthoc_every must be an integer >= 1, got {self.posthoc_every!r}")
        if self.sigma_data != DEFAULTS.sigma_data and self.prediction != "edm" and self.weighting != "edm":
            raise ValueError(f"sigma_data={self.sigma_data} is the data scale of EDM's preconditioning; this run "
                             f"uses neither prediction 'edm' nor weighting 'edm'")
        if self.prediction == "edm" and self.discrete:
            raise ValueError("prediction 'edm' feeds the network EDM's noise input, not DDPM's integer timestep "
                             "labels: drop --discrete")
        if self.time_sampling == "log-normal" and self.discrete:
            raise ValueError("time_sampling 'log-normal' draws a continuous noise level; discrete DDPM timesteps "
                             "have none between their steps: drop --discrete or use uniform/logit-normal times")
        for name in ("steps", "checkpoint_every", "log_every", "width", "depth") + (
                ("batch_size",) if self.batch_size is not None else ()):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        for name, ok, allowed in (("lr", self.lr > 0, "> 0"), ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
                                  ("grad_clip", self.grad_clip > 0, "> 0")):
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_choice("net", self.net, ("unstir", "diffusers"))
        check_choice("nonfinite", self.nonfinite, ("stop", "skip"))
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup} steps) must be shorter than the run (steps = {self.steps})")
        if not (isinstance(self.label_dropout, (int, float)) and 0 <= self.label_dropout < 1):
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if self.label_dropout != DEFAULTS.label_dropout and not self.class_conditional:
            raise ValueError(f"label_dropout={self.label_dropout} is the share of null labels of a class-conditional "
                             f"run (--class-conditional); this run is unconditional")
        if isinstance(self.accumulate, bool) or not (isinstance(self.accumulate, int) and self.accumulate >= 1):
            raise ValueError(f"accumulate must be an integer >= 1, got {self.accumulate!r}")
        if self.discrete and self.process != "ddpm":
            raise ValueError(f"discrete timesteps need process 'ddpm', got {self.process!r}")
        if self.distill:
            check_distill(self.distill, self.steps)
            if self.discrete:
                raise ValueError("progressive distillation places its grid between DDPM's integer timesteps, which a "
                                 "network trained with --discrete has never seen: distil a continuous-time run")
            if self.posthoc_ema:
                raise ValueError("a distillation keeps one EMA per round (the next round's teacher); post-hoc EMA "
                                 "profiles (--posthoc-ema) would span rounds of different objectives")


# --- threads and signals --------------------------------------------------------------------------


def _set_threads(cfg: TrainConfig, dataset) -> None:
    """One intra-op thread for the small vector models unless asked otherwise (--threads or OMP_NUM_THREADS).

    Measured on 2 cores, moons MLP: alone, 2 threads 193 steps/s and 1 thread 158; two trainings at once,
    2 threads each 53 + 53 steps/s (OpenMP's spinning threads fight for the cores), 1 thread each 163 + 159.
    OMP_WAIT_POLICY=PASSIVE rescues the busy case (142 + 140) but halves the lone one (84). So a busy
    machine slows a vector run gracefully only with one thread; images (the U-Net) keep torch's default."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif "OMP_NUM_THREADS" not in os.environ and not dataset.is_image:
        torch.set_num_threads(1)


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # Ctrl-C, and what Slurm and Kubernetes send before a kill
SIGNAL_EVERY = 10  # under torchrun, the ranks agree on a stop request every this many steps


def _handle_stop_signals(handler):
    """Install ``handler`` for the stop signals in the main thread; returns a function that restores the old
    handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    old = {n: signal.signal(n, handler) for n in numbers}
    return lambda: [signal.signal(n, h) for n, h in old.items()]


# --- the run ------------------------------------------------------------------------------------------


DEFAULTS = TrainConfig()


def default_batch_size(dataset) -> int:
    """The batch when --batch-size is not given, by the data: 512 for vectors (the 2-D sets' runs), 128 for
    images up to 16 px (the digits' benchmarks), 32 above (the 32x32 recipe of benchmarks/images.py, whose
    figures the README reports: about 2.4 steps/s of the default U-Net on 2 CPU cores, where batch 512 ran at
    0.09). DDPM trained CIFAR-10 at 128 and EDM at 512 across 8 GPUs: on a GPU, pass a larger one."""
    if not dataset.is_image:
        return 512
    return 128 if dataset.shape[-1] <= 16 else 32


def default_widths(size: int) -> tuple:
    """The U-Net's channels per level when --widths is not given: (32, 64) below 32 px (the digits' net), else
    64 x (1, 2, 2) at 32 px: three levels 32, 16, 8."""
    return (32, 64) if size < 32 else (64, 128, 128)


def unet_options(cfg: TrainConfig, size: int) -> dict:
    return {"widths": tuple(cfg.widths or default_widths(size)), "res_blocks": cfg.res_blocks,
            "attention": tuple(cfg.attention), "dropout": cfg.dropout}


def build_net(cfg: TrainConfig, dataset: data_mod.Dataset, process) -> nn.Module:
    time_scale = 1.0 if cfg.discrete else 1000.0 / process.T
    num_classes = dataset.num_classes if cfg.class_conditional else 0
    if dataset.is_image:
        c, h, _ = dataset.shape
        net = nets.DiffusersUNet if cfg.net == "diffusers" else nets.UNet
        return net(c, h, num_classes=num_classes, time_scale=time_scale, **unet_options(cfg, h))
    return nets.MLP(dataset.shape[0], cfg.width, cfg.depth, time_scale, num_classes)


def check_net_options(cfg: TrainConfig, dataset: data_mod.Dataset) -> None:
    """The network options against the data, before any work: U-Net settings only for images, and those
    that the image size allows."""
    unet_given = [f"--{k.replace('_', '-')}" for k in ("net", "widths", "res_blocks", "attention", "dropout",
                                                       "channels_last")
                  if json.dumps(getattr(cfg, k)) != json.dumps(getattr(DEFAULTS, k))]
    if not dataset.is_image:
        if unet_given:
            raise ValueError(f"{', '.join(unet_given)} {'configures' if len(unet_given) == 1 else 'configure'} the image U-Net; {cfg.data!r} is vector data of shape "
                             f"{dataset.shape} (its MLP takes --width and --depth)")
        return
    mlp_given = [f"--{k}" for k in ("width", "depth") if getattr(cfg, k) != getattr(DEFAULTS, k)]
    if mlp_given:
        raise ValueError(f"{', '.join(mlp_given)} {'configures' if len(mlp_given) == 1 else 'configure'} the MLP of vector data; {cfg.data!r} holds images of shape "
                         f"{dataset.shape} (the U-Net takes --widths, --res-blocks, --attention, --dropout)")
    c, h, w = dataset.shape
    if h != w:
        raise ValueError(f"the U-Net needs square images; {cfg.data!r} has {w}x{h}: pass --size to crop them")
    o = unet_options(cfg, h)
    nets.check_unet(c, h, o["widths"], o["res_blocks"], o["attention"], o["dropout"])


def _compiled(net: nn.Module):
    """``torch.compile(net)``; where the compiler fails (no C++ toolchain, an unsupported platform) the graph
    falls back to eager with torch's warning instead of stopping the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(net)


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or (``lr_schedule='cosine'``) cosine decay to zero at the last step.

    After a recorded change of the run's length (``cfg.schedule_changes``) the cosine runs from that
    change's starting learning rate to zero at the new last step."""
    if cfg.distill:  # each round of a distillation has its own warm-up and decay (``unstir.distill``)
        n = rounds(cfg.distill["nfe"], cfg.distill["teacher_steps"])
        r = max(k for k in range(n) if k * cfg.steps // n <= step)
        begin, end = r * cfg.steps // n, (r + 1) * cfg.steps // n
        cfg = dataclasses.replace(cfg, distill={}, schedule_changes=[], steps=end - begin,
                                  warmup=min(cfg.warmup, (end - begin) // 10))
        step -= begin
    changes = [c for c in cfg.schedule_changes if c["at"] <= step]
    if changes and cfg.lr_schedule == "cosine":
        c = changes[-1]
        return c["lr"] * 0.5 * (1 + math.cos(math.pi * (step - c["at"]) / max(1, c["steps"] - c["at"])))
    total = cfg.schedule_changes[0]["previous_steps"] if cfg.schedule_changes else cfg.steps
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.lr_schedule == "cosine":
        progress = max(0.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warm


# Settings a resumed run may change; every other setting defines the model, the data or the exact
# optimisation stream and must match the recorded run.
RESUMABLE = ("steps", "checkpoint_every", "log_every", "device", "nonfinite")


def _resume_config(cfg: TrainConfig, recorded: dict, start: int) -> TrainConfig:
    """Check ``cfg`` against the recorded config and record a change of length (module rule in ``train``)."""
    if cfg.batch_size is None:  # not asked for: the run's own
        cfg.batch_size = recorded.get("batch_size")
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))  # settings added after the run was made
    recorded = {**{k: v for k, v in defaults.items() if k not in recorded}, **recorded}
    ignore = set(RESUMABLE) | {"schedule_changes", "extra"}
    differ = {k: (recorded.get(k), v) for k, v in mine.items() if k not in ignore and recorded.get(k) != v}
    if differ:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        text = "; ".join(f"{flag(k)}: run has {a!r}, asked {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"--resume continues the recorded run and cannot change what defines its model, data or "
                         f"optimisation ({text}). Only {', '.join(map(flag, RESUMABLE))} may change; start a new run "
                         f"for the rest")
    cfg.schedule_changes = list(recorded.get("schedule_changes", []))
    if cfg.steps < start:
        raise ValueError(f"the run is already at step {start}; --steps {cfg.steps} would end it before that")
    old = recorded["steps"]
    if cfg.steps != old:
        finished = start >= old
        rule = "warm restart" if finished else "stretch"
        lr = cfg.lr if finished else _lr(TrainConfig(**{**recorded, "schedule_changes": cfg.schedule_changes}), start)
        cfg.schedule_changes.append({"at": start, "steps": cfg.steps, "lr": lr, "previous_steps": old, "rule": rule})
    return cfg


@dataclass
class TrainResult:
    run: Path
    net: nn.Module
    ema: nn.Module
    step: int
    interrupted: int = 0  # the stop signal that ended the run early (signal.SIGINT, SIGTERM, ...), or 0


def train(cfg: TrainConfig, out, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, reset_optimizer: bool = False) -> TrainResult:
    """Train, checkpoint and log into the run folder ``out``. ``reset_optimizer`` resumes from a checkpoint that
    carries no optimizer state (AdamW's moments start again). ``stop_after`` ends the call after that many
    steps, as a crash would (no checkpoint beyond the last periodic one): for interruption tests. The
    thread count chosen for training (``_set_threads``) is restored on return."""
    threads = torch.get_num_threads()
    run = Path(out)
    if rank_world()[0] != 0:  # under torchrun rank 0 writes, and holds the run's lock
        try:
            return _train(cfg, run, resume=resume, progress=progress, stop_after=stop_after,
                          reset_optimizer=reset_optimizer)
        finally:
            torch.set_num_threads(threads)
    _check_out(run, resume)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(run, "train"):  # one writer per run, for the whole training
            return _train(cfg, run, resume=resume, progress=progress, stop_after=stop_after,
                          reset_optimizer=reset_optimizer)
    except BaseException:
        if created and [p.name for p in run.iterdir()] == [LOCK_FILE]:  # refused before writing: leave nothing
            (run / LOCK_FILE).unlink()
            run.rmdir()
        raise
    finally:
        torch.set_num_threads(threads)


def _check_out(run: Path, resume: bool) -> None:
    """--out names a new folder, an empty one, or a run; unstir never trains into (and then cleans up) a folder
    of other files."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {str(run)!r} is a file, not a folder")
    if not resume and run.is_dir() and not (run / "run.json").exists():
        others = sorted(p.name for p in run.iterdir() if p.name != LOCK_FILE)
        if others:
            raise ValueError(f"--out {str(run)!r} holds files and no unstir run ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); train into a new or empty folder")


SETTLE_EVERY = 25  # steps whose finite checks a GPU run reads back together
SKIP_LIMIT = 0.05  # --nonfinite skip: stop once more than this share of the steps run were skipped ...
SKIP_GRACE = 20  # ... counted from this many steps on


def _settle(pending: list, params, run: Path) -> None:
    """Read the finite checks ``(step, [loss finite, gradient finite])`` of ``pending`` at once (and empty it);
    raise naming the first step whose loss or gradient was not finite. ``params`` (None where later steps have
    moved them already) tells whether the parameters themselves were not finite at that step."""
    flags = torch.stack([f for _, f in pending]).cpu()
    steps = [s for s, _ in pending]
    pending.clear()
    bad = (~flags.all(1)).nonzero()
    if not len(bad):
        return
    i = int(bad[0, 0])
    part = "loss" if not bool(flags[i, 0]) else "gradient"
    if params is not None and not all(bool(torch.isfinite(q).all()) for q in params):
        part += " (the parameters are not finite: a previous step made them so)"
    raise FloatingPointError(
        f"non-finite {part} at step {steps[i] + 1} of {str(run)!r}; nothing after the last checkpoint was saved, so "
        f"the run resumes from it. `--nonfinite skip` skips such batches instead")


def _train(cfg: TrainConfig, out, *, resume: bool, progress: bool, stop_after: int | None,
           reset_optimizer: bool = False) -> TrainResult:
    run = Path(out)
    if resume:
        if not (run / "run.json").exists():
            raise ValueError(f"nothing to resume: {str(run)!r} holds no run (no run.json); drop --resume to start one, "
                             f"or pass --resume auto to start one when there is none")
        done_steps = _read_json(run / "checkpoint.json")["step"] if (run / "checkpoint.json").exists() else 0
        # Before validating: a --steps shorter than the run's position is the error to name, not what it implies.
        cfg = _resume_config(cfg, read_run_info(run)["config"], done_steps)
    elif (run / "run.json").exists():
        raise ValueError(f"{str(run)!r} already holds a run: pass --resume to continue it or choose another --out")
    cfg.validate()
    rank, world = rank_world()
    device = check_device(cfg.device)
    init_distributed(device)
    torch.manual_seed(cfg.seed)
    dataset = data_mod.load(cfg.data, n=cfg.n_data, size=cfg.size, mode=cfg.mode, seed=cfg.seed)
    if cfg.batch_size is None:
        cfg.batch_size = default_batch_size(dataset)  # recorded in run.json as the number it became
    if cfg.batch_size % (world * cfg.accumulate):
        raise ValueError(f"batch_size {cfg.batch_size} does not split into {world} process(es) x {cfg.accumulate} "
                         f"micro-batch(es) (--accumulate): choose a multiple of {world * cfg.accumulate}")
    if not dataset.is_image:
        ignored = [f"--{k}" for k, bad in (("size", cfg.size is not None), ("mode", cfg.mode != "L")) if bad]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} only apply to image data; {cfg.data!r} is vector data of shape "
                             f"{dataset.shape}")
    if cfg.class_conditional and dataset.labels is None:
        raise ValueError(f"--class-conditional needs class labels; {cfg.data!r} has none (labelled: digits, moons, "
                         f"circles, ring, unequal_2d)")
    check_net_options(cfg, dataset)
    _set_threads(cfg, dataset)
    process = make_process(cfg.process)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = build_net(cfg, dataset, process).to(device, memory_format=layout)
    micro = cfg.batch_size // world // cfg.accumulate
    check_memory(f"training with --batch-size {cfg.batch_size}" + (f" in {cfg.accumulate} micro-batches"
                 if cfg.accumulate > 1 else ""), device=device, batch=micro,
                 # the micro-batch's activations, and its share of the step's noise and data (drawn whole)
                 per_item=training_bytes(net, dataset.shape, device)
                 + 3 * 4 * world * cfg.accumulate * math.prod(dataset.shape),
                 advice=lambda b: f"use --batch-size {b * world * cfg.accumulate} or less, or keep it and split "
                 f"it into micro-batches with --accumulate {-(-cfg.batch_size // (b * world))}")
    ema = build_net(cfg, dataset, process).to(device, memory_format=layout)
    distiller = None
    if cfg.distill:  # the student starts as the teacher: its EMA weights, in net, ema and the frozen teacher copy
        distiller = Progressive(cfg.distill, cfg.steps, process, build_net(cfg, dataset, process).to(device),
                                lambda n: Denoiser(n, process, cfg.prediction, sigma_data=cfg.sigma_data))
        if not (resume and (run / "checkpoint.json").exists()):  # a resumed one has all it needs in its checkpoint
            teacher = {k: v.to(device) for k, v in _teacher_weights(cfg, net).items()}
            net.load_state_dict(teacher)
            distiller.teacher_net.load_state_dict(teacher)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    # foreach: one multi-tensor update instead of a Python loop over parameters (the default only on GPU).
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    start = 0
    if rank == 0 and run.exists():
        remove_temporaries(run)  # left by a process killed inside a write
    posthoc = PowerEMA(net.parameters(), cfg.posthoc_ema) if cfg.posthoc_ema and rank == 0 else None
    names = [n for n, _ in net.named_parameters()]
    if resume and (run / "checkpoint.json").exists():
        start = load_checkpoint(run, net, ema, opt, generator, reset_optimizer=reset_optimizer)
        if posthoc is not None:
            posthoc.load(names, checkpoint_tensors(run, "posthoc."))
        if distiller is not None:
            distiller.teacher_net.load_state_dict({k: v.to(device) for k, v in checkpoint_tensors(run, "teacher.").items()})
    if rank == 0:
        write_run_info(run, {"config": dataclasses.asdict(cfg), "net": net.config, "process": process.config(),
                             "data_shape": list(dataset.shape), "num_classes": dataset.num_classes,
                             "levels": dataset.levels})
    if resume and rank == 0:  # a notice, not progress: --quiet keeps it
        change = cfg.schedule_changes[-1] if cfg.schedule_changes and cfg.schedule_changes[-1]["at"] == start else None
        note = (f"; length {change['previous_steps']} -> {cfg.steps} steps, learning rate "
                + (f"{'restarts at' if change['rule'] == 'warm restart' else 'continues from'} {change['lr']:.3g} "
                   f"and decays to 0 at step {cfg.steps}" if cfg.lr_schedule == "cosine" else
                   f"stays at {cfg.lr:.3g} (constant schedule)") if change else "")
        tqdm.write(f"resuming {str(run)!r} at step {start}{note}")
    ddp = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    model = Denoiser(_compiled(ddp) if cfg.compile else ddp, process, cfg.prediction, discrete_labels=cfg.discrete,
                     sigma_data=cfg.sigma_data)
    times = TimeSampler(process, cfg.weighting, discrete=cfg.discrete, snr_gamma=cfg.snr_gamma,
                        time_sampling=cfg.time_sampling, logit_normal=cfg.logit_normal, log_normal=cfg.log_normal)
    x_all = dataset.x.to(device)
    if rank == 0 and not (run / MOMENTS_FILE).exists():  # for analytical teleportation (sample --nfe)
        write_moments(run, dataset.x)
    labels_all = dataset.labels.to(device) if (dataset.labels is not None and cfg.class_conditional) else None
    local = cfg.batch_size // world
    mine = slice(rank * local, (rank + 1) * local)
    if rank == 0 and os.path.lexists(run / "log.jsonl"):
        regular_file(run / "log.jsonl")  # appended to: never through a link to a file elsewhere
    log = open(run / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or rank != 0, unit="step", dynamic_ncols=True)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    tic, done, skipped = time.perf_counter(), 0, 0
    requested = 0  # the number of a stop signal received (0: none)

    def on_signal(signum, frame):  # Ctrl-C, SIGTERM, SIGUSR1: finish the step, write a checkpoint, stop
        nonlocal requested
        requested = requested or signum

    restore_signals = _handle_stop_signals(on_signal)
    interrupted = 0
    # On a GPU, reading the finite check back at every step stalls the queue of kernels: with --nonfinite stop
    # the checks of up to SETTLE_EVERY steps are read together, before any log line or checkpoint, so a bad step
    # still stops the run before it is saved, and is named. --nonfinite skip decides per step, so it reads each.
    deferred, pending = device.type != "cpu" and cfg.nonfinite == "stop", []
    for step in range(start, cfg.steps):
        if stop_after is not None and done >= stop_after:
            break
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=generator)
        if distiller is not None:
            if distiller.begin(step, net, ema, opt) and rank == 0:
                tqdm.write(f"distillation round {distiller.round(step) + 1} of {distiller.rounds}: "
                           f"{distiller.spec['teacher_steps'] >> distiller.round(step)} -> "
                           f"{distiller.spec['teacher_steps'] >> (distiller.round(step) + 1)} steps")
            t, w = distiller.draw(step, cfg.batch_size, generator), torch.ones(cfg.batch_size)  # t: interval index
        else:
            t, w = times.sample(cfg.batch_size, generator)
        noise = torch.randn((cfg.batch_size, *dataset.shape), generator=generator)
        x0, t, w, noise = x_all[idx[mine]], t[mine].to(device), w[mine].to(device), noise[mine].to(device)
        if cfg.channels_last:
            x0, noise = x0.contiguous(memory_format=layout), noise.contiguous(memory_format=layout)
        y = None
        if labels_all is not None:
            y = labels_all[idx]
            if cfg.label_dropout > 0:  # classifier-free guidance's null label (Ho & Salimans 2022)
                drop = torch.rand(cfg.batch_size, generator=generator) < cfg.label_dropout  # drawn on the CPU
                y = torch.where(drop.to(y.device), dataset.num_classes, y)
            y = y[mine]
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for k in range(cfg.accumulate):  # micro-batches; DDP averages the gradients once, after the last
            part = slice(k * micro, (k + 1) * micro)
            sync = ddp.no_sync() if world > 1 and k < cfg.accumulate - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    labels = None if y is None else y[part]
                    if distiller is not None:
                        part_loss = progressive_loss(model, distiller.teacher, x0[part], t[part].cpu(),
                                                     distiller.grid(step), noise[part], labels) / cfg.accumulate
                    else:
                        part_loss = dsm_loss(model, x0[part], t[part], w[part], noise[part], cfg.weighting,
                                             labels=labels) / cfg.accumulate
                part_loss.backward()
            loss = loss + part_loss.detach()
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        finite = torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()]))
        if deferred:  # read with the next ones (``_settle``), always before anything is written
            pending.append((step, finite))
        elif not bool(finite.all()):
            if cfg.nonfinite == "stop":
                _settle([(step, finite)], params, run)
            skipped += 1  # the batch is dropped: no optimizer or EMA update
            opt.zero_grad(set_to_none=True)
            if done + 1 >= SKIP_GRACE and skipped > SKIP_LIMIT * (done + 1):
                raise FloatingPointError(
                    f"--nonfinite skip skipped {skipped} of the {done + 1} steps run so far (the last at step "
                    f"{step + 1}), more than {SKIP_LIMIT:.0%}: the training diverges rather than meeting a bad batch. "
                    f"Nothing after the last checkpoint of {str(run)!r} was saved; lower --lr or --grad-clip and "
                    f"resume")
        if deferred or bool(finite.all()):
            opt.step()
            with torch.no_grad():
                k = step if distiller is None else distiller.local(step)[0]  # the EMA restarts with each round
                torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema_decay, (1 + k) / (10 + k)))
            if posthoc is not None:
                posthoc.update(step + 1)
        done += 1
        bar.update(1)
        if world == 1:
            interrupted = requested
        elif (step + 1) % SIGNAL_EVERY == 0:  # every rank stops after the same step, so none waits for the others
            flag = torch.tensor([requested], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            interrupted = int(flag.item())
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        save_now = rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or interrupted)
        snapshot_now = posthoc is not None and ((step + 1) % cfg.posthoc_every == 0 or step + 1 == cfg.steps)
        if pending and (len(pending) >= SETTLE_EVERY or log_now or save_now or snapshot_now or interrupted):
            _settle(pending, None, run)
        if log_now:
            elapsed = time.perf_counter() - tic
            rate = done / elapsed
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if log:
                log.write(json.dumps({"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(),
                                      "lr": _lr(cfg, step), "steps_per_s": rate, "elapsed_s": elapsed,
                                      "skipped_nonfinite": skipped}) + "\n")
                log.flush()
        if snapshot_now:  # after the finite checks are read: never a snapshot of a step that went bad
            write_snapshot(run, step + 1, posthoc, names)
        if save_now:
            extra = {} if posthoc is None else {f"posthoc.{k}": v for k, v in posthoc.state(names).items()}
            if distiller is not None:
                extra.update({f"teacher.{k}": v.detach().cpu() for k, v in distiller.teacher_net.state_dict().items()})
            save_checkpoint(run, step + 1, net, ema, opt, generator, extra=extra)
        if interrupted:
            bar.close()
            if rank == 0:
                import signal

                tqdm.write(f"stopped by {signal.Signals(interrupted).name} at step {step + 1}; checkpoint written. "
                           f"Resume with: unstir train --out {run} --resume")
            break
    restore_signals()
    bar.close()
    if log:
        log.close()
    if skipped and rank == 0:
        print(f"skipped {skipped} of {done} steps whose loss or gradient was not finite (--nonfinite skip; the run "
              f"stops above {SKIP_LIMIT:.0%}); each is counted in log.jsonl's skipped_nonfinite", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
    return TrainResult(run, net, ema, start + done, interrupted)


def _teacher_weights(cfg: TrainConfig, net: nn.Module) -> dict:
    """The teacher run's EMA weights for the student ``net`` of a distillation, checked against it: the same
    network, data, process and prediction (``distill`` copies them from the teacher's run.json)."""
    from .runs import load_run

    teacher = Path(cfg.distill["teacher"])
    info = read_run_info(teacher)
    recorded = info["config"]
    differ = [k for k in ("data", "process", "prediction", "size", "mode", "class_conditional", "sigma_data")
              if recorded.get(k, getattr(DEFAULTS, k)) != getattr(cfg, k)]
    weights = {k: v for k, v in json.loads(json.dumps(net.config)).items() if k != "dropout"}  # no weights of its own
    if differ or {k: v for k, v in info["net"].items() if k != "dropout"} != weights:
        raise ValueError(f"the teacher {str(teacher)!r} differs from this student in "
                         f"{', '.join(differ) or 'its network'}; a progressive student is the teacher's network")
    return load_run(teacher, ema=True).net.state_dict()


def classifier_accuracy(net, process, cfg: TrainConfig, device, n: int = 2000) -> dict:
    """Accuracy on held-out data (the held-out set of digits, shapes32 or patches32; a fresh draw, seed + 1000,
    for 2-D sets) at t = t_min and at a quarter, half and three quarters of [t_min, T] (noised with a fixed seed): ``{"t=...": accuracy}``."""
    held = data_mod.load(data_mod.HELD_OUT.get(cfg.data, cfg.data), n=n, size=cfg.size, mode=cfg.mode,
                         seed=cfg.seed + 1000)
    if held.labels is None:
        return {}
    g = torch.Generator().manual_seed(cfg.seed + 2)
    out = {}
    with torch.no_grad():
        for frac in (0.0, 0.25, 0.5, 0.75):
            t = process.t_min + frac * (process.T - process.t_min)
            tt = torch.full((len(held.x),), t, dtype=torch.float64)
            x_t = process.perturb(held.x, tt, torch.randn(held.x.shape, generator=g)).to(device)
            pred = net(x_t, tt.float().to(device)).argmax(1).cpu()
            out[f"t={t:.3g}"] = round((pred == held.labels).float().mean().item(), 4)
    return out


def train_classifier(cfg: TrainConfig, out, *, progress: bool = True, force: bool = False) -> Path:
    """Train a noise-conditional classifier p_t(y | x_t) for classifier guidance (Dhariwal & Nichol 2021):
    cross-entropy on x_t = alpha x0 + sigma eps with t uniform on [t_min, T] of ``cfg.process``, on the
    labelled data ``cfg.data``. The network is an MLP for vectors and the U-Net's encoder half for images.
    Writes ``run.json`` and ``classifier.safetensors`` into ``out`` (in one go: it does not resume; ``force``
    replaces an earlier classifier there, never a model run). ``run.json`` records the held-out accuracy
    (``classifier_accuracy``) at four noise levels."""
    from .runs import atomic_write

    cfg.validate()
    run = Path(out)
    if (run / "run.json").exists():
        if not (run / "classifier.safetensors").exists():
            raise ValueError(f"{str(run)!r} holds a model run; choose another --out for the classifier")
        if not force:
            raise ValueError(f"{str(run)!r} already holds a classifier; pass --force to replace it")
    device = check_device(cfg.device)
    torch.manual_seed(cfg.seed)
    dataset = data_mod.load(cfg.data, n=cfg.n_data, size=cfg.size, mode=cfg.mode, seed=cfg.seed)
    if cfg.batch_size is None:
        cfg.batch_size = default_batch_size(dataset)
    if dataset.labels is None:
        raise ValueError(f"a classifier needs class labels; {cfg.data!r} has none")
    process = make_process(cfg.process)
    time_scale = 1000.0 / process.T
    if dataset.is_image:
        c, h, _ = dataset.shape
        net = nets.EncoderClassifier(c, h, unet_options(cfg, h)["widths"], dataset.num_classes, time_scale)
    else:
        net = nets.MLP(dataset.shape[0], cfg.width, cfg.depth, time_scale, out_dim=dataset.num_classes)
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    x_all, labels = dataset.x.to(device), dataset.labels.to(device)
    for step in tqdm(range(cfg.steps), disable=not progress, unit="step", desc="classifier"):
        idx = torch.randint(len(dataset.x), (cfg.batch_size,), generator=generator)
        t = process.t_min + (process.T - process.t_min) * torch.rand(cfg.batch_size, generator=generator,
                                                                     dtype=torch.float64)
        noise = torch.randn((cfg.batch_size, *dataset.shape), generator=generator).to(device)
        x_t = process.perturb(x_all[idx.to(device)], t.to(device), noise)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss = nn.functional.cross_entropy(net(x_t, t.float().to(device)), labels[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
    accuracy = classifier_accuracy(net.eval(), process, cfg, device)
    from safetensors.torch import save_file

    write_run_info(run, {"kind": "classifier", "config": dataclasses.asdict(cfg), "net": net.config,
                         "process": process.config(), "data_shape": list(dataset.shape),
                         "num_classes": dataset.num_classes, "accuracy": accuracy})
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write(run / "classifier.safetensors", lambda p: save_file(state, str(p)))
    return run
