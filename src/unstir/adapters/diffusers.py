"""diffusers models as unstir models: a ``UNet2DModel`` (or any module with its call signature) and its
scheduler config become a ``Denoiser`` on the discrete DDPM process, so every unstir sampler, the likelihood
and the encoder run on it.

What carries over from the scheduler config: the betas (``trained_betas`` or ``beta_schedule`` with
``beta_start``, ``beta_end``, ``num_train_timesteps``, computed as diffusers does, in float32, with its
float32 ``alphas_cumprod`` kept exactly) and
``prediction_type`` (epsilon -> eps, v_prediction -> v, sample -> x0). The network is called with the
fractional timestep label t N - 1, which is diffusers' integer timestep at the training steps. Keys that
only steer a diffusers sampling loop (clipping, spacing, solver order, ...) are ignored; any other key is
refused, so a config this adapter does not understand is never half-read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .._checks import check_choice
from ..parametrization import Denoiser
from ..processes import DDPM

Tensor = torch.Tensor

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
_SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr"}
# Keys of diffusers' DDPM-family schedulers that steer only their own sampling loops.
_SAMPLER_KEYS = {
    "clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing", "variance_type", "solver_order",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped",
    "interpolation_type", "sigma_min", "sigma_max", "timestep_type", "predict_x0", "solver_p",
    "disable_corrector", "skip_prk_steps", "sigma_data", "use_flow_sigmas", "flow_shift", "beta_min", "beta_max",
}


def betas_from_config(config: dict) -> Tensor:
    """The training betas of a diffusers scheduler config, computed as diffusers computes them (float32)."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    schedule = config.get("beta_schedule", "linear")
    check_choice("beta_schedule", schedule, BETA_SCHEDULES)
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (end - start) + start
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):  # Nichol & Dhariwal (2021), eq. 17
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:
        def alpha_bar(t):  # diffusers' "laplace" schedule
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=torch.float32)


def process_from_config(config: dict) -> tuple[DDPM, str]:
    """(the DDPM process, unstir's prediction name) of a diffusers scheduler config; unknown keys are refused."""
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    unknown = sorted(set(config) - _SCHEDULE_KEYS - _SAMPLER_KEYS)
    if unknown:
        raise ValueError(f"scheduler config has keys unstir does not know: {unknown}; known keys are "
                         f"{sorted(_SCHEDULE_KEYS)} and sampler-only keys {sorted(_SAMPLER_KEYS)}")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True puts alpha_bar = 0 (infinite noise) at the last step, which "
                         "no Gaussian prior matches; unstir supports schedules with alpha_bar > 0 throughout")
    prediction = config.get("prediction_type", "epsilon")
    check_choice("prediction_type", prediction, PREDICTION_TYPES)
    # The network was trained on diffusers' alphas_cumprod, a float32 cumulative product: keep those exact
    # values (they differ from a float64 product of the same betas by up to 1e-5 relative at 1000 steps).
    alpha_bar = torch.cumprod(1.0 - betas_from_config(config), 0).double()
    betas = 1.0 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return DDPM(betas), PREDICTION_TYPES[prediction]


def from_diffusers(unet, scheduler, *, data_shape: tuple[int, ...] | None = None) -> Denoiser:
    """An unstir model from a diffusers UNet and its scheduler (a scheduler object, its config dict, or the
    path of a ``scheduler_config.json``).

    ``unet(sample, timestep, class_labels=None)`` must return an object with ``.sample`` or a tensor. The data
    shape comes from ``unet.config`` (``in_channels``, ``sample_size``) unless given; class labels reach the
    UNet's ``class_labels`` when it has ``num_class_embeds``."""
    config = _scheduler_config(scheduler)
    process, prediction = process_from_config(config)
    unet_config = getattr(unet, "config", {}) or {}
    if data_shape is None and "in_channels" in unet_config and "sample_size" in unet_config:
        size = unet_config["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        data_shape = (unet_config["in_channels"], *size)
    num_classes = int(unet_config.get("num_class_embeds") or 0)

    def net(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = unet(x, t, class_labels=y) if y is not None else unet(x, t)
        return out.sample if hasattr(out, "sample") else out

    net.__wrapped__ = unet  # so unstir.parametrization.model_device finds the UNet's device
    return Denoiser(net, process, prediction, discrete_labels=True, data_shape=data_shape, num_classes=num_classes)


def load_pipeline(path, *, device: str = "cpu") -> Denoiser:
    """An unstir model from a diffusers pipeline folder on disk (``save_pretrained``): its ``unet`` and
    ``scheduler``. Weights load from safetensors only."""
    import diffusers

    root = Path(path)
    index_file = root / "model_index.json"
    if not index_file.exists():
        raise ValueError(f"{str(root)!r} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    if "unet" not in index or "scheduler" not in index:
        raise ValueError(f"pipeline {str(root)!r} needs a 'unet' and a 'scheduler'; it has {sorted(index)}")
    library, cls_name = index["unet"]
    if library != "diffusers" or not hasattr(diffusers, cls_name):
        raise ValueError(f"the pipeline's unet is {library}.{cls_name}; unstir loads diffusers model classes")
    unet = getattr(diffusers, cls_name).from_pretrained(root / "unet", use_safetensors=True).to(device).eval()
    return from_diffusers(unet, root / "scheduler" / "scheduler_config.json")


def _scheduler_config(scheduler) -> dict:
    if isinstance(scheduler, (str, Path)):
        return json.loads(Path(scheduler).read_text())
    if isinstance(scheduler, dict):
        return scheduler
    if hasattr(scheduler, "config"):
        return dict(scheduler.config)
    raise TypeError(f"scheduler must be a diffusers scheduler, a config dict or a path, got {type(scheduler).__name__}")
