"""Conditioning as a model-to-model wrapper: every sampler, the likelihood and the encoder use it unchanged.

Bayes' rule for scores (Song et al. 2021, eq. 48): grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x).

* ``guided(model, classifier, y, scale)``: classifier guidance (Dhariwal & Nichol 2021),
  score + scale * grad_x log p_t(y | x). ``scale = 1`` is Bayes' rule: with the exact classifier the guided
  model is the exact class-conditional model (tests/test_guidance.py).
* ``autoguidance(model, guide, y, scale)``: the same mix with a weaker model as the guide (Karras et al. 2024).
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
    """The guided mix weak + s (strong - weak) of ``cfg`` and ``autoguidance``, with the high-scale options; see
    ``cfg``. ``guide`` None: weak is the model without labels (CFG); else weak is ``guide`` with the same labels
    (autoguidance)."""

    def __init__(self, model, y, scale: float, *, guide=None, interval=None, rescale: float = 0.0, apg=None):
        labelled = bool(getattr(model, "num_classes", 0))
        if guide is None and not labelled:
            raise ValueError("classifier-free guidance needs a model with a class input (num_classes > 0); this "
                             "model has none")
        super().__init__(model, y, model.num_classes if labelled else 0)
        self.scale, self.guide, self.labelled = _check_scale(scale), guide, labelled
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not 0 <= lo < hi:
                raise ValueError(f"the guidance interval must be (lo, hi) noise levels sigma/alpha with 0 <= lo < hi, "
                                 f"got {tuple(interval)!r}")
            interval = (lo, hi)
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
            raise ValueError(f"rescale (CFG rescale's phi) must be in [0, 1], got {rescale!r}")
        self.interval, self.rescale = interval, float(rescale)
        self.apg = None if apg is None else _check_apg(apg)
        self._momentum, self._last_t = None, None

    def _inside(self, out) -> Tensor | bool:
        """Whether each sample's noise level sigma/alpha lies in the interval (lo, hi] (True without one)."""
        if self.interval is None:
            return True
        sbar = torch.as_tensor(out.c.sigma / out.c.alpha, dtype=torch.float64)
        inside = (sbar > self.interval[0]) & (sbar <= self.interval[1])
        return bool(inside) if inside.ndim == 0 or inside.numel() == 1 else inside.reshape(-1, *[1] * (out.x.ndim - 1))

    def __call__(self, x: Tensor, t, y: Tensor | None = None) -> ModelOutput:
        labels = self.labels(x, y) if self.labelled else None
        cond = self.model(x, t, labels) if self.labelled else self.model(x, t)
        inside = self._inside(cond)
        if self.scale == 1.0 or inside is False:
            return cond
        weak = self.model(x, t) if self.guide is None else (self.guide(x, t, labels) if self.labelled
                                                              else self.guide(x, t))
        if self.scale == 0.0 and self.interval is None:
            return weak
        if self.apg is not None:
            x0 = self._apg(cond.x0, weak.x0, t)
            eps = (x - cond.c.alpha * x0) / cond.c.sigma
        else:
            eps = torch.lerp(weak.eps, cond.eps, self.scale)
        if self.rescale:
            dims = tuple(range(1, x.ndim))
            factor = cond.eps.std(dims, keepdim=True) / eps.std(dims, keepdim=True).clamp_min(1e-30)
            eps = eps * (self.rescale * factor + (1 - self.rescale))
        if inside is not True:
            eps = torch.where(inside, eps, cond.eps)
        return ModelOutput(x, t, cond.c, eps, "eps")

    def _apg(self, strong: Tensor, weak: Tensor, t) -> Tensor:
        """Adaptive projected guidance on the x0 predictions (Sadat et al. 2024, Alg. 1)."""
        eta, momentum, threshold = self.apg["eta"], self.apg["momentum"], self.apg["norm_threshold"]
        diff = strong - weak
        if momentum:
            t_now = float(torch.as_tensor(t).max())
            if self._last_t is None or t_now > self._last_t or self._momentum is None \
                    or self._momentum.shape != diff.shape:  # a new sampling pass starts at the top
                self._momentum = torch.zeros_like(diff)
            self._momentum = diff + momentum * self._momentum
            self._last_t, diff = t_now, self._momentum
        dims = tuple(range(1, diff.ndim))
        if threshold > 0:
            diff = diff * (threshold / torch.linalg.vector_norm(diff, dim=dims, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
        unit = strong / torch.linalg.vector_norm(strong, dim=dims, keepdim=True).clamp_min(1e-30)
        parallel = (diff * unit).sum(dims, keepdim=True) * unit
        return strong + (self.scale - 1) * ((diff - parallel) + eta * parallel)


def _check_apg(apg) -> dict:
    allowed = {"eta": 0.0, "momentum": 0.0, "norm_threshold": 0.0}
    if apg is True:
        return allowed
    if not isinstance(apg, dict) or set(apg) - set(allowed):
        raise ValueError(f"apg must be True or a dict with keys among {sorted(allowed)}, got {apg!r}")
    out = allowed | {k: float(v) for k, v in apg.items()}
    if not -1 < out["momentum"] <= 0 or out["norm_threshold"] < 0 or not math.isfinite(out["eta"]):
        raise ValueError(f"apg needs momentum in (-1, 0] (the paper's beta < 0), norm_threshold >= 0 and a finite eta, "
                         f"got {out}")
    return out


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


def cfg(model, y: Tensor | int | None = None, scale: float = 1.0, *, interval=None, rescale: float = 0.0,
        apg=None) -> ClassifierFree:
    """Classifier-free guidance with the diffusers/Imagen scale s (module docstring): s = 0 unconditional,
    s = 1 conditional; Ho & Salimans' w is s - 1. ``model`` must take class labels and, called without
    them, give its unconditional (null-label) prediction. Options for high scales, each neutral by default:

    * ``interval=(lo, hi)``: guide only where the noise level sigma/alpha (EDM's sigma) lies in (lo, hi], the
      conditional model elsewhere (Kynkaanniemi et al. 2024, Sec. 3; EDM2's ImageNet-512 setting is
      (0.28, 2.9] for their data scale). Covering every level it is plain CFG.
    * ``rescale=phi``: CFG rescale (Lin et al. 2024, Alg. 2): the guided output is rescaled to the conditional
      output's per-sample standard deviation and mixed back, eps <- eps (phi std(eps_c)/std(eps) + 1 - phi).
      Applied to eps as diffusers' ``guidance_rescale`` does; the paper applies it to its v-prediction network's
      output, which gives other numbers on the same model. phi = 0 is plain CFG.
    * ``apg``: adaptive projected guidance (Sadat et al. 2024, Alg. 1) on the x0 predictions: the difference
      D_c - D_u, with momentum (running average diff + beta avg, beta in (-1, 0], reset at each new pass) and a
      norm threshold r (scaled down to norm r, 0: off), split into parts parallel and orthogonal to D_c, and
      D = D_c + (s - 1)(orthogonal + eta parallel). ``apg=True`` is eta = 0 without momentum or threshold (the
      paper's main ablation); a dict sets ``eta``, ``momentum``, ``norm_threshold``. eta = 1 with no momentum or
      threshold is plain CFG exactly. A new pass is detected as t rising between calls, so where t ascends at
      every call (encoding, the likelihood's ODE) the momentum restarts at each evaluation: APG without momentum
      there, with eta and the threshold applied as everywhere.
    """
    return ClassifierFree(model, y, scale, interval=interval, rescale=rescale, apg=apg)


def autoguidance(model, guide, y: Tensor | int | None = None, scale: float = 2.0, *, interval=None) -> ClassifierFree:
    """Autoguidance (Karras et al. 2024): D = D_guide + s (D_model - D_guide), the guide a weaker version of the
    same model (fewer training steps or a smaller network) with the same conditioning. Unlike CFG it needs no
    unconditional model and does not trade diversity for fidelity in their experiments. ``guide`` must run on
    the same process and data shape; for a class-conditional model it gets the same labels. ``interval`` as in
    ``cfg``. s = 1 is ``model``; s = 0 is ``guide``."""
    if guide.process.config() != model.process.config():
        raise ValueError(f"the guide runs on process {guide.process!r}, the model on {model.process!r}: their outputs "
                         f"belong to other noise levels")
    gs, ms = getattr(guide, "data_shape", None), getattr(model, "data_shape", None)
    if gs is not None and ms is not None and tuple(gs) != tuple(ms):
        raise ValueError(f"the guide takes data of shape {tuple(gs)}, the model {tuple(ms)}")
    if bool(getattr(guide, "num_classes", 0)) != bool(getattr(model, "num_classes", 0)):
        raise ValueError("the guide and the model must both take class labels or both not")
    return ClassifierFree(model, y, scale, guide=guide, interval=interval)
