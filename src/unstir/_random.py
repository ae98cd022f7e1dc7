"""Random draws from one generator or from one generator per sample.

``SeedGenerators`` is EDM's stacked generator (Karras et al. 2022, the ``StackedRandomGenerator`` of their
``generate.py``): row i of every draw comes from sample i's own generator, so a sample's noise depends on its
seed alone, not on the batch it shares or the process that draws it. Every random draw in unstir goes through
``draw``, which takes either kind (or None, torch's global generator)."""

from __future__ import annotations

import math

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


_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit constant as torch's int64 holds it (two's complement)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2, _NODE, _ELEM = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                                                0x94D049BB133111EB, 0xD1B54A32D192ED03,
                                                                0xABC98388FB8FAC03))


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of 64-bit words whose outputs pass BigCrush
    for consecutive inputs. int64 products wrap modulo 2^64 on every torch device."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


class BrownianNoise:
    """A Brownian path W(u) on u = t / T in [0, 1], fixed by the generator once, queried at any times:
    ``noise(t, s) = (W(t) - W(s)) / sqrt(|t - s| / T)`` is N(0, I), independent over disjoint intervals, and
    the path does not depend on which times are asked for. So an SDE solver run on a finer grid follows the
    same Brownian path (it converges pathwise as the grid is refined; a fresh draw per step would give
    another sample at every grid), which is what k-diffusion's ``BrownianTreeNoiseSampler`` (torchsde) gives.

    Construction: Levy's Brownian bridge over the dyadic tree of depth ``LEVELS``. W(0) = 0, W(1) ~ N(0, I),
    and the midpoint m of a node [a, b] is W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) z_node. A query time
    is rounded to the nearest multiple of 2^-LEVELS (2.3e-10 of T: the cubic grid puts points 1e-7 apart near t = 0.001), and W there is the descent from the root
    (the last descent is kept, so a sampler's consecutive times share most of it). z_node is computed, not
    drawn: a counter-based normal (SplitMix64 of (sample seed, node, element), Box-Muller on its two 32-bit halves), so each sample's
    path is a function of its seed alone, vectorised over the batch, and the same on every device up to the
    float64 rounding of log and cos. The seeds are drawn from ``generator`` (one per sample for
    ``SeedGenerators``, one for the batch otherwise), so a generator gives the same path every time it is
    seeded the same way."""

    LEVELS = 32

    def __init__(self, x: Tensor, generator, T: float):
        batch = x.shape[0]
        seeds = draw(lambda s, g: torch.randint(-(1 << 62), 1 << 62, s, generator=g), (batch,), generator)
        self.seeds = _mix(seeds.to(x.device)).reshape(-1, 1)
        self.element = (torch.arange(x[0].numel(), device=x.device) * _ELEM).reshape(1, -1)
        self.shape, self.dtype, self.T = x.shape, x.dtype, float(T)
        self.last: dict[int, Tensor] = {}

    def _normal(self, node: int) -> Tensor:
        base = self.seeds + self.element + _signed(node * _NODE & _MASK64)
        bits = _mix(base)  # two 32-bit uniforms from one 64-bit word: tails to 6.6 sd
        u1, u2 = ((w.double() + 0.5) * 2.0**-32 for w in (_shr(bits, 32), bits & 0xFFFFFFFF))
        return (-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)

    def _index(self, t: float) -> int:
        if not 0.0 <= t <= self.T:
            raise ValueError(f"the Brownian path is defined on [0, {self.T:g}], got time {t!r}")
        return round(t / self.T * (1 << self.LEVELS))

    def path(self, t: float) -> Tensor:
        """W at t (float64, shape (batch, numel))."""
        k, top = self._index(t), 1 << self.LEVELS
        seen = {0: self.last.get(0), top: self.last.get(top)}
        if seen[0] is None:
            seen[0] = torch.zeros(self.seeds.shape[0], self.element.shape[1], dtype=torch.float64,
                                  device=self.seeds.device)
            seen[top] = self._normal(0)  # node 0 is the end point, node n >= 1 the midpoint of heap node n
        lo, hi, node = 0, top, 1
        while k not in (lo, hi):
            mid = (lo + hi) // 2
            seen[mid] = self.last[mid] if mid in self.last else \
                0.5 * (seen[lo] + seen[hi]) + math.sqrt((hi - lo) / top / 4) * self._normal(node)
            lo, hi, node = (lo, mid, 2 * node) if k < mid else (mid, hi, 2 * node + 1)
        self.last = seen
        return seen[k]

    def __call__(self, t: float, s: float) -> Tensor:
        """The normalised increment (W(t) - W(s)) / sqrt(|t - s| / T), shaped like the state."""
        kt, ks = self._index(t), self._index(s)
        if kt == ks:
            raise ValueError(f"times {t!r} and {s!r} are closer than T / 2^{self.LEVELS}: the Brownian path "
                             f"cannot resolve them")
        dw = self.path(t) - self.path(s)
        return (dw / math.sqrt(abs(kt - ks) / (1 << self.LEVELS))).to(self.dtype).reshape(self.shape)
