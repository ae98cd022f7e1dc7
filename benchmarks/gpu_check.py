"""The GPU check: every verb on a device, its numbers against the CPU's, and the speed table against diffusers.

    python benchmarks/gpu_check.py                       # on cuda; under 8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick  # the same code paths at toy sizes (make test runs it)
    make gpu-check                                       # the first line, into benchmarks/gpu_results.md

Three parts:

1. **Verbs.** Small runs are trained on the device (moons, class-conditional moons, a classifier, a 32x32 colour
   set), then every verb runs on them with ``--device D`` and again with ``--device cpu``; the table gives each
   one's exit status and the largest difference between its two outputs. unstir draws every random number on
   the CPU generator and moves it, so the outputs agree to float tolerance (kernels differ, not noise).
2. **The oracle on the device.** Samples, log-likelihoods and encodings of the exact Gaussian-mixture model
   against the CPU's, the mixture moved with ``GaussianMixture.to``.
3. **Speed** (side by side, in one run, with diffusers on the same network and batch; ratios, best of 3):
   sampling 20 NFE (dpm++2m against diffusers' DPMSolverMultistepScheduler loop) for 1000 images and for one;
   ``unstir.train`` against a plain training loop (add_noise, MSE, AdamW) at batch 32 and 256; bf16 autocast
   against fp32 on DDPM's CIFAR-10 U-Net size (widths 128,256,256,256, about 35M parameters, batch 128);
   sampling and training at 64x64.

With ``--quick`` the sizes shrink until the whole check takes about a minute on a CPU: a test of the code paths,
not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import unstir
from unstir import data, nets, oracle
from unstir._checks import check_device
from unstir.cli import main as cli
from unstir.samplers import SAMPLERS


def train_runs(root: Path, device: str, quick: bool) -> dict:
    """The runs the verbs use, trained on ``device``: name -> folder."""
    steps = 20 if quick else 400
    runs = {k: root / k for k in ("moons", "ve", "cond", "clf", "images")}
    commands = [
        ["train", "--steps", str(steps), "--batch-size", "64", "--out", str(runs["moons"])],
        ["train", "--process", "ve", "--steps", str(steps), "--batch-size", "64", "--out", str(runs["ve"])],
        ["train", "--class-conditional", "--steps", str(steps), "--batch-size", "64", "--out", str(runs["cond"])],
        ["train-classifier", "--data", "moons", "--steps", str(steps), "--batch-size", "64", "--out", str(runs["clf"])],
        ["train", "--data", "shapes32", "--mode", "RGB", "--steps", "3" if quick else "200", "--batch-size", "8" if quick else "32",
         "--widths", "8,8" if quick else "32,64,64", "--out", str(runs["images"])],
    ]
    for argv in commands:
        rc, _, err = run_cli(argv + ([] if argv[0] == "train-classifier" else ["--quiet"]), device)
        if rc != 0:
            raise SystemExit(f"training for the check failed on {device}: {' '.join(argv)}\n{err}")
    return runs


def verbs(runs: dict, quick: bool = True) -> dict:
    """name -> (argv without --device and --out, what it writes: '.npy', '' a sample folder, 'classifier', 'html'
    (a report), 'oracle' (a folder of figures), or None: its printed lines). Every verb, every sampler, every inpainting method."""
    moons, ve, cond, clf, images = (str(runs[k]) for k in ("moons", "ve", "cond", "clf", "images"))
    n = "12" if quick else "200"
    table = {f"sample {s}": (["sample", "--run", moons if SAMPLERS[s].needs is None else ve, "-n", n, "--sampler", s,
                              "--steps", "4" if quick else "20"], ".npy") for s in SAMPLERS if s != "ode_rk45"}
    table.update({
        "sample ode_rk45": (["sample", "--run", moons, "-n", n, "--sampler", "ode_rk45"], ".npy"),
        "sample --nfe (pilot grid, teleported)": (["sample", "--run", moons, "-n", n, "--nfe", "5"], ".npy"),
        "sample --afs": (["sample", "--run", moons, "-n", n, "--steps", "5", "--afs"], ".npy"),
        "sample cfg": (["sample", "--run", cond, "-n", n, "--steps", "4", "--class", "1", "--guidance", "2"], ".npy"),
        "sample classifier": (["sample", "--run", moons, "-n", n, "--steps", "4", "--classifier", clf, "--class", "1",
                               "--guidance", "1"], ".npy"),
        "sample images": (["sample", "--run", images, "-n", "3" if quick else "64", "--steps", "3" if quick else "20"],
                          ""),
        "likelihood": (["likelihood", "--run", moons, "-n", "8" if quick else "100"], None),
        "likelihood images": (["likelihood", "--run", images, "-n", "2" if quick else "16", "--accuracy", "0.5"], None),
        "likelihood hutchinson": (["likelihood", "--run", images, "-n", "2", "--accuracy", "0.5", "--divergence",
                                   "hutchinson", "--probes", "2"], None),
        "encode": (["encode", "--run", moons, "-n", "6"], ".npy"),
        "encode ddim": (["encode", "--run", moons, "-n", "6", "--sampler", "ddim", "--steps", "6"], ".npy"),
        "encode images": (["encode", "--run", images, "-n", "2"], ".npy"),
        "interpolate": (["interpolate", "--run", moons, "--pair", "0", "3", "--frames", "4"], ".npy"),
        "tune-grid": (["tune-grid", "--run", moons, "--sampler", "dpm++2m", "--nfe", "4", "-n", "8", "--max-evals", "4",
                       "--force"], None),
        "train-classifier": (["train-classifier", "--data", "moons", "--steps", "3", "--batch-size", "16", "--force"],
                             "classifier"),
        "report": (["report", "--run", moons, "-n", "50", "--quiet"], "html"),
        "distill": (["distill", "--run", moons, "--nfe", "2", "--teacher-steps", "8", "--steps", "4" if quick else "40",
                     "--batch-size", "64", "--quiet"], "run"),
        "oracle": (["oracle", "-n", "100", "--steps", "4", "--paths", "2", "--quiet"], "oracle"),
    })
    for method in ("replacement", "repaint", "dps", "pigdm", "smc"):
        table[f"inpaint {method}"] = (["inpaint", "--run", moons, "--known", "0", "--values", "0.4", "--method",
                                       method, "-n", "4", "--steps", "5"], ".npy")
    return table


def run_cli(argv, device, debug: bool = False):
    """(exit status, stdout, stderr) of one verb on ``device``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli((["--debug"] if debug else []) + argv + ["--device", device])
    return rc, out.getvalue(), err.getvalue()


