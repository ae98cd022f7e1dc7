"""`unstir sample` and `unstir tune-grid`: drawing samples from a run, and fitting the grids they use."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .. import figures
from ..grids import GRIDS
from ..samplers import SAMPLERS
from .._random import sample_seeds
from .common import (add_class, add_count, add_device, add_guidance, add_nfe, add_no_teleport, add_out,
                     add_processes, add_quiet, add_run, add_seed, add_steps, check_strength, data_bound, npy,
                     output_path, positive, save, warn_out_of_range)


def grid_arg(text: str | None):
    """--grid: None, a grid name, or explicit descending times separated by commas (a tensor; checked against the
    run's process by ``explicit_grid`` once it is loaded)."""
    if text is None or text in GRIDS:
        return text
    try:
        times = [float(v) for v in text.split(",")]
    except ValueError:
        times = []
    if len(times) < 2:
        raise ValueError(f"--grid {text!r} is neither a grid name ({', '.join(GRIDS)}) nor at least two times "
                         f"separated by commas, e.g. 0.999,0.7,0.3,0")
    return torch.tensor(times, dtype=torch.float64)


def explicit_grid(process, args, options: dict) -> None:
    """An explicit --grid: checked against the run's process, and its intervals are the steps (--steps or --nfe,
    if given, must agree; ``options`` are the sampler's, which may add evaluations), before any work."""
    from ..grids import check_grid
    from ..tuning import nfe_for_steps

    try:
        args.grid = check_grid(process, args.grid)
    except ValueError as err:
        raise ValueError(f"--grid: {err}") from None
    steps = len(args.grid) - 1
    if args.steps is not None and args.steps != steps:
        raise ValueError(f"--grid has {steps} intervals and --steps says {args.steps}: drop --steps")
    if args.nfe is not None and args.sampler != "ode_rk45":  # ode_rk45 refuses --nfe below
        nfe = nfe_for_steps(args.sampler, steps, **options) - (1 if args.afs else 0)
        if args.nfe != nfe:
            raise ValueError(f"--grid has {steps} intervals, {nfe} evaluations with {args.sampler}"
                             f"{' and --afs' if args.afs else ''}, and --nfe says {args.nfe}: drop --nfe")
        args.nfe = None
    args.steps = steps


def guidance_model(model, args):
    """The model to sample: as is, classifier-free guided (--guidance without --classifier) or classifier
    guided (--classifier), for the labels of --class."""
    from ..guidance import cfg as cfg_guidance
    from ..guidance import guided
    from ..runs import load_classifier

    check_strength(args.guidance)
    high = {k: v for k, v in (("--guidance-interval", args.guidance_interval), ("--cfg-rescale", args.cfg_rescale),
                              ("--apg", args.apg or None)) if v is not None}
    if high and (args.guidance is None or args.classifier is not None):
        raise ValueError(f"{', '.join(high)} shape{'s' if len(high) == 1 else ''} classifier-free guidance or "
                         f"autoguidance: give --guidance S (without --classifier)")
    options = {"interval": args.guidance_interval, "rescale": args.cfg_rescale or 0.0, "apg": True if args.apg else None}
    if args.guide is not None:
        from ..guidance import autoguidance
        from ..runs import load_run

        if args.classifier is not None or args.guidance is None:
            raise ValueError("--guide is autoguidance: give its scale with --guidance S, and no --classifier")
        if args.cfg_rescale is not None or args.apg:
            raise ValueError("--cfg-rescale and --apg apply to classifier-free guidance, not to --guide")
        guide = load_run(args.guide, ema=not args.no_ema, device=args.device)
        return autoguidance(model, guide, args.label, args.guidance, interval=args.guidance_interval), None
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
        return cfg_guidance(model, args.label, args.guidance, **options), None
    return model, args.label


def sample_cmd(args) -> int:
    """Sample from a trained run and write a PNG (grid of images or scatter plot) or a .npy array."""
    from ..data import from_unit_range
    from ..runs import load_run, read_run_info

    from ..distributed import init, rank_world, sample_sharded, shard

    out = sample_output(args)
    positive(**{"-n": args.n, "--batch-size": args.batch_size})
    rank, world = rank_world()
    shard(args.n, args.batch_size, rank, world)  # -n against the number of processes, before any work
    # A distilled run samples with DDIM on the grid it was distilled for (unstir.distill), with --eta if given,
    # unless --grid, --steps/--nfe (another count) or another --sampler choose otherwise.
    args.grid = grid_arg(args.grid)
    distilled = read_run_info(args.run)["config"].get("distill") if (Path(args.run) / "run.json").exists() else None
    own_grid = bool(distilled) and args.sampler in (None, "ddim") and args.grid is None \
        and (args.nfe is None or args.steps is None) and {args.nfe, args.steps} <= {None, distilled["nfe"]}
    args.sampler = "ddim" if own_grid else args.sampler or default_sampler(args.nfe, args)
    options = sampler_options(args)
    base = load_run(args.run, ema=not args.no_ema, device=args.device)
    if isinstance(args.grid, torch.Tensor):
        explicit_grid(base.process, args, options)
    for flag, lim in (("--xlim", args.xlim), ("--ylim", args.ylim)):
        if lim is None:
            continue
        if len(base.data_shape) != 1 or out.suffix != ".png":
            raise ValueError(f"{flag} sets an axis of the scatter plot that a .png --out of vector data gets; this "
                             f"run's {'images are' if len(base.data_shape) == 3 else 'output is'} not one: drop it")
        if not (math.isfinite(lim[0]) and math.isfinite(lim[1]) and lim[0] < lim[1]):
            raise ValueError(f"{flag} {lim[0]:g} {lim[1]:g}: give LO HI with LO < HI, both finite")
    if not out.suffix:
        check_sample_folder(out, args.n, len(base.data_shape) == 3)
    model, y = guidance_model(base, args)
    init(torch.device(args.device))
    speak = rank == 0  # under torchrun one process writes and reports
    from ..runs import RunLocked, load_moments
    from ..tuning import load_tuned, nfe_for_steps, pilot_evaluations, pilot_grid, save_tuned, steps_for_nfe, tunable

    if own_grid:
        from ..distill import sample_grid

        args.grid, args.steps, args.nfe = sample_grid(base.process, distilled), distilled["nfe"], None
        speak and print(f"distilled run: ddim on its {distilled['grid']} distillation grid, {distilled['nfe']} "
                        f"step(s){', eta ' + format(options['eta'], 'g') if options.get('eta') else ''}; "
                        f"--grid, --steps or another --sampler choose otherwise", file=sys.stderr)
    if args.nfe is not None:
        if args.steps is not None:
            raise ValueError("give --steps or --nfe, not both")
        if args.sampler == "ode_rk45":
            raise ValueError("--nfe sets the model evaluations of a fixed-grid sampler; ode_rk45 is adaptive (its "
                             "evaluations follow --rtol and --atol): drop --nfe, or choose another --sampler")
        args.steps = steps_for_nfe(args.sampler, args.nfe + (1 if args.afs else 0), **options)  # AFS: a step for free
    args.steps = 20 if args.steps is None else args.steps
    if args.sampler == "dpm++3m_sde" and args.steps < SDE3M_MIN_STEPS and speak:
        print(f"note: dpm++3m_sde at {args.steps} steps extrapolates noisy x0 predictions over long steps, which "
              f"diverges on learned image models below about {SDE3M_MIN_STEPS} (validity 0.00 at 10 steps, 0.99 at 15 "
              f"on gratings32: benchmarks/few_steps_images_results.md); dpm++2m_sde is the few-step choice",
              file=sys.stderr)
    grid, teleport, piloted = args.grid, None, False
    if SAMPLERS[args.sampler].gaussian:  # deis_gauss integrates around the training data's Gaussian (N(0, I) without)
        options["moments"] = load_moments(args.run)
    if args.polish is not None and args.polish < 0:
        raise ValueError(f"--polish must be an integer >= 0 (trial grids; 0: the pilot's placement only), got "
                         f"{args.polish}")
    # AFS around the training data's stored mean (the unconditional model's; a class's or a guided model's mean
    # differs, and there it stays centred, as in Zhou et al.)
    afs = (load_moments(args.run) if y is None and args.guidance is None else None) or True if args.afs else False
    if grid is None and args.sampler in tunable():  # a grid fitted for this sampler and NFE beats the named one
        nfe = nfe_for_steps(args.sampler, args.steps) - (1 if args.afs else 0)
        # Analytical teleportation (unstir.teleport) from the training data's moments, for the unconditional
        # model only (a class's or a guided model's distribution has other moments).
        moments = None if (args.afs or args.no_teleport or args.guidance is not None or y is not None) \
            else load_moments(args.run)
        tuned = load_tuned(args.run, model.process, args.sampler, nfe, args.afs, moments is not None)
        where = f"in {args.run}/grids.json"
        deterministic = not (args.sampler == "edm" and options.get("churn") != 0
                             or args.sampler == "ddim" and options.get("eta", 0) != 0)
        if tuned is None and args.nfe is not None and args.nfe <= PILOT_MAX_NFE and args.guidance is None \
                and y is None and not args.no_ema and deterministic:
            # The pilot costs at most pilot_evaluations of its batch (the polish's --polish x NFE included): no
            # more samples than asked for, and a grid from fewer than PILOT_N is used once, not stored
            # (`tune-grid --method pilot` stores one).
            polish = POLISH if args.polish is None else args.polish
            speak and not args.quiet and print(
                f"placing the grid for {args.sampler} at {nfe} NFE by a pilot run of {min(PILOT_N, args.n)} samples "
                f"(at most {pilot_evaluations(nfe, teleport=True, polish=polish)} evaluations of them, once per "
                f"run: --polish 0 for {pilot_evaluations(nfe, teleport=True)} at most)", file=sys.stderr)
            tuned = pilot_grid(model, args.sampler, nfe, n=min(PILOT_N, args.n), afs=afs, device=args.device,
                               teleport=moments, polish=polish, **options)
            piloted = True
            stored = tuned.n == PILOT_N  # every rank places the same grid (a fixed pilot seed); rank 0 stores it
            where = f"in {args.run}/grids.json" if stored else "for this call only"
            why = f"fewer than {PILOT_N} samples; `unstir tune-grid --method pilot` stores one"
            if stored and speak:
                try:
                    save_tuned(args.run, tuned, teleport=moments is not None)
                except RunLocked as err:  # sampling a run that trains: use the grid, keep nothing of a moving model
                    stored, why = False, str(err).split(";")[0].replace("run folder", "the run")
                    where = "for this call only"
            speak and print(f"placed the grid for {args.sampler} at {nfe} NFE{' with --afs' if args.afs else ''} by a pilot run "
                  f"({tuned.evaluations} evaluations of {tuned.n} samples, {tuned.seconds:.1f} s; "
                  + (f"stored in {args.run}/grids.json)" if stored else f"not stored: {why})"), file=sys.stderr)
        if tuned is not None:
            clash = {k: (v, tuned.options[k]) for k, v in options.items() if k in tuned.options and tuned.options[k] != v}
            if clash:
                raise ValueError(f"the grid stored for {args.sampler} at {nfe} NFE was tuned with "
                                 + ", ".join(f"--{k} {t}" for k, (_, t) in clash.items())
                                 + "; sample with those options, or choose a named grid with --grid")
            options = {**tuned.options, **options}
            grid, teleport = tuned.grid, moments if tuned.teleport else None
            given = "".join(f" --{k} {v}" for k, v in tuned.options.items())
            how = "placed by a pilot run" if tuned.method == "pilot" else "tuned"
            if teleport is not None:
                how += f", teleported from T to {float(grid[0]):.4g} (the training data's Gaussian)"
            speak and print(f"using the grid {how} for {args.sampler} at {nfe} NFE{given} {where} (its "
                  f"error {tuned.error:.3g} against {tuned.error_start:.3g} on the named {tuned.start!r} grid, on "
                  f"{tuned.n} prior samples); --grid overrides it", file=sys.stderr)
    if args.polish is not None and not piloted:
        raise ValueError(f"--polish refines the grid that `sample --nfe N` places by a pilot run (N <= {PILOT_MAX_NFE}, a "
                         f"deterministic sampler, no --grid, --guidance, --class or --no-ema), and none runs here"
                         + ("; the grid stored in the run is used: `unstir tune-grid --method pilot --polish N "
                            "--force` replaces it" if grid is not None and args.grid is None else ""))
    if args.sampler == "pc" and args.n > args.batch_size * world and speak:
        print("note: pc's Langevin step averages norms over the batch (score_sde's rule), so its samples depend on "
              "how the batches are split (--batch-size, processes); every other sampler's do not", file=sys.stderr)
    with torch.no_grad():
        x, nfe = sample_sharded(model, args.n, seed=args.seed, batch_size=args.batch_size, device=args.device, y=y,
                                progress=not args.quiet, sampler=args.sampler, steps=args.steps, grid=grid,
                                afs=afs, teleport=teleport, **options)
    if not speak:
        return 0
    if args.guidance is not None:
        warn_out_of_range(x, data_bound(base, args.seed), f"--guidance {args.guidance:g}")  # the run's data
    if out.suffix == ".npy":
        save(out, npy(x.numpy()))
    elif out.suffix == "":
        write_sample_folder(out, x, sample_seeds(args.seed, args.n))
    elif x.ndim == 4:
        save(out, lambda p: figures.image_grid(from_unit_range(x), p))
    else:
        save(out, lambda p: figures.scatter_panels({f"{args.sampler} ({nfe} NFE)": x[:, :2]}, p, xlim=args.xlim,
                                                    ylim=args.ylim))
    spread = f", {world} processes" if world > 1 else ""
    print(f"{args.n} samples with {args.sampler} ({nfe} model evaluations{spread}) -> {out}")
    return 0


def sample_output(args) -> Path:
    """--out: a .png or .npy file (``output_path``'s rules), or a folder (a name without a suffix) that
    ``write_sample_folder`` fills: new, empty, or replaced with --force."""
    out = Path(args.out)
    if out.suffix:
        return output_path(args)
    if not out.parent.is_dir():
        raise ValueError(f"the folder that holds --out, {str(out.parent)!r}, does not exist; create it first")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; a name without a suffix is a folder of samples")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{str(out)!r} exists and is not an empty folder; pass --force to replace its samples or "
                         f"choose another --out")
    return out


