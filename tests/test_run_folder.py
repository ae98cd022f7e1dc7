"""A run folder is a database: one writer at a time, and unstir touches only the files it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from unstir.cli import main
from unstir.runs import LOCK_FILE, RunLocked, remove_temporaries, run_lock
from unstir.tuning import TunedGrid, _read_grids, save_tuned


def _train(out, steps=2000, *extra):
    return subprocess.Popen([sys.executable, "-m", "unstir.cli", "train", "--steps", str(steps), "--batch-size", "64",
                             "--checkpoint-every", "50", "--quiet", "--out", str(out), *extra],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=60.0):
    start = time.time()
    while not path.exists():
        if proc.poll() is not None or time.time() - start > timeout:
            raise AssertionError(f"{path} never appeared: {proc.communicate()}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A training process that holds its run's lock while the tests below try to write the run."""
    run = tmp_path_factory.mktemp("locked") / "run"
    proc = _train(run, 10**7)  # killed at the end
    _wait_for(run / "checkpoint.json", proc)
    yield run, proc
    proc.kill()
    proc.communicate()


def test_a_second_writer_is_refused_naming_the_holder(training, tmp_path, capsys):
    """Two trainings into one folder (the second fresh or resuming), or a tune-grid while the run trains: one
    line that names the holder, its PID and host, and nothing of the first run touched."""
    run, proc = training
    before = sorted(p.name for p in run.iterdir())
    holder = f"`unstir train` (PID {proc.pid} on "
    for argv in (["train", "--out", str(run), "--resume", "--steps", "3000", "--quiet"],
                 ["tune-grid", "--run", str(run), "--nfe", "5", "-n", "4", "--max-evals", "3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert holder in err and err.count("\n") == 1, err
        assert "wait for it to finish (or stop it)" in err
    after = sorted(p.name for p in run.iterdir())
    assert set(before) <= set(after) | {n for n in before if n.startswith("checkpoint-")}  # only it moves its files
    assert proc.poll() is None


def test_sampling_a_run_that_trains_reads_and_stores_nothing(training, tmp_path, capsys):
    """Readers never block: sample works while the run trains; the grid its pilot places is used, not stored."""
    run, _ = training
    assert main(["sample", "--run", str(run), "-n", "128", "--nfe", "5", "--out", str(tmp_path / "x.npy")]) == 0
    err = capsys.readouterr().err
    assert "not stored: the run" in err and "is being written by `unstir train`" in err
    assert not (run / "grids.json").exists()


def test_two_trainings_started_together_leave_one_run(tmp_path):
    """Started 0.1 s apart into the same fresh folder: one trains, the other exits 2 naming it."""
    run = tmp_path / "run"
    a = _train(run, 300)
    time.sleep(0.1)
    b = _train(run, 300, "--process", "ve")
    out = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], out
    loser = out[[a.returncode, b.returncode].index(2)][1]
    assert "is being written by `unstir train`" in loser
    winner = [a, b][[a.returncode, b.returncode].index(0)]
    recorded = json.loads((run / "run.json").read_text())["config"]["process"]
    assert recorded == ("vp" if winner is a else "ve")


def test_concurrent_grid_writers_keep_every_update(tmp_path, monkeypatch):
    """Three writers of grids.json at once (writes slowed to widen the window): all three grids are kept."""
    monkeypatch.setenv("UNSTIR_SLOW_WRITES", "0.3")
    run = tmp_path / "run"
    run.mkdir()

    def grid(nfe):
        return TunedGrid("dpm++2m", nfe, [1.0, 0.5, 0.001, 0.0], "edm", 0.2, 0.1, 10, 1.0, 8, 0, {})

    threads = [threading.Thread(target=save_tuned, args=(run, grid(nfe))) for nfe in (5, 6, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v["nfe"] for v in _read_grids(run / "grids.json").values()) == [5, 6, 7]


def test_a_lock_left_by_a_dead_process_is_free(tmp_path):
    """The kernel drops a flock with its process: a writer killed with SIGKILL leaves nothing that blocks."""
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from unstir.runs import run_lock\n"
            f"with run_lock({str(run)!r}, 'test'):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"PID {proc.pid}"):
        with run_lock(run, "second"):
            pass
    proc.kill()
    proc.wait()
    with run_lock(run, "second"):
        assert json.loads((run / LOCK_FILE).read_text())["holder"] == "second"


def test_train_refuses_a_folder_of_other_files_and_deletes_only_its_own(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    theirs = ["checkpoint-7.safetensors", ".notes.tmp1.txt", "photo.png"]
    for name in theirs:
        (folder / name).write_text("keep me")
    assert main(["train", "--steps", "2", "--out", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds files and no unstir run" in err and "train into a new or empty folder" in err
    assert sorted(p.name for p in folder.iterdir()) == sorted(theirs)
    # In a run, only unstir's own temporaries and unreferenced weights are cleaned up.
    run = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(run), "--quiet"]) == 0
    for name in (".run.tmp123.json", ".checkpoint-9.tmp5.safetensors", "checkpoint-1.safetensors", ".mine.tmp1.txt",
                 "checkpoint-x.safetensors"):
        (run / name).write_text("")
    assert remove_temporaries(run) == 3
    assert {".mine.tmp1.txt", "checkpoint-x.safetensors"} <= {p.name for p in run.iterdir()}


def test_a_refused_training_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["train", "--steps", "2", "--batch-size", "0", "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
