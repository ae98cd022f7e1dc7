"""Models from diffusers and k-diffusion conventions, in and out, checked against the oracle and diffusers."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import unstir
import unstir.adapters.diffusers
from unstir.adapters.karras import from_karras, to_karras
from unstir.oracle import random_mixture, unequal_2d

diffusers = pytest.importorskip("diffusers")
from unstir.adapters.diffusers import betas_from_config, from_diffusers, load_pipeline  # noqa: E402


class OracleUNet(torch.nn.Module):
    """The exact eps of a 4-D Gaussian mixture, disguised as a diffusers UNet on 1x2x2 images: called with
    diffusers' integer timestep label, returns an object with ``.sample``."""

    def __init__(self, mixture, process):
        super().__init__()
        self.mixture, self.process = mixture, process
        self.config = {"in_channels": 1, "sample_size": 2}

    def forward(self, sample, timestep, class_labels=None):
        t = (torch.as_tensor(timestep, dtype=torch.float64).expand(sample.shape[0]) + 1) / self.process.num_steps
        eps = self.mixture.eps(sample.reshape(sample.shape[0], -1), t, self.process)
        return SimpleNamespace(sample=eps.reshape(sample.shape))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
def test_betas_match_diffusers(schedule):
    config = {"beta_schedule": schedule, "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}
    ours = betas_from_config(config)
    theirs = diffusers.DDPMScheduler(**config).betas
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_oracle_through_the_adapter_equals_the_oracle_directly():
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    gm = random_mixture(4, 3, seed=1)
    unet = OracleUNet(gm, unstir.adapters.diffusers.process_from_config(sched.config)[0])
    model = from_diffusers(unet, sched)
    assert model.data_shape == (1, 2, 2) and model.prediction == "eps" and model.process.name == "ddpm"
    direct = gm.denoiser(model.process)
    x_T = model.process.prior_sample((64, 4), torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler in ("dpm++2m", "ddpm", "ode_rk45"):
        a = unstir.sample(model, None, x_T.reshape(64, 1, 2, 2), sampler=sampler, steps=12,
                          generator=torch.Generator().manual_seed(1)).x
        b = unstir.sample(direct, None, x_T, sampler=sampler, steps=12, generator=torch.Generator().manual_seed(1)).x
        torch.testing.assert_close(a.reshape(64, 4), b, rtol=1e-10, atol=1e-10, msg=sampler)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_equals_diffusers_ddim_scheduler(prediction_type):
    """unstir's DDIM on the adapted model against diffusers' DDIMScheduler (clip_sample off, leading spacing,
    final alpha 1), the same UNet (the oracle, predicting eps, v or x0) and the same noise."""
    sched = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, prediction_type=prediction_type)
    gm = random_mixture(4, 3, seed=2)
    probe = from_diffusers(OracleUNet(gm, None), sched)
    eps_unet = OracleUNet(gm, probe.process)

    class Predicting(torch.nn.Module):  # the oracle converted to the scheduler's prediction type
        config = eps_unet.config

        def forward(self, sample, timestep, class_labels=None):
            eps = eps_unet(sample, timestep).sample
            label = torch.as_tensor(timestep).expand(sample.shape[0]).round().long()
            ab = sched.alphas_cumprod[label].double().reshape(-1, 1, 1, 1)
            x0 = (sample - (1 - ab).sqrt() * eps) / ab.sqrt()
            pred = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}
            return SimpleNamespace(sample=pred[prediction_type])

    unet = Predicting()
    model = from_diffusers(unet, sched)
    sched.set_timesteps(10)
    x_T = torch.randn(128, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x_T.clone()
    for ts in sched.timesteps:
        x = sched.step(unet(x, ts).sample, ts, x).prev_sample
    grid = torch.cat([(sched.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    ours = unstir.sample(model, None, x_T, sampler="ddim", grid=grid).x
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


def test_random_unet_and_a_saved_pipeline_sample_through_unstir(tmp_path):
    """A small randomly initialised UNet2DModel, saved as a DDPMPipeline folder, loads from disk and samples
    with unstir's samplers; the adapter and the in-memory UNet give the same numbers."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    assert list((tmp_path / "pipe" / "unet").glob("*.safetensors"))
    model = load_pipeline(tmp_path / "pipe")
    assert model.data_shape == (1, 8, 8) and model.prediction == "v"
    with torch.no_grad():
        a = unstir.sample(model, None, (3, 1, 8, 8), sampler="dpm++2m", steps=5,
                          generator=torch.Generator().manual_seed(0))
        b = unstir.sample(from_diffusers(unet, sched), None, (3, 1, 8, 8), sampler="dpm++2m", steps=5,
                          generator=torch.Generator().manual_seed(0))
    assert a.nfe == 5 and torch.isfinite(a.x).all()
    torch.testing.assert_close(a.x, b.x)


def test_diffusers_bad_input(tmp_path):
    unet = OracleUNet(unequal_2d(), None)
    with pytest.raises(ValueError, match=r"scheduler config has keys unstir does not know: \['warp_factor'\]"):
        from_diffusers(unet, {"beta_schedule": "linear", "warp_factor": 9})
    with pytest.raises(ValueError, match=r"unknown beta_schedule 'quartic'; choose one of"):
        from_diffusers(unet, {"beta_schedule": "quartic"})
    with pytest.raises(ValueError, match=r"unknown prediction_type 'flow_prediction'"):
        from_diffusers(unet, {"prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match=r"rescale_betas_zero_snr=True"):
        from_diffusers(unet, {"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"beta_schedule": "linear", "_class_name": "DDPMScheduler"}))
    assert from_diffusers(unet, tmp_path / "cfg.json").process.num_steps == 1000


def test_velocity_needs_a_process_with_derivatives():
    class Bare(unstir.Process):
        name = "bare"

        def _log_alpha(self, t):
            return -t

        def _log_sigma(self, t):
            return 0.5 * torch.log(-torch.expm1(-2 * t))

    with pytest.raises(ValueError, match="a velocity prediction needs the process's time derivatives"):
        unstir.Denoiser(lambda x, t: x, Bare(0.01, 1.0), "velocity")


def test_model_output_shape_is_checked():
    p = unstir.make_process("vp")
    model = unstir.Denoiser(lambda x, t: x[:, :1], p)
    with pytest.raises(ValueError, match=r"the network returned shape \(4, 1\) for input of shape \(4, 2\)"):
        unstir.sample(model, None, (4, 2), steps=2)


def test_karras_round_trip_and_closed_form():
    """to_karras of the VP oracle is the exact denoiser of the VE path at sigma = sigma_t/alpha_t (the
    mixture convolved with N(0, sigma^2)); from_karras brings it back to a model with the same x0."""
    gm = unequal_2d()
    vp, ve = unstir.make_process("vp"), unstir.make_process("ve", sigma_min=0.002, sigma_max=200.0)
    D = to_karras(gm.denoiser(vp))
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    for sigma in (0.05, 0.7, 20.0):
        t_ve = (math.log(sigma / 0.002) / math.log(200.0 / 0.002))
        torch.testing.assert_close(D(x, sigma), gm.x0(x, t_ve, ve), rtol=1e-9, atol=1e-9)
    back = from_karras(D, D.sigma_min, D.sigma_max, data_shape=(2,))
    t = torch.full((32,), 0.4, dtype=torch.float64)
    sigma = back.process.sigma(t)
    torch.testing.assert_close(back(x, t).x0, D(x, sigma), rtol=1e-12, atol=1e-12)


def test_karras_euler_equals_unstir_ddim():
    """Karras et al. (2022) Alg. 1 without the Heun correction (k-diffusion's sample_euler), written here in
    five lines on D(x, sigma), equals unstir's DDIM on the VP oracle over the same noise levels."""
    gm = unequal_2d()
    vp = unstir.make_process("vp")
    model = gm.denoiser(vp)
    D = to_karras(model)
    grid = unstir.time_grid(vp, 8, "edm", denoise=False)
    sigmas = torch.exp(-vp.log_snr(grid))
    x_T = vp.prior_sample((100, 2), torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x_T / vp.alpha(grid[0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - D(x, s)) / s
        x = x + (s_next - s) * d
    ours = unstir.sample(model, None, x_T, sampler="ddim", grid=grid).x
    torch.testing.assert_close(ours / vp.alpha(grid[-1]), x, rtol=1e-10, atol=1e-10)
