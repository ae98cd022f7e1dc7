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
    assert main(argv + ["--out", str(tmp_path / "new")]) == 130  # Ctrl-C: one line
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp*"))
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert main(argv + ["--out", str(tmp_path / "old")]) == 0
    import unstir.cli.sampling as sampling

    real_replace, calls = sampling.os.replace, []

    def dies_on_the_third(*args):  # the marker lands, one new PNG lands, then the kill
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_replace(*args)

    monkeypatch.setattr(sampling.os, "replace", dies_on_the_third)
    assert main(argv[:-3] + ["-n", "5", "--quiet", "--out", str(tmp_path / "old"), "--force"]) == 130
    old = tmp_path / "old"
    assert not (old / "samples.npz").exists() and (old / sampling.INCOMPLETE).exists()  # marked incomplete
    monkeypatch.setattr(sampling.os, "replace", real_replace)
    assert main(argv[:-3] + ["-n", "5", "--quiet", "--out", str(old), "--force"]) == 0  # knows its own files
    assert sorted(p.name for p in old.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["samples.npz"]


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


def test_a_damaged_run_json_or_moments_file_is_one_line_before_any_allocation(small_run, tmp_path, capsys,
                                                                              monkeypatch):
    """A width of 30000 used to allocate gigabytes before failing; negative sizes, a config without its keys, a
    data_shape the network does not map to itself and moments without their covariance ended in tracebacks."""
    from safetensors.torch import save_file

    from unstir import nets

    built = []
    monkeypatch.setattr(nets.MLP, "__init__", lambda self, *a, __init=nets.MLP.__init__, **k: (
        built.append(torch.empty(0).device), __init(self, *a, **k))[1])
    info = json.loads((small_run / "run.json").read_text())
    sample = ["sample", "--run", str(small_run), "-n", "2", "--steps", "2", "--out", str(tmp_path / "x.npy"), "--force"]
    for change, says in ((lambda i: i["net"].update(width=30000), "more than its checkpoint 'checkpoint-4.safetensors'"
                                                                  " holds"),
                         (lambda i: i["net"].update(width=-5), "describes an invalid network for data of shape (2,) "
                                                               "(Trying to create tensor with negative dimension"),
                         (lambda i: i.update(config={}), "its config lacks 'prediction' (a str)"),
                         (lambda i: i.update(data_shape=[3]), "describes an invalid network for data of shape (3,)"),
                         (lambda i: i.update(data_shape=[0]), "data_shape must be a list of 1 or 3 positive integers")):
        bad = json.loads(json.dumps(info))
        change(bad)
        (small_run / "run.json").write_text(json.dumps(bad))
        built.clear()
        assert main(sample) == 2
        _one_line(capsys, says)
        assert all(device == torch.device("meta") for device in built), built  # nothing built in memory
    (small_run / "run.json").write_text(json.dumps(info))
    save_file({"mean": torch.zeros(2)}, str(small_run / "moments.safetensors"))
    few = ["sample", "--run", str(small_run), "-n", "2", "--nfe", "4", "--out", str(tmp_path / "x.npy"), "--force"]
    assert main(few) == 2
    _one_line(capsys, "must hold the tensors 'mean' and 'cov'", "got ['mean']")
    save_file({"mean": torch.zeros(2), "cov": -torch.eye(2)}, str(small_run / "moments.safetensors"))
    assert main(few) == 2
    _one_line(capsys, "the covariance is not positive semi-definite", "delete it to sample without teleportation")


def test_npy_headers_are_bounded_and_checked_before_reading(tmp_path):
    """A 200 MB header, injected text, a shape the file does not hold, complex and boolean arrays: each one line
    that says which (they used to be "holds Python objects", a read until memory ran out, or accepted)."""
    import struct

    from unstir.data import load

    def npy(name, header, body=b"\0" * 64, version=1):
        text = header.encode("latin1")
        text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
        size = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
        (tmp_path / name).write_bytes(b"\x93NUMPY" + bytes([version, 0]) + size + text + body)
        return str(tmp_path / name)

    (tmp_path / "huge.npy").write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 200_000_000) + b"{" * 100)
    cases = [(str(tmp_path / "huge.npy"), "has a 200,000,000-byte header, above the 10,000 bytes numpy.save writes"),
             (npy("inject.npy", "{'descr': '<f4', 'fortran_order': __import__('os').system('true'), 'shape': (8, 2)}"),
              "has a damaged or foreign header"),
             (npy("claim.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1000), }"),
              "claims shape (1000000000, 1000) of float32 (4,000,000,000,000 bytes), but the file holds 64 bytes"),
             (npy("v2.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (8, 3), }", version=2),
              "claims shape (8, 3) of float32 (96 bytes), but the file holds 64 bytes")]
    np.save(tmp_path / "complex.npy", np.ones((8, 2), complex))
    np.save(tmp_path / "bool.npy", np.ones((8, 2), bool))
    cases += [(str(tmp_path / "complex.npy"), "has dtype complex128; unstir reads real numbers"),
              (str(tmp_path / "bool.npy"), "has dtype bool; unstir reads real numbers")]
    for path, says in cases:
        with pytest.raises(ValueError, match=None) as info:
            load(path)
        assert says in str(info.value), (path, str(info.value))
    good = npy("good.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (8, 2), }")
    assert load(good).x.shape == (8, 2)  # the hand-written header itself is right


