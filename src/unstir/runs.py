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
import contextlib
import fcntl
import json
import os
import re
import socket
import stat
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import nets
from ._checks import check_device
from .parametrization import SIGMA_DATA, Denoiser
from .processes import process_from_config

Tensor = torch.Tensor


FORMAT = 1  # run.json's format version
RUN_KEYS = {"format": int, "kind": str, "config": dict, "net": dict, "process": dict, "data_shape": list,
            "num_classes": int, "levels": (int, type(None)), "accuracy": dict, "posthoc": dict}
_WEIGHTS_NAME = re.compile(r"checkpoint-\d+\.safetensors")


LOCK_FILE = ".lock"
# The names unstir writes in a run folder; everything it deletes there matches one of them.
RUN_FILES = re.compile(r"run\.json|checkpoint\.json|checkpoint-\d+\.safetensors|ema-\d+\.safetensors|log\.jsonl|"
                       r"moments\.safetensors|"
                       r"grids\.json|report\.html|classifier\.safetensors|\.lock")
_TEMPORARY = re.compile(r"\.(run|checkpoint|checkpoint-\d+|ema-\d+|moments|grids|report|classifier)\.tmp\d+"
                        r"\.(json|safetensors|html)")


class RunLocked(ValueError):
    """Another process writes this run folder."""


@contextlib.contextmanager
def run_lock(run, holder: str, wait: float = 0.0):
    """One writer per run folder: an advisory lock (``fcntl.flock``) on ``run/.lock``, held for the block.

    ``holder`` names the writer (``train``, ``tune-grid``, ...); with the process id and host it is written into
    the lock file, so that a second writer, refused after ``wait`` seconds, is told who holds it. The kernel
    releases the lock when its process dies, however it dies, so a lock left by a dead process is simply free:
    nothing stale can block a run (SQLite's and LMDB's rule on a local disk). Readers never take it. The lock
    file stays (removing it would let two writers lock two different files)."""
    run = Path(run)
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline or _holder(run).get("holder") == "train":  # it holds for hours
                    raise RunLocked(f"run folder {str(run)!r} is being written by {lock_holder(run)}; wait for it to "
                                    f"finish (or stop it), then run this again") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(run) -> dict:
    try:
        info = json.loads((Path(run) / LOCK_FILE).read_text()[:1000])
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def lock_holder(run) -> str:
    """Who holds the run's lock, in words (from the lock file)."""
    info = _holder(run)
    try:
        return f"`unstir {info['holder']}` (PID {info['pid']} on {info['host']}, since {info['since']})"
    except KeyError:
        return "another process"


def check_not_locked(run, holder: str) -> None:
    """Refuse, before any work, a writer whose run another process writes now (the lock is not kept)."""
    if Path(run).is_dir():
        with run_lock(run, holder):
            pass


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary name in the same folder, then rename it.

    ``UNSTIR_SLOW_WRITES`` (seconds, a test hook) pauses between the write and the rename, so that fault
    injection can kill a process inside the window."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # the suffix tells writers the format
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise
    if os.environ.get("UNSTIR_SLOW_WRITES"):
        time.sleep(float(os.environ["UNSTIR_SLOW_WRITES"]))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; give them the usual permissions
    os.replace(tmp, path)


