"""End-to-end runs of the command line on tiny settings."""

import json
import subprocess
import sys

import pytest

from unstir.cli import main


def test_oracle_demo_writes_figures_and_summary(tmp_path, capsys):
    assert main(["oracle", "--out", str(tmp_path), "-n", "300", "--steps", "8", "--paths", "2"]) == 0
    text = capsys.readouterr().out
    for name in ("ddpm", "ddim", "euler_maruyama", "pc", "dpm++2m", "unipc"):
        assert f"\n{name} " in text
    assert "sliced-W2 two-sample floor" in text
    for fig in ("marginals.png", "samples.png", "trajectories.png"):
        assert (tmp_path / fig).stat().st_size > 10_000


def test_list_and_help():
    out = subprocess.run([sys.executable, "-m", "unstir.cli", "list"], capture_output=True, text=True, check=True).stdout
    assert "dpm++3m" in out and "ddpm" in out and "log_snr" in out
    # every name `train` and `inpaint` take is listed too
    for line in ("data:        moons, swiss_roll", "predictions: eps, x0, v, score, velocity",
                 "weightings:  auto, simple, sigma2, likelihood, velocity, min-snr", "networks:    mlp, unet",
                 "inpaint methods: replacement, repaint, dps, pigdm, smc"):
        assert line in out, line
    help_text = subprocess.run([sys.executable, "-m", "unstir.cli", "demo", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--process" in help_text and "--train-steps" in help_text


def test_main_demo_trains_samples_and_reports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--train-steps", "30", "-n", "200", "--paths", "2"]) == 0
    text = capsys.readouterr().out
    for name in ("ddpm", "ddim", "euler_maruyama", "pc", "dpm++2m"):
        assert f"\n{name} " in text
    assert "held-out" in text and (tmp_path / "run" / "checkpoint.json").exists()
    for fig in ("samples.png", "trajectories.png"):
        assert (tmp_path / fig).stat().st_size > 10_000


def test_image_demo_trains_scores_and_keeps_its_classifier(tmp_path, capsys):
    args = ["demo", "--images", "--out", str(tmp_path), "--train-steps", "2", "--classifier-steps", "2", "-n", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "training on 'shapes32'" in text and "held-out real (floor)" in text and "dpm++2m (20 NFE)" in text
    assert "(rf, velocity prediction, logit-normal times," in text  # flow matching by default on images
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["time_sampling"] == "logit-normal"
    assert (tmp_path / "samples.png").exists() and (tmp_path / "factor-classifier-2.safetensors").exists()
    mtime = (tmp_path / "factor-classifier-2.safetensors").stat().st_mtime
    assert main(args + ["--force"]) == 0  # the run is replaced, the classifier reused
    assert (tmp_path / "factor-classifier-2.safetensors").stat().st_mtime == mtime
    assert main(args + ["--force", "--classifier-steps", "0"]) == 2
    assert "--classifier-steps must be a positive integer, got 0" in capsys.readouterr().err
    assert main(args + ["--force", "--data", "ring"]) == 2
    assert "--images trains on shapes32; --data ring names a 2-D set" in capsys.readouterr().err


def test_likelihood_encode_decode_interpolate_commands(tmp_path, capsys):
    """The PF-ODE uses from the command line on a small trained run: bits/dim of held-out data, latents
    to .npy and back (decoded close to the encoded data), and an interpolation figure."""
    import numpy as np

    run = tmp_path / "run"
    assert main(["train", "--steps", "200", "--out", str(run), "--quiet"]) == 0
    assert main(["likelihood", "--run", str(run), "-n", "50", "--rtol", "1e-3", "--atol", "1e-3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "50 samples (continuous), d = 2, exact divergence" in text and "bits/dim:" in text
    z = tmp_path / "z.npy"
    assert main(["encode", "--run", str(run), "-n", "20", "--out", str(z)]) == 0
    assert np.load(z).shape == (20, 2)
    assert main(["decode", "--run", str(run), "--latents", str(z), "--out", str(tmp_path / "x.npy")]) == 0
    held = np.load(tmp_path / "z.input.npy")  # encode saves what it encoded
    assert np.abs(np.load(tmp_path / "x.npy") - held).max() < 1e-3
    # The held-out data are a fixed sequence: the first 5 points are the same for -n 5 and -n 20.
    assert main(["encode", "--run", str(run), "-n", "5", "--out", str(tmp_path / "z5.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "z5.input.npy"), held[:5])
    assert main(["encode", "--run", str(run), "-n", "5", "--out", str(tmp_path / "z5.png")]) == 0
    assert main(["interpolate", "--run", str(run), "--pair", "0", "3", "--frames", "5",
                 "--out", str(tmp_path / "frames.npy")]) == 0
    assert np.load(tmp_path / "frames.npy").shape == (5, 2)
    assert main(["decode", "--run", str(run), "--latents", str(z), "--out", str(tmp_path / "x.png")]) == 0
    assert main(["interpolate", "--run", str(run), "--pair", "0", "3", "--frames", "5",
                 "--out", str(tmp_path / "path.png")]) == 0
    assert (tmp_path / "path.png").stat().st_size > 10_000


def test_conditional_sampling_classifier_and_inpainting_commands(tmp_path, capsys):
    """Class-conditional training with label dropout, classifier-free and classifier guidance from the
    command line, and every inverse-problem method on images and on vectors."""
    import numpy as np
    from PIL import Image

    from unstir.data import from_unit_range, load

    run, clf = tmp_path / "d", tmp_path / "c"
    assert main(["train", "--data", "digits", "--class-conditional", "--steps", "6", "--batch-size", "16",
                 "--out", str(run), "--quiet"]) == 0
    assert main(["sample", "--run", str(run), "--class", "3", "--guidance", "2.0", "-n", "4", "--steps", "3",
                 "--out", str(tmp_path / "threes.png")]) == 0
    assert main(["train-classifier", "--data", "digits", "--steps", "5", "--batch-size", "16", "--out", str(clf),
                 "--quiet"]) == 0
    assert main(["sample", "--run", str(run), "--classifier", str(clf), "--class", "3", "-n", "4", "--steps", "3",
                 "--out", str(tmp_path / "t.npy")]) == 0
    assert np.load(tmp_path / "t.npy").shape == (4, 1, 8, 8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(from_unit_range(load("digits-test").x[0, 0]).numpy()).save(tmp_path / "digit.png")
    for method in ("replacement", "repaint", "dps", "pigdm"):
        assert main(["inpaint", "--run", str(run), "--image", str(tmp_path / "digit.png"), "--mask",
                     str(tmp_path / "mask.png"), "--method", method, "--steps", "3", "-n", "2",
                     "--out", str(tmp_path / f"{method}.npy")]) == 0
        assert np.isfinite(np.load(tmp_path / f"{method}.npy")).all()
    assert main(["inpaint", "--run", str(run), "--image", str(tmp_path / "digit.png"), "--task", "superres",
                 "--method", "pigdm", "--steps", "3", "--out", str(tmp_path / "sr.png")]) == 0
    capsys.readouterr()
    assert main(["inpaint", "--run", str(run), "--image", str(tmp_path / "digit.png"), "--mask",
                 str(tmp_path / "digit.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "must be black (0, unknown) and white (255, known) only" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--class", "10", "-n", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "class labels must lie in [0, 9]" in capsys.readouterr().err
    vec = tmp_path / "v"
    assert main(["train", "--steps", "20", "--out", str(vec), "--quiet"]) == 0
    assert main(["sample", "--run", str(vec), "--guidance", "2", "--class", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs a model with a class input" in capsys.readouterr().err
    assert main(["inpaint", "--run", str(vec), "--known", "0", "--values", "0.5", "--method", "replacement",
                 "--steps", "5", "-n", "50", "--out", str(tmp_path / "v.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "v.npy")[:, 0], 0.5, atol=1e-6)
    # twisted SMC from the command line: the known coordinate pasted, every particle's evaluations counted
    assert main(["inpaint", "--run", str(vec), "--known", "0", "--values", "0.5", "--method", "smc", "--particles", "4",
                 "--steps", "5", "-n", "6", "--out", str(tmp_path / "smc.npy")]) == 0
    assert "with smc (20 model evaluations)" in capsys.readouterr().out
    smc = np.load(tmp_path / "smc.npy")
    assert smc.shape == (6, 2) and np.allclose(smc[:, 0], 0.5, atol=1e-6)
    # a vector PNG shows the data and the conditioned samples; an absurd strength is named in a warning
    assert main(["inpaint", "--run", str(vec), "--known", "0", "--values", "0.5", "--method", "dps", "--dps-step", "1e9",
                 "--steps", "5", "-n", "6", "--out", str(tmp_path / "dps.png")]) == 0
    assert "--dps-step 1e+09 is likely too strong" in capsys.readouterr().err
    assert Image.open(tmp_path / "dps.png").size[0] > 300


def test_shared_options_have_one_name_and_one_default():
    """Walk every verb's options: a shared idea has one spelling, one destination and one default everywhere
    (train, whose options default to 'not given' so --resume can tell what changed, excepted for defaults), and
    no verb spells it another way."""
    import argparse

    from unstir.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0]
    shared = {"-n": ("n", None), "--seed": ("seed", 0), "--device": ("device", "cpu"), "--class": ("label", None),
              "--guidance": ("guidance", None), "--force": ("force", False), "--quiet": ("quiet", False),
              "--out": ("out", None), "--run": ("run", None), "--steps": ("steps", None)}
    aliases = {"--samples", "--scale", "--num", "--num-samples", "--label", "--labels", "--overwrite", "--gpu",
               "--count", "--strength", "--cfg", "--output", "--nsamples", "--silent"}
    seen = {}
    for verb, parser in sub.choices.items():
        for action in parser._actions:
            for option in action.option_strings:
                assert option not in aliases, (verb, option)
                if option in shared:
                    dest, default = shared[option]
                    assert action.dest == dest, (verb, option, action.dest)
                    if option in ("--seed", "--device", "--force", "--quiet") and action.default is not argparse.SUPPRESS:
                        assert action.default == default, (verb, option, action.default)
                    seen.setdefault(option, set()).add(verb)
    # every verb that writes a file can replace it; every verb that reads a run has --device
    for verb in ("sample", "encode", "decode", "interpolate", "inpaint", "report", "tune-grid", "train-classifier"):
        assert "--force" in sub.choices[verb].format_help(), verb
    for verb in ("sample", "likelihood", "encode", "decode", "interpolate", "inpaint", "tune-grid"):
        assert "--device" in sub.choices[verb].format_help(), verb
    for verb in ("likelihood", "encode", "decode", "interpolate", "inpaint", "sample"):
        assert "--class" in sub.choices[verb].format_help(), verb
    assert "(default:" in sub.choices["inpaint"]._option_string_actions["--dps-step"].help
    assert "--guidance" not in sub.choices["inpaint"]._option_string_actions  # one meaning per option name
    # every verb that works for a while takes --quiet and --device; every --seed and --nfe has one range
    for verb in ("demo", "oracle", "report", "interpolate", "inpaint", "sample", "likelihood", "encode", "decode",
                 "tune-grid", "train", "train-classifier"):
        assert {"--quiet", "--device"} <= set(sub.choices[verb]._option_string_actions), verb
    from unstir.cli.common import check_shared

    for verb, parser in sub.choices.items():
        for option, bad, good in (("--seed", "4096", "4095"), ("--seed", "-1", "0"), ("--nfe", "1", "2")):
            if option in parser._option_string_actions:
                dest = parser._option_string_actions[option].dest
                with pytest.raises(ValueError, match=f"{option} must be an integer"):
                    check_shared(argparse.Namespace(**{dest: int(bad)}))
                check_shared(argparse.Namespace(**{dest: int(good)}))
    assert "(default:" in sub.choices["sample"]._option_string_actions["--guidance"].help


def test_every_command_help_has_an_example_and_shared_option_names():
    from unstir.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0]
    for name, parser in sub.choices.items():
        assert "example:\n  unstir " + name in parser.format_help(), name
    for name in ("sample", "likelihood", "encode", "interpolate", "inpaint", "report"):
        assert "--run" in sub.choices[name].format_help() and "--seed" in sub.choices[name].format_help(), name


def test_first_try_needs_only_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "circles", "--steps", "20", "--quiet"]) == 0
    assert (tmp_path / "runs" / "circles" / "checkpoint.json").exists()
    assert main(["sample", "--run", "runs/circles", "-n", "50", "--steps", "3"]) == 0
    assert (tmp_path / "samples.png").exists()
