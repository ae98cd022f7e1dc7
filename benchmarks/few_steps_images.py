"""Few steps on a learned image model (issue 32, item 5): every few-step sampler and the distilled students at
NFE 1-20 on one teacher, beside ddpm at 100 and 200 steps.

Families: shapes32 (judged by the factor classifier of benchmarks/images.py) and gratings32 (4 orientations x 3
colour pairs x phase, judged in closed form by unstir.quality.grating_judge; FD, KID, precision and recall in its
38 features). Neither was used to choose any setting of a sampler or of the distillation.

1. The teacher: benchmarks/images.py's recipe (rf with velocity, logit-normal times, U-Net 32,64,64, batch 32, lr
   2e-3 cosine, EMA 0.999) for --steps on --family (cached in --work).
2. Students: ``unstir.distill.distill`` at its defaults (64 teacher steps, half the teacher's steps over the
   rounds, a quarter of its lr, no dropout) for each --distill NFE.
3. Rows, n samples each on seeds 2424.. (never used to choose a setting; every sampler runs with its defaults and
   the named grid ``unstir.sample`` picks; ``sample --nfe`` is the CLI's default at that NFE: deis_gauss
   up to 5 NFE, then ipndm (both rows up to 5), on a grid placed by a pilot run, with analytical teleportation
   from the training data's moments; from 2 NFE, where the named grids are T > t_min > 0 and the pilot places the
   middle point, to 10; above 10 it is dpm++2m on its named grid, the plain dpm++2m row). Scores: validity, FD, KID,
   precision and recall in the factor classifier's features with 95 % intervals (unstir.quality.bootstrap), and
   which of them overlap ddpm 100's. EDM's churn is screened per NFE on seeds 777.. by FD against the training
   images (``--churn``), and only the chosen value is scored on the evaluation seeds. Costs: minutes of training or distillation beside the model's rows, and of
   sampling beside each row.

    .venv/bin/python benchmarks/few_steps_images.py --steps 3000 --out benchmarks/few_steps_images_results.md
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("benchmarks_images", HERE / "images.py")
images = sys.modules.setdefault("benchmarks_images", importlib.util.module_from_spec(spec))
spec.loader.exec_module(images)

from unstir import data, quality  # noqa: E402
from unstir.distill import distill, distill_grid, sample_grid  # noqa: E402
from unstir.distributed import sample_sharded  # noqa: E402
from unstir.runs import load_moments, load_run  # noqa: E402
from unstir.training import TrainConfig, train  # noqa: E402
from unstir.cli.sampling import PILOT_MAX_NFE, PILOT_N, POLISH, default_sampler  # noqa: E402
from unstir.tuning import pilot_grid, steps_for_nfe  # noqa: E402

NFES = (1, 2, 4, 6, 10, 20)
SAMPLERS = ("ddim", "euler_ancestral", "dpm++2m", "dpm++3m", "ipndm", "unipc", "dpm++2m_sde", "dpm++3m_sde",
            "sa_solver", "restart", "edm")
RECIPE = dict(process="rf", prediction="velocity", time_sampling="logit-normal", widths=(32, 64, 64), res_blocks=1,
              attention=(8,), dropout=0.1, batch_size=32, lr=2e-3, ema_decay=0.999)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="shapes32", choices=["shapes32", "gratings32"],
                    help="shapes32 (judged by a factor classifier trained here) or gratings32 (judged in closed form)")
    ap.add_argument("--steps", type=int, default=3000, help="the teacher's training steps")
    ap.add_argument("--distill", type=int, nargs="*", default=[1, 2, 4], help="students' NFE")
    ap.add_argument("--nfe", type=int, nargs="*", default=list(NFES))
    ap.add_argument("--samplers", nargs="*", default=list(SAMPLERS))
    ap.add_argument("--churn", type=float, nargs="+", default=[0.0, 10.0, 40.0, 80.0],
                    help="EDM's S_churn values screened (FD against the training images, seeds 777..) per NFE")
    ap.add_argument("--no-polish", dest="polish", action="store_false", help="the `sample --nfe` rows without "
                    "the polish (by default both: --polish 0 and the CLI's default)")
    ap.add_argument("--ddpm", type=int, nargs="*", default=[200], help="ddpm rows beside the reference (ddpm 100)")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--work", type=Path, default=images.WORK)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher = images.teacher_dir(args.work, args.family, args.steps)
    minutes = {}
    if not (teacher / "checkpoint.json").exists():
        tic = time.perf_counter()
        train(TrainConfig(data=args.family, steps=args.steps, checkpoint_every=500, **RECIPE), teacher, progress=False)
        minutes["teacher"] = (time.perf_counter() - tic) / 60
    students = {}
    for k in args.distill:
        out = args.work / f"{args.family}-teacher{args.steps}-student{k}"
        if not (out / "checkpoint.json").exists():
            tic = time.perf_counter()
            distill(teacher, out, nfe=k, progress=False)
            minutes[f"student{k}"] = (time.perf_counter() - tic) / 60
        students[k] = out
    device = torch.device("cpu")
    reference = data.load(args.family, n=args.n, seed=0).x
    real = data.load(data.HELD_OUT[args.family], n=args.n, seed=0).x
    judge = images.family_judge(args.family, args.work, device, reference)
    floor = judge(real)
    model = load_run(teacher)
    moments = load_moments(teacher)

    def row(name, m, cost="", **kw):
        tic = time.perf_counter()
        with torch.no_grad():
            x, nfe = sample_sharded(m, args.n, seed=images.EVAL_SEED, batch_size=250, device="cpu", progress=False,
                                    **kw)
        s = judge(x)
        return name, nfe, s, cost, (time.perf_counter() - tic) / 60

    rows = [row("ddpm 100 (reference)", model, sampler="ddpm", steps=100)]
    rows += [row(f"ddpm {k}", model, sampler="ddpm", steps=k) for k in args.ddpm if k != 100]
    ref = rows[0][2]
    print(f"reference: validity {ref['validity']:.3f}, FD {ref['fd']:.1f}", flush=True)
    if students:  # what every student is taught: the teacher's DDIM on the 64-point distillation grid
        rows.append(row("teacher, DDIM 64 on the distillation grid", model, sampler="ddim",
                        grid=distill_grid(model.process, 64)))
    for k, run in students.items():
        s_model = load_run(run)
        rows.append(row(f"student, distilled to {k}", s_model, f"{minutes.get(f'student{k}', float('nan')):.1f}",
                        sampler="ddim", grid=sample_grid(s_model.process, s_model.run_info["config"]["distill"])))
        print(rows[-1][0], rows[-1][2]["validity"], flush=True)
    for nfe in args.nfe:
        if 2 <= nfe <= PILOT_MAX_NFE:  # the CLI's default at this NFE first (deis_gauss up to 5, with moments), ipndm
            # beside it; above PILOT_MAX_NFE `sample --nfe` is dpm++2m on its named grid: the plain rows below
            default = default_sampler(nfe, argparse.Namespace(run=teacher))
            for name in dict.fromkeys([default, "ipndm"]):
                gauss = {"moments": moments} if name == "deis_gauss" else {}
                for polish in (0, POLISH) if args.polish else (0,):
                    tic = time.perf_counter()
                    grid = pilot_grid(model, name, nfe, n=PILOT_N, teleport=moments, polish=polish, **gauss)
                    label = "`sample --nfe {}`{} ({}, pilot grid{})".format(
                        nfe, "" if name == default else " --sampler", name,
                        f", polish {polish}" if polish else ", --polish 0" if args.polish else "")
                    rows.append(row(label, model, f"{(time.perf_counter() - tic) / 60:.1f} (placing)", sampler=name,
                                    grid=grid.grid, teleport=moments if grid.teleport else None, **gauss))
                    print(f"{label}: validity {rows[-1][2]['validity']:.3f} FD {rows[-1][2]['fd']:.1f}", flush=True)
        for name in args.samplers:
            try:
                steps = steps_for_nfe(name, nfe)
            except ValueError:
                continue  # this sampler cannot make this NFE (Heun-type: odd NFE >= 3; restart: >= 13)
            if name == "edm":  # EDM's churn, chosen on other seeds against the training images (never the eval seeds)
                screened = []
                for churn in args.churn:
                    tic = time.perf_counter()
                    with torch.no_grad():
                        x, _ = sample_sharded(model, args.n, seed=images.SCREEN_SEED, batch_size=250, device="cpu",
                                              progress=False, sampler="edm", steps=steps, churn=churn)
                    screened.append((judge(x)["fd"], churn))
                churn = min(screened)[1]
                rows.append(row(f"edm {nfe} (churn {churn:g} of {'/'.join(f'{c:g}' for c in args.churn)}, screened)",
                                model, sampler="edm", steps=steps, churn=churn))
                continue
            rows.append(row(f"{name} {nfe}", model, sampler=name, steps=steps))
            print(f"{rows[-1][0]}: validity {rows[-1][2]['validity']:.3f} FD {rows[-1][2]['fd']:.1f}", flush=True)

    def cells(s):
        iv = s["intervals"]
        c = lambda k, f, m=1.0: f"{m * s[k]:{f}} [{m * iv[k][0]:{f}}, {m * iv[k][1]:{f}}]"  # noqa: E731
        near = [k for k in ("validity", "fd", "kid") if s is not ref
                and quality.overlap((s[k], *iv[k]), (ref[k], *ref["intervals"][k]))]
        return (f"{c('validity', '.3f')} | {c('fd', '.1f')} | {c('kid', '.2f', 1e3)} | {c('precision', '.3f')} | "
                f"{c('recall', '.3f')} | {', '.join(near) or '-'}")

    lines = [f"{args.family}: teacher {args.steps} steps ({minutes.get('teacher', float('nan')):.1f} min on this "
             f"machine; nan: cached), recipe {RECIPE}; {args.n} samples per row on seeds {images.EVAL_SEED}..; 95 % "
             f"intervals; KID x 1e3; 'overlaps ddpm 100' lists the figures whose interval overlaps the reference's.",
             "", "| sampler | NFE | validity | FD | KID | precision | recall | overlaps ddpm 100 | model min | "
             "sampling min |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| floor (held-out real) | | {cells(floor)} | | |"]
    for name, nfe, s, cost, sampling in rows:
        lines.append(f"| {name} | {nfe} | {cells(s)} | {cost} | {sampling:.1f} |")
    lines += ["", f"total {(time.perf_counter() - t_start) / 60:.1f} min. Reproduce: `.venv/bin/python "
              f"benchmarks/few_steps_images.py --family {args.family} --steps {args.steps}`"]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