def output_path(work: Path, label: str, kind) -> Path | None:
    """Where a verb's output goes: ``label`` names the run (the device's, or the CPU's reference)."""
    if kind is None:
        return None
    return work / f"{label}{ {'.npy': '.npy', 'html': '.html'}.get(kind, '')}"


def read_output(path: Path, kind):
    """The numbers a verb wrote, as a flat float64 array (None for a page or printed lines)."""
    if kind == ".npy":
        return np.load(path).astype(np.float64).ravel()
    if kind == "":
        return np.load(path / "samples.npz")["x"].astype(np.float64).ravel()
    if kind in ("classifier", "run"):
        from safetensors.numpy import load_file

        name = "classifier.safetensors" if kind == "classifier" else next(path.glob("checkpoint-*.safetensors")).name
        return np.concatenate([v.astype(np.float64).ravel() for k, v in sorted(load_file(path / name).items())
                               if not k.startswith("optim.")])
    return None


def numbers_in(text: str) -> np.ndarray:
    """The decimal numbers of a verb's printed lines, timings left out."""
    import re

    text = re.sub(r"[0-9.]+ s\b", "", text)
    return np.array([float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)])


def check_verbs(device: str, work: Path, quick: bool, debug: bool = False) -> tuple[list[str], list[str]]:
    """Every verb on ``device`` and on the CPU: table lines, and the names of the verbs that failed."""
    runs = train_runs(work / "runs", device, quick)
    lines = [f"verbs on {device} against the CPU (each verb's output on both; difference = largest |device - cpu|):",
             f"  {'verb':40s} {'exit':>4s} {'difference':>11s}"]
    failed = []
    for name, (argv, kind) in verbs(runs, quick).items():
        got = {}
        for where, label in ((device, "device"), ("cpu", "reference")):
            out = output_path(work / "out" / name.replace(" ", "_"), label, kind)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
            extra = [] if out is None else ["--out", str(out)]
            rc, text, err = run_cli(argv + extra, where, debug)
            got[where] = (rc, read_output(out, kind) if rc == 0 and kind not in (None, "html", "oracle")
                          else numbers_in(text), err)
        rc = got[device][0]
        a, b = got[device][1], got["cpu"][1]
        if kind in ("html", "oracle"):  # a page, figures and timings: run, not compared
            diff = "-"
        elif a.shape != b.shape:
            diff = f"shapes {a.shape} {b.shape}"
        else:
            diff = f"{float(np.abs(a - b).max()) if a.size else 0.0:.2e}"
        lines.append(f"  {name:40s} {rc:4d} {diff:>11s}" + ("" if rc == 0 else "   " + got[device][2].strip()[-150:]))
        print(lines[-1], flush=True)
        if rc != 0:
            failed.append(name)
    return lines, failed


