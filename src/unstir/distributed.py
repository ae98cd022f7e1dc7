"""Work split across processes under ``torchrun``: sampling and scoring from per-sample seeds.

The scheme is EDM's (Karras et al. 2022, ``generate.py``): sample i draws all its noise from its own seed
(``SeedGenerators``), the samples are cut into batches and the batches dealt to the ranks in turn, and rank 0
gathers the results. A sample therefore does not depend on the number of processes or on the batch size (up
to float rounding of the batched network), so 1 process and 8 give the same samples. Training keeps its own
DDP scheme (``unstir.training``)."""

from __future__ import annotations

import datetime
import math
import os

import torch

from ._random import SeedGenerators, sample_seeds
from .resources import check_memory, sampling_bytes

Tensor = torch.Tensor

__all__ = ["SeedGenerators", "sample_seeds", "rank_world", "init", "shard", "gather", "sample_sharded",
           "likelihood_sharded"]


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> None:
    """Join the torchrun group. A collective that waits longer than UNSTIR_DIST_TIMEOUT seconds (default 120)
    for a lost rank fails instead of hanging (torchrun also stops the other ranks when one dies)."""
    if rank_world()[1] > 1 and not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("UNSTIR_DIST_TIMEOUT", 120)))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)


def shard(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """This rank's batches of the sample indices 0..n-1: the indices cut into a multiple of ``world`` batches of
    at most ``batch_size``, dealt to the ranks in turn (EDM's split: every rank gets the same number of batches)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if n < world:
        raise ValueError(f"-n {n} is smaller than the number of processes ({world}): every process needs at least "
                         f"one sample; ask for at least {world} or start fewer processes")
    batches = -(-n // (batch_size * world)) * world
    size, extra = divmod(n, batches)  # torch.tensor_split's cut: the first ``extra`` batches hold one more

    def start(i):
        return i * size + min(i, extra)

    return [range(start(i), start(i + 1)) for i in range(rank, batches, world) if start(i + 1) > start(i)]


def gather(local: list) -> list:
    """Every rank's list of items, concatenated in rank order, on every rank (one process: ``local``)."""
    rank, world = rank_world()
    if world == 1:
        return list(local)
    parts = [None] * world
    try:
        torch.distributed.all_gather_object(parts, local)
    except Exception as err:  # a rank that died or hangs: torchrun's report names it
        raise ConnectionError(f"rank {rank}: gathering the results of {world} processes failed, a process was lost "
                              f"(torchrun's report names it): {err}") from None
    return [item for part in parts for item in part]


def sample_sharded(model, n: int, *, seed: int = 0, batch_size: int = 256, device="cpu", y=None, progress=False,
                   **sample_options) -> tuple[Tensor, int]:
    """``n`` samples, sample i from seed ``sample_seeds(seed, n)[i]``, computed in this rank's batches and
    gathered on every rank: (x on the CPU in sample order, model evaluations per sample). ``sample_options``
    go to ``unstir.sample`` (sampler, steps, grid, afs, sampler options)."""
    from tqdm import tqdm

    from .samplers import sample

    rank, world = rank_world()
    mine = shard(n, batch_size, rank, world)
    shape = tuple(model.data_shape)
    check_memory(f"sampling {n:,} samples in batches of {batch_size:,}", device=device, batch=min(batch_size, n),
                 per_item=sampling_bytes(model, shape, device), fixed=2 * 4 * n * math.prod(shape))
    seeds = sample_seeds(seed, n)
    local, nfe, bar = [], 0, None
    for rows in mine:
        part = slice(rows.start, rows.stop)
        generators = SeedGenerators(seeds[part])
        x_T = model.process.prior_sample((len(rows), *model.data_shape), generators, device=device)
        r = sample(model, None, x_T, generator=generators, y=y[part] if isinstance(y, Tensor) and y.ndim else y,
                   **sample_options)
        local.append((rows.start, r.x.cpu()))
        nfe = r.nfe
        # The bar appears once the first batch has passed, so that a bad option or a model that fails at once
        # is reported as one line, without a bar before it.
        bar = bar or tqdm(total=len(mine), disable=not progress or rank != 0, unit="batch", desc="sampling")
        bar.update(1)
    bar is not None and bar.close()
    parts = sorted(gather(local), key=lambda p: p[0])
    return torch.cat([x for _, x in parts]), nfe


def likelihood_sharded(model, x: Tensor, *, seed: int = 0, batch_size: int = 100, device="cpu",
                       progress=False, **options):
    """``log_likelihood`` of the rows of ``x`` split across the ranks, row i's dequantisation noise and probes
    from its own seed; the per-sample results gathered on every rank, in row order (a ``LikelihoodResult``)."""
    import dataclasses

    from .likelihood import LikelihoodResult, log_likelihood

    rank, world = rank_world()
    seeds = sample_seeds(seed, x.shape[0])
    local = []
    y = options.pop("y", None)
    for rows in shard(x.shape[0], batch_size, rank, world):
        part = slice(rows.start, rows.stop)
        r = log_likelihood(model, x[part].to(device), y=y[part] if isinstance(y, Tensor) and y.ndim else y,
                           generator=SeedGenerators(seeds[part]), batch_size=len(rows),
                           progress=progress and rank == 0, **options)
        local.append((rows.start, r))
    parts = [r for _, r in sorted(gather(local), key=lambda p: p[0])]
    fields = {}
    for f in dataclasses.fields(LikelihoodResult):
        values = [getattr(r, f.name) for r in parts]
        if isinstance(values[0], Tensor):
            fields[f.name] = torch.cat([v.cpu() for v in values])
        elif f.name == "nfe":
            fields[f.name] = max(values)
        else:
            fields[f.name] = values[0]
    return LikelihoodResult(**fields)