SAMPLE_MANIFEST = "samples.npz"


def _png_name(i: int) -> str:
    return f"{i:06d}.png"


INCOMPLETE = ".samples-incomplete.npz"  # while a folder is rewritten: every file unstir may have left in it


def previous_samples(out: Path) -> set:
    """The files a previous `unstir sample` wrote in the folder ``out``: its manifest, ``samples.npz``, lists
    them (its ``files``; older ones, one PNG per row of ``x`` for images), and so does the marker of a rewrite
    that was interrupted (``INCOMPLETE``). Nothing else there is unstir's."""
    found = set()
    for name in (SAMPLE_MANIFEST, INCOMPLETE):
        manifest = out / name
        if not manifest.is_file():
            continue
        try:
            with np.load(manifest, allow_pickle=False) as z:
                files = [str(f) for f in z["files"]] if "files" in z else \
                    [_png_name(i) for i in range(len(z["x"]))] if z["x"].ndim == 4 else []
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{str(manifest)!r} is damaged ({err}); remove the folder's samples yourself") from None
        found |= {name, *(f for f in files if re.fullmatch(r"\d{6}\.png", f))}
    return found


def check_sample_folder(out: Path, n: int, images: bool) -> None:
    """Before sampling: refuse to overwrite a file in --out that unstir did not write."""
    if not out.is_dir():
        return
    mine = previous_samples(out)
    clash = sorted(name for name in [SAMPLE_MANIFEST] + ([_png_name(i) for i in range(n)] if images else [])
                   if (out / name).exists() and name not in mine)
    if clash:
        raise ValueError(f"--out {str(out)!r} holds {', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''}, which "
                         f"`unstir sample` did not write; choose another folder (--force replaces only unstir's "
                         f"samples)")


