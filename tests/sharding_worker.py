"""Run under torchrun (or alone) by tests/test_distributed.py: `unstir sample` into a folder (an image run), then
the sharded likelihood of moons under a vector run with per-sample Hutchinson probes, saved by rank 0."""

import os
import sys

import torch
from safetensors.torch import save_file

from unstir import data
from unstir.cli import main
from unstir.distributed import likelihood_sharded
from unstir.runs import load_run

if __name__ == "__main__":
    images, vectors, out, batch = sys.argv[1:5]
    assert main(["sample", "--run", images, "--sampler", "ddpm", "--steps", "6", "-n", "13", "--batch-size", batch,
                 "--out", os.path.join(out, "samples"), "--quiet"]) == 0
    model = load_run(vectors)
    x = data.load("moons", n=3, seed=9).x
    r = likelihood_sharded(model, x, seed=3, batch_size=int(batch), divergence="hutchinson", probes=2, accuracy=1e-6)
    if int(os.environ.get("RANK", 0)) == 0:
        save_file({"bpd": r.bits_per_dim, "stderr": r.stderr, "latent": r.latent}, os.path.join(out, "lik.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
