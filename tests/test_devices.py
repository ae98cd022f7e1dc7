"""Every verb and every use of the score on another device, without a GPU (tests/fake_device.py).

Each verb runs twice on the same CPU-trained runs, once with ``--device cpu`` and once with ``--device cuda`` on
the pretend device, and must exit 0 with the same numbers: unstir draws every random number on the CPU (one
generator per sample, EDM's stacked generator) and moves it to the model's device, so a CUDA run gives the CPU's
samples to float tolerance, and the pretend device, which computes on the CPU, gives them to the bit.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unstir.samplers import SAMPLERS

from .fake_device import other_device


def _gpu_check():
    """benchmarks/gpu_check.py, whose list of verbs this test shares (one list: the GPU check runs the same)."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent.parent / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = _gpu_check()


def _run(argv, device):
    context = other_device() if device == "cuda" else contextlib.nullcontext()
    with context:
        return CHECK.run_cli(argv, device, debug=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The GPU check's runs at --quick sizes, trained on the CPU."""
    return CHECK.train_runs(tmp_path_factory.mktemp("runs"), "cpu", quick=True)


VERBS = list(CHECK.verbs({k: Path(k) for k in ("moons", "ve", "cond", "clf", "images")}))


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_runs_on_another_device_with_the_cpus_numbers(verb, runs, tmp_path):
    argv, kind = CHECK.verbs(runs)[verb]
    got = {}
    for device in ("cpu", "cuda"):
        out = CHECK.output_path(tmp_path, device, kind)  # the labels differ, so the outputs do
        rc, text, err = _run(argv + ([] if out is None else ["--out", str(out)]), device)
        assert rc == 0, err
        got[device] = CHECK.read_output(out, kind) if kind not in (None, "html", "oracle") else CHECK.numbers_in(text)
    if kind == "classifier":
        np.testing.assert_array_equal(got["cuda"], got["cpu"])
    elif kind not in ("html", "oracle"):  # the oracle's table and the report's page hold timings
        np.testing.assert_allclose(got["cuda"], got["cpu"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["--class-conditional"], ["--process", "ddpm", "--discrete"],
                                   ["--data", "digits", "--widths", "8,8"]])
def test_training_on_another_device_gives_the_cpus_weights(extra, tmp_path):
    """The training noise is drawn on the CPU generator and moved, so the weights are the CPU's."""
    weights = {}
    for device in ("cpu", "cuda"):
        rc, _, text = _run(["train", "--steps", "4", "--batch-size", "16", "--out", str(tmp_path / device), "--quiet",
                         *extra], device)
        assert rc == 0, text
        weights[device] = load_file(next((tmp_path / device).glob("checkpoint-*.safetensors")))
    assert weights["cuda"].keys() == weights["cpu"].keys()
    for k, v in weights["cpu"].items():
        torch.testing.assert_close(weights["cuda"][k], v, rtol=0, atol=0, msg=k)


class _Net(torch.nn.Module):
    """A small eps network with a bounded output (no sampler diverges on it); ``nan_below`` makes its output NaN
    for t below that time."""

    def __init__(self, nan_below: float = -1.0):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)
        self.nan_below = nan_below

    def forward(self, x, t):
        out = torch.tanh(self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1)))
        return torch.where(t[:, None] < self.nan_below, torch.full_like(out, float("nan")), out)


FIXED_GRID = [s for s in SAMPLERS if s != "ode_rk45"]


@pytest.mark.parametrize("sampler", FIXED_GRID)
def test_the_sampler_loop_does_not_wait_on_the_device(sampler):
    """A host read (``.item()``, ``.tolist()``, ``.cpu()``) of a device tensor stalls a GPU's queue: the fixed-grid
    samplers read the device at most once per 25 steps (the deferred finite check), plus a constant."""
    import unstir

    process = unstir.make_process("ve" if SAMPLERS[sampler].needs is not None else "vp")
    with other_device() as device:
        model = unstir.Denoiser(_Net().to(device), process, data_shape=(2,))
        from tests.fake_device import OnDevice

        OnDevice.reads = 0
        with torch.no_grad():
            r = unstir.sample(model, None, (8, 2), sampler=sampler, steps=50, generator=torch.Generator().manual_seed(0))
        reads = OnDevice.reads
    assert r.x.device == device and torch.isfinite(r.x).all()
    assert reads <= 50 // 25 + 2, f"{sampler}: {reads} host reads in 50 steps"


def test_a_non_finite_state_on_the_device_is_named_by_its_step():
    """The deferred check still names the first step whose state was not finite, as on the CPU."""
    import unstir

    process = unstir.make_process("vp")
    messages = {}
    for device in ("cpu", "cuda"):
        context = other_device() if device == "cuda" else contextlib.nullcontext()
        with context:
            model = unstir.Denoiser(_Net(nan_below=0.5).to(device), process, data_shape=(2,))
            with pytest.raises(FloatingPointError) as info:
                unstir.sample(model, None, (4, 2), sampler="ddim", steps=40, grid="uniform", device=device,
                              generator=torch.Generator().manual_seed(0))
            messages[device] = str(info.value)
    assert messages["cuda"] == messages["cpu"]
    assert "in 4 of 4 samples" in messages["cpu"] and "at step 20 (t = 0.48" in messages["cpu"]  # the first step that starts below t = 0.5