def write_sample_folder(out: Path, x, seeds) -> None:
    """``samples.npz`` (``x``: the samples in the model's coordinates, float32; ``seeds``: each one's seed;
    ``files``: the PNGs) and, for images, one PNG per sample named by its index (EDM's layout).

    Whole or marked: everything is written into a hidden temporary folder beside ``out``. A new ``out`` is that
    folder renamed (atomic). An existing one first gets the marker ``INCOMPLETE``, listing the old and the new
    files, then loses its manifest (an unstir folder without ``samples.npz`` is incomplete), then the files the
    previous manifest lists, receives the new files, gets its new manifest, and loses the marker last. A rewrite
    killed half-way leaves the marker, so the next `sample --force` knows every file there that is unstir's.
    Files unstir did not write are never touched."""
    from ..data import from_unit_range

    x = x.cpu()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = []
        if x.ndim == 4:
            from PIL import Image

            images = from_unit_range(x).permute(0, 2, 3, 1).numpy()
            for i, image in enumerate(images):
                files.append(_png_name(i))
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / files[-1])
        np.savez(tmp / SAMPLE_MANIFEST, x=x.numpy().astype(np.float32), seeds=np.asarray(seeds, dtype=np.uint64),
                 files=np.asarray(files, dtype=str))
        if not out.exists():
            os.rename(tmp, out)
            return
        old = previous_samples(out)
        listed = sorted((old | set(files)) - {SAMPLE_MANIFEST, INCOMPLETE})
        np.savez(tmp / "marker.npz", x=np.zeros((0,), np.float32), files=np.asarray(listed, dtype=str))
        os.replace(tmp / "marker.npz", out / INCOMPLETE)
        (out / SAMPLE_MANIFEST).unlink(missing_ok=True)  # incomplete from here until the new manifest lands
        for name in sorted(old - {SAMPLE_MANIFEST, INCOMPLETE}):
            (out / name).unlink(missing_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
        os.replace(tmp / SAMPLE_MANIFEST, out / SAMPLE_MANIFEST)
        (out / INCOMPLETE).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SDE3M_MIN_STEPS = 15  # dpm++3m_sde below this: a notice (measured unstable on learned image models)
PILOT_MAX_NFE = 10  # `sample --nfe N` places the grid by a pilot run up to here (benchmarks/few_steps.py)
GAUSS_MAX_NFE = 5   # `sample --nfe N` defaults to deis_gauss up to here where the run has moments (default_sampler)
PILOT_N = 128       # pilot samples: 64 left a fitted grid worse than the named one on fresh noise at d = 64
POLISH = 180        # Nelder-Mead trial grids after the pilot (tuning.pilot_grid step 6): chosen on
                    # oracle.image_mixture(seed=11), where 90 -> 180 cut ipndm's error 10-20 % at NFE 4 and 6

SAMPLER_OPTIONS = ("eta", "order", "form", "snr", "churn", "rtol", "atol", "noise", "interval", "restarts",
                   "restart_steps", "tau", "predictor_order", "corrector_order")


def default_sampler(nfe: int | None, args=None, *, moments: bool | None = None) -> str:
    """For 10 evaluations or fewer, with the pilot grid: up to GAUSS_MAX_NFE, deis_gauss where the run stores its
    training data's moments (or ``moments=True`` says so, for a model that is not a run) and sampling would teleport with them (an unconditional, unguided model, no --afs or
    --no-teleport), else ipndm (teleported, within half of diffusers' best error at NFE 4-6 up to d = 64:
    benchmarks/RESULTS.md). dpm++2m above 10. Chosen on oracle.image_mixture(seed=11) (d = 3072, polished pilot
    grids, 256 fresh samples): deis_gauss against ipndm 1.78 / 3.19 at NFE 4, 1.23 / 2.27 at 5, 1.23 / 1.06 at 6
    and 0.62 / 0.66 at 10, so it takes over where it halves the error and not where the two tie."""
    if nfe is None or nfe > PILOT_MAX_NFE:
        return "dpm++2m"
    if nfe > GAUSS_MAX_NFE:
        return "ipndm"
    from ..runs import MOMENTS_FILE

    if moments is None:  # does the run store its training data's moments?
        moments = args is not None and (Path(args.run) / MOMENTS_FILE).exists()
    gaussian = moments and not (  # args=None: no such option given
        getattr(args, "afs", False) or getattr(args, "no_teleport", False) or getattr(args, "label", None) is not None
        or getattr(args, "guidance", None) is not None)
    return "deis_gauss" if gaussian else "ipndm"


def sampler_options(args) -> dict:
    """The sampler options given on the command line, each checked to apply to the chosen sampler."""
    import inspect

    def takes(name, option):  # dpm++2m/3m fix their order in the name; form is second order's; eta makes the SDE
        if "dpm++" in name and option in ("order", "form", "eta", "noise"):
            return {"form": name.startswith("dpm++2m"), "order": False}.get(option, name.endswith("_sde"))
        return option in inspect.signature(SAMPLERS[name].fn).parameters

    options = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k, None) is not None}
    for k in options:
        if not takes(args.sampler, k):
            raise ValueError(f"--{k} does not apply to sampler {args.sampler!r}; it applies to "
                             f"{sorted(n for n in SAMPLERS if takes(n, k))}")
    return options


