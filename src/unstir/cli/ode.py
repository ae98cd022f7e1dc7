"""The verbs of the probability-flow ODE: likelihood, encode, decode, interpolate."""

from __future__ import annotations

import math

import torch

from .. import figures
from ..grids import GRIDS
from ..samplers import SAMPLERS
from .common import (add_class, add_count, add_device, add_held_out, add_out, add_processes, add_quiet, add_run,
                     add_steps, held_out, note_distilled, npy, output_path, positive, save)
from .sampling import grid_arg

LATENT_BOUND = 100  # decode refuses latents beyond this many prior standard deviations


def fixed_steps(args) -> int:
    """--steps and --grid of encode and decode: the grid of a fixed-step sampler (default: 20 intervals of the
    sampler's spacing; --grid names another spacing or gives the times, T ... t_min, whose intervals are the
    steps), refused with the adaptive ode_rk45, which chooses its own steps. An explicit grid is checked against
    the run's process by ``check_ode_grid`` once the run is loaded."""
    args.grid = grid_arg(args.grid)
    if args.sampler == "ode_rk45":
        for flag, given in (("--steps", args.steps), ("--grid", args.grid)):
            if given is not None:
                shown = f"{flag} {given}" if flag == "--steps" else flag
                raise ValueError(f"{shown} sets the grid of a fixed-step sampler; ode_rk45 (the default) is adaptive "
                                 f"and chooses its own steps: drop {flag}, or pass --sampler ddim (or another)")
        return 20  # unused by the adaptive solve
    if isinstance(args.grid, torch.Tensor):
        steps = len(args.grid) - 1
        if args.steps is not None and args.steps != steps:
            raise ValueError(f"--grid has {steps} intervals and --steps says {args.steps}: drop --steps")
        return steps
    positive(**{"--steps": 20 if args.steps is None else args.steps})
    return 20 if args.steps is None else args.steps


def check_ode_grid(model, args) -> None:
    """An explicit --grid of encode or decode against the loaded run's process, before any work: descending
    inside [t_min, T], and ending at t_min, not 0 (the final denoising step is not invertible)."""
    from ..inversion import ode_grid

    if isinstance(args.grid, torch.Tensor):
        try:
            args.grid = ode_grid(model, args.sampler, args.steps, args.grid)
        except ValueError as err:
            raise ValueError(f"--grid: {err}") from None


def likelihood_cmd(args) -> int:
    """Log-likelihood of held-out data under a trained run, by the probability-flow ODE: mean nats and
    bits/dim with their standard error, and the model evaluations. Quantised data (images, digits) are
    dequantised and their bits/dim include the offset of their number of levels (see unstir.likelihood)."""
    from ..distributed import init, likelihood_sharded, rank_world, shard
    from ..resources import check_memory, training_bytes
    from ..runs import load_moments, load_run

    positive(**{"-n": args.n, "--batch-size": args.batch_size})
    rank, world = rank_world()
    shard(args.n, args.batch_size, rank, world)  # -n against the number of processes, before any work
    model = load_run(args.run, device=args.device)
    note_distilled(model)
    d = math.prod(model.data_shape)
    divergence = ("exact" if d <= 64 else "hutchinson") if args.divergence == "auto" else args.divergence
    if args.probes is not None and divergence == "exact":
        raise ValueError(f"--probes {args.probes} sets the Hutchinson estimator's probes; this run's divergence is exact "
                         f"({'--divergence exact' if args.divergence == 'exact' else f'auto for d = {d} <= 64'}): "
                         f"drop --probes, or pass --divergence hutchinson")
    args.probes = 8 if args.probes is None else args.probes
    check_memory(f"the likelihood of {args.n:,} samples in batches of {args.batch_size:,}", device=args.device,
                 batch=min(args.n, args.batch_size), per_item=training_bytes(model, model.data_shape, args.device),
                 fixed=3 * 8 * args.n * math.prod(model.data_shape))  # the held-out draw (float64) and its copies
    x, levels = held_out(model, args.data, args.n, args.seed)
    init(torch.device(args.device))
    r = likelihood_sharded(model, x, seed=args.seed, batch_size=args.batch_size, device=args.device,
                           progress=not args.quiet, divergence=args.divergence, probes=args.probes,
                           accuracy=args.accuracy, rtol=args.rtol, atol=args.atol, levels=levels, y=args.label,
                           moments=load_moments(args.run))
    if rank != 0:
        return 0
    bpd, se = r.mean()
    nats_se = (r.nats.std() / r.nats.numel() ** 0.5).item() if r.nats.numel() > 1 else float("nan")
    kind = f"dequantised, {levels} levels" if levels else "continuous"
    div = "exact" if r.stderr is None else f"Hutchinson ({args.probes} probes)"
    spread = f", {world} processes" if world > 1 else ""
    print(f"{x.shape[0]} samples ({kind}), d = {d}, {div} divergence, {r.sample_nfe.float().mean().item():.0f} "
          f"evaluations of the augmented ODE per sample (the slowest {r.nfe}; batches of {args.batch_size}{spread})")
    plus_minus = lambda v: f" +- {v:.4f}" if x.shape[0] > 1 else " (one sample: no standard error)"  # noqa: E731
    print(f"log-likelihood: {r.nats.mean().item():.4f}{plus_minus(nats_se)} nats per sample")
    print(f"bits/dim:       {bpd:.4f}{plus_minus(se)}")
    if x.ndim == 4 and levels == 256:
        print(f"baselines:      {image_baselines(model, x)} bits/dim on the same images")
    return 0