def check_oracle(device: str) -> list[str]:
    """The exact mixture model on the device against the CPU: samples, likelihoods, encodings."""
    process = unstir.make_process("vp")
    mixture = oracle.unequal_2d()
    x0 = mixture.sample(64, torch.Generator().manual_seed(1))
    rows = []
    results = {}
    for where in ("cpu", device):
        model = mixture.to(where).denoiser(process)
        g = lambda: torch.Generator().manual_seed(2)  # noqa: E731  (CPU generators: the same noise everywhere)
        with torch.no_grad():
            results[where] = {
                "samples dpm++2m (20 steps)": unstir.sample(model, None, (256, 2), sampler="dpm++2m", steps=20,
                                                            generator=g(), dtype=torch.float64).x,
                "samples ddpm (100 steps)": unstir.sample(model, None, (256, 2), sampler="ddpm", steps=100,
                                                          generator=g(), dtype=torch.float64).x,
                "log-likelihood (nats)": unstir.log_likelihood(model, x0.to(where), accuracy=1e-4).nats,
                "encodings (ode_rk45)": unstir.encode(model, x0.to(where), rtol=1e-6, atol=1e-6).z,
            }
    lines = [f"the oracle (exact Gaussian-mixture model, float64) on {device} against the CPU:"]
    for name, ref in results["cpu"].items():
        diff = (results[device][name].cpu() - ref).abs().max().item()
        lines.append(f"  {name:30s} largest difference {diff:.2e}")
    return lines


def _timed(fn, device, repeat: int = 3) -> float:
    """The best of ``repeat`` wall times of ``fn()`` (synchronised on a GPU)."""
    best = math.inf
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def sampling_speed(device, size: int, widths, n: int, quick: bool) -> str:
    """unstir dpm++2m against diffusers' DPMSolverMultistepScheduler loop, 20 NFE, the same network and noise."""
    from diffusers import DPMSolverMultistepScheduler

    torch.manual_seed(0)
    net = nets.UNet(3, size, widths).to(device).eval()
    model = unstir.Denoiser(net, unstir.make_process("ddpm"), discrete_labels=False, data_shape=(3, size, size))
    z = torch.randn(n, 3, size, size, device=device)
    steps = 3 if quick else 20

    def theirs():
        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps)
        x = z
        for t in sched.timesteps:
            x = sched.step(net(x, (torch.full((len(x),), float(t), device=device) + 1) / 1000), t, x).prev_sample
        return x

    def ours():
        return unstir.sample(model, None, z, sampler="dpm++2m", steps=steps).x

    with torch.no_grad():
        ours(), theirs()  # warm-up (kernels, allocator)
        t_ours, t_theirs = _timed(ours, device), _timed(theirs, device)
    return (f"  sampling {n} image(s) {size}x{size}, {steps} NFE, U-Net {','.join(map(str, widths))}: unstir "
            f"{t_ours:.3f} s, diffusers {t_theirs:.3f} s, ratio {t_ours / t_theirs:.2f}")


