"""The `unstir` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from . import figures, oracle
from .demos import demo, oracle_demo
from .grids import GRIDS
from .losses import WEIGHTINGS
from .parametrization import PREDICTIONS
from .processes import PROCESSES
from .samplers import SAMPLERS, sample


def _output(args, suffixes=(".png", ".npy")) -> Path:
    """--out checked before any work: a known suffix, not a folder, in a folder that exists (one rule for every
    verb that writes a file, as for cp or numpy.save: unstir creates run folders, never the folder of a file),
    and an existing file only with --force."""
    out = Path(args.out)
    if out.suffix not in suffixes:
        raise ValueError(f"--out must end in {' or '.join(suffixes)}, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise ValueError(f"the folder of --out, {str(out.parent)!r}, does not exist; create it first")
    if out.exists() and not getattr(args, "force", False):
        raise ValueError(f"{str(out)!r} exists; pass --force to replace it or choose another --out")
    return out


def _save(out: Path, write) -> None:
    """Write ``out`` through ``write(path)`` atomically: a failed write leaves no partial file."""
    from .runs import atomic_write

    atomic_write(out, write)


def _positive(**values) -> None:
    """Counts from the command line: each a positive integer, named as typed."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_strength(value) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"--guidance must be >= 0 (a negative strength pushes away from the condition), got {value}")


def _warn_out_of_range(x, bound: float, what: str) -> None:
    """Samples orders of magnitude outside the data's range are a strength set too high, not a result."""
    top = x.abs().max().item()
    if top > 100 * bound:
        print(f"warning: samples reach |x| = {top:.3g}, over 100x the data's range (|x| <= {bound:.3g}); {what} is "
              f"likely too strong", file=sys.stderr)


def _npy(array):
    def write(path):
        with open(path, "wb") as f:
            np.save(f, array)
    return write


def train_cmd(args) -> int:
    """Train a score model by denoising score matching and write a run folder (safetensors checkpoints,
    config, log.jsonl). Under `torchrun --nproc_per_node=N` the same command trains data-parallel (DDP),
    each process on its own shard of every global batch."""
    from .runs import read_run_info
    from .training import TrainConfig, train

    if not hasattr(args, "out"):
        args.out = str(Path("runs") / Path(getattr(args, "data", "moons")).stem)
    fields = {f for f in TrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in fields}  # only the options on the command line
    resume = getattr(args, "resume", False)
    if resume and (Path(args.out) / "run.json").exists():
        # Resume the recorded run; options given again must agree with it (checked by `train`).
        cfg = TrainConfig(**{**read_run_info(args.out)["config"], **given})
    else:
        cfg = TrainConfig(**given)
    result = train(cfg, args.out, resume=resume, progress=not getattr(args, "quiet", False))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run folder: {result.run} (step {result.step})")
    return 130 if result.interrupted else 0


def train_classifier_cmd(args) -> int:
    """Train a noise-conditional classifier p_t(y | x_t) on labelled data (digits, moons, ...) for classifier
    guidance: `unstir sample --run R --classifier C --class 3 --guidance 2`."""
    from .training import TrainConfig, train_classifier

    cfg = TrainConfig(data=args.data, process=args.process, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed)
    run = train_classifier(cfg, args.out, progress=not args.quiet)
    print(f"classifier folder: {run}")
    return 0


def _guidance_model(model, args):
    """The model to sample: as is, classifier-free guided (--guidance without --classifier) or classifier
    guided (--classifier), for the labels of --class."""
    from .guidance import cfg as cfg_guidance
    from .guidance import guided
    from .runs import load_classifier

    _check_strength(args.guidance)
    if args.classifier is not None:
        if args.label is None:
            raise ValueError("--classifier needs --class, the label to guide towards")
        clf = load_classifier(args.classifier, device=args.device)
        if clf.process.config() != model.process.config():
            raise ValueError(f"the classifier was trained on process {clf.process!r}, the model on {model.process!r}")
        if clf.data_shape is not None and tuple(clf.data_shape) != tuple(model.data_shape):
            raise ValueError(f"the classifier was trained on data of shape {tuple(clf.data_shape)}, the run's data "
                             f"have shape {tuple(model.data_shape)}")
        return guided(model, clf, args.label, 1.0 if args.guidance is None else args.guidance), None
    if args.guidance is not None:
        if args.label is None:
            raise ValueError("--guidance needs --class, the label to guide towards")
        return cfg_guidance(model, args.label, args.guidance), None
    return model, args.label


