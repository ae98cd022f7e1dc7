"""Run folders: what a training run writes, and how it is read back.

A run folder holds ``run.json`` (the configuration, network, process and data shape), ``checkpoint.json``
(the step, the RNG state and the name of the current weights file), ``checkpoint-<step>.safetensors``
(model, EMA and optimizer tensors) and ``log.jsonl`` (metrics). Each file is written to a temporary name
and renamed, and the JSON pointer is renamed last, so an interrupted write never leaves a run that cannot
resume. Weights are read only from safetensors files: nothing here unpickles.

Sampling needs only this module (``load_run``), never the trainer.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import nets
from .parametrization import Denoiser
from .processes import process_from_config

Tensor = torch.Tensor


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary name in the same folder, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; give them the usual permissions
    os.replace(tmp, path)


def _generator_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def _set_generator_state(g: torch.Generator, state: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))


def load_tensors(path) -> dict[str, Tensor]:
    """Read a safetensors file; refuse anything else (pickles can run code when loaded)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix != ".safetensors" or head[:1] == b"\x80" or head[:2] == b"PK":
        raise ValueError(f"refusing to load {str(path)!r}: only .safetensors files are read, never pickles")
    return load_file(str(path))


def save_checkpoint(run: Path, step: int, net: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                    generator: torch.Generator) -> Path:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = torch.as_tensor(v).contiguous().cpu()
    weights = run / f"checkpoint-{step}.safetensors"
    atomic_write(weights, lambda p: save_file(tensors, str(p)))
    meta = {"step": step, "weights": weights.name, "generator": _generator_state(generator),
            "param_groups": opt_state["param_groups"]}
    pointer = run / "checkpoint.json"
    old = json.loads(pointer.read_text())["weights"] if pointer.exists() else None
    atomic_write(pointer, lambda p: p.write_text(json.dumps(meta)))
    if old and old != weights.name:
        (run / old).unlink(missing_ok=True)
    return weights


def load_checkpoint(run: Path, net: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer | None,
                    generator: torch.Generator | None) -> int:
    meta = json.loads((run / "checkpoint.json").read_text())
    tensors = load_tensors(run / meta["weights"])
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    if opt is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if generator is not None:
        _set_generator_state(generator, meta["generator"])
    return meta["step"]




def write_run_info(run: Path, info: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    atomic_write(run / "run.json", lambda p: p.write_text(json.dumps(info, indent=1)))


def read_run_info(run) -> dict:
    return json.loads((Path(run) / "run.json").read_text())


def load_classifier(run, *, device: str = "cpu"):
    """The noise-conditional classifier of a folder written by ``unstir train-classifier``."""
    from .guidance import NoiseClassifier

    run = Path(run)
    if not (run / "classifier.safetensors").exists():
        raise ValueError(f"{str(run)!r} is not a classifier folder (no classifier.safetensors); "
                         f"write one with `unstir train-classifier`")
    info = read_run_info(run)
    net = nets.build(info["net"])
    net.load_state_dict(load_tensors(run / "classifier.safetensors"))
    return NoiseClassifier(net.to(device).eval(), process_from_config(info["process"]), info["num_classes"])


def load_run(run, *, ema: bool = True, device: str = "cpu") -> Denoiser:
    """The trained model of a run folder, as a ``Denoiser`` (EMA weights by default)."""
    run = Path(run)
    if not (run / "checkpoint.json").exists():
        if (run / "run.json").exists():
            raise ValueError(f"run folder {str(run)!r} has no checkpoint yet (its training has not reached the "
                             f"first one); resume it with `unstir train --out {run} --resume`")
        raise ValueError(f"{str(run)!r} is not a run folder (no checkpoint.json)")
    info = read_run_info(run)
    net = nets.build(info["net"])
    shadow = nets.build(info["net"])
    load_checkpoint(run, net, shadow, None, None)
    chosen = (shadow if ema else net).to(device).eval()
    process = process_from_config(info["process"])
    num_classes = info["num_classes"] if info["config"].get("class_conditional") else 0
    model = Denoiser(chosen, process, info["config"]["prediction"], discrete_labels=info["config"]["discrete"],
                     data_shape=tuple(info["data_shape"]), num_classes=num_classes)
    model.run_info = info
    return model