def tune_grid_cmd(args) -> int:
    """Fit the time points of an NFE-evaluation grid to the run's model and store them in RUN/grids.json;
    `unstir sample` with the same sampler and --steps then uses them (and says so)."""
    from ..runs import check_not_locked, load_moments, load_run
    from ..tuning import GRIDS_FILE, _key, _read_grids, pilot_grid, save_tuned, tune_grid

    args.sampler = args.sampler or default_sampler(args.nfe, args)
    options = sampler_options(args)
    if args.sampler == "edm":
        options["churn"] = 0.0
    stored = Path(args.run) / GRIDS_FILE
    if args.afs and args.method != "pilot":
        raise ValueError("--afs grids are placed by --method pilot; the Nelder-Mead fit tunes grids without AFS")
    if args.nfe < 3 and args.method != "pilot":
        raise ValueError(f"--nfe must be an integer >= 3 for --method nelder-mead (it fits two or more points; "
                         f"--method pilot places the middle point of a 2-evaluation grid), got {args.nfe}")
    if args.polish is not None and args.method != "pilot":
        raise ValueError("--polish refines a --method pilot grid; --max-evals bounds the Nelder-Mead fit")
    if args.polish is not None and args.polish < 0:
        raise ValueError(f"--polish must be an integer >= 0 (trial grids; 0: the pilot's placement only), got "
                         f"{args.polish}")
    moments = None if (args.method != "pilot" or args.afs or args.no_teleport) else load_moments(args.run)
    if stored.exists() and _key(args.sampler, args.nfe, args.afs, moments is not None) in _read_grids(stored) \
            and not args.force:
        raise ValueError(f"{str(stored)!r} already holds a grid for {args.sampler} at {args.nfe} NFE; pass --force to "
                         f"replace it (the new one is stored only if it beats the best named grid)")
    if SAMPLERS[args.sampler].gaussian:  # the reference Gaussian sample will use: the run's moments
        options["moments"] = load_moments(args.run)
    model = load_run(args.run, ema=not args.no_ema, device=args.device)
    check_not_locked(args.run, "tune-grid")  # a training run changes the model the grid would be fitted to
    if args.method == "pilot":
        tuned = pilot_grid(model, args.sampler, args.nfe, n=args.n, afs=(load_moments(args.run) or True) if args.afs
                           else False, seed=args.seed, device=args.device, teleport=moments,
                           polish=POLISH if args.polish is None else args.polish, **options)
    else:
        tuned = tune_grid(model, args.sampler, args.nfe, n=args.n, max_evals=args.max_evals, seed=args.seed,
                          progress=not args.quiet, **options)
    summary = (f"{args.sampler} at {args.nfe} NFE: mean endpoint error {tuned.error:.4g} (best named grid "
               f"{tuned.start!r}: {tuned.error_start:.4g}) on {tuned.n} prior samples; cost {tuned.evaluations} model "
               f"evaluations, {tuned.seconds:.1f} s")
    if not tuned.error < tuned.error_start:
        print(f"{summary}: no grid beat the named one, nothing stored")
        return 0
    path = save_tuned(args.run, tuned, teleport=moments is not None)
    print(f"{summary} -> {path}")
    print("times: " + " ".join(f"{t:.5g}" for t in tuned.times)
          + (" (teleported from T to the first: the training data's Gaussian)" if tuned.teleport else ""))
    return 0


