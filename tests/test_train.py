"""Training: exact resume, several processes, checkpoints, data errors and the CLI end to end."""

import json
import math
import os
import shutil
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import unstir
from unstir import data
from unstir.runs import load_run, load_tensors
from unstir.training import TrainConfig, train

SMALL = dict(data="moons", steps=40, batch_size=64, checkpoint_every=10, log_every=10, n_data=2000)


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    straight = train(TrainConfig(**SMALL), tmp_path / "a", progress=False)
    interrupted = train(TrainConfig(**SMALL), tmp_path / "b", progress=False, stop_after=25)
    assert interrupted.step == 25
    # The crash lost steps 21-25: resume continues from the step-20 checkpoint.
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 20
    resumed = train(TrainConfig(**SMALL), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 40
    for module in ("net", "ema"):
        a, b = getattr(straight, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), module
    files_a = load_file(str(tmp_path / "a" / "checkpoint-40.safetensors"))
    files_b = load_file(str(tmp_path / "b" / "checkpoint-40.safetensors"))
    assert files_a.keys() == files_b.keys() and all(torch.equal(files_a[k], files_b[k]) for k in files_a)
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-40.safetensors"]
    assert not list((tmp_path / "b").glob(".*tmp*")), "no temporary files left behind"


def test_refuses_to_overwrite_a_run_and_to_load_pickles(tmp_path):
    train(TrainConfig(**{**SMALL, "steps": 10}), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        train(TrainConfig(**{**SMALL, "steps": 10}), tmp_path / "run", progress=False)
    evil = tmp_path / "weights.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="never pickles"):
        load_tensors(evil)
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="only .safetensors files are read"):
        load_tensors(tmp_path / "model.pt")


def test_two_processes_match_each_other_and_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): the ranks end with identical weights, equal within float
    tolerance to a 1-process run with the same global batch."""
    dump = tmp_path / "dump"
    dump.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [str(torchrun), "--nproc_per_node=2", "--master_port=29517", str(Path(__file__).with_name("ddp_worker.py")),
           str(tmp_path / "ddp"), str(dump)]
    # One retry: a fresh-clone suite failed here once in five runs (session 15) with the workers' output lost;
    # it passed alone every time. A second failure fails the test and shows what the workers printed.
    for attempt in (1, 2):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if p.returncode == 0:
            break
        first = p.stderr[-3000:]
        shutil.rmtree(tmp_path / "ddp", ignore_errors=True)
    assert p.returncode == 0, f"torchrun failed twice; the first time it printed:\n{first}\nthe second:\n{p.stderr[-3000:]}"
    if attempt == 2:
        print(f"torchrun failed once and passed on the retry; the failure printed:\n{first}")
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    single = train(TrainConfig(data="moons", steps=30, batch_size=64, checkpoint_every=30, log_every=10, n_data=2000),
                   tmp_path / "single", progress=False)
    ref = single.net.state_dict()
    for k in ref:
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-4, atol=1e-5)


def test_cli_train_then_sample(tmp_path):
    from unstir.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "moons", "--steps", "20", "--batch-size", "32", "--out", str(run), "--quiet"]) == 0
    assert main(["sample", "--run", str(run), "--sampler", "dpm++2m", "--steps", "5", "-n", "50",
                 "--out", str(tmp_path / "s.npy")]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (50, 2) and np.isfinite(x).all()
    assert main(["sample", "--run", str(run), "-n", "50", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (run / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20 and "steps_per_s" in json.loads(lines[-1])
    model = load_run(run)
    assert model.data_shape == (2,) and model.process.name == "vp"


def test_image_training_and_class_conditional_unet(tmp_path):
    run = train(TrainConfig(data="digits", steps=3, batch_size=16, checkpoint_every=3, class_conditional=True,
                            prediction="v", process="ddpm", discrete=True), tmp_path / "d", progress=False)
    model = load_run(run.run)
    assert model.data_shape == (1, 8, 8) and model.discrete_labels and model.prediction == "v"
    out = unstir.sample(model, None, (4, 1, 8, 8), sampler="ddim", steps=3)
    assert out.x.shape == (4, 1, 8, 8)


def test_data_sets_and_scaling(tmp_path):
    for name in data.TOY_2D:
        x = data.toy_2d(name, 500)
        assert x.shape == (500, 2) and x.abs().max() < 6, name
    with pytest.raises(ValueError, match=r"n must be a positive integer, got 0"):
        data.toy_2d("moons", 0)
    with pytest.raises(ValueError, match=r"unknown 2-D data set 'moon'; choose one of"):
        data.toy_2d("moon", 10)


@pytest.mark.parametrize("name", ["moons", "circles"])
def test_toy_sets_are_independent_draws(name):
    """scikit-learn spaces moons/circles evenly in angle; the data sets must be i.i.d. draws instead.
    The count of points in a fixed half-plane over repeated sets is binomial: its spread must match
    sqrt(n p (1 - p)) (an evenly spaced set has spread near 0)."""
    n = 1000
    counts = torch.tensor([(data.toy_2d(name, n, seed=s)[:, 0] > 0.3).sum().item() for s in range(40)], dtype=torch.float64)
    p = counts.mean().item() / n
    sd_binomial = math.sqrt(n * p * (1 - p))
    # The sample sd of 40 draws is within 35% of the true one with probability > 0.99 (chi-square, 39 dof).
    assert 0.65 * sd_binomial < counts.std().item() < 1.35 * sd_binomial, (counts.std().item(), sd_binomial)
    d, held = data.digits(), data.load("digits-test")
    assert d.x.shape == (1500, 1, 8, 8) and d.x.min() == -1 and d.x.max() == 1 and d.num_classes == 10
    assert held.x.shape == (297, 1, 8, 8) and d.levels == held.levels == 17
    assert torch.equal(torch.cat([d.x, held.x]), data.digits("all").x)
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(data.from_unit_range(data.to_unit_range(u8)), u8)


def _png(path, size, mode="L"):
    from PIL import Image

    Image.fromarray(np.random.RandomState(0).randint(0, 255, size=(*size, 3) if mode == "RGB" else size,
                                                      dtype=np.uint8), mode).save(path)


def test_image_folder_and_npy(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", (12, 10))
    _png(folder / "b.png", (12, 10))
    d = data.image_folder(folder)
    assert d.x.shape == (2, 1, 12, 10)
    rgb = data.image_folder(folder, size=8, mode="RGB")
    assert rgb.x.shape == (2, 3, 8, 8)
    np.save(tmp_path / "v.npy", np.random.rand(5, 3))
    assert data.npy_array(tmp_path / "v.npy").x.shape == (5, 3)


def test_bad_data_gets_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"has no PNG or JPEG files"):
        data.image_folder(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image '.*x\.png'"):
        data.image_folder(broken)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _png(mixed / "a.png", (8, 8))
    _png(mixed / "b.png", (9, 9))
    with pytest.raises(ValueError, match=r"mixed sizes .* pass --size"):
        data.image_folder(mixed)
    a = np.zeros((4, 2))
    a[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(ValueError, match=r"NaN or inf \(first in row 2\)"):
        data.npy_array(tmp_path / "nan.npy")
    np.save(tmp_path / "flat.npy", np.zeros(7))
    with pytest.raises(ValueError, match=r"must have shape \(N, d\).*got \(7,\)"):
        data.npy_array(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match=r"unknown data 'mnist'"):
        data.load("mnist")
    with pytest.raises(ValueError, match=r"unknown weighting 'elbo'"):
        train(TrainConfig(**{**SMALL, "weighting": "elbo"}), tmp_path / "x", progress=False)


def test_bf16_autocast_trains_and_stays_finite(tmp_path):
    result = train(TrainConfig(**{**SMALL, "steps": 5, "bf16": True}), tmp_path / "bf16", progress=False)
    assert all(torch.isfinite(p).all() for p in result.net.parameters())
    assert all(p.dtype == torch.float32 for p in result.net.parameters()), "weights stay float32 under autocast"
