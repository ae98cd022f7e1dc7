"""The run report renders in a real browser: every image loads, no console errors, not blank."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from unstir.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    assert main(["train", "--data", "unequal_2d", "--class-conditional", "--steps", "150", "--out",
                 str(root / "run"), "--quiet"]) == 0
    assert main(["tune-grid", "--run", str(root / "run"), "--sampler", "dpm++2m", "--nfe", "5", "-n", "32", "--max-evals", "10",
                 "--quiet"]) == 0
    assert main(["report", "--run", str(root / "run"), "-n", "200", "--quiet"]) == 0
    return root / "run" / "report.html"


def test_report_has_every_section(report):
    text = report.read_text()
    for heading in ("Samples", "Trajectories", "Deterministic samplers against model evaluations", "Training loss",
                    "Likelihood", "Interpolation", "Encode / decode", "Classifier-free guidance",
                    "Conditioning on a coordinate", "Tuned time grids"):
        assert f"<h2>{heading}</h2>" in text, heading
    assert "placeholder" not in text.lower() and text.count("data:image/png;base64,") >= 7
    assert re.search(r"<title>unstir: report\d*/run \(unequal_2d, vp, eps prediction\)</title>", text)
    assert "(two-sample floor: 5 fresh draws of the true data against the same held-out points, range" in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium); "
                                             ".ci/run installs it")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--enable-logging=stderr", "--v=0", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert 'data-images="ok"' in dom.stdout  # the page's own check: every image decoded
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1200,3000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = torch.as_tensor(np.asarray(Image.open(shot).convert("L"), dtype=np.float32))
    assert pixels.std() > 20 and (pixels < 128).float().mean() > 0.005  # ink on the page, not blank


def test_report_errors(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (tmp_path / "run.json").write_text("{}")
    assert main(["report", "--run", str(tmp_path)]) == 2
    assert "has no checkpoint yet" in capsys.readouterr().err


def test_report_figures_are_readable():
    """The NFE axis is labelled at the evaluation counts only (no crowded minor labels), and small images are
    enlarged: a 10-frame strip of 8x8 digits is at least 400 px wide."""
    import base64
    import io

    from PIL import Image

    from unstir import figures
    from unstir.figures import plt
    from unstir.report import _images

    fig, ax = plt.subplots()
    ax.loglog([4, 6, 8, 10, 12, 20, 40, 80], [1, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01])
    figures.label_counts(ax, [4, 6, 10, 20, 40, 8, 12, 20, 40, 80])
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    minor = [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    plt.close(fig)
    assert shown == ["4", "6", "8", "10", "12", "20", "40", "80"] and minor == []
    uri = _images(torch.zeros(10, 1, 8, 8), 10)
    png = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert png.size[0] >= 400
