"""Model outputs: eps, x0, v, score, velocity and EDM's F are one thing in six coordinates.

With x = alpha x0 + sigma eps (any process) and the coefficient record c of ``processes.Coefficients``:

    score    = -eps / sigma                          (Tweedie's formula; Efron 2011, Song et al. 2021 eq. 7)
    x0       = (x - sigma eps) / alpha
    v        = alpha eps - sigma x0                  (Salimans & Ho 2022)
    velocity = alpha' x0 + sigma' eps                (flow matching; Lipman et al. 2023, Liu et al. 2023)
             = f x + g^2 / (2 sigma) eps            (the probability-flow ODE field f - g^2/2 score,
                                                      Song et al. 2021 eq. 13: the same vector field)

so eps = (alpha v + sigma x) / (alpha^2 + sigma^2) and eps = (velocity - f x) 2 sigma / g^2.

EDM's preconditioning (Karras et al. 2022, sec. 5 and Table 1) is the sixth coordinate, ``edm``: the raw
output F of a network that sees c_in x at the noise input c_noise, with

    x0 = c_skip x + c_out F.

EDM writes it for x / s(t) at the noise level sigma~ = sigma / alpha (their s = alpha): c_skip = sd^2 /
(sigma~^2 + sd^2), c_out = sigma~ sd / sqrt(sigma~^2 + sd^2), c_in = 1 / sqrt(sigma~^2 + sd^2) and c_noise =
ln(sigma~) / 4, with sd = ``sigma_data``. Folding the 1 / alpha into them gives the general form used here,
finite for every process including rectified flow's alpha -> 0 end (r^2 = sigma^2 + alpha^2 sd^2, the variance
of x for data of variance sd^2):

    c_skip = alpha sd^2 / r^2,   c_out = sigma sd / r,   c_in = 1 / r,   c_noise = -log_snr / 4

so that eps = (sigma x / r - alpha sd F) / r, which needs no division by sigma. On VE (alpha = 1) these are
EDM's own. ``sigma_data`` is a property of the data (0.5 for images in [-1, 1], EDM's choice).

A network predicts one of them; ``Denoiser`` wraps it and exposes all five. Samplers, losses and
likelihoods talk to a ``Model`` (a ``Denoiser`` or anything with the same call), never to the raw network.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable, Protocol, runtime_checkable

import torch

from ._checks import check_choice
from .processes import DDPM, Coefficients, Process, coefficients

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v", "score", "velocity", "edm")
SIGMA_DATA = 0.5  # EDM's sigma_data for images scaled to [-1, 1]


def edm_scalings(c: Coefficients, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning at the coefficients ``c``, in the general form of
    the module's docstring (floats for float coefficients, tensors for tensor ones)."""
    r = (c.sigma**2 + c.alpha**2 * sigma_data**2) ** 0.5
    return c.alpha * sigma_data**2 / r**2, c.sigma * sigma_data / r, 1 / r, -c.log_snr / 4


def check_sigma_data(value) -> float:
    """EDM's sigma_data: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise ValueError(f"sigma_data must be a finite number > 0 (the data's standard deviation; 0.5 for images "
                         f"in [-1, 1]), got {value!r}")
    return float(value)


def to_eps(kind: str, pred: Tensor, x: Tensor, c: Coefficients, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Convert a prediction of type ``kind`` to eps; the entries of ``c`` broadcast against x. ``sigma_data``
    enters only the ``edm`` coordinate."""
    if kind == "eps":
        return pred
    if kind == "x0":
        return (x - c.alpha * pred) / c.sigma
    if kind == "v":
        return (c.alpha * pred + c.sigma * x) / (c.alpha**2 + c.sigma**2)
    if kind == "score":
        return -c.sigma * pred
    if kind == "velocity":
        return (pred - c.drift * x) * (2 * c.sigma / c.g2)
    if kind == "edm":
        r = (c.sigma**2 + c.alpha**2 * sigma_data**2) ** 0.5
        return (x * (c.sigma / r) - pred * (c.alpha * sigma_data)) / r
    check_choice("prediction", kind, PREDICTIONS)


