"""Model outputs: eps, x0, v and score are one thing in four coordinates.

With x = alpha x0 + sigma eps (any process, VP or not):

    score = -eps / sigma                        (Tweedie; reference text 000, section 2)
    x0    = (x - sigma eps) / alpha
    v     = alpha eps - sigma x0                (Salimans & Ho 2022)
    eps   = (alpha v + sigma x) / (alpha^2 + sigma^2)

A network predicts one of them; ``Denoiser`` wraps it and exposes all four. Samplers, losses and
likelihoods talk to a ``Denoiser`` (or anything with the same call), never to the raw network.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable

import torch

from ._checks import check_choice, expand_as
from .processes import DDPM, Process, coefficients

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v", "score")


def to_eps(kind: str, pred: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Convert a prediction of type ``kind`` to eps. alpha and sigma broadcast against x."""
    if kind == "eps":
        return pred
    if kind == "x0":
        return (x - alpha * pred) / sigma
    if kind == "v":
        return (alpha * pred + sigma * x) / (alpha**2 + sigma**2)
    if kind == "score":
        return -sigma * pred
    check_choice("prediction", kind, PREDICTIONS)


def from_eps(kind: str, eps: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Convert eps to a prediction of type ``kind``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return (x - sigma * eps) / alpha
    if kind == "v":
        return alpha * eps - sigma * (x - sigma * eps) / alpha
    if kind == "score":
        return -eps / sigma
    check_choice("prediction", kind, PREDICTIONS)


def convert(pred: Tensor, src: str, dst: str, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Convert a prediction from type ``src`` to type ``dst``."""
    check_choice("prediction", src, PREDICTIONS)
    check_choice("prediction", dst, PREDICTIONS)
    if src == dst:
        return pred
    return from_eps(dst, to_eps(src, pred, x, alpha, sigma), x, alpha, sigma)


class ModelOutput:
    """What the model says about x at time t, in every parametrization (computed on demand)."""

    def __init__(self, x: Tensor, t, alpha: Tensor, sigma: Tensor, pred: Tensor, kind: str):
        self.x, self.t, self.alpha, self.sigma = x, t, alpha, sigma
        self.pred, self.kind = pred, kind

    def _get(self, kind: str) -> Tensor:
        if kind == self.kind:
            return self.pred
        return from_eps(kind, self.eps, self.x, self.alpha, self.sigma)

    @cached_property
    def eps(self) -> Tensor:
        return to_eps(self.kind, self.pred, self.x, self.alpha, self.sigma)

    @cached_property
    def x0(self) -> Tensor:
        return self._get("x0")

    @cached_property
    def score(self) -> Tensor:
        return self._get("score")

    @cached_property
    def v(self) -> Tensor:
        return self._get("v")


class Denoiser:
    """Wrap ``net(x, t_input) -> prediction`` for a process.

    ``prediction`` names what the network outputs (eps, x0, v or score). The network receives t as a
    tensor of shape (batch,) in x's dtype (or ``time_dtype``): continuous t, or, with ``discrete_labels=True`` on a DDPM
    process, the integer timestep label (t N - 1).
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], process: Process, prediction: str = "eps",
                 *, discrete_labels: bool = False, time_dtype: torch.dtype | None = None):
        check_choice("prediction", prediction, PREDICTIONS)
        if discrete_labels and not isinstance(process, DDPM):
            raise ValueError(f"discrete_labels=True needs a 'ddpm' process, got {process.name!r}")
        self.net, self.process, self.prediction = net, process, prediction
        self.discrete_labels = discrete_labels
        self.time_dtype = time_dtype  # None: the network gets t in x's dtype
        self.data_shape: tuple[int, ...] | None = None  # set when known, so samplers can check x_T

    def __call__(self, x: Tensor, t, y: Tensor | None = None) -> ModelOutput:
        """The model's outputs at (x, t); t is a Python float (one time for the batch) or a tensor (batch,).
        ``y`` (class labels) is passed on to networks that take it."""
        if isinstance(t, float):
            c = coefficients(self.process, t)
            alpha, sigma = c.alpha, c.sigma
            label = t * self.process.num_steps - 1 if self.discrete_labels else t
            t_in = torch.full((x.shape[0],), label, dtype=self.time_dtype or x.dtype, device=x.device)
        else:
            alpha, sigma = expand_as(self.process.alpha(t), x), expand_as(self.process.sigma(t), x)
            t_in = self.process.timestep(t) if self.discrete_labels else torch.as_tensor(t, dtype=torch.float64)
            t_in = t_in.to(dtype=self.time_dtype or x.dtype, device=x.device).expand(x.shape[0])
        pred = self.net(x, t_in) if y is None else self.net(x, t_in, y)
        return ModelOutput(x, t, alpha, sigma, pred, self.prediction)
