"""A second device on a CPU-only machine, for catching device errors without a GPU.

Inside ``other_device()``, ``device="cuda"`` is a pretend CUDA device: a tensor made on it (a factory with
``device="cuda"``, ``.to("cuda")``, ``module.to("cuda")``) is a CPU tensor of the subclass ``OnDevice`` whose
``.device`` says ``cuda:0``. Every torch operation on an ``OnDevice`` tensor checks CUDA's rules before it
runs, on the CPU:

- all tensor arguments on one device, except 0-dim CPU tensors (which CUDA accepts as scalars), CPU index
  tensors of ``t[index]`` (which CUDA moves) and the source of ``copy_`` (which CUDA copies across devices);
- ``.numpy()`` refused (copy to the host first);
- a CPU ``torch.Generator`` refused for a draw on the device.

So a tensor born on the default device (the CPU) and combined with the model's, which fails on a real GPU with
"Expected all tensors to be on the same device", fails here with the same words, and the numbers of a correct
program are the CPU's to the last bit. The ``meta`` default device (``torch.set_default_device("meta")``) was
tried first: it lets a 2-D ``matmul`` and indexing of CPU tensors by meta ones through, and it refuses 0-dim
scalar tensors that CUDA accepts. ``torch.cuda.is_available``, ``device_count``, ``torch.version.cuda`` and
the ``torch.cuda.Event`` that torchode records on a CUDA device are patched for the duration.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

DEVICE = torch.device("cuda", 0)

# Calls that look at tensors without computing with them (or that CUDA allows across devices).
_INSPECT = {"__get__", "__set__", "__repr__", "__format__", "__len__", "dim", "size", "__reduce_ex__",
            "_has_compatible_shallow_copy_type", "is_same_size", "__bool__", "item", "tolist", "__float__",
            "__int__", "__index__", "__iter__", "__deepcopy__", "numel", "stride", "storage_offset", "data_ptr",
            "untyped_storage", "is_floating_point", "is_complex", "element_size", "get_device", "requires_grad_",
            "register_hook", "retain_grad", "detach", "detach_"}


def _target(args, kwargs):
    """(device, dtype, non_blocking, memory_format) of a ``Tensor.to`` call (``.to(other)`` takes other's)."""
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
    if any(isinstance(a, OnDevice) for a in (*args[1:], *kwargs.values())):  # .to(other)
        device = DEVICE
    return device, dtype, non_blocking, memory_format


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


# Calls that copy a number from the device to the host: on a GPU each one waits for every queued kernel.
_HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu"}


class OnDevice(torch.Tensor):
    """A CPU tensor that behaves as if it lived on ``DEVICE``; ``OnDevice.reads`` counts host reads of it."""

    reads = 0

    @property
    def device(self):
        return DEVICE

    @property
    def is_cuda(self):
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "numpy":
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if name in _HOST_READS or (name == "to" and not _on_device(_target(args, kwargs)[0])
                                   and _target(args, kwargs)[0] is not None):
            OnDevice.reads += 1
        if name == "cpu" or (name == "to" and _target(args, kwargs)[0] is not None
                             and not _on_device(_target(args, kwargs)[0])):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out
        # Gradients that backward() accumulates are plain tensors (autograd does not keep the subclass), so the
        # optimizers' and clip_grad_norm_'s fused list kernels, torch's own code, are not checked.
        # copy_ takes its source from any device on CUDA too (load_state_dict copies CPU weights into a model there).
        if name not in _INSPECT and name != "copy_" and not name.startswith(("_foreach_", "_fused_")):
            host = [t for t in _tensors(args, kwargs) if not isinstance(t, OnDevice) and t.dim() > 0]
            if host and name in ("__getitem__",) and isinstance(args[0], OnDevice):
                host = [t for t in host if t.dtype not in (torch.long, torch.int, torch.bool, torch.uint8)]
            if host:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"cuda:0 and cpu! (in {name}, on the pretend device of tests/fake_device.py)")
        return super().__torch_function__(func, types, args, kwargs)


def _tensors(args, kwargs):
    """The tensors among the arguments, and in lists and tuples of them (what torch functions take)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, torch.Tensor))


class _Mode(TorchFunctionMode):
    """Factories and ``.to`` aimed at the pretend device make ``OnDevice`` tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _on_device(kwargs.get("device")) and getattr(func, "__name__", "") != "to":
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != "cuda":
                raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu'")
            kwargs["device"] = "cpu"
            out = func(*args, **kwargs)
            return out.as_subclass(OnDevice) if isinstance(out, torch.Tensor) else out
        if getattr(func, "__name__", "") == "to":
            device, dtype, non_blocking, memory_format = _target(args, kwargs)
            if _on_device(device):
                with torch._C.DisableTorchFunctionSubclass():
                    out = torch.Tensor.to(args[0], dtype=dtype, non_blocking=non_blocking,
                                          memory_format=memory_format or torch.preserve_format)
                return out.as_subclass(OnDevice)
        return func(*args, **kwargs)


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


@contextlib.contextmanager
def other_device():
    """Within: ``"cuda"`` names the pretend device (see the module's docstring)."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # module.to keeps the subclass
    try:
        with mock.patch("torch.cuda.is_available", return_value=True), \
                mock.patch("torch.cuda.device_count", return_value=1), \
                mock.patch("torch.version.cuda", torch.version.cuda or "12.0"), \
                mock.patch("torch.cuda.Event", _Event), \
                mock.patch("torch.cuda.current_stream", lambda device=None: None), \
                mock.patch("torch.cuda.synchronize", lambda device=None: None), \
                _Mode():
            yield DEVICE
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
