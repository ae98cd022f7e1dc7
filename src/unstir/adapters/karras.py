"""k-diffusion's denoiser convention (Karras et al. 2022): D(x, sigma) -> x0 on the variance-exploding
path x = x0 + sigma n. Every unstir process is that path in its scaled coordinates xbar = x / alpha,
sigma = sigma_t / alpha_t (the PF ODE d xbar / d sbar = eps is process-free), so the two conventions
convert exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..parametrization import Denoiser
from ..processes import VE

Tensor = torch.Tensor


class KarrasDenoiser:
    """An unstir model seen as D(x, sigma) (k-diffusion's ``model(x, sigma, **extra_args)``).

    ``sigma`` is a scalar or a (batch,) tensor of noise levels sigma_t / alpha_t inside
    [``sigma_min``, ``sigma_max``]; ``y`` is passed on as class labels."""

    def __init__(self, model):
        self.model, self.process = model, model.process
        self.sigma_min = math.exp(-self.process.log_snr(self.process.t_min).item())
        self.sigma_max = math.exp(-self.process.log_snr(self.process.T).item())

    def __call__(self, x: Tensor, sigma, y: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        t = self.process.t_from_log_snr(-torch.log(sigma))
        alpha = self.process.alpha(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.model(alpha * x, t, y).x0


def to_karras(model) -> KarrasDenoiser:
    """An unstir model as a k-diffusion-style denoiser D(x, sigma)."""
    return KarrasDenoiser(model)


def from_karras(denoiser: Callable[..., Tensor], sigma_min: float, sigma_max: float, *,
                data_shape: tuple[int, ...] | None = None, num_classes: int = 0) -> Denoiser:
    """A denoiser D(x, sigma) -> x0 (k-diffusion's convention) as an unstir model on the VE process with the
    same noise range; class labels go to ``denoiser(x, sigma, y)``."""
    process = VE(sigma_min=sigma_min, sigma_max=sigma_max)

    def net(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        sigma = process.sigma(t).to(x.dtype)
        return denoiser(x, sigma) if y is None else denoiser(x, sigma, y)

    net.__wrapped__ = denoiser  # so unstir.parametrization.model_device finds the denoiser's device
    return Denoiser(net, process, "x0", time_dtype=torch.float64, data_shape=data_shape, num_classes=num_classes)