def sample_cmd(args) -> int:
    """Sample from a trained run and write a PNG (grid of images or scatter plot) or a .npy array."""
    from .data import from_unit_range
    from .runs import load_run

    out = _output(args)
    if args.n < 1:
        raise ValueError(f"-n must be a positive integer, got {args.n}")
    options = _sampler_options(args)
    model, y = _guidance_model(load_run(args.run, ema=not args.no_ema, device=args.device), args)
    shape = (args.n, *model.data_shape)
    from .tuning import load_tuned, nfe_for_steps, steps_for_nfe

    if args.nfe is not None:
        if args.steps is not None:
            raise ValueError("give --steps or --nfe, not both")
        args.steps = steps_for_nfe(args.sampler, args.nfe)
    args.steps = 20 if args.steps is None else args.steps
    grid = args.grid
    if grid is None:  # a grid tuned for this sampler and NFE (`unstir tune-grid`) beats the named default
        nfe = nfe_for_steps(args.sampler, args.steps)
        tuned = load_tuned(args.run, model.process, args.sampler, nfe)
        if tuned is not None:
            clash = {k: (v, tuned.options[k]) for k, v in options.items() if k in tuned.options and tuned.options[k] != v}
            if clash:
                raise ValueError(f"the grid stored for {args.sampler} at {nfe} NFE was tuned with "
                                 + ", ".join(f"--{k} {t}" for k, (_, t) in clash.items())
                                 + "; sample with those options, or choose a named grid with --grid")
            options = {**tuned.options, **options}
            grid = tuned.grid
            given = "".join(f" --{k} {v}" for k, v in tuned.options.items())
            print(f"using the grid tuned for {args.sampler} at {nfe} NFE{given} in {args.run}/grids.json (fitted "
                  f"error {tuned.error:.3g} against {tuned.error_start:.3g} on the named {tuned.start!r} grid); "
                  f"--grid overrides it", file=sys.stderr)
    with torch.no_grad():
        r = sample(model, None, shape, sampler=args.sampler, steps=args.steps, grid=grid, y=y,
                   generator=torch.Generator().manual_seed(args.seed), **options)
    x = r.x.cpu()
    if args.guidance is not None:
        _warn_out_of_range(x, _data_bound(model, args.seed), f"--guidance {args.guidance:g}")
    if out.suffix == ".npy":
        _save(out, _npy(x.numpy()))
    elif x.ndim == 4:
        _save(out, lambda p: figures.image_grid(from_unit_range(x), p))
    else:
        _save(out, lambda p: figures.scatter_panels({f"{args.sampler} ({r.nfe} NFE)": x[:, :2]}, p, xlim=args.xlim,
                                                    ylim=args.ylim))
    print(f"{args.n} samples with {args.sampler} ({r.nfe} model evaluations) -> {out}")
    return 0


SAMPLER_OPTIONS = ("eta", "order", "form", "snr", "churn", "rtol", "atol")


def _sampler_options(args) -> dict:
    """The sampler options given on the command line, each checked to apply to the chosen sampler."""
    import inspect

    def takes(name, option):  # dpm++2m/3m fix their order in the name; form is second order's
        if "dpm++" in name and option in ("order", "form"):
            return option == "form" and name == "dpm++2m"
        return option in inspect.signature(SAMPLERS[name].fn).parameters

    options = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k, None) is not None}
    for k in options:
        if not takes(args.sampler, k):
            raise ValueError(f"--{k} does not apply to sampler {args.sampler!r}; it applies to "
                             f"{sorted(n for n in SAMPLERS if takes(n, k))}")
    return options


def _held_out(model, spec: str | None, n: int, seed: int):
    """Data the run was not trained on: a fresh draw of a 2-D set (seed + 1000), the held-out digits, or the
    first n items of a folder / .npy file. Returns (x, levels)."""
    from . import data as data_mod

    cfg = model.run_info["config"]
    spec = spec or ("digits-test" if cfg["data"] == "digits" else cfg["data"])
    ds = data_mod.load(spec, n=n, size=cfg.get("size"), mode=cfg.get("mode", "L"), seed=seed + 1000)
    if tuple(ds.shape) != tuple(model.data_shape):
        raise ValueError(f"data {spec!r} has per-sample shape {ds.shape}; the run's model expects {model.data_shape}")
    return ds.x[:n], ds.levels


def _data_bound(model, seed: int) -> float:
    """The largest |x| of the run's data: 1 for images (scaled to [-1, 1]), else of a held-out draw."""
    if len(model.data_shape) == 3:
        return 1.0
    return _held_out(model, None, 1000, seed)[0].abs().max().item()


def likelihood_cmd(args) -> int:
    """Log-likelihood of held-out data under a trained run, by the probability-flow ODE: mean nats and
    bits/dim with their standard error, and the model evaluations. Quantised data (images, digits) are
    dequantised and their bits/dim include the offset of their number of levels (see unstir.likelihood)."""
    from .likelihood import log_likelihood
    from .runs import load_run

    _positive(**{"-n": args.n, "--batch-size": args.batch_size})
    model = load_run(args.run, device=args.device)
    x, levels = _held_out(model, args.data, args.n, args.seed)
    r = log_likelihood(model, x, divergence=args.divergence, probes=args.probes, rtol=args.rtol, atol=args.atol,
                       levels=levels, batch_size=args.batch_size, y=args.label, generator=torch.Generator().manual_seed(args.seed),
                       progress=not args.quiet)
    d = x[0].numel()
    bpd, se = r.mean()
    nats_se = (r.nats.std() / r.nats.numel() ** 0.5).item() if r.nats.numel() > 1 else float("nan")
    kind = f"dequantised, {levels} levels" if levels else "continuous"
    div = "exact" if r.stderr is None else f"Hutchinson ({args.probes} probes)"
    print(f"{x.shape[0]} samples ({kind}), d = {d}, {div} divergence, {r.nfe} evaluations of the augmented "
          f"ODE in all (batches of {args.batch_size})")
    print(f"log-likelihood: {r.nats.mean().item():.4f} +- {nats_se:.4f} nats per sample")
    print(f"bits/dim:       {bpd:.4f} +- {se:.4f}")
    return 0