def test_the_gpu_check_runs_quick_on_the_cpu(capsys):
    """`benchmarks/gpu_check.py --device cpu --quick` (parts 2 and 3; part 1, the verbs, is the parametrised test
    above on the pretend device): every line present, the oracle's numbers the CPU's own, no measurement failed."""
    assert CHECK.main(["--device", "cpu", "--quick", "--no-verbs"]) == 0
    text = capsys.readouterr().out
    for line in ("samples dpm++2m (20 steps)     largest difference 0.00e+00", "log-likelihood (nats)",
                 "encodings (ode_rk45)", "sampling 16 image(s) 32x32", "sampling 1 image(s) 32x32",
                 "sampling 8 image(s) 64x64", "training 32x32, batch 8", "training 64x64", "bf16 speed-up"):
        assert line in text, line
    assert "failed:" not in text


def test_a_missing_device_is_one_line_that_says_what_to_pass(runs, monkeypatch, capsys):
    from unstir.cli import main

    moons = str(runs["moons"])
    monkeypatch.setattr("torch.version.cuda", None)
    assert main(["sample", "--run", moons, "-n", "4", "--device", "cuda", "--out", "x.npy"]) == 2
    err = capsys.readouterr().err
    assert "this torch build has no CUDA support (a CPU build); use --device cpu" in err and err.count("\n") == 1
    monkeypatch.setattr("torch.version.cuda", "12.0")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert main(["likelihood", "--run", moons, "-n", "4", "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda:7': this machine has 1 CUDA device(s); use cuda (cuda:0) or cpu" in err
    assert err.count("\n") == 1
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["train", "--steps", "2", "--device", "cuda", "--out", "never"]) == 2
    assert "no CUDA device that torch can see" in capsys.readouterr().err


def test_a_run_trained_on_the_device_samples_and_resumes_on_the_cpu(tmp_path, capsys):
    """Its checkpoint loads on the CPU; its recorded device is named in one line when it is missing, and
    --device cpu resumes it."""
    from unstir.cli import main

    run = tmp_path / "run"
    rc, _, err = _run(["train", "--steps", "4", "--batch-size", "16", "--checkpoint-every", "2", "--out", str(run),
                       "--quiet"], "cuda")
    assert rc == 0, err
    assert main(["sample", "--run", str(run), "-n", "4", "--steps", "3", "--out", str(tmp_path / "x.npy")]) == 0
    assert np.isfinite(np.load(tmp_path / "x.npy")).all()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda'" in err and "use --device cpu" in err and err.count("\n") == 1
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--device", "cpu", "--quiet"]) == 0


def test_a_non_finite_training_step_on_the_device_stops_as_on_the_cpu(tmp_path):
    """On a GPU the finite checks are read back together (training.SETTLE_EVERY), yet the run stops naming the
    same step as on the CPU, with no checkpoint written after it, and --nonfinite skip still skips per step."""
    from unstir.training import TrainConfig, train

    bad = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    np.save(tmp_path / "d.npy", bad)
    cfg = dict(data=str(tmp_path / "d.npy"), steps=40, checkpoint_every=5, batch_size=16, lr=1e30)
    messages, saved = {}, {}
    for device in ("cpu", "cuda"):
        context = other_device() if device == "cuda" else contextlib.nullcontext()
        with context, pytest.raises(FloatingPointError) as info:
            train(TrainConfig(device=device, **cfg), tmp_path / device, progress=False)
        messages[device] = str(info.value).replace(str(tmp_path / device), "RUN")
        saved[device] = sorted(p.name for p in (tmp_path / device).glob("checkpoint-*.safetensors"))
    assert messages["cuda"] == messages["cpu"] and saved["cuda"] == saved["cpu"]
    for device in ("cpu", "cuda"):  # every step after the first bad one is skipped, until skipping gives up
        context = other_device() if device == "cuda" else contextlib.nullcontext()
        with context, pytest.raises(FloatingPointError, match="--nonfinite skip skipped") as info:
            train(TrainConfig(device=device, nonfinite="skip", **cfg), tmp_path / f"skip-{device}", progress=False)
        messages[device] = str(info.value).replace(str(tmp_path / f"skip-{device}"), "RUN")
    assert messages["cuda"] == messages["cpu"]


def test_a_distillation_killed_on_the_device_resumes_there_to_the_cpus_weights(tmp_path):
    """A distillation on the device, stopped inside its first round and resumed there (its checkpoint's weights,
    optimizer and round teacher copied back onto the device), ends with the weights an uninterrupted CPU
    distillation gets, to the bit."""
    from unstir.distill import distill
    from unstir.training import TrainConfig, train

    train(TrainConfig(data="moons", steps=30, width=16, depth=1, n_data=500, checkpoint_every=30), tmp_path / "t",
          progress=False)
    kw = dict(nfe=2, teacher_steps=8, steps=12, checkpoint_every=4, progress=False)
    distill(tmp_path / "t", tmp_path / "cpu", device="cpu", **kw)
    with other_device():
        distill(tmp_path / "t", tmp_path / "dev", device="cuda", stop_after=6, **kw)
        distill(None, tmp_path / "dev", resume=True, progress=False)
    a, b = (load_file(tmp_path / d / "checkpoint-12.safetensors") for d in ("cpu", "dev"))
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
