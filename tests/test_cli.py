"""End-to-end runs of the command line on tiny settings."""

import subprocess
import sys

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
