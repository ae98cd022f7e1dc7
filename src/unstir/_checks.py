"""Validation and broadcasting helpers shared by the public boundary of every layer."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

_T_TOL = 1e-12  # float64 round-off allowance when a grid lands on t_min or T


def as_time(t, t_min: float, T: float, batch: int | None = None) -> Tensor:
    """t as a float64 tensor (scalar or shape (batch,)), raising ValueError outside [t_min, T]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim > 1 or (batch is not None and t.ndim == 1 and t.shape[0] != batch):
        raise ValueError(f"t must be a scalar or have shape ({batch if batch is not None else 'batch'},), "
                         f"got shape {tuple(t.shape)}")
    if t.numel():
        lo, hi = (v.item() for v in torch.aminmax(t))  # one reduction; NaN propagates and fails the test
        if not (lo >= t_min - _T_TOL and hi <= T + _T_TOL):
            raise ValueError(f"t must lie in [t_min, T] = [{t_min:g}, {T:g}], got "
                             f"{t.item() if t.ndim == 0 else f'values in [{lo:g}, {hi:g}]'}")
    return t.clamp(t_min, T)


def expand_as(coef: Tensor, x: Tensor) -> Tensor:
    """A scalar or per-sample coefficient reshaped to broadcast against x, in x's dtype and device."""
    coef = coef.to(dtype=x.dtype, device=x.device)
    return coef.reshape(-1, *([1] * (x.ndim - 1))) if coef.ndim == 1 else coef


def check_choice(kind: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(allowed)}")


def check_positive(name: str, value) -> float:
    """A finite number > 0 (not a bool), as a float, or a ValueError naming it."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_device(name) -> torch.device:
    """A torch device that exists here, or a ValueError that says what to do instead."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r} ({err}); use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"device {name!r}: this torch build has no CUDA support (a CPU build); use --device cpu, "
                             f"or install a CUDA build (make install TORCH_SPEC=\"torch==... --index-url ...\")")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device {name!r}: this machine has no CUDA device that torch can see (a CUDA build, but "
                             f"no GPU or driver; check CUDA_VISIBLE_DEVICES and nvidia-smi); use --device cpu")
        if (device.index or 0) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s); use "
                             + ("cuda (cuda:0)" if count == 1 else f"one of cuda:0 .. cuda:{count - 1}")
                             + " or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS (Apple's GPU) is not available on this machine; use --device cpu")
    return device