def encode_cmd(args) -> int:
    """Encode data into latents at T along the probability-flow ODE (adaptive, or DDIM inversion with
    --sampler ddim, exact with --exact) and save them as .npy."""
    from .inversion import encode
    from .runs import load_run

    out = _output(args, (".npy",))
    model = load_run(args.run, device=args.device)
    x, _ = _held_out(model, args.data, args.n, args.seed)
    with torch.no_grad():
        enc = encode(model, x, sampler=args.sampler, steps=args.steps, exact=args.exact, y=args.label,
                     **({"progress": True} if args.sampler == "ode_rk45" else {}))
    _save(out, _npy(enc.z.cpu().numpy()))
    print(f"{x.shape[0]} latents ({enc.nfe} model evaluations) -> {out}")
    return 0


def decode_cmd(args) -> int:
    """Decode latents (.npy from `unstir encode`, or any prior samples) back to data along the PF ODE."""


    from .data import from_unit_range
    from .inversion import decode
    from .runs import load_run

    out = _output(args)
    model = load_run(args.run, device=args.device)
    from .data import read_npy

    z = torch.as_tensor(read_npy(args.latents))
    if z.ndim < 2 or z.shape[0] == 0:
        raise ValueError(f"{args.latents!r} holds no latents (shape {tuple(z.shape)}); it needs shape (n, "
                         f"{', '.join(map(str, model.data_shape))}) with n >= 1")
    if tuple(z.shape[1:]) != tuple(model.data_shape):
        raise ValueError(f"latents of shape {tuple(z.shape)} do not fit the run's data shape {model.data_shape}")
    with torch.no_grad():
        r = decode(model, z.float(), sampler=args.sampler, steps=args.steps,
                   **({"progress": True} if args.sampler == "ode_rk45" else {}))
    if out.suffix == ".npy":
        _save(out, _npy(r.x.cpu().numpy()))
    elif r.x.ndim == 4:
        _save(out, lambda p: figures.image_grid(from_unit_range(r.x.cpu()), p))
    else:
        _save(out, lambda p: figures.scatter_panels({f"decoded ({r.nfe} NFE)": r.x.cpu()}, p))
    print(f"{z.shape[0]} decoded ({r.nfe} model evaluations) -> {out}")
    return 0


def interpolate_cmd(args) -> int:
    """Encode two held-out data points, interpolate their latents (slerp or lerp) and decode every frame:
    a strip of images, or for 2-D data the path drawn over the data."""
    from .data import from_unit_range
    from .inversion import interpolate
    from .runs import load_run

    out = _output(args)
    i, j = args.pair
    if min(i, j) < 0 or i == j:
        raise ValueError(f"--pair needs two different indices >= 0 into the held-out data, got {i} {j}")
    model = load_run(args.run, device=args.device)
    x, _ = _held_out(model, args.data, max(args.pair) + 1, args.seed)
    if max(i, j) >= x.shape[0]:
        raise ValueError(f"--pair {i} {j}: the held-out data have {x.shape[0]} points (indices 0-{x.shape[0] - 1})")
    with torch.no_grad():
        r = interpolate(model, x[i], x[j], args.frames, method=args.method, y=args.label)
    if out.suffix == ".npy":
        _save(out, _npy(r.x.cpu().numpy()))
    elif r.x.ndim == 4:
        _save(out, lambda p: figures.image_grid(from_unit_range(r.x.cpu()), p, ncol=args.frames))
    else:
        background, _ = _held_out(model, args.data, 2000, args.seed)
        _save(out, lambda p: figures.interpolation_path(background, r.x.cpu(), p))
    print(f"{args.frames} frames ({args.method}, {r.nfe} model evaluations) -> {out}")
    return 0


INVERSE_METHODS = ("replacement", "repaint", "dps", "pigdm", "smc")