def remove_temporaries(run: Path) -> int:
    """Delete what interrupted writes left in a run folder: unstir's temporary files, and weights files that no
    checkpoint pointer names (written, but killed before the pointer moved). Returns how many. Only names
    unstir writes are touched; call it holding the run's lock (another writer's temporaries are not stale)."""
    run = Path(run)
    stale = [p for p in run.glob(".*.tmp*") if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    pointer = run / "checkpoint.json"
    try:
        current = _read_json(pointer).get("weights") if pointer.exists() else None
    except (OSError, ValueError, AttributeError):
        current = None  # a damaged pointer: leave the weights alone, loading will say what is wrong
    else:
        stale += [p for p in run.glob("checkpoint-*.safetensors") if p.name != current
                  and _WEIGHTS_NAME.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _generator_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def _set_generator_state(g: torch.Generator, state: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))


def load_tensors(path) -> dict[str, Tensor]:
    """Read a safetensors file; refuse anything else (pickles can run code when loaded), and links, FIFOs and
    devices (``regular_file``)."""
    path = regular_file(Path(path))
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix != ".safetensors" or head[:1] == b"\x80" or head[:2] == b"PK":
        raise ValueError(f"refusing to load {str(path)!r}: only .safetensors files are read, never pickles")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' SafetensorError and friends: a damaged file
        raise ValueError(f"{str(path)!r} is damaged and cannot be read ({err}); restore it from a backup or "
                         f"retrain") from None


MOMENTS_FILE = "moments.safetensors"
MOMENTS_MAX_DIM = 4096  # a 32x32 colour image: 3072 values, a 38 MB float32 covariance


def write_moments(run: Path, x: Tensor) -> None:
    """The training data's mean and covariance (float32) in ``run/moments.safetensors``, for analytical
    teleportation (``unstir.teleport``); nothing above ``MOMENTS_MAX_DIM`` values per sample."""
    from .teleport import Moments

    if x[0].numel() > MOMENTS_MAX_DIM or len(x) < 2:
        return
    try:
        m = Moments.of(x)
    except ValueError:  # an optional feature never blocks training: such a run samples without teleportation
        return
    atomic_write(run / MOMENTS_FILE, lambda p: save_file({"mean": m.mean.float(), "cov": m.cov.float()}, str(p)))


def load_moments(run):
    """The run's training-data ``Moments``, or None (a run trained before they were stored, or too large)."""
    path = Path(run) / MOMENTS_FILE
    if not path.exists():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _MOMENTS_SEEN:
        _MOMENTS_SEEN.clear()  # one run's at a time
        _MOMENTS_SEEN[key] = _read_moments(path)
    return _MOMENTS_SEEN[key]


# The moments last read, by file identity: the same Moments object (its eigendecomposition, seconds for a 32x32
# colour run on a CPU, computed once) serves every later verb on that run in this process. A rewritten file (a new
# inode or mtime: writes are atomic renames) is read again.
_MOMENTS_SEEN: dict = {}


def _read_moments(path: Path):
    from .teleport import Moments

    t = load_tensors(path)
    if set(t) != {"mean", "cov"}:
        raise ValueError(f"{str(path)!r} must hold the tensors 'mean' and 'cov' (the training data's moments), got "
                         f"{sorted(t)}; delete it to sample without teleportation")
    try:
        return Moments(t["mean"], t["cov"])
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}; delete it to sample without teleportation") from None


def save_checkpoint(run: Path, step: int, net: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                    generator: torch.Generator, extra: dict[str, Tensor] | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically (weights first, then the pointer); ``extra`` tensors (keys with
    a prefix of their own, e.g. the post-hoc EMA's 'posthoc.') travel with it for an exact resume."""
    tensors = dict(extra or {})
    tensors.update({f"model.{k}": v.detach().contiguous().cpu() for k, v in net.state_dict().items()})
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


def checkpoint_tensors(run: Path, prefix: str) -> dict[str, Tensor]:
    """The tensors of the run's current checkpoint whose keys start with ``prefix``, the prefix removed."""
    meta = _read_json(Path(run) / "checkpoint.json")
    tensors = load_tensors(Path(run) / meta["weights"])
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_checkpoint(run: Path, net: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer | None,
                    generator: torch.Generator | None, *, reset_optimizer: bool = False) -> int:
    """Load the run's checkpoint into ``net``, ``ema`` and (to resume) ``opt`` and ``generator``; returns its step.

    Everything is checked before anything is used: a step >= 0; weights of the dtypes and shapes of the network
    (an int8 or fp16 file is refused, not cast); for a resume, optimizer moments of the parameters' shapes, and
    an optimizer state at all (a checkpoint without one would restart Adam's moments silently: ``reset_optimizer``
    accepts that); an RNG state torch can take."""
    pointer = run / "checkpoint.json"
    meta = _read_json(pointer)
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("weights"), str)
            and _WEIGHTS_NAME.fullmatch(meta["weights"]) and isinstance(meta.get("generator"), str)
            and isinstance(meta.get("param_groups"), list)):
        raise ValueError(f"{str(pointer)!r} is not a valid checkpoint pointer (it needs an integer "
                         f"step, a weights file named checkpoint-<step>.safetensors in the run folder, the RNG "
                         f"state and the optimizer's parameter groups)")
    if meta["step"] < 0:
        raise ValueError(f"{str(pointer)!r} records step {meta['step']}; a step is >= 0 (the file is damaged)")
    tensors = load_tensors(run / meta["weights"])
    for prefix, module in (("model.", net), ("ema.", ema)):
        for name, expected in module.state_dict().items():
            got = tensors.get(prefix + name)
            if got is not None and got.dtype != expected.dtype:
                raise ValueError(f"checkpoint {meta['weights']!r}: {prefix + name} is {got.dtype}, the network's is "
                                 f"{expected.dtype}; unstir writes weights in the network's dtype (the file is not "
                                 f"unstir's)")
    try:
        net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    except RuntimeError as err:
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise ValueError(f"checkpoint {meta['weights']!r} does not match the run's network ({first})") from None
    if opt is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        params = [p for group in opt.param_groups for p in group["params"]]
        for idx, moments in state.items():
            for name, v in moments.items():
                if name != "step" and (idx >= len(params) or v.shape != params[idx].shape):
                    raise ValueError(f"checkpoint {meta['weights']!r}: optimizer tensor optim.{idx}.{name} has shape "
                                     f"{tuple(v.shape)}, not its parameter's; the file is damaged")
        if not state and not reset_optimizer:
            raise ValueError(f"checkpoint {meta['weights']!r} carries no optimizer state: resuming would restart "
                             f"AdamW's moments; pass --reset-optimizer to resume so, or start a new run")
        if state:
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if generator is not None:
        try:
            _set_generator_state(generator, meta["generator"])
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"{str(pointer)!r}: the RNG state is damaged ({str(err).splitlines()[0][:80]})") from None
    return meta["step"]


