"""Random draws from one generator or from one generator per sample.

``SeedGenerators`` is EDM's stacked generator (Karras et al. 2022, the ``StackedRandomGenerator`` of their
``generate.py``): row i of every draw comes from sample i's own generator, so a sample's noise depends on its
seed alone, not on the batch it shares or the process that draws it. Every random draw in unstir goes through
``draw``, which takes either kind (or None, torch's global generator)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class SeedGenerators:
    """One CPU ``torch.Generator`` per sample, seeded by ``seeds``; draws land on the device asked for, so the
    noise is the same on a CPU and a GPU."""

    def __init__(self, seeds):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, rows: slice) -> "SeedGenerators":
        """The generators of a slice of the samples (the same objects: their streams go on)."""
        part = SeedGenerators([])
        part.seeds, part.generators = self.seeds[rows], self.generators[rows]
        return part

    def stack(self, fn, shape, device=None) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"a draw of shape {tuple(shape)} for {len(self.generators)} per-sample generators: the "
                             f"first dimension must be the number of samples")
        rows = [fn(tuple(shape[1:]), g) for g in self.generators]
        return torch.stack(rows).to(device) if rows else fn(tuple(shape), None).to(device)


def draw(fn, shape, generator, device=None) -> Tensor:
    """``fn(shape, generator)`` (a CPU draw) for a torch.Generator or None; row by row for ``SeedGenerators``."""
    if isinstance(generator, SeedGenerators):
        return generator.stack(fn, shape, device)
    return fn(tuple(shape), generator).to(device)


def randn(shape, generator, dtype=torch.float32, device=None) -> Tensor:
    """Standard normal noise on ``device``, drawn where the generator lives: a CPU generator (or a
    ``SeedGenerators``) draws on the CPU and the draw is moved, so the noise is the CPU's on every device (as
    diffusers' ``randn_tensor`` and EDM do); a generator of ``device`` draws there; None uses torch's global
    generator of ``device``."""
    if isinstance(generator, SeedGenerators):
        return draw(lambda s, g: torch.randn(s, generator=g, dtype=dtype), shape, generator, device)
    where = device if generator is None else generator.device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=where).to(device)


SEED_BITS = 20  # torch's CPU generator keeps 32 bits of a seed: 12 for the run seed, 20 for the sample index


def sample_seeds(seed: int, n: int) -> list:
    """The per-sample seeds of ``n`` samples for the run seed ``seed``: seed * 2^20 + i. Sample i is the same for
    any n, and two run seeds never share a sample (torch's CPU generator uses 32 bits of a seed, hence the limits:
    seed < 4096, n <= 2^20)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** (32 - SEED_BITS):
        raise ValueError(f"seed must be an integer in [0, {2 ** (32 - SEED_BITS)}) for per-sample seeds, got {seed!r}")
    if n > 2**SEED_BITS:
        raise ValueError(f"at most {2**SEED_BITS} samples per seed, got {n}; draw more under another seed")
    return [(seed << SEED_BITS) + i for i in range(n)]
