"""Analytical teleportation: the high-noise part of the PF ODE solved in closed form (Wang & Vastola 2024,
"The unreasonable effectiveness of Gaussian score approximation for diffusion models and its
applications", arXiv:2412.09726: their "analytical teleportation").

At high noise the score of p_t is close to that of the Gaussian with the data's mean m and covariance C.
For Gaussian data N(m, C) every marginal is p_t = N(alpha_t m, alpha_t^2 C + sigma_t^2 I), and its PF ODE
has a closed-form flow. Write C = U diag(l) U^T. The ODE's drift f(t) x and its score term both act
separately on each eigen-coordinate y_k = u_k^T (x - alpha_t m), so each y_k stays 1-D Gaussian with
variance v_k(t) = alpha_t^2 l_k + sigma_t^2. In one dimension the PF-ODE flow is the unique increasing map
between the marginals, the affine one, so from time s to time t

    x_t = alpha_t m + U diag(sqrt(v(t) / v(s))) U^T (x_s - alpha_s m)

(the Gaussian model's closed-form trajectory, written here in alpha/sigma form so that it holds for VP,
sub-VP, VE, rectified flow and DDPM alike). ``Moments.flow`` is this map; ``sample(..., teleport=moments)`` uses
it to carry x_T from T to the grid's first point, at no model evaluation, and the sampler takes over there.

Where this differs from the paper: they skip a fixed share of the steps; here where to land is chosen per
model by ``pilot_grid(..., teleport=moments)`` (its dynamic programming weighs the teleport's distance to
the pilot teacher at each candidate time against the steps it saves). The moments come from the training
data (the paper's choice), not from the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .processes import Process, coefficients

Tensor = torch.Tensor


@dataclass(frozen=True)
class Moments:
    """The data's mean (d,) and covariance (d, d), flattened over the per-sample shape, in float64, with
    the covariance's eigendecomposition (computed once, on first use; at once for d <= 1024)."""

    mean: Tensor
    cov: Tensor

    def __post_init__(self):
        mean, cov = torch.as_tensor(self.mean, dtype=torch.float64), torch.as_tensor(self.cov, dtype=torch.float64)
        d = mean.numel()
        if mean.ndim != 1 or cov.shape != (d, d):
            raise ValueError(f"moments need a mean of shape (d,) and a covariance of shape (d, d), got "
                             f"{tuple(mean.shape)} and {tuple(cov.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("moments contain NaN or inf")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", (cov + cov.T) / 2)
        object.__setattr__(self, "_eig", None)
        if d <= 1024:  # cheap: check now (larger ones are checked by the first flow or by pilot_grid before work)
            self.eig()

    def eig(self) -> tuple[Tensor, Tensor]:
        """The covariance's eigenvalues (clamped at 0) and eigenvectors, computed once; refuses a covariance
        that is not positive semi-definite. (A 3072 x 3072 covariance takes seconds on a CPU.)"""
        if self._eig is None:
            evals, evecs = torch.linalg.eigh(self.cov)
            # A covariance of fewer samples than dimensions is singular; formed (or stored) in float32 its zero
            # eigenvalues come out as +-(d x float32's epsilon) x the largest. Only more negative ones are refused.
            if evals.min() < -max(1e-8, self.dim * 2.0 ** -23) * max(1.0, evals.max().item()):
                raise ValueError(f"the covariance is not positive semi-definite: smallest eigenvalue "
                                 f"{evals.min().item():.3g}")
            object.__setattr__(self, "_eig", (evals.clamp_min(0.0), evecs))
        return self._eig

    @classmethod
    def of(cls, x: Tensor) -> "Moments":
        """The sample mean and (unbiased) covariance of data ``x`` of shape (n, *data_shape), n >= 2 (the
        centred product in x's precision, float32 for images: 3 s for 20,000 32x32 colour images on 2 cores)."""
        x = torch.as_tensor(x).flatten(1)
        if x.shape[0] < 2:
            raise ValueError(f"moments need at least 2 samples, got {x.shape[0]}")
        mean = x.to(torch.float64).mean(0)
        centred = x - mean.to(x.dtype)
        return cls(mean, (centred.T @ centred).to(torch.float64) / (x.shape[0] - 1))

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def flow(self, process: Process, x: Tensor, s: float, t: float) -> Tensor:
        """The exact PF-ODE flow of the Gaussian N(mean, cov) from time ``s`` to time ``t`` applied to ``x``
        (batch, *data_shape); the result has ``x``'s dtype and device."""
        flat = x.flatten(1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} values per sample, the moments {self.dim}")
        cs, ct = coefficients(process, float(s)), coefficients(process, float(t))
        evals, evecs = (v.to(x.device) for v in self.eig())
        mean = self.mean.to(x.device)
        scale = ((ct.alpha ** 2 * evals + ct.sigma ** 2) / (cs.alpha ** 2 * evals + cs.sigma ** 2)).sqrt()
        y = ((flat.to(torch.float64) - cs.alpha * mean) @ evecs) * scale
        return (ct.alpha * mean + y @ evecs.T).to(x.dtype).reshape(x.shape)


class GaussianReference:
    """The reference Gaussian N(m, C), C = U diag(l) U^T, of ``moments`` on ``device``, in the coordinates in which
    its PF-ODE flow is a scaling per direction: the likelihood's solve is taken relative to it
    (``unstir.likelihood``) and ``deis_gauss`` integrates around it. Isotropic N(0, I) without moments: then
    U = I and no rotation is done."""

    def __init__(self, moments, d, device):
        if moments is None:
            self.mean, self.evals, self.evecs = None, torch.ones(d, dtype=torch.float64, device=device), None
        else:  # checked against d by log_likelihood
            evals, evecs = moments.eig()
            self.mean, self.evals, self.evecs = (v.to(device) for v in (moments.mean, evals, evecs))

    def scale(self, rho: Tensor) -> Tensor:
        """s_k = sqrt(l_k + rho^2), shape (batch, d), rho = sigma/alpha of shape (batch,)."""
        return (self.evals + rho[:, None] ** 2).sqrt()

    def rotate(self, v: Tensor) -> Tensor:  # U^T v for rows v
        return v if self.evecs is None else v @ self.evecs

    def unrotate(self, z: Tensor) -> Tensor:  # U z for rows z
        return z if self.evecs is None else z @ self.evecs.T

    def whiten(self, xbar: Tensor, rho: Tensor) -> Tensor:
        """w = U^T (xbar - m) / s(rho), rows."""
        return self.rotate(xbar if self.mean is None else xbar - self.mean) / self.scale(rho)

    def unwhiten(self, w: Tensor, rho: Tensor) -> Tensor:
        z = self.unrotate(self.scale(rho) * w)
        return z if self.mean is None else z + self.mean