def inpaint_cmd(args) -> int:
    """Solve a linear inverse problem with a trained run: inpainting (--mask), colorization or 2x
    super-resolution of --image, or, for vector data, conditioning on coordinates (--known, --values).
    Writes the measurement beside -n posterior samples (images), or a scatter plot / .npy. Methods:
    replacement and RePaint paste the known entries (masks only); DPS (Chung et al. 2023, Alg. 1; --guidance
    is its step size zeta', default 1.0); PiGDM; smc, twisted SMC (Wu et al. 2023) with --particles per
    sample, the one method that converges to the posterior."""
    from .data import from_unit_range, to_unit_range
    from .inverse import Measurement, colorize_operator, dps, pigdm, repaint, superres_operator, twisted_smc
    from .runs import load_run

    _positive(**{"-n": args.n, "--steps": args.steps, "--particles": args.particles})
    if not args.sigma_y >= 0:
        raise ValueError(f"--sigma-y must be >= 0, got {args.sigma_y}")
    if args.guidance is not None and args.method != "dps":
        raise ValueError(f"--guidance is DPS's step size; --method {args.method} has none")
    if args.particles is not None and args.method != "smc":
        raise ValueError(f"--particles is for --method smc, not {args.method}")
    _check_strength(args.guidance)
    out = _output(args)
    model = load_run(args.run, device=args.device)
    shape = tuple(model.data_shape)
    g = torch.Generator().manual_seed(args.seed)
    image_options = [name for name, given in (("--image", args.image), ("--mask", args.mask),
                                              ("--task", args.task != "inpaint")) if given]
    vector_options = [name for name, given in (("--known", args.known), ("--values", args.values)) if given]
    if len(shape) == 3:
        if vector_options:
            raise ValueError(f"{' and '.join(vector_options)} condition vector data; this run's data are images "
                             f"{shape}: use --image with --mask or --task")
        if args.image is None:
            raise ValueError("image runs need --image (a PNG of the run's size)")
        truth = to_unit_range(_read_png(args.image, shape))[None].double()
        if args.task == "inpaint":
            if args.mask is None:
                raise ValueError("--task inpaint needs --mask (white = known, black = unknown)")
            mask = _read_png(args.mask, shape, mask=True)
            m = Measurement(mask, truth.flatten(1)[:, mask.flatten().bool()], args.sigma_y, data_shape=shape)
        else:
            if args.mask is not None:
                raise ValueError(f"--mask is for --task inpaint; --task {args.task} measures the whole image")
            ops = superres_operator(shape) if args.task == "superres" else colorize_operator(shape)
            m = Measurement(y=ops["A"](truth), sigma_y=args.sigma_y, data_shape=shape, **ops)
    else:
        if image_options:
            raise ValueError(f"{' and '.join(image_options)} apply to image runs; this run's data are vectors of "
                             f"shape {shape}: use --known I [I ...] --values V [V ...]")
        if args.known is None or args.values is None or len(args.known) != len(args.values):
            raise ValueError("vector runs need --known I [I ...] and as many --values")
        if min(args.known) < 0 or max(args.known) >= shape[0]:
            raise ValueError(f"--known indices must lie in [0, {shape[0] - 1}], got {args.known}")
        if len(set(args.known)) != len(args.known):
            raise ValueError(f"--known lists an index twice: {args.known}; give each known coordinate once")
        mask = torch.zeros(shape, dtype=torch.long)
        mask[list(args.known)] = 1
        m = Measurement(mask, torch.tensor([args.values[args.known.index(i)] for i in sorted(args.known)]),
                        args.sigma_y, data_shape=shape)
        truth = None
    if args.method in ("replacement", "repaint") and m.mask is None:
        raise ValueError(f"--method {args.method} pastes known entries and needs a mask; use dps, pigdm or smc for "
                         f"--task {args.task}")
    y = args.label
    x_T = model.process.prior_sample((args.n, *shape), g)
    with torch.no_grad():
        if args.method == "repaint":
            r = repaint(model, m, x_T, args.steps, y=y, generator=g)
        elif args.method == "replacement":
            r = sample(model, None, x_T, sampler="ddpm", steps=args.steps, project=m.replacement(g), y=y, generator=g)
        elif args.method == "dps":
            r = dps(model, m, x_T, args.steps, zeta=1.0 if args.guidance is None else args.guidance, y=y, generator=g)
        elif args.method == "smc":
            r = twisted_smc(model, m, args.n, args.steps, particles=args.particles or 16, y=y, generator=g)
        else:
            r = sample(pigdm(model, m), None, x_T, sampler="ddpm", steps=args.steps, y=y, generator=g)
    x, nfe = r.x, r.nfe
    if args.method == "dps":
        _warn_out_of_range(x, _data_bound(model, args.seed), f"--guidance {args.guidance if args.guidance is not None else 1.0:g}")
    if out.suffix == ".npy":
        _save(out, _npy(x.cpu().numpy()))
    elif truth is not None:
        shown = m.pinv(m.A(truth)).to(x.dtype)  # the measurement, back in image space
        grid = from_unit_range(torch.cat([truth.to(x.dtype), shown, x]).clamp(-1, 1))
        _save(out, lambda p: figures.image_grid(grid, p, ncol=args.n + 2))
    else:
        background, _ = _held_out(model, None, 2000, args.seed)
        known = ", ".join(f"x[{i}] = {v:g}" for i, v in zip(args.known, args.values))
        _save(out, lambda p: figures.conditioned_samples(background.cpu(), x.cpu(), p,
                                                         title=f"{args.method} ({nfe} NFE), given {known}"))
    print(f"{args.n} samples with {args.method} ({nfe} model evaluations) -> {out}")
    return 0