def add_polish(p) -> None:
    p.add_argument("--polish", type=int, help="after the pilot run, Nelder-Mead trial grids (each NFE evaluations of "
                   f"the pilot batch) refining its 3 best grids; 0: the pilot's placement only (default: {POLISH}; it "
                   "cut ipndm's error at d = 3072 1.3-3.5x: benchmarks/few_steps_image_results.md)")


def register(sub) -> None:
    deterministic = sorted(k for k, v in SAMPLERS.items() if not v.stochastic)
    sa = sub.add_parser("sample", help="sample from a trained run", description=sample_cmd.__doc__)
    add_run(sa)
    sa.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                    help="see `unstir list` (default: dpm++2m; ipndm with --nfe 10 or fewer, and with --nfe 5 or fewer "
                    "deis_gauss where the run stores its data's moments and teleports)")
    add_steps(sa, None, "grid intervals; the model evaluations are reported. For ode_rk45 only the output grid: its "
              "cost is set by --rtol/--atol")
    add_nfe(sa, "model evaluations instead of --steps (fixed-grid samplers). A grid stored for this sampler and "
            "NFE (`unstir tune-grid`) is used, also with --no-ema; up to 10 NFE without one, the grid is placed by a "
            "pilot run of 128 samples (fewer if -n is smaller: then not stored), polished (--polish) and stored (no pilot with "
            "--guidance, --class or --no-ema: the named grid is used there)")
    sa.add_argument("--grid", metavar="GRID", help=f"time grid: a name ({', '.join(GRIDS)}; "
                    "default: the sampler's) or the process's times, descending, separated by commas (e.g. "
                    "0.999,0.97,0.84,0.5,0.15,0: its intervals are the steps; a final 0 denoises)")
    sa.add_argument("--afs", action="store_true", help="analytical first step (Zhou et al. 2024): the evaluation at T "
                    "replaced by (x_T - alpha_T m) / sigma_T, m the training data's stored mean (0 for a class or "
                    "guidance), one evaluation fewer (fixed-grid samplers)")
    add_no_teleport(sa)
    add_polish(sa)
    add_count(sa, 1000, "number of samples")
    add_out(sa, "samples.png (image grid, clipped to 0-255, or scatter plot), samples.npy (the model's "
            "coordinates, unclipped: images in [-1, 1] up to the sampler's overshoot) or a folder (a name without a "
            "suffix): samples.npz (x and each sample's seed) and, for images, one PNG per sample",
            default="samples.png")
    sa.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="samples per batch (default: "
                    "256). Sample i draws its noise from its own seed (--seed * 2^20 + i), so the samples are the "
                    "same for any batch size and, under torchrun, any number of processes")
    add_class(sa, classifier=True)
    add_guidance(sa, "guidance strength (default: none): classifier-free (diffusers/Imagen scale s: 0 "
                 "unconditional, 1 conditional; Ho & Salimans' w = s - 1), or with --classifier the classifier "
                 "gradient's weight (default there: 1 = Bayes' rule)")
    sa.add_argument("--classifier", help="classifier folder from `unstir train-classifier`: classifier guidance")
    sa.add_argument("--guide", help="autoguidance (Karras et al. 2024): a weaker run of the same data and process "
                    "(fewer steps, a smaller network) to guide with; --guidance is the scale")
    sa.add_argument("--guidance-interval", dest="guidance_interval", type=float, nargs=2, metavar=("LO", "HI"),
                    help="guide only where the noise level sigma/alpha lies in (LO, HI] (Kynkaanniemi et al. 2024)")
    sa.add_argument("--cfg-rescale", dest="cfg_rescale", type=float, help="CFG rescale's phi in [0, 1] (Lin et al. "
                    "2024; on eps, as diffusers' guidance_rescale)")
    sa.add_argument("--apg", action="store_true", help="adaptive projected guidance (Sadat et al. 2024): keep only the "
                    "part of the guidance orthogonal to the conditional x0 prediction")
    sa.add_argument("--eta", type=float, help="ddim: 0 deterministic ... 1 DDPM (default: 0); euler_ancestral and "
                    "dpm++2m_sde/3m_sde: the noise's share (default: 1)")
    sa.add_argument("--tau", type=float, help="sa_solver: the noise scale in [0, 2] (0: the PF ODE; default 1 for t "
                    "in [0.2 T, 0.8 T], 0 outside)")
    sa.add_argument("--predictor-order", dest="predictor_order", type=int, help="sa_solver: 1-4 (default: 2)")
    sa.add_argument("--corrector-order", dest="corrector_order", type=int, help="sa_solver: 1-4 (default: 2)")
    sa.add_argument("--noise", choices=["brownian", "fresh"], help="dpm++2m_sde/3m_sde, sa_solver: the same Brownian path "
                    "whatever the grid, or a fresh draw per step (default: brownian)")
    sa.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"), help="restart: the noise levels "
                    "sigma/alpha between which it restarts (default: 0.06 0.30)")
    sa.add_argument("--restarts", type=int, help="restart: how many times (default: 2)")
    sa.add_argument("--restart-steps", dest="restart_steps", type=int, help="restart: Heun steps back down "
                    "(default: 3)")
    sa.add_argument("--order", type=int, help="deis and deis_gauss (1-4, default 3), ipndm (1-4, default 4), unipc "
                    "(1-3, default 3)")
    sa.add_argument("--form", choices=["midpoint", "taylor"], help="dpm++2m's (and dpm++2m_sde's) second-order term: Lu et al. "
                    "Algorithm 2 (midpoint, default) or the phi_2 integral (taylor)")
    sa.add_argument("--snr", type=float, help="pc: Langevin corrector signal-to-noise ratio (default: 0.075)")
    sa.add_argument("--churn", type=float, help="edm: S_churn (default: 10)")
    sa.add_argument("--rtol", type=float, help="ode_rk45: relative tolerance (default: 1e-5)")
    sa.add_argument("--atol", type=float, help="ode_rk45: absolute tolerance (default: 1e-5)")
    add_seed(sa)
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    add_quiet(sa)
    sa.add_argument("--xlim", type=float, nargs=2, metavar=("LO", "HI"), help="scatter plot x range (default: from the samples)")
    sa.add_argument("--ylim", type=float, nargs=2, metavar=("LO", "HI"), help="scatter plot y range (default: from the samples)")
    add_device(sa)
    add_processes(sa)
    sa.set_defaults(func=sample_cmd)

    tg = sub.add_parser("tune-grid", help="fit a sampler's time grid to the run's model (stored in the run)",
                        description=tune_grid_cmd.__doc__)
    add_run(tg)
    tg.add_argument("--sampler", default=None, choices=sorted(set(deterministic) - {"ode_rk45"} | {"edm"}),
                    help="deterministic fixed-grid sampler (edm runs with churn 0) (default: as for sample: deis_gauss "
                    "or ipndm for --nfe 10 or fewer, else dpm++2m)")
    add_nfe(tg, "model evaluations of the grid", default=8)
    tg.add_argument("--method", choices=["nelder-mead", "pilot"], default="nelder-mead",
                    help="nelder-mead: fit the points to a tight solve (costly); pilot: dynamic programming over a "
                    "100-step pilot run, GITS (cheap; what `unstir sample --nfe` does) (default: nelder-mead)")
    tg.add_argument("--afs", action="store_true", help="place the grid for sampling with --afs (--method pilot)")
    add_no_teleport(tg)
    add_polish(tg)
    add_count(tg, 256, "prior samples the grid is fitted on")
    tg.add_argument("--max-evals", type=int, default=300, help="bound on the optimiser's trial grids, each costing "
                    "NFE evaluations on the batch (default: 300)")
    tg.add_argument("--order", type=int, help="deis, deis_gauss, ipndm, unipc order (default: the sampler's)")
    tg.add_argument("--form", choices=["midpoint", "taylor"], help="dpm++2m's second-order term (default: midpoint)")
    add_seed(tg, "the fitting batch")
    tg.add_argument("--no-ema", action="store_true", help="tune for the raw weights instead of the EMA")
    add_device(tg)
    add_quiet(tg)
    tg.add_argument("--force", action="store_true", help="replace a grid stored for this sampler and NFE")
    tg.set_defaults(func=tune_grid_cmd)