def image_baselines(model, x) -> str:
    """The compressor baselines of 8-bit images (``unstir.quality``): lossless PNG and WebP files, and the
    per-pixel categorical fitted to the run's training data where that can still be loaded."""
    from .. import data as data_mod
    from ..quality import categorical_bits_per_dim, file_bits_per_dim

    cfg = model.run_info["config"]
    text = f"PNG {file_bits_per_dim(x, 'PNG'):.4f}, WebP {file_bits_per_dim(x, 'WEBP'):.4f}"
    try:
        train = data_mod.load(cfg["data"], n=cfg.get("n_data", 20000), size=cfg.get("size"),
                              mode=cfg.get("mode", "L"), seed=cfg.get("seed", 0)).x
    except (ValueError, OSError):
        return text + " (the per-pixel categorical needs the training data, which is gone)"
    return f"per-pixel categorical {categorical_bits_per_dim(train, x):.4f}, " + text


def encode_cmd(args) -> int:
    """Encode held-out data into latents at T along the probability-flow ODE (adaptive, or DDIM inversion with
    --sampler ddim, exact with --exact). z.npy holds the latents and z.input.npy beside it the data they
    encode (so `unstir decode --latents z.npy` can be checked against it); z.png draws both."""
    from ..data import from_unit_range
    from ..inversion import encode
    from ..runs import load_run

    positive(**{"-n": args.n})
    args.steps = fixed_steps(args)
    out = output_path(args)
    companion = out.with_suffix(".input.npy")
    if out.suffix == ".npy" and companion.exists() and not args.force:
        raise ValueError(f"{str(companion)!r} exists; pass --force to replace it or choose another --out")
    model = load_run(args.run, device=args.device)
    check_ode_grid(model, args)
    note_distilled(model)
    x, _ = held_out(model, args.data, args.n, args.seed, args.device)
    with torch.no_grad():
        enc = encode(model, x, sampler=args.sampler, steps=args.steps, grid=args.grid, exact=args.exact, y=args.label,
                     **({"progress": not args.quiet} if args.sampler == "ode_rk45" else {}))
    z = enc.z.cpu()
    if out.suffix == ".npy":
        save(out, npy(z.numpy()))
        save(companion, npy(x.cpu().numpy()))
    elif z.ndim == 4:  # data above, latents below (scaled by 1/3 so that +-3 standard deviations show)
        sigma_T = float(model.process.sigma(model.process.T))
        grid = torch.cat([from_unit_range(x.cpu()), from_unit_range((z / (3 * sigma_T)).clamp(-1, 1))])
        save(out, lambda p: figures.image_grid(grid, p, ncol=x.shape[0]))
    else:
        save(out, lambda p: figures.scatter_panels({"held-out data": x.cpu()[:, :2], f"latents ({enc.nfe} NFE)":
                                                     z[:, :2]}, p))
    print(f"{x.shape[0]} latents ({enc.nfe} model evaluations) -> {out}"
          + (f", the data they encode -> {companion}" if out.suffix == ".npy" else ""))
    return 0