def _read_png(path, shape, mask: bool = False):
    """A PNG as a uint8 tensor of ``shape`` (C, H, W); a mask as 0/1 (white = 1), refusing other values."""
    from PIL import Image

    c, h, w = shape
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if (mask or c == 1) else "RGB"), dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from None
    if arr.shape[:2] != (h, w):
        raise ValueError(f"{str(path)!r} is {arr.shape[1]}x{arr.shape[0]}; the run's images are {w}x{h}")
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if mask:
        if not ((t == 0) | (t == 255)).all():
            raise ValueError(f"mask {str(path)!r} must be black (0, unknown) and white (255, known) only")
        return (t[:1] == 255).long().expand(c, h, w).contiguous()
    return t


def tune_grid_cmd(args) -> int:
    """Fit the time points of an NFE-evaluation grid to the run's model and store them in RUN/grids.json;
    `unstir sample` with the same sampler and --steps then uses them (and says so)."""
    from .runs import load_run
    from .tuning import save_tuned, tune_grid

    from .tuning import GRIDS_FILE, _key, _read_grids

    options = _sampler_options(args)
    if args.sampler == "edm":
        options["churn"] = 0.0
    stored = Path(args.run) / GRIDS_FILE
    if stored.exists() and _key(args.sampler, args.nfe) in _read_grids(stored) and not args.force:
        raise ValueError(f"{str(stored)!r} already holds a grid for {args.sampler} at {args.nfe} NFE; pass --force to "
                         f"replace it (the new one is stored only if it beats the best named grid)")
    model = load_run(args.run, ema=not args.no_ema, device=args.device)
    tuned = tune_grid(model, args.sampler, args.nfe, n=args.n, max_evals=args.max_evals, seed=args.seed,
                      progress=not args.quiet, **options)
    summary = (f"{args.sampler} at {args.nfe} NFE: mean endpoint error {tuned.error:.4g} (best named grid "
               f"{tuned.start!r}: {tuned.error_start:.4g}) on {tuned.n} prior samples; cost {tuned.evaluations} model "
               f"evaluations, {tuned.seconds:.1f} s")
    if not tuned.error < tuned.error_start:
        print(f"{summary}: no grid beat the named one, nothing stored")
        return 0
    path = save_tuned(args.run, tuned)
    print(f"{summary} -> {path}")
    print("times: " + " ".join(f"{t:.5g}" for t in tuned.times))
    return 0


def report_cmd(args) -> int:
    """Write RUN/report.html: one self-contained page with the run's samples, trajectories, quality against
    NFE, loss curve, bits/dim, interpolation, round trip, guided samples and inpainting."""
    from .report import write_report

    args.out = args.out or str(Path(args.run) / "report.html")
    path = write_report(args.run, _output(args, (".html",)), n=args.n, seed=args.seed, progress=not args.quiet)
    print(f"report -> {path}")
    return 0


