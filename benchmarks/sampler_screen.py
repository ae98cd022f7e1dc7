"""Screen sampler settings on a cached teacher of benchmarks/few_steps_images.py, on the screening seeds (777..)
by default, or on the evaluation seeds (2424..) with --evaluate once a setting has been chosen on the screening
ones. Each spec is images.parse_spec's 'name:steps[:key=value...]', e.g. 'dpm++2m_sde:10:eta=0.5' or
'ipndm:10:grid=edm' ('afs=mean': AFS from the run's stored data mean, as `unstir sample --afs`; 'afs=true':
centred AFS); one JSON line per spec (validity and FD with their 95 % intervals, class TV, precision, recall,
NFE, seconds).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampler_screen.py --family shapes32 --steps 11000 \\
        --work /tmp/fsi dpm++2m_sde:10:eta=0.5 ipndm:10

--run R screens another run of the family instead of the cached teacher, e.g. a student of `unstir distill`; on a
distilled run a spec that names no grid and the student's step count samples on the student's own grid (as
`unstir sample` does), so 'ddim:4:eta=0.5' on a 4-step student is its DDIM with noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import images  # noqa: E402  (benchmarks/images.py)

from unstir._random import sample_seeds  # noqa: E402
from unstir.distributed import sample_sharded  # noqa: E402
from unstir.distill import sample_grid  # noqa: E402
from unstir.runs import load_moments, load_run  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="name:steps[:key=value...]")
    images.add_cached_teacher_args(ap)
    ap.add_argument("--evaluate", action="store_true", help=f"the evaluation seeds {images.EVAL_SEED}.. instead "
                    f"of the screening seeds {images.SCREEN_SEED}..")
    ap.add_argument("--seed", type=int, help="another seed set (per-sample seeds seed * 2^20 + i), e.g. a fresh "
                    "one for a setting already chosen and evaluated")
    ap.add_argument("--run", type=Path, help="screen this run (e.g. a distilled student) instead of the teacher")
    args = ap.parse_args()
    specs = [images.parse_spec(s) for s in args.specs]  # a malformed spec fails here, before any work
    seed = args.seed if args.seed is not None else images.EVAL_SEED if args.evaluate else images.SCREEN_SEED
    sample_seeds(seed, args.n)  # and a seed outside the per-sample seeds' range
    teacher, judge = images.cached_teacher(args)
    model = load_run(args.run or teacher)
    distilled = model.run_info["config"].get("distill")
    for text, (name, steps, options) in zip(args.specs, specs):
        if options.get("afs") == "mean":
            options = {**options, "afs": load_moments(args.run or teacher)}
        if distilled and "grid" not in options and steps == distilled["nfe"]:
            options = {**options, "grid": sample_grid(model.process, distilled)}
        tic = time.perf_counter()
        with torch.no_grad():
            x, nfe = sample_sharded(model, args.n, seed=seed, batch_size=250, device="cpu", sampler=name,
                                    steps=steps, **options)
        s = judge(x)
        iv = s["intervals"]
        print(json.dumps(dict(family=args.family, run=str(args.run or teacher), spec=text, nfe=nfe, seed=seed,
                              n=args.n, reference=args.reference,
                              validity=round(s["validity"], 3), validity_ci=[round(v, 3) for v in iv["validity"]],
                              fd=round(s["fd"], 1), fd_ci=[round(v, 1) for v in iv["fd"]],
                              class_tv=round(s["class_tv"], 3), precision=round(s["precision"], 3),
                              recall=round(s["recall"], 3),
                              seconds=round(time.perf_counter() - tic))), flush=True)


if __name__ == "__main__":
    main()
