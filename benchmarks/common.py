"""Shared pieces of the benchmarks: oracle cases, reference solves and distances."""

from __future__ import annotations

import torch

import unstir
from unstir import oracle
from unstir.metrics import mode_weights, sliced_w2, two_sample_floor  # noqa: F401  (re-exported)


def cases():
    """Oracle cases: (name, mixture)."""
    return [("ring8", oracle.ring()), ("unequal3", oracle.unequal_2d()), ("mix8d", oracle.random_mixture(8, 4, seed=0))]


def reference(model, process, x_T, rtol=1e-9):
    """A tight adaptive solve of the PF ODE from T to t_min, then the denoising step: the limit every
    deterministic sampler converges to on a grid that ends at t_min and 0."""
    grid = torch.tensor([process.T, process.t_min, 0.0], dtype=torch.float64)
    return unstir.sample(model, process, x_T, sampler="ode_rk45", grid=grid, rtol=rtol, atol=rtol).x


def endpoint_error(x, ref) -> float:
    """Mean Euclidean distance to the reference endpoints."""
    return (x.double() - ref.double()).norm(dim=1).mean().item()


def mode_weight_error(gm, x) -> float:
    return (mode_weights(gm, x) - gm.weights).abs().max().item()