def list_choices(args) -> int:
    """Every name the other commands take: data, processes, predictions, weightings, networks, grids,
    samplers, inverse-problem methods and oracle mixtures."""
    from .data import TOY_2D
    from .nets import NETS

    print("data:       ", ", ".join([*TOY_2D, "digits", "digits-test"]), "(or a folder of images, or a .npy file)")
    print("predictions:", ", ".join(PREDICTIONS))
    print("weightings: ", ", ".join(["auto", *WEIGHTINGS]))
    print("networks:   ", ", ".join(k for k in NETS if k != "encoder"), "(chosen by the data's shape)")
    print("inpaint methods:", ", ".join(INVERSE_METHODS))
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
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
    m.add_argument("--force", action="store_true", help="replace OUT/run if it holds an earlier demo run")
    m.set_defaults(func=demo)
    d = sub.add_parser("oracle", help="samplers on the exact score of a Gaussian mixture, with figures",
                       description=oracle_demo.__doc__)
    d.add_argument("--out", default="runs/oracle", help="folder for the figures (default: runs/oracle)")
    d.add_argument("--process", default="vp", choices=sorted(PROCESSES))
    d.add_argument("--data", default="unequal_2d", choices=list(oracle.EXAMPLES),
                   help="a 2-D Gaussian mixture ('random': 5 random components, from --seed; default: unequal_2d)")
    d.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20)")
    d.add_argument("-n", type=int, default=2000, help="samples per sampler (default: 2000)")
    d.add_argument("--paths", type=int, default=6, help="trajectories to draw (default: 6)")
    d.add_argument("--seed", type=int, default=0, help="seed for the samples and the noise (default: 0)")
    d.set_defaults(func=oracle_demo)
    # Options left out are absent from args (SUPPRESS), so --resume can tell what the user asked to change.
    tr = sub.add_parser("train", help="train a score model (torchrun for several processes)", description=train_cmd.__doc__,
                        argument_default=argparse.SUPPRESS)
    tr.add_argument("--data", help="moons, swiss_roll, circles, checkerboard, ring, unequal_2d, digits, a folder "
                    "of PNG/JPEG images (8-bit, scaled to [-1, 1]) or a .npy file: vectors as given, float images "
                    "as given (expected in [-1, 1]), integer images as 8-bit levels 0..255 (default: moons)")
    tr.add_argument("--out", help="run folder (refused if it already holds a run, unless --resume; default: "
                    "runs/<data name>)")
    tr.add_argument("--process", choices=sorted(PROCESSES), help="forward process (default: vp)")
    tr.add_argument("--prediction", choices=list(PREDICTIONS),
                    help="what the network predicts (default: eps; velocity is flow matching, e.g. with --process rf)")
    tr.add_argument("--weighting", choices=["auto", *WEIGHTINGS],
                    help="loss weighting: DDPM's simple eps loss, sigma^2 (score_sde), g^2 with importance-"
                         "sampled t, or the flow-matching velocity loss (default: velocity for --prediction "
                         "velocity, else simple)")
    tr.add_argument("--steps", type=int, help="optimizer steps in total (default: 4000)")
    tr.add_argument("--batch-size", dest="batch_size", type=int,
                    help="global batch size, split across processes (default: 512)")
    tr.add_argument("--lr", type=float, help="AdamW peak learning rate (default: 2e-3)")
    tr.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine decay; must be shorter than the "
                    "run (default: 200, or a tenth of a run shorter than 2000 steps)")
    tr.add_argument("--grad-clip", dest="grad_clip", type=float,
                    help="gradient-norm clipping (default: 1.0)")
    tr.add_argument("--ema-decay", dest="ema_decay", type=float,
                    help="EMA of the weights, used for sampling (default: 0.999)")
    tr.add_argument("--seed", type=int, help="seed for data, initialisation and noise (default: 0)")
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
    tr.add_argument("--bf16", action="store_true", help="bf16 autocast")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out exactly where it stopped, with its recorded settings; only "
                         "--steps, --checkpoint-every and --device may change. A longer --steps stretches the "
                         "cosine decay from the current learning rate to the new end (a finished run restarts it "
                         "from --lr: a warm restart); the change is recorded in run.json")
    tr.add_argument("--threads", type=int, help="intra-op CPU threads (default: 1 for vector data, where one "
                    "thread is 18%% slower alone but 3x faster beside another job; torch's default for images)")
    tr.add_argument("--nonfinite", choices=["stop", "skip"],
                    help="a non-finite loss or gradient: stop naming the step (default), or skip the batch and "
                         "count it in log.jsonl")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=train_cmd)
    sa = sub.add_parser("sample", help="sample from a trained run", description=sample_cmd.__doc__)
    sa.add_argument("--run", required=True, help="run folder written by `unstir train`")
    sa.add_argument("--sampler", default="dpm++2m", choices=sorted(SAMPLERS),
                    help="see `unstir list` (default: dpm++2m)")
    sa.add_argument("--steps", type=int, help="grid intervals; the model evaluations are reported. For "
                    "ode_rk45 only the output grid: its cost is set by --rtol/--atol (default: 20)")
    sa.add_argument("--nfe", type=int, help="model evaluations instead of --steps (fixed-grid samplers; a grid "
                    "stored by `unstir tune-grid` for this sampler and NFE is used)")
    sa.add_argument("--grid", choices=list(GRIDS), help="time grid (default: the sampler's)")
    sa.add_argument("-n", type=int, default=1000, help="number of samples (default: 1000)")
    sa.add_argument("--out", default="samples.png", help="samples.png (default; image grid, clipped to 0-255, or scatter plot) or "
                    "samples.npy (the model's coordinates, unclipped: images in [-1, 1] up to the sampler's overshoot)")
    sa.add_argument("--class", dest="label", type=int, help="class label to sample (class-conditional runs, or "
                    "with --classifier)")
    sa.add_argument("--guidance", type=float, help="guidance scale: classifier-free (diffusers/Imagen scale s: 0 "
                    "unconditional, 1 conditional; Ho & Salimans' w = s - 1), or with --classifier the classifier "
                    "gradient's weight (1 = Bayes' rule)")
    sa.add_argument("--classifier", help="classifier folder from `unstir train-classifier`: classifier guidance")
    sa.add_argument("--eta", type=float, help="ddim: 0 deterministic ... 1 DDPM (default: 0)")
    sa.add_argument("--order", type=int, help="deis (1-4, default 3), ipndm (1-4, default 4), unipc (1-3, default 3)")
    sa.add_argument("--form", choices=["midpoint", "taylor"], help="dpm++2m's second-order term: Lu et al. "
                    "Algorithm 2 (midpoint, default) or the phi_2 integral (taylor)")
    sa.add_argument("--snr", type=float, help="pc: Langevin corrector signal-to-noise ratio (default: 0.075)")
    sa.add_argument("--churn", type=float, help="edm: S_churn (default: 10)")
    sa.add_argument("--rtol", type=float, help="ode_rk45: relative tolerance (default: 1e-5)")
    sa.add_argument("--atol", type=float, help="ode_rk45: absolute tolerance (default: 1e-5)")
    sa.add_argument("--seed", type=int, default=0, help="seed for the noise (default: 0)")
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sa.add_argument("--xlim", type=float, nargs=2, metavar=("LO", "HI"), help="scatter plot x range (default: from the samples)")
    sa.add_argument("--ylim", type=float, nargs=2, metavar=("LO", "HI"), help="scatter plot y range (default: from the samples)")
    sa.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    sa.add_argument("--force", action="store_true", help="replace --out if it exists")
    sa.set_defaults(func=sample_cmd)
    deterministic = sorted(k for k, v in SAMPLERS.items() if not v.stochastic)

    def common(p, data_help="held-out data (default: the run's data: a fresh draw, or digits-test)"):
        p.add_argument("--run", required=True, help="run folder written by `unstir train`")
        p.add_argument("--data", help=data_help)
        p.add_argument("--seed", type=int, default=0, help="seed for the held-out draw and any noise (default: 0)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
        p.add_argument("--class", dest="label", type=int, help="class label (class-conditional runs)")

    tc = sub.add_parser("train-classifier", help="train a noise-conditional classifier for classifier guidance",
                        description=train_classifier_cmd.__doc__)
    tc.add_argument("--data", default="digits", help="labelled data: digits, moons, circles, ring, unequal_2d (default: digits)")
    tc.add_argument("--out", required=True, help="folder for the classifier")
    tc.add_argument("--process", default="vp", choices=sorted(PROCESSES), help="the model's process (default: vp)")
    tc.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    tc.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="batch size (default: 256)")
    tc.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default: 1e-3)")
    tc.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    tc.add_argument("--quiet", action="store_true", help="no progress bar")
    tc.set_defaults(func=train_classifier_cmd)
    lk = sub.add_parser("likelihood", help="bits/dim of held-out data by the PF ODE", description=likelihood_cmd.__doc__)
    common(lk)
    lk.add_argument("-n", type=int, default=500, help="number of held-out samples (default: 500)")
    lk.add_argument("--divergence", default="auto", choices=["auto", "exact", "hutchinson"],
                    help="exact (torch.func, default for d <= 64) or Hutchinson-Skilling probes (default: auto)")
    lk.add_argument("--probes", type=int, default=8, help="Hutchinson probes per sample (default: 8)")
    lk.add_argument("--rtol", type=float, default=1e-5, help="solver relative tolerance (default: 1e-5)")
    lk.add_argument("--atol", type=float, default=1e-5, help="solver absolute tolerance (default: 1e-5)")
    lk.add_argument("--batch-size", dest="batch_size", type=int, default=100,
                    help="samples per solve (default: 100)")
    lk.add_argument("--quiet", action="store_true", help="no progress bar")
    lk.set_defaults(func=likelihood_cmd)
    en = sub.add_parser("encode", help="encode data to latents along the PF ODE", description=encode_cmd.__doc__)
    common(en)
    en.add_argument("-n", type=int, default=100, help="number of held-out samples (default: 100)")
    en.add_argument("--out", required=True, help="latents .npy")
    en.add_argument("--sampler", default="ode_rk45", choices=deterministic,
                    help="ode_rk45 (adaptive, default) or a deterministic sampler run upward (ddim: DDIM inversion)")
    en.add_argument("--steps", type=int, default=20, help="grid intervals for a fixed-step sampler (default: 20)")
    en.add_argument("--exact", action="store_true", help="exact DDIM inversion (with --sampler ddim)")
    en.add_argument("--force", action="store_true", help="replace --out if it exists")
    en.set_defaults(func=encode_cmd)
    de = sub.add_parser("decode", help="decode latents to data along the PF ODE", description=decode_cmd.__doc__)
    de.add_argument("--run", required=True, help="run folder written by `unstir train`")
    de.add_argument("--latents", required=True, help="latents .npy (from `unstir encode`)")
    de.add_argument("--out", required=True, help="decoded.png (grid or scatter) or decoded.npy")
    de.add_argument("--sampler", default="ode_rk45", choices=deterministic, help="as for encode (default: ode_rk45)")
    de.add_argument("--steps", type=int, default=20, help="grid intervals for a fixed-step sampler (default: 20)")
    de.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    de.add_argument("--force", action="store_true", help="replace --out if it exists")
    de.set_defaults(func=decode_cmd)
    ip = sub.add_parser("interpolate", help="interpolate between two data points through their latents",
                        description=interpolate_cmd.__doc__)
    common(ip)
    ip.add_argument("--pair", type=int, nargs=2, default=[0, 1], metavar=("I", "J"),
                    help="indices of the two held-out points (default: 0 1)")
    ip.add_argument("--frames", type=int, default=8, help="frames including both ends (default: 8)")
    ip.add_argument("--method", default="slerp", choices=["slerp", "lerp"], help="latent interpolation (default: slerp)")
    ip.add_argument("--out", required=True, help="strip.png (image strip, or the path drawn over the data) or "
                    "frames.npy")
    ip.add_argument("--force", action="store_true", help="replace --out if it exists")
    ip.set_defaults(func=interpolate_cmd)
    ip2 = sub.add_parser("inpaint", help="inpainting, colorization, super-resolution, or conditioning on coordinates",
                         description=inpaint_cmd.__doc__)
    ip2.add_argument("--run", required=True, help="run folder written by `unstir train`")
    ip2.add_argument("--image", help="the image to restore (PNG of the run's size)")
    ip2.add_argument("--mask", help="inpainting mask PNG: white = known, black = unknown")
    ip2.add_argument("--task", default="inpaint", choices=["inpaint", "colorize", "superres"],
                     help="inpaint (--mask), colorize (RGB runs) or superres (2x) (default: inpaint)")
    ip2.add_argument("--known", type=int, nargs="+", help="vector data: indices of the known coordinates")
    ip2.add_argument("--values", type=float, nargs="+", help="vector data: their values")
    ip2.add_argument("--method", default="repaint", choices=list(INVERSE_METHODS),
                     help="replacement, repaint (masks only), dps, pigdm or smc (twisted SMC) (default: repaint)")
    ip2.add_argument("--sigma-y", dest="sigma_y", type=float, default=0.0, help="measurement noise std (default: 0)")
    ip2.add_argument("--guidance", type=float, help="dps: the step size zeta' of Chung et al. Alg. 1 (default: 1.0)")
    ip2.add_argument("--particles", type=int, help="smc: particles per sample (default: 16)")
    ip2.add_argument("--class", dest="label", type=int, help="class label (class-conditional runs)")
    ip2.add_argument("--steps", type=int, default=100, help="sampler steps (default: 100)")
    ip2.add_argument("-n", type=int, default=8, help="number of posterior samples (default: 8)")
    ip2.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    ip2.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    ip2.add_argument("--out", required=True, help="result .png (truth, measurement, samples; for vectors the "
                     "samples over the data) or .npy")
    ip2.add_argument("--force", action="store_true", help="replace --out if it exists")
    ip2.set_defaults(func=inpaint_cmd)
    tg = sub.add_parser("tune-grid", help="fit a sampler's time grid to the run's model (stored in the run)",
                        description=tune_grid_cmd.__doc__)
    tg.add_argument("--run", required=True, help="run folder written by `unstir train`")
    tg.add_argument("--sampler", default="dpm++2m", choices=sorted(set(deterministic) - {"ode_rk45"} | {"edm"}),
                    help="deterministic fixed-grid sampler (edm runs with churn 0) (default: dpm++2m)")
    tg.add_argument("--nfe", type=int, default=8, help="model evaluations of the grid (default: 8)")
    tg.add_argument("-n", type=int, default=256, help="prior samples the grid is fitted on (default: 256)")
    tg.add_argument("--max-evals", type=int, default=300, help="bound on the optimiser's trial grids, each costing "
                    "NFE evaluations on the batch (default: 300)")
    tg.add_argument("--order", type=int, help="deis, ipndm, unipc order (default: the sampler's)")
    tg.add_argument("--form", choices=["midpoint", "taylor"], help="dpm++2m's second-order term (default: midpoint)")
    tg.add_argument("--seed", type=int, default=0, help="seed of the fitting batch (default: 0)")
    tg.add_argument("--no-ema", action="store_true", help="tune for the raw weights instead of the EMA")
    tg.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    tg.add_argument("--quiet", action="store_true", help="no progress bar")
    tg.add_argument("--force", action="store_true", help="replace a grid stored for this sampler and NFE")
    tg.set_defaults(func=tune_grid_cmd)
    rp = sub.add_parser("report", help="write RUN/report.html, a page that shows what the model does",
                        description=report_cmd.__doc__)
    rp.add_argument("--run", required=True, help="run folder written by `unstir train`")
    rp.add_argument("--out", help="page to write (default: RUN/report.html)")
    rp.add_argument("-n", type=int, default=1000, help="samples per sampler for vector data (default: 1000)")
    rp.add_argument("--seed", type=int, default=0, help="seed for the noise and the held-out draw (default: 0)")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.add_argument("--force", action="store_true", help="replace --out if it exists")
    rp.set_defaults(func=report_cmd)
    ls = sub.add_parser("list", help="list the data sets, processes, predictions, weightings, networks, grids and "
                        "samplers", description=list_choices.__doc__)
    ls.set_defaults(func=list_choices)
    for name, parser in sub.choices.items():
        parser.epilog = "example:\n  " + EXAMPLES[name]
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return ap


EXAMPLES = {
    "demo": "unstir demo --out runs/demo",
    "oracle": "unstir oracle --process ve --data ring",
    "train": "unstir train --data moons --out runs/moons",
    "train-classifier": "unstir train-classifier --data digits --out runs/clf",
    "sample": "unstir sample --run runs/moons --sampler dpm++2m --steps 20 --out samples.png",
    "likelihood": "unstir likelihood --run runs/moons",
    "encode": "unstir encode --run runs/moons --out z.npy",
    "decode": "unstir decode --run runs/moons --latents z.npy --out x.png",
    "interpolate": "unstir interpolate --run runs/moons --pair 0 3 --out path.png",
    "inpaint": "unstir inpaint --run runs/digits --image digit.png --mask mask.png --method repaint --out y.png",
    "tune-grid": "unstir tune-grid --run runs/moons --sampler dpm++2m --nfe 8",
    "report": "unstir report --run runs/moons",
    "list": "unstir list",
}


# What a user (or the machine: a full disk) can get wrong: one line on stderr and exit status 2, not a traceback.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"unstir {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
