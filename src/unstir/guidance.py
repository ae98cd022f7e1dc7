"""Conditioning as a model-to-model wrapper: every sampler, the likelihood and the encoder use it unchanged.

Bayes' rule for scores (Song et al. 2021, eq. 48): grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x).

* ``guided(model, classifier, y, scale)``: classifier guidance (Dhariwal & Nichol 2021),
  score + scale * grad_x log p_t(y | x). ``scale = 1`` is Bayes' rule: with the exact classifier the guided
  model is the exact class-conditional model (tests/test_guidance.py).
* ``cfg(model, y, scale)``: classifier-free guidance (Ho & Salimans 2022),
  eps = eps(x, t) + s (eps(x, t, y) - eps(x, t)). **Scale convention**: this s is the diffusers / Imagen
  ``guidance_scale``: s = 0 is the unconditional model, s = 1 the conditional model, s > 1 extrapolates.
  Ho & Salimans write eps = (1 + w) eps(x, y) - w eps(x), so their w = s - 1 (their w = 0 is our s = 1).

The wrappers follow the ``unstir.Model`` protocol. Labels come from the wrapper (``y`` given at
construction) or, when it was built with ``y=None``, from each call (``unstir.sample(..., y=labels)``).
"""

from __future__ import annotations

import math

import torch

from .parametrization import ModelOutput

Tensor = torch.Tensor


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the guidance scale must be a finite number, got {scale!r}")
    return float(scale)


class _Wrapper:
    """Shared plumbing of the guidance wrappers: the Model protocol and the labels."""

    def __init__(self, model, y, num_classes: int):
        from .samplers import check_labels

        self.model, self.process, self.data_shape = model, model.process, getattr(model, "data_shape", None)
        self.num_classes = num_classes
        self._y = y
        self._check_labels = check_labels
        if y is not None:
            check_labels(self, y, 1 if isinstance(y, int) or (isinstance(y, torch.Tensor) and y.ndim == 0) else len(y))

    def labels(self, x: Tensor, y) -> Tensor:
        y = self._y if y is None else y
        if y is None:
            raise ValueError("guidance needs class labels: give y to the wrapper or to unstir.sample(..., y=...)")
        return self._check_labels(self, y, x.shape[0], x.device)


class ClassifierGuided(_Wrapper):
    """score + scale * grad_x log p_t(y | x); see ``guided``."""

    def __init__(self, model, classifier, y, scale: float):
        super().__init__(model, y, int(classifier.num_classes))
        self.classifier, self.scale = classifier, _check_scale(scale)

    def __call__(self, x: Tensor, t, y: Tensor | None = None) -> ModelOutput:
        labels = self.labels(x, y)
        out = self.model(x, t)
        grad = class_log_prob_grad(self.classifier, x, t, labels)
        # eps = -sigma score, so adding scale * grad to the score subtracts sigma * scale * grad from eps.
        eps = out.eps - (self.scale * out.c.sigma) * grad.to(out.eps.dtype)
        return ModelOutput(x, t, out.c, eps, "eps")


def keeps_graph(x: Tensor) -> bool:
    """Whether the caller differentiates through this evaluation (the likelihood's divergence, a gradient
    of a guided x0): then a wrapper's own gradient must stay in the graph (``create_graph``), or the caller
    sees that term as a constant of x and gets a wrong divergence."""
    return torch.is_grad_enabled() and x.requires_grad


def class_log_prob_grad(classifier, x: Tensor, t, labels: Tensor) -> Tensor:
    """grad_x log p_t(y | x) of a classifier, per sample; differentiable in x when ``keeps_graph(x)``."""
    differentiate = keeps_graph(x)
    with torch.enable_grad():
        xg = x if differentiate else x.detach().requires_grad_(True)
        logp = torch.log_softmax(classifier(xg, t), dim=1)
        return torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), xg, create_graph=differentiate)[0]


class ClassifierFree(_Wrapper):
    """eps_uncond + s (eps_cond - eps_uncond); see ``cfg``."""

    def __init__(self, model, y, scale: float):
        if not getattr(model, "num_classes", 0):
            raise ValueError("classifier-free guidance needs a model with a class input (num_classes > 0); this "
                             "model has none")
        super().__init__(model, y, model.num_classes)
        self.scale = _check_scale(scale)

    def __call__(self, x: Tensor, t, y: Tensor | None = None) -> ModelOutput:
        labels = self.labels(x, y)
        uncond = self.model(x, t)
        if self.scale == 0.0:
            return uncond
        cond = self.model(x, t, labels)
        if self.scale == 1.0:
            return cond
        return ModelOutput(x, t, cond.c, torch.lerp(uncond.eps, cond.eps, self.scale), "eps")


class NoiseClassifier:
    """A trained noise-conditional classifier ``net(x, t_input) -> logits`` for a process: called as
    ``classifier(x, t)`` with t a float or a (batch,) tensor, like a model."""

    def __init__(self, net, process, num_classes: int, data_shape: tuple[int, ...] | None = None):
        self.net, self.process, self.num_classes = net, process, int(num_classes)
        self.data_shape = None if data_shape is None else tuple(data_shape)

    def __call__(self, x: Tensor, t) -> Tensor:
        t_in = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.net(x, t_in)


def guided(model, classifier, y: Tensor | int | None = None, scale: float = 1.0) -> ClassifierGuided:
    """Classifier guidance: a model whose score is ``model``'s plus ``scale`` times grad_x log p_t(y | x).

    ``classifier(x, t)`` returns class logits (or log-probabilities) of the noised x, shape (batch, classes),
    and has ``num_classes``; it must be differentiable in x. ``model`` is called without labels."""
    if not hasattr(classifier, "num_classes"):
        raise TypeError("the classifier needs a num_classes attribute and a call classifier(x, t) -> logits")
    cp = getattr(classifier, "process", None)
    if cp is not None and cp.config() != model.process.config():
        raise ValueError(f"the classifier was trained on process {cp!r}, the model runs on {model.process!r}: its "
                         f"log p_t(y | x) belongs to other noise levels")
    shape, model_shape = getattr(classifier, "data_shape", None), getattr(model, "data_shape", None)
    if shape is not None and model_shape is not None and tuple(shape) != tuple(model_shape):
        raise ValueError(f"the classifier takes data of shape {tuple(shape)}, the model's data have shape "
                         f"{tuple(model_shape)}")
    return ClassifierGuided(model, classifier, y, scale)


def cfg(model, y: Tensor | int | None = None, scale: float = 1.0) -> ClassifierFree:
    """Classifier-free guidance with the diffusers/Imagen scale s (module docstring): s = 0 unconditional,
    s = 1 conditional; Ho & Salimans' w is s - 1. ``model`` must take class labels and, called without
    them, give its unconditional (null-label) prediction."""
    return ClassifierFree(model, y, scale)
