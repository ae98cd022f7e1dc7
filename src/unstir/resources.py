"""What a job will need, checked before it starts: memory for ``-n`` samples and a batch on the device.

The estimate is deliberately simple and stated: one forward pass of a single sample through the network under
hooks on its leaf modules gives the bytes of every activation it makes (``activation_bytes``). Measured on this
project's U-Net (32x32 RGB, widths 64,128,128) and MLP, the peak memory of a batch was 0.43x (U-Net) and 0.34x
(MLP) of that sum per sample without gradients, and 1.35x and 1.1x with a backward pass; the checks use 0.5x and
1.5x. A job whose estimate exceeds the memory available (MemAvailable and the cgroup's limit on the CPU, the
driver's free memory on CUDA) is refused in one line that names the estimate and a ``--batch-size`` that fits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .parametrization import model_network

INFERENCE_FACTOR = 0.5  # peak bytes per sample, as a share of the sum of the network's activations
TRAINING_FACTOR = 1.5  # the same with a backward pass (saved activations and their gradients)
STATE_COPIES = 8  # copies of a sample a sampler or solver keeps (x, denoised, a multistep history, noise, ...)


def available_memory(device) -> int | None:
    """Bytes free for new tensors on ``device``, or None where unknown: on the CPU the smaller of /proc/meminfo's
    MemAvailable and what the cgroup (a container's limit) has left; on CUDA the driver's free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, AttributeError):  # no driver to ask (tests' pretend device)
            return None
        return int(free)
    if device.type != "cpu":
        return None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def activation_bytes(net: nn.Module, shape, device="cpu") -> int:
    """Bytes of every leaf module's output in one forward pass of a single sample of ``shape`` (no gradients)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        p = next(net.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x = torch.zeros((1, *shape), dtype=dtype, device=device)
        t = torch.full((1,), 0.5, device=device)
        with torch.no_grad():
            net(x, t)
    finally:
        for h in handles:
            h.remove()
    return total


def gib(n: float) -> str:
    """Bytes for a reader: '3.2 GiB', '4,610 GiB', '12.5 MiB', '4.7 KiB'."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            v = n / scale
            return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{int(n)} bytes"


def check_memory(what: str, *, device, batch: int, per_item: int, fixed: int = 0, advice=None) -> None:
    """Refuse, in one line, a job whose estimate ``fixed + batch * per_item`` bytes exceeds what ``device``
    has free (``fixed``: what does not scale with the batch, e.g. the -n samples kept on the host; counted
    against the CPU only). Says the estimate, what is free, and ``advice(b)`` for the largest power of two ``b``
    that fits (default: "use --batch-size b or less")."""
    device = torch.device(device)
    free = available_memory(device)
    if free is None:
        return
    host = fixed if device.type == "cpu" else 0
    need = host + batch * per_item
    if need <= free:
        return
    if device.type != "cpu":
        cpu_free = available_memory("cpu")
        if cpu_free is not None and fixed > cpu_free:
            raise ValueError(f"{what} keeps about {gib(fixed)} on the host, more than the {gib(cpu_free)} free; ask "
                             f"for fewer samples")
    room = (free - host) // max(per_item, 1)
    if room < 1:
        raise ValueError(f"{what} needs about {gib(need)} on {device} ({gib(host)} for what is kept whole), more than "
                         f"the {gib(free)} free; ask for fewer samples")
    fits = 1 << (int(room).bit_length() - 1)
    advice = advice or (lambda b: f"use --batch-size {b} or less")
    raise ValueError(f"{what} needs about {gib(need)} on {device} ({gib(per_item)} per sample in a batch of {batch:,}), "
                     f"more than the {gib(free)} free; {advice(fits)}")


def _per_sample(model, shape, device, factor: float, copies: int) -> int:
    net = model_network(model)
    d = 4 * int(torch.Size(shape).numel())
    return int(factor * activation_bytes(net, shape, device)) + copies * d if net is not None else copies * d


def sampling_bytes(model, shape, device) -> int:
    """Estimated peak bytes per sample of a batch being sampled (or solved by the probability-flow ODE)."""
    return _per_sample(model, shape, device, INFERENCE_FACTOR, STATE_COPIES)


def training_bytes(model, shape, device) -> int:
    """Estimated peak bytes per sample of a training batch or of a vector-Jacobian product through the network
    (forward, backward, the sample's data and noise)."""
    return _per_sample(model, shape, device, TRAINING_FACTOR, 4)


__all__ = ["available_memory", "activation_bytes", "check_memory", "sampling_bytes", "training_bytes"]