def test_sixteen_bit_images_are_read_at_sixteen_bits_and_bombs_refused(tmp_path, monkeypatch):
    """16-bit grey PNGs used to be clipped to two values (98.4% at +1): now their 65536 levels are kept, to
    float32 rounding; a folder mixing 8 and 16 bits, and an image above the pixel limit (read from its header,
    not decoded), are one line each."""
    from PIL import Image

    from unstir import data

    rng = np.random.default_rng(3)
    deep = tmp_path / "deep"
    deep.mkdir()
    levels = rng.integers(0, 65536, (4, 8, 8)).astype(np.uint16)
    for i, a in enumerate(levels):
        Image.fromarray(a).save(deep / f"{i}.png")
    d = data.load(str(deep))
    assert d.levels == 65536 and d.x.shape == (4, 1, 8, 8)
    np.testing.assert_allclose(d.x[:, 0].double().numpy(), levels / 32767.5 - 1.0, atol=1e-7)
    assert len(np.unique(d.x.numpy())) > 200  # not two values
    assert data.load(str(deep), mode="RGB").x.shape == (4, 3, 8, 8)
    Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).save(deep / "eight.png")
    with pytest.raises(ValueError, match=r"mix bit depths: 8-bit \(e.g. eight.png\) and 16-bit"):
        data.load(str(deep))
    big = tmp_path / "big"
    big.mkdir()
    Image.new("L", (64, 64)).save(big / "bomb.png")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 32 * 32)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image above the limit"))
    with pytest.raises(ValueError, match=r"is 64 x 64 = 4,096 pixels, above unstir's limit of 1,024"):
        data.load(str(big))


def test_memory_is_checked_before_work(small_run, tmp_path, capsys):
    """-n and --batch-size far beyond this machine's memory: one line with the estimate and a batch size that
    fits, before any sampling, data drawing or folder; the suggested batch size then passes the check."""
    import re

    out = str(tmp_path / "x.npy")
    huge = str(10 ** 11)
    cases = [(["sample", "--run", str(small_run), "-n", huge, "--batch-size", huge, "--out", out], "sampling"),
             (["likelihood", "--run", str(small_run), "-n", huge, "--batch-size", huge], "the likelihood of"),
             (["train", "--batch-size", huge, "--out", str(tmp_path / "new"), "--quiet"], "training with --batch-size")]
    for argv, what in cases:
        tic = time.perf_counter()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err and "more than the" in err and "free" in err, err
        assert time.perf_counter() - tic < 30
    assert not (tmp_path / "new").exists()
    fits = re.search(r"use --batch-size (\d+) or less", err).group(1)
    from unstir.resources import check_memory, training_bytes
    from unstir.runs import load_run

    model = load_run(small_run)
    per_item = training_bytes(model, model.data_shape, "cpu") + 3 * 4 * 2  # as train estimates it
    check_memory("x", device="cpu", batch=int(fits), per_item=per_item)  # the suggestion passes the estimate
    with pytest.raises(ValueError, match=f"use --batch-size {fits} or less"):
        check_memory("x", device="cpu", batch=4 * int(fits), per_item=per_item)


def test_a_stored_grid_clears_temporaries_left_by_a_killed_writer(small_run):
    stale = small_run / ".grids.tmp99999.json"
    stale.write_text("{half")
    theirs = small_run / ".grids.tmp-notes.json"  # not a name unstir writes
    theirs.write_text("mine")
    save_tuned(small_run, TunedGrid(sampler="dpm++2m", nfe=5, times=[1.0, 0.5, 1e-3], start="quadratic",
                                    error_start=0.2, error=0.1, evaluations=10, seconds=0.1, n=4, seed=0, options={},
                                    method="pilot"))
    assert not stale.exists() and theirs.read_text() == "mine"


def test_ctrl_c_outside_training_is_one_line(small_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C during sample or likelihood used to print a KeyboardInterrupt traceback: now one line, exit 130."""
    from unstir import distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "sample_sharded", interrupted)
    monkeypatch.setattr(distributed, "likelihood_sharded", interrupted)
    for argv in (["sample", "--run", str(small_run), "-n", "4", "--out", str(tmp_path / "x.npy")],
                 ["likelihood", "--run", str(small_run), "-n", "4"]):
        assert main(argv) == 130
        _one_line(capsys, f"unstir {argv[0]}: interrupted (Ctrl-C) before its output was complete")
    assert not (tmp_path / "x.npy").exists()
