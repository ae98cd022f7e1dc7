"""Run folders from elsewhere: damaged or hostile files get a clear one-line error and nothing is written."""

import json
import shutil
import struct

import pytest
import torch

import unstir
from unstir.cli import main


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("untrusted") / "run"
    assert main(["train", "--steps", "10", "--out", str(run), "--quiet"]) == 0
    return run


def _copy(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run, next(run.glob("checkpoint-*.safetensors"))


def _assert_sample_fails(run, tmp_path, capsys, text):
    out = tmp_path / "x.npy"
    assert main(["sample", "--run", str(run), "-n", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_truncated_and_garbled_weights(good_run, tmp_path, capsys):
    run, weights = _copy(good_run, tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_sample_fails(run, tmp_path, capsys, "is damaged and cannot be read")
    weights.write_bytes(struct.pack("<Q", 2**60) + data[8:])  # a header that claims an enormous size
    _assert_sample_fails(run, tmp_path, capsys, "is damaged and cannot be read")
    weights.write_bytes(b"\x80\x04" + data[2:])  # a pickle's magic bytes
    _assert_sample_fails(run, tmp_path, capsys, "never pickles")


def test_hostile_or_broken_json(good_run, tmp_path, capsys):
    run, _ = _copy(good_run, tmp_path)
    info = json.loads((run / "run.json").read_text())
    for bad, text in [("{not json", "is damaged: not readable JSON"),
                      (json.dumps({**info, "exec": "rm -rf /"}), "has keys unstir does not know: ['exec']"),
                      (json.dumps({**info, "config": [1, 2]}), "'config' has the wrong type (list)"),
                      (json.dumps({**info, "format": 99}), "has format 99; this unstir reads format 1"),
                      (json.dumps({**info, "net": {**info["net"], "width": 64}}), "does not match the run's network"),
                      (json.dumps({**info, "net": {"kind": "transformer"}}), "describes an invalid network")]:
        (run / "run.json").write_text(bad)
        _assert_sample_fails(run, tmp_path, capsys, text)
    (run / "run.json").write_text(json.dumps(info))
    pointer = json.loads((run / "checkpoint.json").read_text())
    for weights in ("../../etc/passwd", "/tmp/x.safetensors", "checkpoint-1.pt"):
        (run / "checkpoint.json").write_text(json.dumps({**pointer, "weights": weights}))
        _assert_sample_fails(run, tmp_path, capsys, "is not a valid checkpoint pointer")


def test_devices_that_are_not_here(good_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match=r"device 'cuda'"):
        unstir.load_run(good_run, device="cuda")
    assert main(["sample", "--run", str(good_run), "--device", "cuda:0", "--out", "x.npy"]) == 2
    assert "device 'cuda:0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'"):
        unstir.load_run(good_run, device="gpu0")


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tmp_path):
    from unstir.training import TrainConfig, train

    import numpy as np

    bad = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    np.save(tmp_path / "d.npy", bad)
    cfg = dict(data=str(tmp_path / "d.npy"), steps=20, checkpoint_every=5, batch_size=16, lr=1e30)
    with pytest.raises(FloatingPointError, match=r"non-finite (loss|gradient|parameter).* at step \d+ of .* resumes from it"):
        train(TrainConfig(**cfg), tmp_path / "a", progress=False)
    # lr 1e30 ruins the parameters: every later step is skipped, and skipping stops once above its limit
    with pytest.raises(FloatingPointError, match=r"--nonfinite skip skipped (19|20) of the 20 steps run so far .*more "
                                                 r"than 5%.*resume"):
        train(TrainConfig(nonfinite="skip", **cfg), tmp_path / "b", progress=False)


def test_nonfinite_skip_skips_a_bad_batch_and_says_how_many(tmp_path, monkeypatch, capsys):
    """One batch in 40 with a NaN loss: --nonfinite skip drops it (no update), finishes, and says so on stderr
    and in log.jsonl."""
    from unstir import training
    from unstir.training import TrainConfig, train

    calls, loss = [0], training.dsm_loss

    def sometimes_nan(*args, **kwargs):
        calls[0] += 1
        value = loss(*args, **kwargs)
        return value * float("nan") if calls[0] == 7 else value

    monkeypatch.setattr(training, "dsm_loss", sometimes_nan)
    result = train(TrainConfig(data="moons", steps=40, batch_size=16, nonfinite="skip", log_every=40),
                   tmp_path / "r", progress=False)
    logged = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert result.step == 40 and logged[-1]["skipped_nonfinite"] == 1
    assert "skipped 1 of 40 steps whose loss or gradient was not finite" in capsys.readouterr().err


def test_outputs_are_never_clobbered_and_failed_writes_leave_nothing(good_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.npy"
    assert main(["sample", "--run", str(good_run), "-n", "4", "--steps", "2", "--out", str(out)]) == 0
    before = out.read_bytes()
    assert main(["sample", "--run", str(good_run), "-n", "4", "--steps", "2", "--seed", "1", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["sample", "--run", str(good_run), "-n", "4", "--steps", "2", "--seed", "1", "--out", str(out),
                 "--force"]) == 0
    assert out.read_bytes() != before

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("unstir.figures.scatter_panels", broken)
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(good_run), "-n", "4", "--steps", "2", "--out", str(png)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not png.exists() and not list(tmp_path.glob(".*tmp*"))


def _user_errors(run, tmp):
    """Bad invocations a new user makes, each with the words its one-line error must contain."""
    r, o = str(run), str(tmp / "o.png")
    return [
        (["train", "--data", "spirals", "--out", str(tmp / "a")], "unknown data 'spirals'"),
        (["train", "--steps", "0", "--out", str(tmp / "b")], "steps"),
        (["train", "--out", str(tmp / "nothing"), "--resume"], "nothing to resume"),
        (["train", "--data", "moons", "--warmup", "500", "--steps", "100", "--out", str(tmp / "c")], "warm"),
        (["sample", "--run", r, "-n", "0", "--out", o], "-n must be a positive integer, got 0"),
        (["sample", "--run", r, "--steps", "0", "--out", o], "steps must be an integer >= 1, got 0"),
        (["sample", "--run", str(tmp), "--out", o], "is not a run folder"),
        (["sample", "--run", r, "--sampler", "annealed_langevin", "--out", o], "needs a process of type ['VE']"),
        (["sample", "--run", r, "--out", str(tmp / "o.jpg")], "--out must end in .png or .npy"),
        (["sample", "--run", r, "--eta", "0.5", "--out", o], "--eta does not apply to sampler 'dpm++2m'"),
        (["sample", "--run", r, "--sampler", "ddim", "--eta", "2", "--out", o], "eta must be in [0, 1], got 2.0"),
        (["sample", "--run", r, "--class", "3", "--out", o], "class"),
        (["sample", "--run", r, "--device", "cuda", "--out", o], "device 'cuda'"),
        (["likelihood", "--run", r, "--rtol", "-1"], "rtol"),
        (["likelihood", "--run", r, "--divergence", "hutchinson", "--probes", "0"], "probes"),
        (["encode", "--run", r, "--data", "digits", "--out", str(tmp / "z.npy")], "per-sample shape"),
        (["decode", "--run", r, "--latents", str(tmp / "missing.npy"), "--out", o], "missing.npy"),
        (["interpolate", "--run", r, "--pair", "0", "3", "--frames", "1", "--out", o], "frames"),
        (["tune-grid", "--run", r, "--nfe", "2"], "--nfe must be an integer >= 3 for --method nelder-mead"),
        (["sample", "--run", r, "--nfe", "1", "--out", o], "--nfe must be an integer >= 2 (a grid with a point to place"),
        (["tune-grid", "--run", r, "--sampler", "ode_heun", "--nfe", "6"], "NFE is 2 m + 1; got --nfe=6"),
        (["report", "--run", str(tmp)], "is not a run folder"),
        (["oracle", "-n", "0", "--out", str(tmp / "or")], "-n"),
    ]


@pytest.fixture(scope="module")
def props(tmp_path_factory):
    """What the bad invocations point at: a digits classifier, 50 held-out rows, an empty latent file."""
    import numpy as np

    root = tmp_path_factory.mktemp("props")
    assert main(["train-classifier", "--data", "digits", "--steps", "2", "--batch-size", "8", "--out",
                 str(root / "clf"), "--quiet"]) == 0
    np.save(root / "held.npy", np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    np.save(root / "empty.npy", np.zeros((0, 2), np.float32))
    from PIL import Image

    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(root / "m.png")
    (root / "dir.npy").mkdir()
    return root


def _more_user_errors(run, tmp, props):
    """The bad invocations of issue 18 that used to end in a traceback or exit 0 with an option ignored."""
    r, o = str(run), str(tmp / "o.png")
    vec = ["inpaint", "--run", r, "--out", str(tmp / "i.npy")]
    return [
        (["sample", "--run", r, "--classifier", str(props / "clf"), "--class", "1", "--out", o],
         "the classifier was trained on data of shape (1, 8, 8), the run's data have shape (2,)"),
        (["interpolate", "--run", r, "--data", str(props / "held.npy"), "--pair", "0", "60", "--out", o],
         "the held-out data have 50 points"),
        (["decode", "--run", r, "--latents", str(props / "empty.npy"), "--out", o], "holds no latents"),
        (["interpolate", "--run", r, "--pair", "-1", "3", "--out", o], "--pair needs two different indices >= 0"),
        (["interpolate", "--run", r, "--pair", "2", "2", "--out", o], "--pair needs two different indices >= 0"),
        (vec + ["--known", "0", "0", "--values", "0.4", "0.5"], "--known lists an index twice"),
        (vec + ["--known", "0", "--values", "0.4", "--task", "superres"], "--task apply to image runs"),
        (vec + ["--known", "0", "--values", "0.4", "--mask", str(props / "m.png")], "--mask apply to image runs"),
        (vec + ["--known", "0", "--values", "0.4", "--method", "pigdm", "--dps-step", "3"],
         "--dps-step is DPS's step size; --method pigdm has none"),
        (vec + ["--known", "0", "--values", "0.4", "--method", "dps", "--dps-step", "-5"], "--dps-step must be >= 0"),
        (vec + ["--known", "0", "--values", "0.4", "--method", "repaint", "--particles", "4"],
         "--particles is for --method smc"),
        (["sample", "--run", r, "--guidance", "-1", "--class", "0", "--out", o], "--guidance must be >= 0"),
        (["likelihood", "--run", r, "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["encode", "--run", r, "--out", str(tmp / "nonexistent" / "e.npy")], "does not exist; create it first"),
        (["sample", "--run", str(props / "clf"), "--out", o], "is a classifier folder"),
        (["sample", "--run", r, "--out", str(props / "dir.npy"), "--force"], "is a folder"),
        (["sample", "--run", r, "--steps", "4", "--nfe", "5", "--out", o], "give --steps or --nfe, not both"),
        (["sample", "--run", r, "--nfe", "5", "--polish", "-1", "--out", o], "--polish must be an integer >= 0"),
        (["sample", "--run", r, "--steps", "5", "--polish", "30", "--out", o], "and none runs here"),
        (["tune-grid", "--run", r, "--polish", "30"], "--polish refines a --method pilot grid"),
    ]


def test_user_errors_are_one_line_and_write_nothing(good_run, props, tmp_path, capsys):
    """Each bad invocation: exit status 2, one line on stderr naming the problem, no traceback, and no
    output written (the count goes into docs/reliability.md)."""
    before = set(tmp_path.rglob("*"))
    cases = _user_errors(good_run, tmp_path) + _more_user_errors(good_run, tmp_path, props)
    for argv, text in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and text in err, (argv, err)
    assert set(tmp_path.rglob("*")) == before
    assert len(cases) == 43
