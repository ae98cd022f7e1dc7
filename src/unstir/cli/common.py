"""What every verb shares: the options they all speak (defined once here, so no two verbs spell or default
them differently), and the checks and writers behind them."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import torch

# --- the shared options ---------------------------------------------------------------------------------


def add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by `unstir train`")


def add_out(p: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    """--out, and --force to replace it (every verb that writes a file takes both)."""
    p.add_argument("--out", required=default is None, default=default,
                   help=help + (f" (default: {default})" if default else ""))
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def add_count(p: argparse.ArgumentParser, default: int, what: str) -> None:
    p.add_argument("-n", type=int, default=default, help=f"{what} (default: {default})")


SEED_LIMIT = 4096  # --seed of every verb: sample i of run seed s is drawn from seed s * 2^20 + i (32 bits)


def add_seed(p: argparse.ArgumentParser, what: str = "the noise and any held-out draw", default=0) -> None:
    p.add_argument("--seed", type=int, default=default, help=f"seed for {what}, in [0, {SEED_LIMIT}) (default: 0)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")


def add_processes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine, started by unstir through "
                   "torchrun's launcher (one per GPU; default: 1). Ctrl-C or SIGTERM then stops every process with "
                   "unstir's line; `torchrun --nproc-per-node N -m unstir.cli -- ...` does the same work")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (notices and warnings still show)")


NFE_MIN = 2  # --nfe of sample and tune-grid: a grid with at least one point between T and the end to place


def add_nfe(p: argparse.ArgumentParser, help: str, default: int | None = None) -> None:
    p.add_argument("--nfe", type=int, default=default, help=f"{help} (at least {NFE_MIN}"
                   + (f"; default: {default})" if default is not None else ")"))


def check_shared(args) -> None:
    """The options every verb shares, checked once before any verb runs (one line each, like every error):
    --seed in [0, SEED_LIMIT), --nfe >= NFE_MIN."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be an integer in [0, {SEED_LIMIT}) (sample i draws from seed * 2^20 + i, "
                         f"32 bits), got {seed}")
    nfe = getattr(args, "nfe", None)
    if nfe is not None and nfe < NFE_MIN and getattr(args, "command", None) != "distill":  # distill: its own check
        raise ValueError(f"--nfe must be an integer >= {NFE_MIN} (a grid with a point to place; fewer evaluations: "
                         f"--steps; a distilled run samples at its own NFE without either), got {nfe}")


def add_class(p: argparse.ArgumentParser, classifier: bool = False) -> None:
    p.add_argument("--class", dest="label", type=int, help="class label (class-conditional runs"
                   + (", or with --classifier)" if classifier else ")"))