def training_speed(device, size: int, widths, batch: int, quick: bool, work: Path) -> str:
    """unstir.train's samples/s (the difference of two runs' wall times, so that set-up cancels) against a plain
    loop over the same network: DDPMScheduler.add_noise, MSE on eps, AdamW."""
    from diffusers import DDPMScheduler

    from unstir.training import TrainConfig, train

    k1, k2 = (2, 4) if quick else (20, 120)
    images = "shapes32" if size == 32 else "patches32"
    wall = {}
    for k in (k1, k2):
        folder = work / f"train-{size}-{batch}-{k}"
        shutil.rmtree(folder, ignore_errors=True)
        cfg = TrainConfig(data=images, mode="RGB", size=None if size == 32 else size, steps=k, batch_size=batch,
                          widths=tuple(widths), device=str(device), warmup=1, checkpoint_every=10**6,
                          n_data=256 if quick else 20000)
        t0 = time.perf_counter()
        train(cfg, folder, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall[k] = time.perf_counter() - t0
    ours = batch * (k2 - k1) / (wall[k2] - wall[k1]) if wall[k2] > wall[k1] else math.nan  # nan: lost in noise

    torch.manual_seed(0)
    net = nets.UNet(3, size, widths).to(device)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    sched = DDPMScheduler(num_train_timesteps=1000)
    x_all = data.load(images, n=max(batch, 256), size=None if size == 32 else size, mode="RGB").x.to(device)

    def step():
        x0 = x_all[torch.randint(len(x_all), (batch,), device=device)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        loss = torch.nn.functional.mse_loss(net(sched.add_noise(x0, noise, t), (t.float() + 1) / 1000), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    plain = batch * (k2 - k1) / _timed(lambda: [step() for _ in range(k2 - k1)], device, repeat=2)
    return (f"  training {size}x{size}, batch {batch}: unstir.train {ours:9.1f} samples/s, plain loop {plain:9.1f}, "
            f"ratio {ours / plain:.2f}")


def bf16_speed(device, quick: bool) -> str:
    """A bare training step (forward, backward, AdamW) in fp32 and under bf16 autocast on DDPM's CIFAR-10 U-Net
    size (widths 128,256,256,256, attention at 16x16), batch 128."""
    widths, batch, attention = ((8, 8), 2, ()) if quick else ((128, 256, 256, 256), 128, (16,))
    torch.manual_seed(0)
    net = nets.UNet(3, 32, widths, attention=attention).to(device)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x, t = torch.randn(batch, 3, 32, 32, device=device), torch.rand(batch, device=device)

    def step(bf16):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = (net(x, t).float() - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(False), step(True)
    fp32 = _timed(lambda: [step(False) for _ in range(3)], device)
    bf16 = _timed(lambda: [step(True) for _ in range(3)], device)
    params = sum(p.numel() for p in net.parameters())
    return (f"  bare step, U-Net {','.join(map(str, widths))} ({params / 1e6:.1f}M parameters), batch {batch}: fp32 "
            f"{fp32 / 3 * 1e3:.1f} ms, bf16 autocast {bf16 / 3 * 1e3:.1f} ms, bf16 speed-up {fp32 / bf16:.2f}x")


def check_speed(device, quick: bool, work: Path) -> list[str]:
    import diffusers

    small = (8, 8) if quick else (32, 64, 64)
    lines = [f"speed on {device} against diffusers {diffusers.__version__} (best of 3; ratio = unstir / diffusers "
             f"for times, unstir / plain loop for rates):"]
    jobs = [lambda: sampling_speed(device, 32, small, 16 if quick else 1000, quick),
            lambda: sampling_speed(device, 32, small, 1, quick),
            lambda: sampling_speed(device, 64, small, 8 if quick else 256, quick),
            lambda: training_speed(device, 32, small, 8 if quick else 32, quick, work),
            lambda: training_speed(device, 32, small, 16 if quick else 256, quick, work),
            lambda: training_speed(device, 64, small, 8 if quick else 64, quick, work),
            lambda: bf16_speed(device, quick)]
    for job in jobs:
        try:
            lines.append(job())
        except Exception as err:  # one failed measurement is a line of the table, not the end of the check
            lines.append(f"  failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    ap.add_argument("--quick", action="store_true", help="toy sizes: a test of the code paths, not a measurement")
    ap.add_argument("--no-verbs", action="store_true", help="leave out part 1 (tests/test_devices.py runs it on a "
                    "pretend device)")
    ap.add_argument("--no-speed", action="store_true", help="leave out part 3")
    ap.add_argument("--work", help="folder for the runs (default: a temporary folder, removed at the end)")
    ap.add_argument("--out", help="also write the report to this markdown file")
    ap.add_argument("--debug", action="store_true", help="a verb that fails shows its traceback")
    args = ap.parse_args(argv)
    device = check_device(args.device)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="unstir-gpu-check-"))
    tic = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    header = [f"unstir GPU check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}), "
              f"{'--quick' if args.quick else 'full sizes'}"]
    print(header[0], flush=True)
    try:
        verb_lines, failed = ([], []) if args.no_verbs else check_verbs(str(device), work, args.quick, args.debug)
        lines = header + verb_lines + check_oracle(str(device))
        print("\n".join(lines[-5:]), flush=True)
        if not args.no_speed:
            lines += check_speed(device, args.quick, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines.append(f"{len(failed)} verb(s) failed{': ' + ', '.join(failed) if failed else ''}; "
                 f"the check took {time.perf_counter() - tic:.0f} s")
    print(lines[-1])
    if args.out:
        command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).write_text(f"# GPU check\n\n`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
