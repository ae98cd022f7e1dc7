"""The velocity (flow-matching) coordinate and the rectified-flow process, checked by independent routes."""

import pytest
import torch

import unstir
from unstir.losses import TimeSampler, dsm_loss
from unstir.oracle import unequal_2d

from .conftest import ALL_PROCESSES


@pytest.mark.parametrize("name", [n for n in ALL_PROCESSES if n != "ddpm"])
def test_velocity_solves_the_continuity_equation(name):
    """The PF-ODE field u transports p_t: d/dt log p_t(x) = -div u(x) - u . grad log p_t(x) (Fokker-Planck
    for the ODE). The time derivative by central differences of the oracle's exact log p_t, the divergence
    by autograd of the model's velocity output: two routes that share no formula with the conversion."""
    p = unstir.make_process(name)
    gm = unequal_2d()
    model = gm.denoiser(p)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.2
    for t in (0.1, 0.4, 0.8 * p.T):
        h = 1e-5
        dlogp_dt = (gm.marginal_log_prob(x, t + h, p) - gm.marginal_log_prob(x, t - h, p)) / (2 * h)
        xr = x.clone().requires_grad_(True)
        u = model(xr, t).velocity
        div = sum(torch.autograd.grad(u[:, i].sum(), xr, retain_graph=True)[0][:, i] for i in range(2))
        rhs = -div - (u * gm.score(x, t, p)).sum(1)
        torch.testing.assert_close(dlogp_dt, rhs.detach(), rtol=1e-5, atol=1e-5)


def test_rf_velocity_is_eps_minus_x0_and_ddim_is_euler_in_t():
    """On rectified flow alpha' = -1 and sigma' = 1, so the velocity is E[eps|x] - E[x0|x], and unstir's
    DDIM step from t to s is exactly x + (s - t) u: the Euler step of flow matching."""
    p = unstir.make_process("rf")
    gm = unequal_2d()
    model = gm.denoiser(p)
    x = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t, s in [(p.T, 0.7), (0.5, 0.2), (0.05, p.t_min)]:
        u = gm.eps(x, t, p) - gm.x0(x, t, p)
        torch.testing.assert_close(model(x, t).velocity, u, rtol=1e-12, atol=1e-12)
        grid = torch.tensor([t, s], dtype=torch.float64)
        ddim = unstir.sample(model, p, x, sampler="ddim", grid=grid).x
        torch.testing.assert_close(ddim, x + (s - t) * u, rtol=1e-12, atol=1e-12)


def test_rf_ddim_reproduces_diffusers_flow_match_euler():
    """unstir's DDIM on the rf process against diffusers' FlowMatchEulerDiscreteScheduler (shift 1) with the
    same sigmas, the same velocity model and the same noise. diffusers rounds its state to float32 at each
    step (1e-7 relative); unstir runs in float64 here, so the two agree to the accumulated rounding."""
    diffusers = pytest.importorskip("diffusers")
    p = unstir.make_process("rf")
    gm = unequal_2d()
    exact = gm.denoiser(p)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=torch.linspace(0.99, 0.05, 12).tolist())  # float32-exact, inside [t_min, T]
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x_T.clone()
    for ts, sigma in zip(sched.timesteps, sched.sigmas.tolist()):
        x = sched.step(exact(x, sigma).velocity, ts, x).prev_sample
    grid = torch.cat([sched.sigmas[:-1].double(), torch.zeros(1, dtype=torch.float64)])
    ours = unstir.sample(exact, p, x_T, sampler="ddim", grid=grid).x
    assert sched.sigmas[-1] == 0
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)


def test_velocity_loss_minimum_is_the_exact_velocity():
    """Flow matching as a DSM weighting: the exact velocity is the minimiser (common random numbers), and the
    loss equals (g^2/2 sigma)^2 times the per-sample eps error, the same objective in eps coordinates."""
    p, gm = unstir.make_process("rf"), unequal_2d()
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(20000, g)
    t, w = TimeSampler(p, "velocity").sample(20000, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    exact = gm.denoiser(p)
    base = dsm_loss(exact, x0, t, w, noise, "velocity").item()
    for f in (lambda u: 1.05 * u, lambda u: u + 0.05, lambda u: u + 0.1 * u.flip(1)):
        net = lambda x, tt, f=f: f(exact(x, tt).velocity)  # noqa: E731
        model = unstir.Denoiser(net, p, "velocity", time_dtype=torch.float64)
        assert dsm_loss(model, x0, t, w, noise, "velocity").item() > base
    x_t = p.perturb(x0, t, noise)
    factor = (p.g2(t) / (2 * p.sigma(t))) ** 2
    eps_form = (factor * (exact(x_t, t).eps - noise).square().mean(1)).mean().item()
    assert base == pytest.approx(eps_form, rel=1e-8)


def test_train_rf_velocity_and_sample_with_every_kind_of_sampler(tmp_path):
    """`unstir train --process rf --prediction velocity` trains a flow-matching model whose samples, from
    deterministic and stochastic samplers alike, land near the data (moons: sliced-W2 well below that of
    the prior, 1.0)."""
    from unstir.cli import main
    from unstir.data import toy_2d

    from .conftest import sliced_w2

    run = tmp_path / "rf"
    assert main(["train", "--process", "rf", "--prediction", "velocity", "--steps", "600", "--out", str(run),
                 "--quiet"]) == 0
    model = unstir.load_run(run)
    assert model.prediction == "velocity" and model.process.name == "rf"
    assert model.run_info["config"]["weighting"] == "velocity"
    held = toy_2d("moons", 2000, seed=5)
    for sampler in ("ddim", "dpm++2m", "euler_maruyama", "pc"):
        with torch.no_grad():
            r = unstir.sample(model, None, (2000, 2), sampler=sampler, steps=30,
                              generator=torch.Generator().manual_seed(0))
        assert sliced_w2(r.x, held) < 0.2, sampler
