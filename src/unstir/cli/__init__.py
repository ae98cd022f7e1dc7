"""The `unstir` command line: one module per family of verbs, and the options they share defined once
(``unstir.cli.common``), so every verb speaks the same words."""

from __future__ import annotations

import argparse
import os
import sys

from . import conditional, ode, pages, sampling, training

FAMILIES = (pages, training, sampling, ode, conditional)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unstir", description="Score-based diffusion: one learned score, every "
                                 "correct way to use it.", allow_abbrev=False)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    for name, parser in sub.choices.items():
        parser.allow_abbrev = False  # `--width 64` is not `--widths 64`: only whole option names
        parser.epilog = "example:\n  " + EXAMPLES[name]
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return ap


EXAMPLES = {
    "demo": "unstir demo --out runs/demo",
    "oracle": "unstir oracle --process ve --data ring",
    "train": "unstir train --data moons --out runs/moons",
    "ema": "unstir ema --run runs/moons --sigma-rel 0.1 --out runs/moons-ema0.1",
    "distill": "unstir distill --run runs/moons --nfe 2 --out runs/moons-2step",
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        return _dispatch(args, argv)
    try:
        return _dispatch(args, argv)
    except USER_ERRORS as err:
        print(f"unstir {args.command}: error: {in_flags(describe(err), args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no handler stops the work cleanly (training writes a checkpoint)
        print(f"unstir {args.command}: interrupted (Ctrl-C) before its output was complete", file=sys.stderr)
        return 130


def describe(err: BaseException) -> str:
    """An error as one line: an OSError from the system (a full disk, a path through a file) as its reason and
    path ("Not a directory: '/dev/null/x'"), without Python's "[Errno 20]"."""
    if isinstance(err, OSError) and not isinstance(err, ValueError) and err.strerror:
        paths = " -> ".join(repr(str(p)) for p in (err.filename, err.filename2) if p is not None)
        return f"{err.strerror}{': ' + paths if paths else ''}"
    return str(err)


def in_flags(message: str, command: str) -> str:
    """A message from the Python API in the command line's words: a verb's option named by its Python name
    (``batch_size must ...``, ``label_dropout=0.2 ...``, ``max_evals must ...``) is named by its flag
    (``--batch-size``, ``--label-dropout``, ``--max-evals``); names the verb does not take are left alone."""
    import re

    parser = build_parser()._subparsers._group_actions[0].choices[command]
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings and a.dest != "help"}
    for dest, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        after = r"( must\b|=| \(| \d| is the\b| applies\b)" if "_" in dest else r"( must\b|=)"  # plain words stay
        message = re.sub(rf"(?<![-\w.']){re.escape(dest)}(?={after})", flag, message)
    return message


def _dispatch(args, argv) -> int:
    from .common import check_shared

    check_shared(args)
    nproc = getattr(args, "nproc", 1)
    if isinstance(nproc, int) and nproc != 1 and "LOCAL_RANK" not in os.environ:
        return launch(args.command, argv, nproc)
    return args.func(args)


def launch(command: str, argv: list, nproc: int) -> int:
    """Run ``unstir <argv>`` in ``nproc`` processes on this machine through torchrun's launcher (its
    ``--standalone`` rendezvous), in this process, so that a stop ends with unstir's line: Ctrl-C, SIGTERM or
    SIGUSR1 reach every worker (each stops as it would alone: training writes a checkpoint) and the launcher
    returns 128 + the signal, where plain torchrun ends in its own traceback."""
    if nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    import logging

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    for name in list(logging.root.manager.loggerDict):  # its notices of the stop that unstir reports itself
        if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
            logging.getLogger(name).setLevel(logging.ERROR)
    rest = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=")
                                                  or (i and argv[i - 1] == "--nproc"))]
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "unstir.cli",
                                             "--", *rest])
    try:
        run(launcher)
    except SignalException as err:
        import signal

        print(f"unstir {command}: stopped by {signal.Signals(err.sigval).name}; every process stopped (their lines "
              f"are above)", file=sys.stderr)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        codes = sorted(f.exitcode for f in err.failures.values() if f.exitcode > 0)  # < 0: stopped by torchrun
        print(f"unstir {command}: {len(codes) or len(err.failures)} of {nproc} processes failed (exit status "
              f"{', '.join(map(str, sorted(set(codes)))) or 'by a signal'}; torchrun stopped the rest); the errors "
              f"are above", file=sys.stderr)
        return 2 if 2 in codes else (codes[-1] if codes else 1)
    return 0


__all__ = ["build_parser", "launch", "main"]
