"""Run under torchrun by tests/test_train.py: train, then save this rank's final weights."""

import os
import sys

import torch
from safetensors.torch import save_file

from unstir.training import TrainConfig, train

if __name__ == "__main__":
    out, dump = sys.argv[1], sys.argv[2]
    cfg = TrainConfig(data="moons", steps=30, batch_size=64, checkpoint_every=30, log_every=10, n_data=2000)
    result = train(cfg, out, progress=False)
    save_file({k: v.contiguous() for k, v in result.net.state_dict().items()},
              os.path.join(dump, f"rank{os.environ['RANK']}.safetensors"))
    torch.distributed.destroy_process_group()
