"""Sampling and scoring sharded across processes: per-sample seeds (EDM's scheme), so the samples do not depend
on the number of processes or the batch size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unstir import oracle
from unstir.distributed import SeedGenerators, sample_sharded, shard
from unstir.processes import make_process


@pytest.mark.parametrize("n, batch, world", [(13, 7, 1), (13, 7, 2), (100, 64, 3), (5, 1, 5), (64, 64, 2)])
def test_shards_cover_every_sample_once_with_equal_batch_counts(n, batch, world):
    parts = [shard(n, batch, r, world) for r in range(world)]
    indices = sorted(i for p in parts for rows in p for i in rows)
    assert indices == list(range(n))
    assert all(len(rows) <= batch for p in parts for rows in p)
    assert len({len(p) for p in parts}) == 1 or n < batch * world, "equal batch counts when every batch is full"


def test_fewer_samples_than_processes_is_refused():
    with pytest.raises(ValueError, match=r"-n 3 is smaller than the number of processes \(4\)"):
        shard(3, 8, 0, 4)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m", "euler_maruyama", "edm"])
def test_a_sample_depends_on_its_seed_alone(sampler):
    """Batch 7 against 64, and the first 10 of 30 against 10 alone: the same samples up to float rounding, for
    deterministic and stochastic samplers (per-step noise from each sample's generator). Not pc: its Langevin
    step averages norms over the batch (score_sde's rule), and `unstir sample` says so when that matters."""
    process = make_process("vp")
    model = oracle.random_mixture(4, 3, seed=1).denoiser(process)
    kw = dict(seed=5, sampler=sampler, steps=8)
    a, nfe = sample_sharded(model, 30, batch_size=7, **kw)
    b, _ = sample_sharded(model, 30, batch_size=64, **kw)
    c, _ = sample_sharded(model, 10, batch_size=3, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[:10], c, rtol=1e-5, atol=1e-5)
    other, _ = sample_sharded(model, 30, batch_size=64, **{**kw, "seed": 6})
    assert (other - a).norm(dim=1).min() > 1e-2, "another seed gives other samples"
    assert nfe > 0 and a.shape == (30, 4)


def test_seed_generators_draw_each_row_from_its_own_seed():
    g = SeedGenerators([11, 12, 13])
    x = g.stack(lambda s, gen: torch.randn(s, generator=gen), (3, 2))
    assert torch.equal(x[1], torch.randn(2, generator=torch.Generator().manual_seed(12)))
    with pytest.raises(ValueError, match=r"first dimension must be the number of samples"):
        g.stack(lambda s, gen: torch.randn(s, generator=gen), (4, 2))


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_torchrun_two_processes_sample_and_score_as_one(tmp_path):
    """`torchrun --nproc_per_node=2 unstir sample --out folder` with batch 7 against one process with batch 64:
    the same seeds, the same samples (a stochastic sampler) to rounding, one PNG per sample; the sharded
    likelihood (dequantisation noise and Hutchinson probes per sample) likewise."""
    from unstir.training import TrainConfig, train

    images = train(TrainConfig(data="digits", steps=2, batch_size=8, widths=(16, 32)), tmp_path / "digits",
                   progress=False).run
    vectors = train(TrainConfig(data="moons", steps=30, batch_size=64), tmp_path / "moons", progress=False).run
    worker = str(Path(__file__).with_name("sharding_worker.py"))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    _run([torchrun, "--nproc_per_node=2", "--master_port=29541", worker, str(images), str(vectors),
          str(tmp_path / "two"), "2"])
    _run([sys.executable, worker, str(images), str(vectors), str(tmp_path / "one"), "64"])
    two, one = np.load(tmp_path / "two" / "samples" / "samples.npz"), np.load(tmp_path / "one" / "samples" / "samples.npz")
    assert two["x"].shape == (13, 1, 8, 8) and np.array_equal(two["seeds"], one["seeds"])
    np.testing.assert_allclose(two["x"], one["x"], rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "two" / "samples").glob("*.png")) == [f"{i:06d}.png" for i in range(13)]
    lik2, lik1 = load_file(str(tmp_path / "two" / "lik.safetensors")), load_file(str(tmp_path / "one" / "lik.safetensors"))
    # Adaptive steps see the rounding of the batched network: at accuracy 1e-4 this barely trained MLP's per-sample
    # results moved by up to 0.003 bits/dim between batch splits (its solver error); at 1e-6 by under 1e-5.
    for k in lik1:
        torch.testing.assert_close(lik2[k], lik1[k], rtol=1e-4, atol=1e-4)
    assert lik1["bpd"].shape == (3,) and torch.isfinite(lik1["bpd"]).all()


def test_torchrun_with_fewer_samples_than_processes_fails_before_work(tmp_path):
    from unstir.training import TrainConfig, train

    run = train(TrainConfig(data="moons", steps=2, batch_size=8), tmp_path / "run", progress=False).run
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29543", "-m", "unstir.cli", "--", "sample", "--run",
                        str(run), "-n", "1", "--out", str(tmp_path / "s.npy")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "-n 1 is smaller than the number of processes (2)" in p.stderr
    assert not (tmp_path / "s.npy").exists()


def test_nproc_stops_every_process_on_ctrl_c_with_unstir_lines(tmp_path):
    """`unstir train --nproc 2` started by unstir through torchrun's launcher: Ctrl-C (SIGINT to the process group,
    as a terminal sends it) stops both ranks at the same step with a checkpoint, and ends with unstir's lines and
    exit 130, where plain torchrun ends in its own SignalException traceback. A failing worker ends in its one
    line and unstir's, exit 2."""
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "unstir.cli", "train", "--nproc", "2", "--steps", "1000000",
                          "--checkpoint-every", "50", "--batch-size", "64", "--quiet", "--out", str(run)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    start = time.time()
    while not (run / "checkpoint.json").exists():
        assert p.poll() is None and time.time() - start < 120, p.communicate()
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "unstir train: stopped by SIGINT; every process stopped" in err, err
    assert (out + err).count("stopped by SIGINT at step") == 1 and "W1" not in err  # rank 0 speaks for both
    step = int((out + err).split("stopped by SIGINT at step ")[1].split(";")[0])
    assert json.loads((run / "checkpoint.json").read_text())["step"] == step
    failed = subprocess.run([sys.executable, "-m", "unstir.cli", "sample", "--nproc", "2", "--run", str(run), "-n",
                             "1", "--out", str(tmp_path / "s.npy")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert "-n 1 is smaller than the number of processes (2)" in failed.stderr
    assert "processes failed (exit status 2; torchrun stopped the rest); the errors are above" in failed.stderr