def decode_cmd(args) -> int:
    """Decode latents (.npy from `unstir encode`, or any prior samples) back to data along the PF ODE."""
    from ..data import from_unit_range, read_npy
    from ..inversion import decode
    from ..runs import load_run

    args.steps = fixed_steps(args)
    out = output_path(args)
    model = load_run(args.run, device=args.device)
    check_ode_grid(model, args)
    note_distilled(model)
    z = torch.as_tensor(read_npy(args.latents))
    if z.ndim < 2 or z.shape[0] == 0:
        raise ValueError(f"{args.latents!r} holds no latents (shape {tuple(z.shape)}); it needs shape (n, "
                         f"{', '.join(map(str, model.data_shape))}) with n >= 1")
    if tuple(z.shape[1:]) != tuple(model.data_shape):
        raise ValueError(f"latents of shape {tuple(z.shape)} do not fit the run's data shape {model.data_shape}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{args.latents!r} holds NaN or inf")
    sigma_T, top = float(model.process.sigma(model.process.T)), z.abs().max().item()
    if top > LATENT_BOUND * sigma_T:
        raise ValueError(f"{args.latents!r} holds latents up to {top:.3g}, {top / sigma_T:.3g} times the prior's "
                         f"standard deviation (sigma_T = {sigma_T:.3g}); latents from `unstir encode` or the prior lie "
                         f"within a few sigma_T, and the ODE from far outside it does not reach the data")
    with torch.no_grad():
        r = decode(model, z.float(), sampler=args.sampler, steps=args.steps, grid=args.grid, y=args.label,
                   **({"progress": not args.quiet} if args.sampler == "ode_rk45" else {}))
    if out.suffix == ".npy":
        save(out, npy(r.x.cpu().numpy()))
    elif r.x.ndim == 4:
        save(out, lambda p: figures.image_grid(from_unit_range(r.x.cpu()), p))
    else:
        save(out, lambda p: figures.scatter_panels({f"decoded ({r.nfe} NFE)": r.x.cpu()}, p))
    print(f"{z.shape[0]} decoded ({r.nfe} model evaluations) -> {out}")
    return 0


def interpolate_cmd(args) -> int:
    """Encode two held-out data points, interpolate their latents (slerp or lerp) and decode every frame:
    a strip of images, or for 2-D data the path drawn over the data."""
    from ..data import from_unit_range
    from ..inversion import interpolate
    from ..runs import load_run

    out = output_path(args)
    i, j = args.pair
    if min(i, j) < 0 or i == j:
        raise ValueError(f"--pair needs two different indices >= 0 into the held-out data, got {i} {j}")
    model = load_run(args.run, device=args.device)
    note_distilled(model)
    x, _ = held_out(model, args.data, max(args.pair) + 1, args.seed, args.device)
    if max(i, j) >= x.shape[0]:
        raise ValueError(f"--pair {i} {j}: the held-out data have {x.shape[0]} points (indices 0-{x.shape[0] - 1})")
    with torch.no_grad():
        r = interpolate(model, x[i], x[j], args.frames, method=args.method, y=args.label, progress=not args.quiet)
    if out.suffix == ".npy":
        save(out, npy(r.x.cpu().numpy()))
    elif r.x.ndim == 4:
        save(out, lambda p: figures.image_grid(from_unit_range(r.x.cpu()), p, ncol=args.frames))
    else:
        background, _ = held_out(model, args.data, 2000, args.seed)
        save(out, lambda p: figures.interpolation_path(background, r.x.cpu(), p))
    print(f"{args.frames} frames ({args.method}, {r.nfe} model evaluations) -> {out}")
    return 0