def add_guidance(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--guidance", type=float, help=help)


def add_steps(p: argparse.ArgumentParser, default: int | None, help: str) -> None:
    p.add_argument("--steps", type=int, default=default,
                   help=help + f" (default: {20 if default is None else default})")


def add_no_teleport(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-teleport", dest="no_teleport", action="store_true",
                   help="keep the pilot run's grids starting at T: by default, on a run that stores its training data's "
                   "moments, the pilot may start below T by analytical teleportation (the data's Gaussian, solved "
                   "exactly; Wang & Vastola 2024) where that is nearer its teacher")


def add_held_out(p: argparse.ArgumentParser) -> None:
    """What the verbs that read held-out data share."""
    add_run(p)
    p.add_argument("--data", help="held-out data (default: the run's data: a fresh draw, or digits-test, shapes32-test, gratings32-test, patches32-test)")
    add_seed(p)
    add_device(p)
    add_class(p)


# --- checks and writers ---------------------------------------------------------------------------------

def output_path(args, suffixes=(".png", ".npy")) -> Path:
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


def save(out: Path, write) -> None:
    """Write ``out`` through ``write(path)`` atomically: a failed write leaves no partial file."""
    from ..runs import atomic_write

    atomic_write(out, write)


def npy(array):
    def write(path):
        with open(path, "wb") as f:
            np.save(f, array)
    return write


def positive(**values) -> None:
    """Counts from the command line: each a positive integer, named as typed."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def check_strength(value) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"--guidance must be >= 0 (a negative strength pushes away from the condition), got {value}")


def warn_out_of_range(x, bound: float, what: str) -> None:
    """Samples orders of magnitude outside the data's range are a strength set too high, not a result."""
    top = x.abs().max().item()
    if top > 100 * bound:
        print(f"warning: samples reach |x| = {top:.3g}, over 100x the data's range (|x| <= {bound:.3g}); {what} is "
              f"likely too strong", file=sys.stderr)


HELD_OUT_CHUNK = 20000  # 2-D held-out data come in fixed chunks, so the first k points never depend on -n


def held_out(model, spec: str | None, n: int, seed: int, device="cpu"):
    """Data the run was not trained on, on ``device``: a fresh draw of a 2-D set (chunks of 20000 from seeds seed + 1000,
    seed + 1001, ...: a fixed sequence, so point i is the same for any n), the held-out set of digits, shapes32, gratings32 or patches32, or the first n
    items of a folder / .npy file. Returns (x, levels)."""
    from .. import data as data_mod

    cfg = model.run_info["config"]
    spec = spec or data_mod.held_out_name(cfg["data"])
    if spec in data_mod.TOY_2D:
        chunks = [data_mod.load(spec, n=HELD_OUT_CHUNK, seed=seed + 1000 + k) for k in range(-(-n // HELD_OUT_CHUNK))]
        ds = chunks[0]
        ds.x = torch.cat([c.x for c in chunks])
    else:
        ds = data_mod.load(spec, n=n, size=cfg.get("size"), mode=cfg.get("mode", "L"), seed=seed + 1000)
    if tuple(ds.shape) != tuple(model.data_shape):
        raise ValueError(f"data {spec!r} has per-sample shape {ds.shape}; the run's model expects {model.data_shape}")
    return ds.x[:n].to(device), ds.levels


def data_bound(model, seed: int) -> float:
    """The largest |x| of the run's data: 1 for images (scaled to [-1, 1]), else of a held-out draw."""
    from .. import data as data_mod

    if len(model.data_shape) == 3:
        return 1.0
    if not data_mod.is_builtin(model.run_info["config"]["data"]):
        return math.inf  # trained on a file: its range is not looked up (paths in run.json are not followed)
    return held_out(model, None, 1000, seed)[0].abs().max().item()


def read_png(path, shape, mask: bool = False):
    """A PNG as a uint8 tensor of ``shape`` (C, H, W); a mask as 0/1 (white = 1), refusing other values."""
    from PIL import Image

    from ..data import _colour

    c, h, w = shape
    try:
        with Image.open(path) as im:
            if not mask and c == 1 and _colour(im) == "colour":
                raise ValueError(f"{str(path)!r} is a colour image; the run's images are grayscale (1 channel): "
                                 f"convert it first (e.g. PIL's Image.convert('L'))")
            arr = np.asarray(im.convert("L" if (mask or c == 1) else "RGB"), dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err.strerror or err}") from None
    if arr.shape[:2] != (h, w):
        raise ValueError(f"{str(path)!r} is {arr.shape[1]}x{arr.shape[0]}; the run's images are {w}x{h}")
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if mask:
        if not ((t == 0) | (t == 255)).all():
            raise ValueError(f"mask {str(path)!r} must be black (0, unknown) and white (255, known) only")
        return (t[:1] == 255).long().expand(c, h, w).contiguous()
    return t


@contextlib.contextmanager
def evaluation_bar(model, quiet: bool, desc: str):
    """A progress bar that counts the network's evaluations (a forward hook on it) for work whose total is not
    known ahead (RePaint's jumps, SMC's particles); nothing with ``quiet`` or for a model without a network."""
    from tqdm import tqdm

    from ..parametrization import model_network

    net = None if quiet else model_network(model)
    if net is None:
        yield
        return
    bar = tqdm(desc=desc, unit="eval", dynamic_ncols=True, delay=1.0)  # after a second: a quick failure stays one line
    def count(*_):  # a forward hook's return value would replace the output: return nothing
        bar.update(1)

    handle = net.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def note_distilled(model) -> None:
    """A notice where a verb integrates the PF ODE of a distilled run, whose network was trained only at the points
    of its distillation grid (``unstir.distill``): away from them it is not its teacher's score."""
    spec = getattr(model, "run_info", {}).get("config", {}).get("distill")
    if spec:
        import sys

        print(f"note: this run is distilled to {spec['nfe']} DDIM step(s) on its grid; its network is trained at "
              f"those points only, so a PF-ODE solve elsewhere is not its teacher's (use the teacher "
              f"{spec['teacher']!r} for likelihoods and exact encodings)", file=sys.stderr)
