"""The probability-flow ODE (Song et al. 2021, eq. 13) as a vector field, with its divergence.

In t the field is dx/dt = f(x, t) - 1/2 g(t)^2 score = ``ModelOutput.velocity``. The adaptive solvers use
it in log-SNR time lambda = log(alpha/sigma) and scaled state xbar = x / alpha, where it reads

    d xbar / d lambda = -sbar eps(alpha xbar, t(lambda)),      sbar = sigma / alpha = e^{-lambda},

which is as smooth as the data allows on every process, the discrete DDPM schedule included (its
coefficients have kinks in t at every integer step, none in lambda). Its divergence in xbar is
-sigma div_x eps (x = alpha xbar), which the likelihood integrates.

``divergence`` computes div_x of a sample-wise map exactly (one batched vector-Jacobian product over the d
basis vectors, ``torch.autograd.grad(is_grads_batched=True)``, i.e. vmap) or by Hutchinson-Skilling probes.
"""

from __future__ import annotations

import torch

from ._random import draw
from .processes import coefficients

Tensor = torch.Tensor


class LogSNRField:
    """d xbar / d lambda of the PF ODE for ``model`` (labels ``y`` bound); state and time in float64, the
    model evaluated in ``dtype``. ``nfe`` counts evaluations."""

    def __init__(self, model, dtype: torch.dtype, y: Tensor | None = None, bar=None, span=None):
        self.model, self.process, self.dtype, self.y, self.nfe = model, model.process, dtype, y, 0
        self.bar, self.span = bar, span  # an optional tqdm bar over the log-SNR interval ``span``

    def time(self, lam: Tensor) -> float:
        return self.process.t_from_log_snr(lam).item()

    def __call__(self, lam: Tensor, xbar: Tensor) -> Tensor:
        t = self.time(lam)
        c = coefficients(self.process, t)
        self.nfe += 1
        if self.bar is not None:
            done = round(1000 * (lam.item() - self.span[0]) / (self.span[1] - self.span[0]))
            if done > self.bar.n:
                self.bar.set_postfix(nfe=self.nfe, refresh=False)
                self.bar.update(done - self.bar.n)
        eps = self.model((c.alpha * xbar).to(self.dtype), t, self.y).eps.to(torch.float64)
        if not torch.isfinite(eps).all():  # an adaptive solver reads its error norm back anyway: no extra stall
            raise FloatingPointError(f"the model's output is NaN or inf at t = {t:.6g} in the adaptive solve "
                                     f"(garbled weights?)")
        return -c.sigma_bar * eps


def divergence(fn, x: Tensor, probes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(fn(x), div_x fn) for a sample-wise map fn: (B, *shape) -> (B, *shape).

    With ``probes`` None the divergence is exact, shape (B,): the rows e_i^T J of every sample's Jacobian come
    from one batched backward pass over the d basis vectors. With ``probes`` of shape (K, B, *shape)
    (Rademacher or Gaussian, E[v v^T] = I) it is Hutchinson-Skilling's estimate per probe, shape (B, K):
    v^T J v, unbiased for the trace. fn must treat samples independently (no batch statistics)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        if not out.requires_grad:
            raise ValueError("the divergence needs fn(x) as a differentiable function of x, but its output is "
                             "detached from its input (no gradient flows through it)")
        if probes is None:
            batch, d = x.shape[0], x[0].numel()
            basis = torch.eye(d, dtype=out.dtype, device=out.device).reshape(d, 1, *x.shape[1:])
            rows = _vjps(out, x, basis.expand(d, *x.shape))
            div = rows.reshape(d, batch, d).diagonal(dim1=0, dim2=2).sum(-1)
        else:
            vjp = _vjps(out, x, probes.to(out.dtype))
            div = (vjp * probes).flatten(2).sum(-1).T
    return out.detach(), div.detach()


def _vjps(out: Tensor, x: Tensor, vs: Tensor) -> Tensor:
    """v^T d out / d x for each v in ``vs`` (K, *x.shape): one vmapped backward pass, or, for a network whose
    backward vmap cannot batch (diffusers' UNet2DModel queries a memory format inside it), one pass per v."""
    try:
        return torch.autograd.grad(out, x, vs, is_grads_batched=True, retain_graph=True)[0]
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
    return torch.stack([torch.autograd.grad(out, x, v, retain_graph=True)[0] for v in vs])


def draw_probes(kind: str, k: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """k probe vectors per sample, shape (k, *x.shape): 'rademacher' (+-1) or 'gaussian' (N(0, I)). They are
    drawn sample by sample, so a sample's probes do not depend on the size of the batch after it, on the
    generator's device, and land on x's."""
    shape = (x.shape[0], k, *x.shape[1:])
    if kind == "rademacher":
        v = draw(lambda s, g: torch.randint(0, 2, s, generator=g), shape, generator, x.device).to(x.dtype).mul_(2).sub_(1)
    else:
        v = draw(lambda s, g: torch.randn(s, generator=g, dtype=x.dtype), shape, generator, x.device)
    return v.transpose(0, 1)
