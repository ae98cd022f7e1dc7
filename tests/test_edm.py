"""EDM's preconditioning (Karras et al. 2022) as the ``edm`` prediction coordinate, its loss weight and its
log-normal noise levels: exact on the oracle, EDM's own scalings on VE, refused where undefined."""

import math

import pytest
import torch

import unstir
from unstir.losses import TimeSampler, dsm_loss
from unstir.oracle import unequal_2d
from unstir.parametrization import edm_scalings
from unstir.processes import coefficients

from .conftest import ALL_PROCESSES
from .test_parametrization import edm_net


def test_scalings_are_edms_own_on_ve():
    """alpha = 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4
    (Karras et al. 2022, Table 1), at several sigma and data scales."""
    p = unstir.make_process("ve")
    for t in (p.t_min, 0.3, 0.8, p.T):
        c = coefficients(p, t)
        s = c.sigma
        for sd in (0.5, 1.0, 0.2):
            got = edm_scalings(c, sd)
            want = (sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2),
                    math.log(s) / 4)
            for g, w in zip(got, want):
                assert g == pytest.approx(w, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", ["vp", "ve", "rf", "subvp"])
@pytest.mark.parametrize("sampler", ["ddim", "ode_heun", "dpm++2m"])
def test_preconditioned_oracle_samples_like_the_plain_oracle(name, sampler):
    """A network that sees only c_in x and c_noise, wrapped as prediction 'edm' around the exact x0, gives the
    plain oracle's samples to float64 rounding: the preconditioning is exact on every process."""
    p = unstir.make_process(name)
    gm = unequal_2d()
    plain = gm.denoiser(p)
    wrapped = unstir.Denoiser(edm_net(gm, p, sd=0.7), p, "edm", sigma_data=0.7)
    x_T = p.prior_sample((64, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = unstir.sample(plain, p, x_T, sampler=sampler, steps=8, dtype=torch.float64).x
    b = unstir.sample(wrapped, p, x_T, sampler=sampler, steps=8, dtype=torch.float64).x
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_the_network_sees_unit_variance_input_and_edms_noise_label():
    """c_in x has unit variance per coordinate for data of variance sd^2 at every noise level (EDM's design
    rule, sec. 5), and the noise input is ln(sigma / alpha) / 4."""
    p = unstir.make_process("vp")
    sd = 0.5
    x0 = sd * torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = {}

    def net(x_in, c_noise):
        seen["var"], seen["noise"] = x_in.var().item(), c_noise[0].item()
        return torch.zeros_like(x_in)

    model = unstir.Denoiser(net, p, "edm")
    for t in (0.01, 0.3, 0.9):
        x = p.perturb(x0, torch.full((20000,), t, dtype=torch.float64), torch.randn_like(x0))
        model(x, t)
        assert seen["var"] == pytest.approx(1.0, abs=0.04)  # 4 sd of a variance estimate at n = 40000 is 0.03
        assert seen["noise"] == pytest.approx(math.log(p.sigma(t).item() / p.alpha(t).item()) / 4, rel=1e-6)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_edm_loss_is_x0_error_over_c_out_squared(name):
    """The 'edm' weighting is lambda = 1 / c_out^2 on the x0 error (Karras et al. 2022, eq. 8), evaluated in F
    coordinates: checked against that formula for a model of another prediction type."""
    p = unstir.make_process(name)
    gm = unequal_2d()
    g = torch.Generator().manual_seed(5)
    x0 = gm.sample(256, generator=g).double()
    noise = torch.randn(256, 2, generator=g, dtype=torch.float64)
    t = p.t_min + (p.T - p.t_min) * torch.rand(256, generator=g, dtype=torch.float64)
    model = gm.denoiser(p)  # an eps model, wrong in a known way: the exact E[x0 | x], not x0 itself
    loss = dsm_loss(model, x0, t, torch.ones(256, dtype=torch.float64), noise, "edm")
    c = p.coefficients(t)
    c_out = edm_scalings(c, 0.5)[1]
    x_t = p.perturb(x0, t, noise)
    want = ((gm.x0(x_t, t, p) - x0).square().mean(1) / c_out**2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-8)


@pytest.mark.parametrize("name", ["vp", "ve", "rf"])
def test_log_normal_noise_levels(name):
    """ln(sigma / alpha) of the drawn times has EDM's mean and std, (-1.2, 1.2) by default, within 4 standard
    errors (only VE clamps, 0.25 % of the draws at sigma_min = 0.01: excluded by comparing the quantiles)."""
    p = unstir.make_process(name)
    n = 40000
    t, w = TimeSampler(p, "edm", time_sampling="log-normal").sample(n, torch.Generator().manual_seed(1))
    assert torch.all(w == 1) and t.min() >= p.t_min and t.max() <= p.T
    ln_sigma = -p.log_snr(t)
    q = torch.quantile(ln_sigma, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    z = torch.tensor([-1.2815516, 0.0, 1.2815516], dtype=torch.float64)
    # sd of a sample quantile: sqrt(p(1-p)/n) / density; at most 1.2 * 0.0026 / 0.175 = 0.018 here
    torch.testing.assert_close(q, -1.2 + 1.2 * z, rtol=0, atol=4 * 0.018)


def test_bad_edm_input_is_refused_before_work(tmp_path):
    p = unstir.make_process("ddpm")
    with pytest.raises(ValueError, match="discrete"):
        TimeSampler(p, "edm", discrete=True, time_sampling="log-normal")
    with pytest.raises(ValueError, match="discrete_labels=False"):
        unstir.Denoiser(lambda x, t: x, p, "edm", discrete_labels=True)
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0.*-1"):
        unstir.Denoiser(lambda x, t: x, p, "edm", sigma_data=-1)
    with pytest.raises(ValueError, match="log_normal needs a finite mean and a std > 0"):
        TimeSampler(p, "edm", time_sampling="log-normal", log_normal=(0, 0))
    from unstir.training import TrainConfig
    for cfg, match in ((TrainConfig(prediction="edm", process="ddpm", discrete=True), "drop --discrete"),
                       (TrainConfig(sigma_data=1.0), "neither prediction 'edm'"),
                       (TrainConfig(log_normal=(0.0, 1.0)), "this run's time_sampling is 'uniform'"),
                       (TrainConfig(time_sampling="log-normal", weighting="likelihood"), "uniform")):
        with pytest.raises(ValueError, match=match):
            cfg.validate()
    assert TrainConfig(prediction="edm").weighting == "edm"


def test_train_and_sample_an_edm_run(tmp_path):
    """`train --prediction edm --time-sampling log-normal` writes a run that loads with its sigma_data and samples
    close to held-out data: sliced W2 below 0.15 after 300 steps (measured: 0.05-0.09 with EDM's settings, 0.13-0.15
    for the default eps run of the same length; the two-sample floor at n = 2000 is 0.055)."""
    from unstir.cli import main
    from unstir.data import load
    from unstir.metrics import sliced_w2
    out = tmp_path / "edm"
    assert main(["train", "--data", "moons", "--process", "vp", "--prediction", "edm", "--time-sampling", "log-normal",
                 "--sigma-data", "0.8", "--steps", "300", "--out", str(out), "--quiet"]) == 0
    model = unstir.load_run(out)
    assert model.prediction == "edm" and model.sigma_data == 0.8 and model.run_info["config"]["weighting"] == "edm"
    x = unstir.sample(model, model.process, (2000, 2), sampler="ode_heun", steps=10,
                      generator=torch.Generator().manual_seed(0)).x.detach()
    assert sliced_w2(x.double(), load("moons", n=2000, seed=5).x.double()) < 0.15
