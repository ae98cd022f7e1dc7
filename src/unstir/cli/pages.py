"""The verbs that show: demo, oracle, report, list."""

from __future__ import annotations

from pathlib import Path

from .. import oracle
from ..demos import IMAGE_DEMO_N, IMAGE_DEMO_STEPS, demo, oracle_demo
from ..grids import GRIDS
from ..losses import WEIGHTINGS
from ..parametrization import PREDICTIONS
from ..processes import PROCESSES
from ..samplers import SAMPLERS
from .common import add_count, add_device, add_quiet, add_run, add_seed, output_path
from .conditional import INVERSE_METHODS

def report_cmd(args) -> int:
    """Write RUN/report.html: one self-contained page with the run's samples, trajectories, quality against
    NFE, loss curve, bits/dim, interpolation, round trip, guided samples and inpainting."""
    from ..report import write_report
    if not (Path(args.run) / "run.json").exists():  # --run first: named as such, not as a missing --out folder
        raise ValueError(f"{args.run!r} is not a run folder (no run.json)")
    args.out = args.out or str(Path(args.run) / "report.html")
    path = write_report(args.run, output_path(args, (".html",)), n=args.n, seed=args.seed, progress=not args.quiet,
                        device=args.device)
    print(f"report -> {path}")
    return 0


def list_choices(args) -> int:
    """Every name the other commands take: data, processes, predictions, weightings, networks, grids,
    samplers, inverse-problem methods and oracle mixtures."""
    from ..data import IMAGE_SETS, TOY_2D
    from ..nets import NETS

    print("data:       ", ", ".join([*TOY_2D, *IMAGE_SETS]),
          "(or a folder of images, or a .npy file)")
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


def register(sub) -> None:
    m = sub.add_parser("demo", help="the main job: train on 2-D data, sample with five samplers, figures",
                       description=demo.__doc__)
    m.add_argument("--out", default="runs/demo", help="folder for the run and figures (default: runs/demo)")
    m.add_argument("--force", action="store_true", help="replace OUT/run and the figures if they hold an earlier "
                   "demo's")
    m.add_argument("--data", default=None, choices=["moons", "swiss_roll", "circles", "checkerboard", "ring",
                                                    "unequal_2d"], help="2-D data set (default: moons)")
    m.add_argument("--process", default=None, choices=sorted(PROCESSES),
                   help="forward process (default: vp; with --images rf, flow matching, which learned shapes32 "
                        "fastest in benchmarks/images.py)")
    m.add_argument("--train-steps", dest="train_steps", type=int, default=None,
                   help=f"training steps (default: 3000; {IMAGE_DEMO_STEPS} with --images)")
    m.add_argument("--images", action="store_true", help="shapes32 (32x32 colour) instead: 600 training steps "
                   "(about 2 minutes on 2 CPU cores; 6 the first time, which also trains the factor classifier), "
                   "samples scored by the factor classifier against real images")
    m.add_argument("--classifier-steps", dest="classifier_steps", type=int, default=1500,
                   help="with --images: training steps of the factor classifier, kept in OUT (default: 1500)")
    m.add_argument("-n", type=int, default=None, help="samples per sampler (default: 2000; with --images, samples "
                   f"scored: {IMAGE_DEMO_N})")
    m.add_argument("--paths", type=int, default=6, help="trajectories to draw (default: 6)")
    add_seed(m, "training, noise and held-out data")
    add_device(m)
    add_quiet(m)
    m.set_defaults(func=demo)

    d = sub.add_parser("oracle", help="samplers on the exact score of a Gaussian mixture, with figures",
                       description=oracle_demo.__doc__)
    d.add_argument("--out", default="runs/oracle", help="folder for the figures (default: runs/oracle)")
    d.add_argument("--force", action="store_true", help="replace the figures of an earlier oracle run in --out")
    d.add_argument("--process", default="vp", choices=sorted(PROCESSES), help="forward process (default: vp)")
    d.add_argument("--data", default="unequal_2d", choices=list(oracle.EXAMPLES),
                   help="a 2-D Gaussian mixture ('random': 5 random components, from --seed; default: unequal_2d)")
    d.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20)")
    add_count(d, 2000, "samples per sampler")
    d.add_argument("--paths", type=int, default=6, help="trajectories to draw (default: 6)")
    add_seed(d, "the samples and the noise")
    add_device(d)
    add_quiet(d)
    d.set_defaults(func=oracle_demo)

    rp = sub.add_parser("report", help="write RUN/report.html, a page that shows what the model does",
                        description=report_cmd.__doc__)
    add_run(rp)
    rp.add_argument("--out", help="page to write (default: RUN/report.html)")
    rp.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_count(rp, 1000, "samples per sampler for vector data")
    add_seed(rp)
    add_device(rp)
    add_quiet(rp)
    rp.set_defaults(func=report_cmd)

    ls = sub.add_parser("list", help="list the data sets, processes, predictions, weightings, networks, grids and "
                        "samplers", description=list_choices.__doc__)
    ls.set_defaults(func=list_choices)