def write_run_info(run: Path, info: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, **info}
    atomic_write(run / "run.json", lambda p: p.write_text(json.dumps(info, indent=1)))


JSON_MAX_BYTES = 16 << 20  # run.json, checkpoint.json, grids.json: kilobytes when unstir writes them


def regular_file(path: Path, max_bytes: int | None = None) -> Path:
    """``path`` if it is a regular file of the run folder, not a symbolic link (to another run's weights, to a
    file elsewhere), a FIFO (which would hang the reader) or a device (``/dev/zero``), of at most ``max_bytes``;
    else a ValueError that says what it is. A missing file raises FileNotFoundError, as ``open`` does."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{str(path)!r} is a symbolic link; unstir reads a run's own files only, never through a "
                         f"link (copy the file in its place)")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{str(path)!r} is not a regular file (a FIFO, socket or device); unstir did not write it")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ValueError(f"{str(path)!r} holds {st.st_size:,} bytes, more than the {max_bytes:,} such a file can have; "
                         f"unstir did not write it")
    return path


def _read_json(path: Path):
    try:
        return json.loads(regular_file(path, JSON_MAX_BYTES).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{str(path)!r} is damaged: not readable JSON ({type(err).__name__}: "
                         f"{str(err)[:100]})") from None


def read_log(run) -> list[dict]:
    """The rows of ``run/log.jsonl`` (one JSON object per logged step; [] when there is none), or a ValueError
    that names the file and the line that is not one."""
    path = Path(run) / "log.jsonl"
    if not os.path.lexists(path):
        return []
    rows = []
    for number, line in enumerate(regular_file(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{str(path)!r}, line {number}, is damaged: not a JSON object ({err})") from None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("loss"), (int, float))):
            raise ValueError(f"{str(path)!r}, line {number}, is damaged: a row needs an integer step and a loss")
        rows.append(row)
    return rows


def read_run_info(run) -> dict:
    """run.json, validated: known keys of the right types and a supported format version."""
    path = Path(run) / "run.json"
    if not path.exists():
        raise ValueError(f"{str(Path(run))!r} is not a run folder (no run.json)")
    info = _read_json(path)
    if not isinstance(info, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(info).__name__}")
    unknown = sorted(set(info) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"{str(path)!r} has keys unstir does not know: {unknown}")
    for key, kind in RUN_KEYS.items():
        if key in info and not isinstance(info[key], kind):
            raise ValueError(f"{str(path)!r}: {key!r} has the wrong type ({type(info[key]).__name__})")
    if info.get("format", 1) > FORMAT:
        raise ValueError(f"{str(path)!r} has format {info['format']}; this unstir reads format {FORMAT} and older")
    missing = [k for k in ("config", "net", "process") if k not in info]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {missing}")
    return info


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
    return NoiseClassifier(net.to(device).eval(), process_from_config(info["process"]), info["num_classes"],
                           tuple(info["data_shape"]))


def _check_network(run: Path, info: dict) -> None:
    """Before any weights are allocated, build run.json's network on the meta device (no memory) and refuse in
    one line a network that cannot be built (negative sizes, unknown options), that does not map ``data_shape``
    to itself, or whose parameters need more bytes than the checkpoint file holds (a run.json edited to a width of
    30000 would otherwise allocate gigabytes before failing)."""
    path = str(run / "run.json")
    shape = info.get("data_shape")
    if not (isinstance(shape, list) and len(shape) in (1, 3) and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError(f"{path!r}: data_shape must be a list of 1 or 3 positive integers, got {shape!r}")
    try:
        with torch.device("meta"):
            probe = nets.build(info["net"])
            out = probe(torch.zeros((1, *shape)), torch.full((1,), 0.5))
    except (TypeError, ValueError, KeyError, RuntimeError, IndexError) as err:
        first = str(err).strip().split("\n")[0]
        raise ValueError(f"{path!r} describes an invalid network for data of shape {tuple(shape)} "
                         f"({first})") from None
    if tuple(out.shape[1:]) != tuple(shape):
        raise ValueError(f"{path!r}: its network maps data of shape {tuple(shape)} (data_shape) to "
                         f"{tuple(out.shape[1:])}; run.json's network and data_shape disagree")
    need = 2 * sum(p.numel() * p.element_size() for p in probe.parameters())  # the weights and their EMA
    try:
        weights = run / _read_json(run / "checkpoint.json")["weights"]
        held = weights.stat().st_size if _WEIGHTS_NAME.fullmatch(weights.name) else None
    except (ValueError, OSError, KeyError, TypeError):
        held = None  # load_checkpoint names what is wrong with the pointer
    if held is not None and need > held:
        raise ValueError(f"{path!r} describes a network of {need // 2:,} bytes of parameters, twice of which (weights "
                         f"and EMA) is more than its checkpoint {weights.name!r} holds ({held:,} bytes); run.json and "
                         f"the checkpoint disagree")


def load_run(run, *, ema: bool = True, device: str = "cpu") -> Denoiser:
    """The trained model of a run folder, as a ``Denoiser`` (EMA weights by default)."""
    run = Path(run)
    if not (run / "checkpoint.json").exists():
        if (run / "classifier.safetensors").exists():
            raise ValueError(f"{str(run)!r} is a classifier folder (from `unstir train-classifier`), not a model run; "
                             f"pass it as --classifier beside --run <a model run>")
        if (run / "run.json").exists():
            raise ValueError(f"run folder {str(run)!r} has no checkpoint yet (its training has not reached the "
                             f"first one); resume it with `unstir train --out {run} --resume`")
        raise ValueError(f"{str(run)!r} is not a run folder (no checkpoint.json)")
    info = read_run_info(run)
    device = check_device(device)
    for key, kind in (("prediction", str), ("discrete", bool)):
        if not isinstance(info["config"].get(key), kind):
            raise ValueError(f"{str(run / 'run.json')!r}: its config lacks {key!r} (a {kind.__name__}); the file is "
                             f"damaged or not unstir's")
    _check_network(run, info)
    try:
        net, shadow = nets.build(info["net"]), nets.build(info["net"])
        process = process_from_config(info["process"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{str(run / 'run.json')!r} describes an invalid network or process ({err})") from None
    load_checkpoint(run, net, shadow, None, None)
    chosen = (shadow if ema else net).to(device).eval()
    num_classes = info["num_classes"] if info["config"].get("class_conditional") else 0
    try:
        model = Denoiser(chosen, process, info["config"]["prediction"], discrete_labels=info["config"]["discrete"],
                         data_shape=tuple(info["data_shape"]), num_classes=num_classes,
                         sigma_data=info["config"].get("sigma_data", SIGMA_DATA))
    except ValueError as err:
        raise ValueError(f"{str(run / 'run.json')!r}: {err}") from None
    model.run_info = info
    return model
