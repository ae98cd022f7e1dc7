"""Fault injection: real `unstir train` processes killed at random moments (SIGKILL, including inside
checkpoint writes, slowed by the UNSTIR_SLOW_WRITES hook) and interrupted (SIGINT), then resumed.
The short form runs in `make test`; `pytest -m slow` runs the full one (12 kills)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from unstir.runs import load_tensors

ARGS = ["train", "--data", "moons", "--steps", "300", "--checkpoint-every", "10", "--batch-size", "64", "--quiet"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "unstir.cli", *ARGS, "--out", str(out), *extra]


def _env(slow):
    return {**os.environ, "OMP_NUM_THREADS": "1", **({"UNSTIR_SLOW_WRITES": str(slow)} if slow else {})}


def _final(run):
    meta = json.loads((run / "checkpoint.json").read_text())
    return meta, load_tensors(run / meta["weights"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "reference"
    subprocess.run(_cmd(run), env=_env(0), check=True, capture_output=True)
    return _final(run)


def _started(run, proc, before, timeout=60.0):
    """Wait until the process has (re)written run.json: its imports and set-up are done, the loop starts."""
    start = time.time()
    while not ((run / "run.json").exists() and (run / "run.json").stat().st_mtime_ns != before):
        if proc.poll() is not None or time.time() - start > timeout:
            raise AssertionError("the training process did not start")
        time.sleep(0.01)


def _mtime(run):
    return (run / "run.json").stat().st_mtime_ns if (run / "run.json").exists() else None


@pytest.mark.parametrize("kills", [pytest.param(3, id="short"), pytest.param(12, marks=pytest.mark.slow, id="full")])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reference, kills):
    run, rng = tmp_path / "run", random.Random(kills)
    inside_write, steps_seen = 0, []
    for k in range(kills):
        before = _mtime(run)
        proc = subprocess.Popen(_cmd(run, *(["--resume"] if k else [])), env=_env(0.03),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _started(run, proc, before)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait()
        if list(run.glob(".*.tmp*")):
            inside_write += 1
        if (run / "checkpoint.json").exists():  # the pointer always names a complete, readable checkpoint
            meta, _ = _final(run)
            steps_seen.append(meta["step"])
    done = subprocess.run(_cmd(run, "--resume"), env=_env(0), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    meta, tensors = _final(run)
    ref_meta, ref_tensors = reference
    assert meta["step"] == 300 and meta["generator"] == ref_meta["generator"]
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors)  # weights, EMA, optimizer
    assert not list(run.glob(".*.tmp*")) and [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-300.safetensors"]
    assert steps_seen == sorted(steps_seen)  # resume never went back past a complete checkpoint
    print(f"kills {kills}, inside a checkpoint write {inside_write}, checkpoint steps at the kills {steps_seen}")
    if kills >= 10:
        assert inside_write >= 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                       pytest.param(signal.SIGUSR1, 138, marks=pytest.mark.slow)])
def test_a_stop_signal_writes_a_checkpoint_that_resumes_bit_identically(sig, code, tmp_path, reference):
    """Ctrl-C, and the SIGTERM (or SIGUSR1) that Slurm and Kubernetes send before a kill: the step finishes, a
    checkpoint is written, one line says how to resume, the exit status is the shell's 128 + signal, and the
    resumed run ends bit-identical to an uninterrupted one."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run), env=_env(0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _started(run, proc, None)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    line = [s for s in (out + err).splitlines() if f"stopped by {sig.name} at step" in s]
    assert len(line) == 1 and f"unstir train --out {run} --resume" in line[0]
    step = int(line[0].split(" at step ")[1].split(";")[0])
    assert _final(run)[0]["step"] == step
    assert subprocess.run(_cmd(run, "--resume"), env=_env(0), capture_output=True).returncode == 0
    meta, tensors = _final(run)
    assert all(torch.equal(tensors[k], reference[1][k]) for k in reference[1])


def _children(pid):
    kids = []
    for stat in __import__("pathlib").Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not __import__("pathlib").Path("/proc").exists(), reason="needs /proc to find the ranks")
def test_torchrun_job_that_loses_a_rank_stops_and_resumes(tmp_path):
    """Two ranks under torchrun; rank 1 is killed: the job ends with a failure (non-zero exit naming the lost
    rank) within a bounded time, not a hang, and `--resume` under torchrun completes the run."""
    from pathlib import Path

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run = tmp_path / "ddp"
    cmd = [torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "unstir.cli", "train", "--data", "moons",
           "--steps", "400", "--checkpoint-every", "20", "--batch-size", "64", "--quiet", "--out", str(run)]
    env = {**_env(0), "UNSTIR_DIST_TIMEOUT": "30"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not (run / "checkpoint.json").exists():
        assert proc.poll() is None and time.time() - start < 120, "the job did not start"
        time.sleep(0.05)
    ranks = {}
    for pid in _children(proc.pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = pid
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.time()
    out, err = proc.communicate(timeout=90)
    elapsed = time.time() - killed
    print(f"torchrun job ended {elapsed:.1f} s after rank 1 was killed (exit status {proc.returncode})")
    assert proc.returncode != 0 and elapsed < 60
    assert "Signal 9" in err or "SIGKILL" in err or "failed" in err.lower(), err[-2000:]
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 400


@pytest.mark.slow
def test_kills_inside_grid_writes_and_sample_folders_leave_nothing_half_done(tmp_path):
    """SIGKILL at random moments (i) of `tune-grid` storing its grid under the run's lock, with its write slowed
    so that kills land between the temporary file and the rename, and (ii) of `sample --out FOLDER` writing a
    folder. After every kill: the lock is free, grids.json is the old or the new one (never torn), the next
    writer removes the stale temporary file, and a sample folder is absent, whole (every file its samples.npz
    lists exists and opens) or marked incomplete (no samples.npz)."""
    import numpy as np
    from PIL import Image

    from unstir.runs import run_lock

    rng = random.Random(7)
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "unstir.cli", "train", "--data", "digits", "--steps", "2", "--batch-size",
                    "8", "--widths", "8,8", "--quiet", "--out", str(run)], env=_env(0), check=True, capture_output=True)
    grid = [sys.executable, "-m", "unstir.cli", "tune-grid", "--run", str(run), "--nfe", "5", "-n", "4",
            "--max-evals", "3", "--force"]
    for kill in range(4):
        proc = subprocess.Popen(grid, env=_env(0.5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        proc.kill()
        proc.wait()
        with run_lock(run, "test"):  # free: the kernel released the dead holder's lock
            pass
        if (run / "grids.json").exists():
            json.loads((run / "grids.json").read_text())  # whole
    subprocess.run(grid, env=_env(0), check=True, capture_output=True)
    assert not list(run.glob(".grids.tmp*")), "the last writer removed what the killed ones left"
    out = tmp_path / "samples"
    argv = [sys.executable, "-m", "unstir.cli", "sample", "--run", str(run), "-n", "400", "--steps", "2", "--quiet",
            "--out", str(out), "--force"]
    for kill in range(6):
        proc = subprocess.Popen(argv, env=_env(0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 8.0))
        proc.kill()
        proc.wait()
        if out.exists() and (out / "samples.npz").exists():
            listed = list(np.load(out / "samples.npz")["files"])
            assert len(listed) == 400
            for name in listed:
                Image.open(out / name).load()
    subprocess.run(argv, env=_env(0), check=True, capture_output=True)
    assert len(list(np.load(out / "samples.npz")["files"])) == 400