def add_ode_grid(p) -> None:
    p.add_argument("--grid", metavar="GRID", help=f"time grid of a fixed-step sampler: a name ({', '.join(GRIDS)}; "
                   "default: the sampler's) or the process's times, descending from T to t_min, separated by commas "
                   "(its intervals are the steps); encode runs it upward. Use the same grid to decode")


def register(sub) -> None:
    deterministic = sorted(k for k, v in SAMPLERS.items() if not v.stochastic)
    lk = sub.add_parser("likelihood", help="bits/dim of held-out data by the PF ODE", description=likelihood_cmd.__doc__)
    add_held_out(lk)
    add_count(lk, 500, "number of held-out samples")
    lk.add_argument("--divergence", default="auto", choices=["auto", "exact", "hutchinson"],
                    help="exact (torch.func, default for d <= 64) or Hutchinson-Skilling probes (default: auto)")
    lk.add_argument("--probes", type=int, help="Hutchinson probes per sample (default: 8; only with the Hutchinson "
                    "divergence)")
    lk.add_argument("--accuracy", type=float, default=0.01, help="target error in nats per dimension that sets the "
                    "solver's error control (default: 0.01)")
    lk.add_argument("--rtol", type=float, help="solver relative tolerance on the whitened state (default: 0)")
    lk.add_argument("--atol", type=float, help="solver absolute tolerance on the whitened state (default: accuracy / 80)")
    lk.add_argument("--batch-size", dest="batch_size", type=int, default=100, help="samples per solve (default: 100)")
    add_processes(lk)
    add_quiet(lk)
    lk.set_defaults(func=likelihood_cmd)

    en = sub.add_parser("encode", help="encode data to latents along the PF ODE", description=encode_cmd.__doc__)
    add_held_out(en)
    add_count(en, 100, "number of held-out samples")
    add_out(en, "z.npy (the latents, and z.input.npy beside it: the data they encode) or z.png (data and latents "
            "drawn)")
    en.add_argument("--sampler", default="ode_rk45", choices=deterministic,
                    help="ode_rk45 (adaptive, default) or a deterministic sampler run upward (ddim: DDIM inversion)")
    add_steps(en, None, "grid intervals for a fixed-step sampler (default: 20; ode_rk45 chooses its own)")
    add_ode_grid(en)
    en.add_argument("--exact", action="store_true", help="exact DDIM inversion (with --sampler ddim)")
    add_quiet(en)
    en.set_defaults(func=encode_cmd)

    de = sub.add_parser("decode", help="decode latents to data along the PF ODE", description=decode_cmd.__doc__)
    add_run(de)
    de.add_argument("--latents", required=True, help="latents .npy (from `unstir encode`)")
    add_out(de, "decoded.png (grid or scatter) or decoded.npy")
    de.add_argument("--sampler", default="ode_rk45", choices=deterministic, help="as for encode (default: ode_rk45)")
    add_steps(de, None, "grid intervals for a fixed-step sampler (default: 20; ode_rk45 chooses its own)")
    add_ode_grid(de)
    add_class(de)
    add_device(de)
    add_quiet(de)
    de.set_defaults(func=decode_cmd)

    ip = sub.add_parser("interpolate", help="interpolate between two data points through their latents",
                        description=interpolate_cmd.__doc__)
    add_held_out(ip)
    ip.add_argument("--pair", type=int, nargs=2, default=[0, 1], metavar=("I", "J"),
                    help="indices of the two held-out points (default: 0 1)")
    ip.add_argument("--frames", type=int, default=8, help="frames including both ends (default: 8)")
    ip.add_argument("--method", default="slerp", choices=["slerp", "lerp"], help="latent interpolation (default: slerp)")
    add_out(ip, "strip.png (image strip, or the path drawn over the data) or frames.npy")
    add_quiet(ip)
    ip.set_defaults(func=interpolate_cmd)
