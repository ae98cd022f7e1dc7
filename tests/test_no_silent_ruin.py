"""Nothing silently ruined: each case here ended with exit status 0 and a ruined or misleading result
before it was fixed (issue "Nothing silently ruined"); each now fails loudly or does the right thing."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import unstir
from unstir import data
from unstir.cli import main
from unstir.figures import plot_limits
from unstir.training import TrainConfig, _lr


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_1_resume_refuses_changed_settings_and_records_a_longer_run(tmp_path, capsys):
    run = str(tmp_path / "r")
    assert main(["train", "--steps", "60", "--checkpoint-every", "30", "--out", run, "--quiet"]) == 0
    code = main(["train", "--steps", "90", "--out", run, "--resume", "--process", "ve", "--prediction", "x0",
                 "--data", "circles", "--lr", "0.1", "--quiet"])
    err = _error(capsys)
    assert code == 2
    for part in ("--data: run has 'moons', asked 'circles'", "--lr: run has 0.002, asked 0.1",
                 "--prediction: run has 'eps', asked 'x0'", "--process: run has 'vp', asked 've'"):
        assert part in err
    assert main(["train", "--out", run, "--resume", "--data", "digits", "--quiet"]) == 2
    assert "--data: run has 'moons', asked 'digits'" in _error(capsys)
    # Options not repeated are taken from the run; a longer run is recorded with the rule applied.
    assert main(["train", "--steps", "90", "--out", run, "--resume", "--quiet"]) == 0
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["config"]["steps"] == 90
    change = info["config"]["schedule_changes"][-1]
    assert change["at"] == 60 and change["previous_steps"] == 60 and change["rule"] == "warm restart"
    assert main(["train", "--steps", "50", "--out", run, "--resume", "--quiet"]) == 2
    assert "already at step 90" in _error(capsys)
    # A --steps below the warm-up is still named by the run's position, not by the warm-up it implies.
    assert main(["train", "--steps", "10", "--out", run, "--resume", "--quiet"]) == 2
    assert "the run is already at step 90; --steps 10 would end it before that" in _error(capsys)


def test_resume_auto_and_quiet_keeps_notices(tmp_path, capsys):
    """`--resume auto` starts a run where there is none and resumes it where there is (a requeued job runs one
    command); --quiet hides progress bars, not the resume notice."""
    run = str(tmp_path / "r")
    assert main(["train", "--steps", "20", "--out", run, "--resume", "auto", "--quiet"]) == 0
    assert main(["train", "--steps", "30", "--out", run, "--resume", "auto", "--quiet"]) == 0
    assert f"resuming {run!r} at step 20; length 20 -> 30 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["steps"] == 30
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--quiet"]) == 2
    assert "nothing to resume" in _error(capsys)


def test_train_classifier_reports_held_out_accuracy_and_takes_force(tmp_path, capsys):
    clf = str(tmp_path / "c")
    assert main(["train-classifier", "--data", "moons", "--steps", "150", "--out", clf, "--quiet", "--seed", "1",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy: t=0.001" in text
    accuracy = json.loads((tmp_path / "c" / "run.json").read_text())["accuracy"]
    assert accuracy["t=0.001"] > 0.8 and accuracy["t=0.001"] > accuracy["t=0.75"]  # moons, then noise (chance 0.5)
    assert main(["train-classifier", "--data", "moons", "--steps", "5", "--out", clf, "--quiet"]) == 2
    assert "already holds a classifier; pass --force" in _error(capsys)
    assert main(["train-classifier", "--data", "moons", "--steps", "5", "--out", clf, "--quiet", "--force"]) == 0
    run = str(tmp_path / "run")
    assert main(["train", "--steps", "5", "--out", run, "--quiet"]) == 0
    assert main(["train-classifier", "--data", "moons", "--steps", "5", "--out", run, "--quiet", "--force"]) == 2
    assert "holds a model run" in _error(capsys)


def test_1_stretching_an_unfinished_run_keeps_the_learning_rate_continuous(tmp_path):
    from unstir.training import train

    cfg = TrainConfig(steps=300, warmup=20, checkpoint_every=100)
    train(cfg, tmp_path / "r", progress=False, stop_after=150)  # interrupted: checkpoint at step 100
    longer = train(TrainConfig(steps=400, warmup=20, checkpoint_every=100), tmp_path / "r", resume=True,
                   progress=False)
    assert longer.step == 400
    recorded = TrainConfig(**json.loads((tmp_path / "r" / "run.json").read_text())["config"])
    assert recorded.schedule_changes[0]["rule"] == "stretch"
    before = _lr(TrainConfig(steps=300, warmup=20), 100)
    assert _lr(recorded, 100) == pytest.approx(before, rel=1e-12)  # no jump at the change
    assert _lr(recorded, 99) == pytest.approx(_lr(TrainConfig(steps=300, warmup=20), 99), rel=1e-12)
    assert _lr(recorded, 399) < 1e-3 * before and _lr(recorded, 250) < before


def test_2_demo_never_deletes_what_it_did_not_make(tmp_path, capsys):
    keep = tmp_path / "run"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--train-steps", "5", "-n", "50", "--paths", "1"]) == 2
    assert "already exists; pass --force" in _error(capsys)
    assert main(["demo", "--out", str(tmp_path), "--train-steps", "5", "-n", "50", "--paths", "1", "--force"]) == 2
    assert "is not a unstir run folder" in _error(capsys)
    assert (keep / "precious.txt").read_text() == "mine"


def test_3_non_finite_weights_and_wrong_output_shapes_stop_with_a_message(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--steps", "20", "--out", str(run), "--quiet"]) == 0
    weights = next(run.glob("checkpoint-*.safetensors"))
    tensors = load_file(str(weights))
    tensors = {k: torch.full_like(v, float("nan")) if k.startswith("ema.") and v.is_floating_point() else v
               for k, v in tensors.items()}
    save_file(tensors, str(weights))
    out = tmp_path / "s.npy"
    assert main(["sample", "--run", str(run), "--out", str(out), "-n", "10"]) == 2
    assert "NaN or inf at step 0" in _error(capsys) and not out.exists()
    p = unstir.make_process("vp")
    narrow = unstir.Denoiser(lambda x, t: x[:, :1], p, data_shape=(2,))
    with pytest.raises(ValueError, match=r"returned shape \(4, 1\) for input of shape \(4, 2\)"):
        unstir.sample(narrow, None, (4, 2))


def test_4_scatter_limits_come_from_the_data():
    t = torch.linspace(0, 4 * math.pi, 2000)
    spiral = torch.stack([8.5 + 8 * torch.cos(t) * t / t.max(), 8.5 + 8 * torch.sin(t) * t / t.max()], 1)
    (x0, x1), (y0, y1) = plot_limits({"data": spiral, "samples": spiral + 0.1})
    inside = ((spiral[:, 0] > x0) & (spiral[:, 0] < x1) & (spiral[:, 1] > y0) & (spiral[:, 1] < y1)).float().mean()
    assert inside > 0.99


def test_5_integer_images_are_scaled_or_refused(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(10, 8, 8)).astype(np.int64)
    np.save(tmp_path / "a.npy", images)
    ds = data.npy_array(tmp_path / "a.npy")
    assert ds.x.min() >= -1 and ds.x.max() <= 1 and ds.levels == 256
    torch.testing.assert_close(ds.x[:, 0], torch.as_tensor(images, dtype=torch.float32) / 127.5 - 1)
    np.save(tmp_path / "b.npy", images * 10)
    with pytest.raises(ValueError, match=r"integer images .* hold values in \[0, 2550\]"):
        data.npy_array(tmp_path / "b.npy")


def test_6_a_text_file_named_npy_gets_a_plain_message(tmp_path):
    (tmp_path / "x.npy").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="is not a NumPy .npy file") as info:
        data.npy_array(tmp_path / "x.npy")
    assert "pickle" not in str(info.value)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects, not numbers") as info:
        data.npy_array(tmp_path / "o.npy")
    assert "allow_pickle" not in str(info.value)


def test_7_oracle_validates_before_writing_and_accepts_random(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["oracle", "--out", str(out), "-n", "0"]) == 2
    assert "-n must be a positive integer, got 0" in _error(capsys)
    assert not out.exists()
    assert main(["oracle", "--out", str(out), "--data", "random", "-n", "100", "--steps", "4", "--paths", "1"]) == 0


def test_8_image_options_on_vector_data_and_long_warmups_are_refused(tmp_path):
    from unstir.training import train

    for kw, flag in (({"size": 16}, "--size"), ({"mode": "RGB"}, "--mode")):
        with pytest.raises(ValueError, match=f"{flag} only apply to image data"):
            train(TrainConfig(steps=5, **kw), tmp_path / flag, progress=False)
    with pytest.raises(ValueError, match="--class-conditional needs class labels; 'swiss_roll' has none"):
        train(TrainConfig(data="swiss_roll", steps=5, class_conditional=True), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"warmup \(50 steps\) must be shorter than the run \(steps = 40\)"):
        TrainConfig(steps=40, warmup=50).validate()
    assert TrainConfig(steps=40).warmup == 4 and TrainConfig(steps=4000).warmup == 200


def test_rk45_with_one_step_still_solves_the_ode():
    p, gm = unstir.make_process("vp"), unstir.oracle.unequal_2d()
    model = gm.denoiser(p)
    x_T = p.prior_sample((50, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    one = unstir.sample(model, None, x_T, sampler="ode_rk45", steps=1)
    many = unstir.sample(model, None, x_T, sampler="ode_rk45", steps=20)
    torch.testing.assert_close(one.x, many.x, rtol=1e-3, atol=1e-3)
