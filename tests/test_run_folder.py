"""A run folder is a database: one writer at a time, and unstir touches only the files it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch
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


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("images") / "run"
    assert main(["train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--widths", "8,8", "--out",
                 str(run), "--quiet"]) == 0
    return run


def test_sample_force_replaces_only_what_sample_wrote(image_run, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["sample", "--run", str(image_run), "--steps", "2", "--out", str(out), "--quiet"]
    assert main(argv + ["-n", "3"]) == 0
    theirs = {"2024-07-01_beach.png": "a photo", "notes.txt": "mine"}
    for name, text in theirs.items():
        (out / name).write_text(text)
    assert main(argv + ["-n", "2", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["000000.png", "000001.png", "samples.npz", *theirs])
    assert all((out / name).read_text() == text for name, text in theirs.items())
    assert list(np.load(out / "samples.npz")["files"]) == ["000000.png", "000001.png"]
    assert not list(tmp_path.glob(".samples.tmp*"))
    (out / "000005.png").write_text("not unstir's")
    capsys.readouterr()
    assert main(argv + ["-n", "8", "--force"]) == 2  # refused before sampling
    err = capsys.readouterr().err
    assert "holds 000005.png, which `unstir sample` did not write" in err and err.count("\n") == 1
    assert (out / "000005.png").read_text() == "not unstir's"


def test_a_killed_sample_folder_is_not_taken_for_whole(image_run, tmp_path, monkeypatch):
    """A write that dies half-way: a new folder does not appear at all, and an existing one is left without its
    manifest (samples.npz, written last), the mark of an incomplete unstir folder."""
    from PIL import Image

    written = []
    real_save = Image.Image.save

    def dies_on_the_second(self, path, *a, **k):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return real_save(self, path, *a, **k)

    argv = ["sample", "--run", str(image_run), "--steps", "2", "-n", "3", "--quiet"]
    monkeypatch.setattr(Image.Image, "save", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp*"))
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert main(argv + ["--out", str(tmp_path / "old")]) == 0
    import unstir.cli.sampling as sampling

    monkeypatch.setattr(sampling.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--out", str(tmp_path / "old"), "--force"])
    assert not (tmp_path / "old" / "samples.npz").exists()


@pytest.fixture
def small_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "16", "--out", str(run), "--quiet"]) == 0
    return run


def _one_line(capsys, *parts):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for part in parts:
        assert part in err, err


def test_links_fifos_and_devices_in_a_run_are_refused(small_run, tmp_path, capsys):
    """The run folder is a boundary: a weights file linked to another run's, a FIFO named run.json (which would
    hang a reader), grids.json linked to /dev/zero (read until memory runs out), log.jsonl linked to a file
    elsewhere (appended to by a resume): one line each, and nothing outside the run read or written."""
    sample = ["sample", "--run", str(small_run), "-n", "4", "--steps", "2", "--out", str(tmp_path / "x.npy"),
              "--force"]
    weights = small_run / json.loads((small_run / "checkpoint.json").read_text())["weights"]
    other = tmp_path / "other.safetensors"
    weights.rename(other)
    weights.symlink_to(other)
    assert main(sample) == 2
    _one_line(capsys, "is a symbolic link; unstir reads a run's own files only")
    weights.unlink()
    other.rename(weights)

    (small_run / "grids.json").symlink_to("/dev/zero")
    assert main(["sample", "--run", str(small_run), "-n", "4", "--nfe", "5", "--out", str(tmp_path / "y.npy")]) == 2
    _one_line(capsys, "grids.json' is a symbolic link")
    (small_run / "grids.json").unlink()

    outside = tmp_path / "elsewhere.txt"
    outside.write_text("theirs\n")
    (small_run / "log.jsonl").unlink()
    (small_run / "log.jsonl").symlink_to(outside)
    assert main(["train", "--out", str(small_run), "--resume", "--steps", "6", "--quiet"]) == 2
    _one_line(capsys, "log.jsonl' is a symbolic link")
    assert outside.read_text() == "theirs\n"
    (small_run / "log.jsonl").unlink()

    info = (small_run / "run.json").read_text()
    (small_run / "run.json").unlink()
    os.mkfifo(small_run / "run.json")
    assert main(sample) == 2
    _one_line(capsys, "run.json' is not a regular file (a FIFO, socket or device)")
    (small_run / "run.json").unlink()
    (small_run / "run.json").write_text(info)
    (small_run / "checkpoint.json").write_text("[" * 100000 + "]" * 100000)
    assert main(sample) == 2
    _one_line(capsys, "checkpoint.json' is damaged: not readable JSON")


def test_a_data_path_recorded_in_a_run_is_not_followed(tmp_path, capsys):
    """config.data naming a file outside the run (here: the one it was trained on) is not read for held-out
    data: one line asks for --data, and --data works."""
    data = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d.npy"), "--steps", "4", "--batch-size", "16", "--out", str(run),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["likelihood", "--run", str(run), "-n", "8"]) == 2
    _one_line(capsys, "a path recorded in its run.json, which unstir does not follow; pass the held-out data with "
                      "--data")
    assert main(["likelihood", "--run", str(run), "-n", "8", "--data", str(tmp_path / "d.npy")]) == 0


def test_damaged_checkpoints_are_one_line_each(small_run, tmp_path, capsys):
    """int8/fp16 weights, optimizer moments of the wrong shape, a missing optimizer state, a negative step and a
    garbage RNG state: each refused in one line (exit 2), where they used to load or end in a traceback."""
    from safetensors.torch import load_file, save_file

    pointer = small_run / "checkpoint.json"
    meta = json.loads(pointer.read_text())
    weights = small_run / meta["weights"]
    original = load_file(weights)
    sample = ["sample", "--run", str(small_run), "-n", "2", "--steps", "2", "--out", str(tmp_path / "x.npy"), "--force"]
    resume = ["train", "--out", str(small_run), "--resume", "--steps", "6", "--quiet"]

    def with_tensors(change):
        tensors = dict(original)
        change(tensors)
        save_file(tensors, str(weights))

    key = next(k for k in original if k.startswith("model."))
    for dtype in (torch.int8, torch.float16, torch.bool):
        with_tensors(lambda t: t.__setitem__(key, original[key].to(dtype)))
        assert main(sample) == 2
        _one_line(capsys, f"{key} is {dtype}, the network's is torch.float32")
    moment = next(k for k in original if k.startswith("optim.") and k.endswith("exp_avg"))
    with_tensors(lambda t: t.__setitem__(moment, torch.zeros(3, 1)))
    assert main(resume) == 2
    _one_line(capsys, f"optimizer tensor {moment} has shape (3, 1), not its parameter's")
    with_tensors(lambda t: [t.pop(k) for k in list(t) if k.startswith("optim.")])
    assert main(resume) == 2
    _one_line(capsys, "carries no optimizer state", "pass --reset-optimizer")
    assert main(resume + ["--reset-optimizer"]) == 0
    meta = json.loads(pointer.read_text())
    for field, value, says in (("step", -150, "records step -150"), ("generator", "AAAA", "the RNG state is damaged")):
        pointer.write_text(json.dumps({**meta, field: value}))
        assert main(["train", "--out", str(small_run), "--resume", "--steps", "9", "--quiet"]) == 2
        _one_line(capsys, says)


def test_nan_weights_under_the_adaptive_solvers_and_smc_are_one_line(small_run, tmp_path, capsys):
    """NaN weights used to end ode_rk45, encode and tune-grid in torchdiffeq's "underflow in dt" and smc in
    "probability tensor contains inf/nan": now one line that names the time, like the fixed-grid samplers."""
    from safetensors.torch import load_file, save_file

    weights = small_run / json.loads((small_run / "checkpoint.json").read_text())["weights"]
    tensors = load_file(weights)
    save_file({k: torch.full_like(v, float("nan")) if k.startswith("ema.") else v for k, v in tensors.items()},
              str(weights))
    run = str(small_run)
    for argv in (["sample", "--run", run, "-n", "4", "--sampler", "ode_rk45", "--out", str(tmp_path / "a.npy")],
                 ["encode", "--run", run, "-n", "4", "--out", str(tmp_path / "b.npy"), "--quiet"],
                 ["tune-grid", "--run", run, "--nfe", "5", "-n", "4", "--max-evals", "3"],
                 ["inpaint", "--run", run, "--known", "0", "--values", "0.4", "--method", "smc", "-n", "2",
                  "--steps", "4", "--out", str(tmp_path / "c.npy")]):
        assert main(argv) == 2, argv
        _one_line(capsys, "NaN or inf at t = ")


def test_tolerances_that_no_step_can_meet_are_refused(small_run, tmp_path, capsys):
    out = ["--out", str(tmp_path / "a.npy")]
    for rtol, atol, says in (("0", "0", "rtol and atol cannot both be 0"), ("-1e-3", "1e-5", "rtol must be a finite "
                                                                                             "number >= 0, got -0.001")):
        argv = ["sample", "--run", str(small_run), "-n", "4", "--sampler", "ode_rk45", f"--rtol={rtol}", f"--atol={atol}"]
        assert main(argv + out) == 2
        _one_line(capsys, says)
