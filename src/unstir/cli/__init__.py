"""The `unstir` command line: one module per family of verbs, and the options they share defined once
(``unstir.cli.common``), so every verb speaks the same words."""

from __future__ import annotations

import argparse
import sys

from . import conditional, ode, pages, sampling, training

FAMILIES = (pages, training, sampling, ode, conditional)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unstir", description="Score-based diffusion: one learned score, every "
                                 "correct way to use it.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
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


__all__ = ["build_parser", "main"]
