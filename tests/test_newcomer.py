"""What a newcomer met (accepted-and-ignored options, outputs replaced without --force): each case failed, or
passed silently, before its fix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unstir.cli import main

from .test_run_folder import _one_line


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    run = tmp_path_factory.mktemp("newcomer") / "moons"
    assert main(["train", "--steps", "30", "--batch-size", "64", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    run = tmp_path_factory.mktemp("newcomer") / "digits"
    assert main(["train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--widths", "8,8", "--out",
                 str(run), "--quiet"]) == 0
    return run


def test_repeated_known_and_values_all_count(moons, tmp_path):
    """`--known 0 --known 1 --values 0.4 --values 0.5` used only the last pair; now both, as listing them does."""
    out = tmp_path / "y.npy"
    assert main(["inpaint", "--run", str(moons), "--known", "0", "--known", "1", "--values", "0.4", "--values",
                 "0.5", "--method", "replacement", "-n", "3", "--steps", "4", "--out", str(out)]) == 0
    y = np.load(out)
    np.testing.assert_allclose(y[:, :2], np.tile([0.4, 0.5], (3, 1)), atol=1e-6)


def test_options_that_do_not_apply_are_refused(moons, digits, tmp_path, capsys):
    """Each was accepted and ignored (exit 0): --nfe with the adaptive solver (530 evaluations for --nfe 5),
    --steps on adaptive encode/decode, --probes with the exact divergence, --label-dropout on an unconditional
    run, --xlim on images or reversed."""
    np.save(tmp_path / "z.npy", np.zeros((2, 2), np.float32))
    run, out = str(moons), str(tmp_path / "o.npy")
    cases = [
        (["sample", "--run", run, "--sampler", "ode_rk45", "--nfe", "5", "--out", out], "ode_rk45 is adaptive"),
        (["encode", "--run", run, "-n", "4", "--steps", "5", "--out", out], "--steps 5 sets the grid of a fixed-step"),
        (["decode", "--run", run, "--latents", str(tmp_path / "z.npy"), "--steps", "5", "--out", out],
         "ode_rk45 (the default) is adaptive"),
        (["likelihood", "--run", run, "-n", "4", "--probes", "4"], "auto for d = 2 <= 64): drop --probes"),
        (["train", "--label-dropout", "0.2", "--out", str(tmp_path / "r"), "--quiet"],
         "--label-dropout=0.2 is the share of null labels of a class-conditional run"),
        (["sample", "--run", str(digits), "-n", "2", "--xlim", "0", "1", "--out", str(tmp_path / "s.png")],
         "--xlim sets an axis of the scatter plot"),
        (["sample", "--run", run, "-n", "2", "--xlim", "1", "0", "--out", str(tmp_path / "s.png")],
         "--xlim 1 0: give LO HI with LO < HI"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        _one_line(capsys, says)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s.png").exists()
    assert main(["encode", "--run", run, "-n", "4", "--sampler", "ddim", "--steps", "5", "--out", out]) == 0
    assert main(["likelihood", "--run", run, "-n", "4", "--probes", "2", "--divergence", "hutchinson",
                 "--quiet"]) == 0


def test_latents_and_images_that_do_not_fit_are_refused(moons, digits, tmp_path, capsys):
    """Complex latents lost their imaginary part, latents of 1e30 decoded to 1e29, and a colour --image on a
    grey run was converted: all silently."""
    out = str(tmp_path / "x.npy")
    np.save(tmp_path / "c.npy", np.zeros((2, 2), complex))
    np.save(tmp_path / "big.npy", np.full((2, 2), 1e30, np.float32))
    for name, says in (("c.npy", "has dtype complex128; unstir reads real numbers"),
                       ("big.npy", "holds latents up to 1e+30, 1e+30 times the prior's standard deviation")):
        assert main(["decode", "--run", str(moons), "--latents", str(tmp_path / name), "--out", out]) == 2
        _one_line(capsys, says)
    Image.fromarray((np.zeros((8, 8, 3)) + [200, 0, 0]).astype(np.uint8)).save(tmp_path / "red.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")
    assert main(["inpaint", "--run", str(digits), "--image", str(tmp_path / "red.png"), "--mask",
                 str(tmp_path / "mask.png"), "--out", str(tmp_path / "y.png")]) == 2
    _one_line(capsys, "is a colour image; the run's images are grayscale (1 channel)")


def test_one_sample_likelihood_says_there_is_no_standard_error(moons, capsys):
    assert main(["likelihood", "--run", str(moons), "-n", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "(one sample: no standard error)" in text and "nan" not in text


def test_demo_and_oracle_keep_earlier_figures_without_force(tmp_path, capsys):
    """demo replaced OUT/samples.png without --force, oracle had no --force and overwrote its figures, and
    `oracle --out /missing/deep/folder` created the whole tree."""
    out = tmp_path / "figs"
    out.mkdir()
    (out / "samples.png").write_bytes(b"mine")
    oracle = ["oracle", "--out", str(out), "-n", "50", "--steps", "2", "--paths", "1", "--quiet"]
    assert main(oracle) == 2
    _one_line(capsys, "already holds samples.png; pass --force")
    assert main(["demo", "--out", str(out), "--train-steps", "2", "-n", "20", "--paths", "1"]) == 2
    _one_line(capsys, "already holds samples.png; pass --force")
    assert (out / "samples.png").read_bytes() == b"mine" and not (out / "run").exists()
    assert main(oracle + ["--force"]) == 0 and (out / "samples.png").read_bytes() != b"mine"
    capsys.readouterr()
    deep = tmp_path / "missing" / "deep" / "folder"
    assert main(["oracle", "--out", str(deep), "-n", "50", "--steps", "2", "--paths", "1"]) == 2
    _one_line(capsys, "does not exist; create it first")
    assert not (tmp_path / "missing").exists()


def test_the_default_batch_fits_the_data_and_is_recorded(tmp_path):
    """`train --data shapes32 ...` kept batch 512 (0.09 steps/s on 2 cores, 12 hours at the default 4000 steps);
    the default is now chosen by the data (512 vectors, 128 images up to 16 px, 32 above), recorded in run.json
    as the number, and kept by a resume that does not name it."""
    import json

    (tmp_path / "png").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(tmp_path / "png" / f"{i}.png")
    for data, extra, batch in (("moons", [], 512), ("digits", ["--widths", "8,8"], 128),
                               (str(tmp_path / "png"), ["--widths", "8,8", "--mode", "RGB"], 32)):
        run = tmp_path / f"run{batch}"
        assert main(["train", "--data", data, "--steps", "1", "--out", str(run), "--quiet", *extra]) == 0
        assert json.loads((run / "run.json").read_text())["config"]["batch_size"] == batch
    assert main(["train", "--out", str(tmp_path / "run32"), "--resume", "--steps", "2", "--quiet"]) == 0
    assert json.loads((tmp_path / "run32" / "run.json").read_text())["config"]["batch_size"] == 32


def test_figures_read(digits, moons, tmp_path):
    """A mosaic of 1000 8x8 digits was 289 x 289 pixels (each digit 8 px), and the inpaint strip, 182 x 20, did
    not say which image was which. Now every image in a mosaic is drawn at least 32 px across, and the strip
    titles each image."""
    from unstir import figures

    grid = tmp_path / "grid.png"
    assert main(["sample", "--run", str(digits), "-n", "1000", "--steps", "2", "--out", str(grid), "--quiet"]) == 0
    assert Image.open(grid).size == ((32 * 9 + 1) * 4,) * 2  # 32 columns of 8 + 1 px, drawn x4
    import torch

    strip = tmp_path / "strip.png"
    figures.labelled_strip(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), ["truth", "measurement", "dps 1"], strip)
    assert Image.open(strip).size[1] > 60  # room for the titles above the images
    with pytest.raises(ValueError, match="one label per image"):
        figures.labelled_strip(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), ["truth"], strip)


def test_messages_speak_the_command_line(moons, tmp_path, capsys):
    """Python names (`n`, `batch_size`, `max_evals`) became flags; no raw `[Errno N]`; `report --run /missing`
    named --out; a bad log.jsonl line was reported without its file; `--width 64` was taken as `--widths`."""
    cases = [
        (["tune-grid", "--run", str(moons), "-n", "0", "--nfe", "5"], "-n must be an integer >= 1, got 0"),
        (["tune-grid", "--run", str(moons), "--max-evals", "-1", "--nfe", "5"], "--max-evals must be an integer"),
        (["train", "--batch-size", "0", "--out", str(tmp_path / "r")], "--batch-size must be an integer >= 1"),
        (["train", "--out", "/dev/null/x", "--quiet"], "Not a directory: '/dev/null/x'"),
        (["report", "--run", str(tmp_path / "missing")], "is not a run folder (no run.json)"),
        (["train", "--data", "digits", "--width", "64", "--out", str(tmp_path / "r")],
         "--width configures the MLP of vector data; 'digits' holds images"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Errno" not in err, err
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(moons, broken)
    with open(broken / "log.jsonl", "a") as f:
        f.write("{half a line\n")
    assert main(["report", "--run", str(broken), "-n", "50", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{str(broken / 'log.jsonl')!r}, line" in err and "is damaged" in err


def test_help_and_readme_come_from_the_registries():
    """train --help listed data sets by hand (shapes32 and patches32 were missing) and the README's resume rule
    named three settings where the code allows five."""
    from pathlib import Path

    from unstir.cli import build_parser
    from unstir.data import IMAGE_SETS, TOY_2D
    from unstir.training import RESUMABLE

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = train._option_string_actions["--data"].help
    assert all(name in help_text for name in TOY_2D + IMAGE_SETS)
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    rule = readme.split("differences listed. Only ")[1].split(" may change")[0]
    assert sorted(rule.replace("`", "").replace(" and ", ", ").split(", ")) == \
        sorted("--" + k.replace("_", "-") for k in RESUMABLE)
