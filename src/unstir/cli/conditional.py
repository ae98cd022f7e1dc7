"""`unstir inpaint`: linear inverse problems with a trained run."""

from __future__ import annotations

import torch

from .. import figures
from ..samplers import sample
from .common import (add_class, add_count, add_device, add_out, add_quiet, add_run, add_seed, add_steps,
                     data_bound, evaluation_bar, held_out, npy, output_path, positive, read_png, save,
                     note_distilled, warn_out_of_range)

INVERSE_METHODS = ("replacement", "repaint", "dps", "pigdm", "smc")


def inpaint_cmd(args) -> int:
    """Solve a linear inverse problem with a trained run: inpainting (--mask), colorization or 2x
    super-resolution of --image, or, for vector data, conditioning on coordinates (--known, --values).
    Writes the measurement beside -n posterior samples (images), or a scatter plot / .npy. Methods:
    replacement and RePaint paste the known entries (masks only); DPS (Chung et al. 2023, Alg. 1; --dps-step
    is its step size zeta', default 1.0); PiGDM; smc, twisted SMC (Wu et al. 2023) with --particles per
    sample, the one method that converges to the posterior."""
    from ..data import from_unit_range, to_unit_range
    from ..inverse import Measurement, colorize_operator, dps, pigdm, repaint, superres_operator, twisted_smc
    from ..runs import load_run

    positive(**{"-n": args.n, "--steps": args.steps, "--particles": args.particles})
    if not args.sigma_y >= 0:
        raise ValueError(f"--sigma-y must be >= 0, got {args.sigma_y}")
    if args.dps_step is not None and args.method != "dps":
        raise ValueError(f"--dps-step is DPS's step size; --method {args.method} has none")
    if args.particles is not None and args.method != "smc":
        raise ValueError(f"--particles is for --method smc, not {args.method}")
    if args.dps_step is not None and not args.dps_step >= 0:
        raise ValueError(f"--dps-step must be >= 0 (a negative step pushes away from the measurement), got "
                         f"{args.dps_step}")
    out = output_path(args)
    model = load_run(args.run, device=args.device)
    note_distilled(model)
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
        truth = to_unit_range(read_png(args.image, shape))[None].double()
        if args.task == "inpaint":
            if args.mask is None:
                raise ValueError("--task inpaint needs --mask (white = known, black = unknown)")
            mask = read_png(args.mask, shape, mask=True)
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
    x_T = model.process.prior_sample((args.n, *shape), g).to(args.device)  # drawn on the CPU, as every draw
    with torch.no_grad(), evaluation_bar(model, args.quiet, args.method):
        if args.method == "repaint":
            r = repaint(model, m, x_T, args.steps, y=y, generator=g)
        elif args.method == "replacement":
            r = sample(model, None, x_T, sampler="ddpm", steps=args.steps, project=m.replacement(g), y=y, generator=g)
        elif args.method == "dps":
            r = dps(model, m, x_T, args.steps, zeta=1.0 if args.dps_step is None else args.dps_step, y=y, generator=g)
        elif args.method == "smc":
            r = twisted_smc(model, m, args.n, args.steps, particles=args.particles or 16, y=y, generator=g)
        else:
            r = sample(pigdm(model, m), None, x_T, sampler="ddpm", steps=args.steps, y=y, generator=g)
    x, nfe = r.x, r.nfe
    if args.method == "dps":
        warn_out_of_range(x, data_bound(model, args.seed), f"--dps-step {args.dps_step if args.dps_step is not None else 1.0:g}")
    if out.suffix == ".npy":
        save(out, npy(x.cpu().numpy()))
    elif truth is not None:
        shown = m.pinv(m.A(truth)).to(x.dtype)  # the measurement, back in image space
        strip = from_unit_range(torch.cat([truth.cpu().to(x.dtype), shown.cpu(), x.cpu()]).clamp(-1, 1))
        labels = ["truth", "measurement"] + [f"{args.method} {i + 1}" for i in range(args.n)]
        save(out, lambda p: figures.labelled_strip(strip, labels, p))
    else:
        from ..data import is_builtin

        background = held_out(model, None, 2000, args.seed)[0] if is_builtin(model.run_info["config"]["data"]) \
            else x[:0]  # trained on a file: no background (paths in run.json are not followed)
        known = ", ".join(f"x[{i}] = {v:g}" for i, v in zip(args.known, args.values))
        save(out, lambda p: figures.conditioned_samples(background.cpu(), x.cpu(), p,
                                                         title=f"{args.method} ({nfe} NFE), given {known}"))
    print(f"{args.n} samples with {args.method} ({nfe} model evaluations) -> {out}")
    return 0


def register(sub) -> None:
    ip = sub.add_parser("inpaint", help="inpainting, colorization, super-resolution, or conditioning on coordinates",
                        description=inpaint_cmd.__doc__)
    add_run(ip)
    ip.add_argument("--image", help="the image to restore (PNG of the run's size)")
    ip.add_argument("--mask", help="inpainting mask PNG: white = known, black = unknown")
    ip.add_argument("--task", default="inpaint", choices=["inpaint", "colorize", "superres"],
                    help="inpaint (--mask), colorize (RGB runs) or superres (2x) (default: inpaint)")
    ip.add_argument("--known", type=int, nargs="+", action="extend",
                    help="vector data: indices of the known coordinates (repeat the flag or list several)")
    ip.add_argument("--values", type=float, nargs="+", action="extend", help="vector data: their values, in the "
                    "order of --known")
    ip.add_argument("--method", default="repaint", choices=list(INVERSE_METHODS),
                    help="replacement, repaint (masks only), dps, pigdm or smc (twisted SMC) (default: repaint)")
    ip.add_argument("--sigma-y", dest="sigma_y", type=float, default=0.0, help="measurement noise std (default: 0)")
    ip.add_argument("--dps-step", dest="dps_step", type=float, help="dps: the step size zeta' of Chung et al. "
                    "Alg. 1 (default: 1.0). `sample --guidance` is the guidance scale of classifier-free or "
                    "classifier guidance, a different thing")
    ip.add_argument("--particles", type=int, help="smc: particles per sample (default: 16)")
    add_class(ip)
    add_steps(ip, 100, "sampler steps")
    add_count(ip, 8, "number of posterior samples")
    add_seed(ip)
    add_device(ip)
    add_quiet(ip)
    add_out(ip, "result .png (truth, measurement, samples; for vectors the samples over the data) or .npy")
    ip.set_defaults(func=inpaint_cmd)
