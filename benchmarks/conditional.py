"""Conditional generation on scikit-learn's digits.

1. A class-conditional U-Net trained with label dropout (0.1) and a noise-conditional classifier (the U-Net's
   encoder half) for an unconditional U-Net, all on the 1500 training digits. For several guidance scales:
   the accuracy of a LogisticRegression judge (trained separately on the real training digits) on the
   requested class, and the diversity (mean pairwise distance between samples of a class, pixels in
   [0, 1]), so the cost of high scales shows.
2. Inpainting of held-out digits with the lower half masked, per method, as an image grid beside the
   truth, with the judge's accuracy on the inpainted digits (true label).

    .venv/bin/python benchmarks/conditional.py --out benchmarks/conditional_results.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import unstir
from unstir import data, figures
from unstir.guidance import cfg, guided
from unstir.inverse import Measurement, dps, pigdm, repaint
from unstir.runs import load_classifier
from unstir.training import TrainConfig, train, train_classifier

HERE = Path(__file__).parent
PER_CLASS = 50


def _judge():
    from sklearn.linear_model import LogisticRegression

    real = data.digits("train")
    return LogisticRegression(max_iter=3000).fit(((real.x + 1) / 2).flatten(1).numpy(), real.labels.numpy())


def _runs(work: Path, steps: int):
    base = dict(data="digits", steps=steps, batch_size=128, lr=1e-3, warmup=200, ema_decay=0.999)
    cond, uncond, clf = work / "digits_cond", work / "digits_uncond", work / "digits_classifier"
    if not (cond / "checkpoint.json").exists():
        train(TrainConfig(class_conditional=True, **base), cond, progress=False)
    if not (uncond / "checkpoint.json").exists():
        train(TrainConfig(**base), uncond, progress=False)
    if not (clf / "classifier.safetensors").exists():
        train_classifier(TrainConfig(data="digits", steps=steps, batch_size=256, lr=1e-3, warmup=100), clf,
                         progress=False)
    return unstir.load_run(cond), unstir.load_run(uncond), load_classifier(clf)


def guidance_table(cond, uncond, clf, judge) -> list[str]:
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    lines = ["## 1. Guidance scale against accuracy and diversity", "",
             f"{PER_CLASS} samples per class, dpm++2m, 20 steps, the same noise for every row. Accuracy: share the judge",
             "assigns to the requested class. Diversity: mean pairwise distance within a class (pixels in [0, 1]).", "",
             "| guidance | scale | accuracy | diversity |", "|---|---|---|---|"]
    real = data.load("digits-test")
    rows = [("classifier-free (s)", s, cfg(cond, scale=s)) for s in (0.0, 1.0, 2.0, 4.0)]
    rows += [("classifier", s, guided(uncond, clf, scale=s)) for s in (0.0, 1.0, 2.0, 4.0)]
    x_T = cond.process.prior_sample((len(labels), 1, 8, 8), torch.Generator().manual_seed(0))
    for name, scale, model in rows:
        ctx = torch.enable_grad() if name == "classifier" else torch.no_grad()
        with ctx:
            x = unstir.sample(model, None, x_T, steps=20, y=labels).x.detach()
        lines.append(f"| {name} | {scale:g} | {_accuracy(judge, x, labels):.3f} | {_diversity(x, labels):.3f} |")
    lines.append(f"| held-out real digits | | {_accuracy(judge, real.x, real.labels):.3f} | "
                 f"{_diversity(real.x, real.labels):.3f} |")
    return lines


def _accuracy(judge, x, labels) -> float:
    pred = judge.predict(((x.clamp(-1, 1) + 1) / 2).flatten(1).numpy())
    return float((torch.as_tensor(pred) == labels).double().mean())


def _diversity(x, labels) -> float:
    x = ((x.clamp(-1, 1) + 1) / 2).flatten(1).double()
    per = [torch.pdist(x[labels == c]).mean().item() for c in labels.unique().tolist() if (labels == c).sum() > 1]
    return sum(per) / len(per)


def inpainting(uncond, judge) -> list[str]:
    test = data.load("digits-test")
    truth, labels = test.x[:8].double(), test.labels[:8]
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[:, :4] = 1  # the upper half is known
    g = torch.Generator().manual_seed(1)
    x_T = uncond.process.prior_sample((8, 1, 8, 8), g)
    known = truth.flatten(1)[:, mask.flatten().bool()]
    columns, lines = [truth, truth * mask], ["", "## 2. Inpainting the lower half of 8 held-out digits", "",
                                              "| method | NFE | judge accuracy (true label) |", "|---|---|---|"]
    for name in ("replacement", "repaint", "dps", "pigdm"):
        xs = []
        for i in range(8):  # one measurement per digit; every method from the same noise
            m = Measurement(mask, known[i], 0.0, data_shape=(1, 8, 8))
            gi = torch.Generator().manual_seed(10 + i)
            if name == "repaint":
                with torch.no_grad():
                    r = repaint(uncond, m, x_T[i:i + 1], 100, generator=gi)
                x, nfe = r.x, r.nfe
            elif name == "dps":
                r = dps(uncond, m, x_T[i:i + 1], 100, zeta=1.0, generator=gi)
                x, nfe = r.x, r.nfe
            else:
                model = pigdm(uncond, m) if name == "pigdm" else uncond
                ctx = torch.no_grad() if name == "replacement" else torch.enable_grad()
                with ctx:
                    r = unstir.sample(model, None, x_T[i:i + 1], sampler="ddpm", steps=100, generator=gi,
                                      project=m.replacement(gi) if name == "replacement" else None)
                x, nfe = r.x.detach(), r.nfe
            xs.append(x)
        x = torch.cat(xs)
        columns.append(x.double())
        lines.append(f"| {name} | {nfe} | {_accuracy(judge, x.float(), labels):.3f} |")
    grid = torch.stack(columns, 1).reshape(-1, 1, 8, 8).clamp(-1, 1)
    figures.image_grid(data.from_unit_range(grid.float()), HERE / "digits_inpainting.png", ncol=len(columns))
    lines += ["", "benchmarks/digits_inpainting.png: each row a held-out digit; columns: truth, the known upper half, "
              "then replacement, RePaint, DPS, PiGDM."]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "conditional_results.md"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--work", default="runs/bench")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cond, uncond, clf = _runs(Path(args.work), args.steps)
    judge = _judge()
    lines = ["# Conditional generation on digits", "", f"`.venv/bin/python benchmarks/conditional.py --out {args.out}`", ""]
    lines += guidance_table(cond, uncond, clf, judge)
    print("\n".join(lines), flush=True)
    lines += inpainting(uncond, judge)
    lines += ["", f"total {time.perf_counter() - t0:.0f} s (training included when the runs are not in {args.work})"]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