def from_eps(kind: str, eps: Tensor, x: Tensor, c: Coefficients, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Convert eps to a prediction of type ``kind``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return (x - c.sigma * eps) / c.alpha
    if kind == "v":
        return c.alpha * eps - c.sigma * (x - c.sigma * eps) / c.alpha
    if kind == "score":
        return -eps / c.sigma
    if kind == "velocity":
        if isinstance(c.drift, float):  # one time for the batch: two fused ops
            return torch.add(x * c.drift, eps, alpha=c.g2 / (2 * c.sigma))
        return c.drift * x + (c.g2 / (2 * c.sigma)) * eps
    if kind == "edm":
        r = (c.sigma**2 + c.alpha**2 * sigma_data**2) ** 0.5
        return (x * (c.sigma / r) - eps * r) / (c.alpha * sigma_data)
    check_choice("prediction", kind, PREDICTIONS)


def convert(pred: Tensor, src: str, dst: str, x: Tensor, c: Coefficients, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Convert a prediction from type ``src`` to type ``dst`` at the coefficients ``c`` (broadcast to x)."""
    check_choice("prediction", src, PREDICTIONS)
    check_choice("prediction", dst, PREDICTIONS)
    if src == dst:
        return pred
    return from_eps(dst, to_eps(src, pred, x, c, sigma_data), x, c, sigma_data)


class ModelOutput:
    """What the model says about x at time t, in every parametrization (computed on demand).

    ``c`` is the process's coefficient record at t, broadcast against x; ``sigma_data`` is the data scale of the
    ``edm`` coordinate (see the module docstring)."""

    def __init__(self, x: Tensor, t, c: Coefficients, pred: Tensor, kind: str, sigma_data: float = SIGMA_DATA):
        self.x, self.t, self.c = x, t, c
        self.pred, self.kind, self.sigma_data = pred, kind, sigma_data

    def like(self, x: Tensor, pred: Tensor, c: Coefficients | None = None) -> "ModelOutput":
        """The same kind of output (its kind, time and data scale) for another x and prediction."""
        return ModelOutput(x, self.t, self.c if c is None else c, pred, self.kind, self.sigma_data)

    @property
    def alpha(self):
        return self.c.alpha

    @property
    def sigma(self):
        return self.c.sigma

    def _get(self, kind: str) -> Tensor:
        if kind == self.kind:
            return self.pred
        return from_eps(kind, self.eps, self.x, self.c, self.sigma_data)

    @cached_property
    def eps(self) -> Tensor:
        return to_eps(self.kind, self.pred, self.x, self.c, self.sigma_data)

    @cached_property
    def x0(self) -> Tensor:
        return self._get("x0")

    @cached_property
    def score(self) -> Tensor:
        return self._get("score")

    @cached_property
    def v(self) -> Tensor:
        return self._get("v")

    @cached_property
    def velocity(self) -> Tensor:
        """dx/dt of the probability-flow ODE (the flow-matching velocity)."""
        return self._get("velocity")

    @cached_property
    def edm(self) -> Tensor:
        """EDM's raw network output F, with x0 = c_skip x + c_out F (see the module docstring)."""
        return self._get("edm")


def in_graph(out: ModelOutput, use: str) -> ModelOutput:
    """``out``, or a one-line refusal when its prediction is detached from x: a use that differentiates the
    model (the likelihood's divergence, DPS, PiGDM's vjp) would otherwise see only the conversion's own x
    (x0 -> eps is (x - alpha x0) / sigma) and be silently wrong."""
    if not out.pred.requires_grad:
        raise ValueError(f"{use} differentiates the model's output in x, but this model's output is detached from "
                         f"its input (no gradient flows through it)")
    return out


def model_device(model) -> torch.device:
    """Where a model computes: the device of the first parameter or buffer of a network found from it through
    ``.net`` (a ``Denoiser``'s), ``.model`` (what a wrapper wraps) and ``.__wrapped__`` (what an adapter's
    function calls), or a ``device`` attribute met on the way (a plain function can carry one, as the oracle's
    do); the CPU where there is none."""
    for part in _inner(model):
        if isinstance(getattr(part, "device", None), torch.device):
            return part.device
        if isinstance(part, torch.nn.Module):
            for tensor in part.parameters():
                return tensor.device
            for tensor in part.buffers():
                return tensor.device
    return torch.device("cpu")


def model_network(model) -> torch.nn.Module | None:
    """The network a model calls, found as ``model_device`` finds its device; None for a plain function (an
    oracle's exact score)."""
    for part in _inner(model):
        if isinstance(part, torch.nn.Module) and next(part.parameters(), None) is not None:
            return part
    return None


def _inner(model):
    """``model``, then what it wraps, breadth first: ``.net``, ``.model``, ``.__wrapped__``."""
    todo, seen = [model], set()
    while todo:
        part = todo.pop(0)
        if part is None or id(part) in seen:
            continue
        seen.add(id(part))
        yield part
        todo += [getattr(part, name, None) for name in ("net", "model", "__wrapped__")]


@runtime_checkable
class Model(Protocol):
    """What every sampler, loss, likelihood and guidance wrapper needs of a model.

    ``process`` is the forward process the model was trained for; ``data_shape`` the per-sample shape
    (None if the model accepts any); ``num_classes`` the number of class labels it accepts in ``y``
    (0: unconditional). Calling it at (x, t) with optional class labels ``y`` (shape (batch,), integers)
    returns a ``ModelOutput``. t is a Python float (one time for the batch) or a tensor of shape (batch,).
    """

    process: Process
    data_shape: tuple[int, ...] | None
    num_classes: int

    def __call__(self, x: Tensor, t, y: Tensor | None = None) -> ModelOutput: ...


class Denoiser:
    """Wrap ``net(x, t_input[, y]) -> prediction`` for a process: the standard ``Model``.

    ``prediction`` names what the network outputs (eps, x0, v, score, velocity or edm). The network receives t
    as a tensor of shape (batch,) in x's dtype (or ``time_dtype``): continuous t, or, with
    ``discrete_labels=True`` on a DDPM process, the integer timestep label (t N - 1). With ``prediction="edm"``
    it is EDM's preconditioned network instead: it receives c_in x and the noise input c_noise = -log_snr / 4,
    and its output F is mapped to x0 by c_skip x + c_out F (``sigma_data``: the data's scale, module docstring). ``data_shape`` is the
    per-sample shape the network expects (None: any); ``num_classes`` > 0 means the network takes class
    labels ``y`` in [0, num_classes) as a third argument.
    """

    def __init__(self, net: Callable[..., Tensor], process: Process, prediction: str = "eps",
                 *, discrete_labels: bool = False, time_dtype: torch.dtype | None = None,
                 data_shape: tuple[int, ...] | None = None, num_classes: int = 0, sigma_data: float = SIGMA_DATA):
        check_choice("prediction", prediction, PREDICTIONS)
        self.sigma_data = check_sigma_data(sigma_data)
        if prediction == "edm" and discrete_labels:
            raise ValueError("prediction 'edm' feeds the network EDM's noise input c_noise = -log_snr / 4, not DDPM's "
                             "integer timestep labels: use discrete_labels=False (a 'ddpm' process is fine)")
        if not isinstance(process, Process):
            raise TypeError(f"process must be a unstir Process, got {type(process).__name__}")
        if prediction == "velocity" and not all(hasattr(process, m) for m in ("_dlog_alpha", "_g2")):
            raise ValueError(f"a velocity prediction needs the process's time derivatives (d log alpha/dt and g^2); "
                             f"{type(process).__name__} does not define them")
        if discrete_labels and not isinstance(process, DDPM):
            raise ValueError(f"discrete_labels=True needs a 'ddpm' process, got {process.name!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.net, self.process, self.prediction = net, process, prediction
        self.discrete_labels = discrete_labels
        self.time_dtype = time_dtype  # None: the network gets t in x's dtype
        self.data_shape = None if data_shape is None else tuple(int(s) for s in data_shape)
        self.num_classes = num_classes

    def __call__(self, x: Tensor, t, y: Tensor | None = None) -> ModelOutput:
        """The model's outputs at (x, t); t is a Python float (one time for the batch) or a tensor (batch,).
        ``y`` (class labels) is passed on to the network as a third argument when given."""
        edm = self.prediction == "edm"
        if isinstance(t, float):
            c = coefficients(self.process, t)
            label = t * self.process.num_steps - 1 if self.discrete_labels else -c.log_snr / 4 if edm else t
            t_in = torch.full((x.shape[0],), label, dtype=self.time_dtype or x.dtype, device=x.device)
        else:
            c = self.process.coefficients(t)
            t_in = (self.process.timestep(t) if self.discrete_labels else -c.log_snr / 4 if edm
                    else torch.as_tensor(t, dtype=torch.float64))
            t_in = t_in.to(dtype=self.time_dtype or x.dtype, device=x.device).expand(x.shape[0])
            c = c.expand_as(x)
        x_in = x
        if edm:
            c_in = edm_scalings(c, self.sigma_data)[2]
            x_in = x * (c_in if isinstance(c_in, float) else c_in.to(x.dtype))
        pred = self.net(x_in, t_in) if y is None else self.net(x_in, t_in, y)
        if pred.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(pred.shape)} for input of shape {tuple(x.shape)}; "
                             f"a {self.prediction} prediction must have the input's shape")
        return ModelOutput(x, t, c, pred, self.prediction, self.sigma_data)
