"""The few-step stochastic samplers (issue 32): DPM-Solver++ SDE, Euler-ancestral, Restart, and the Brownian
path that makes an SDE solver's noise independent of its grid. Their convergence in distribution on the oracle
is in tests/test_samplers.py::test_stochastic_samplers_approach_exact_samples."""

import math

import pytest
import torch

import unstir
from unstir._random import BrownianNoise, SeedGenerators
from unstir.oracle import unequal_2d
from unstir.samplers import SAMPLERS, run_sampler
from unstir.samplers.ode import dpmpp
from unstir.samplers.stochastic import ddpm, edm, restart
from unstir.tuning import nfe_for_steps, steps_for_nfe


def _path(seed, times, shape=(2000, 3), dtype=torch.float64):
    """W(t_i) - W(t_{i+1}) over consecutive times (the increments, un-normalised by the interval between the
    times as the path rounds them, to 2^-32)."""
    b = BrownianNoise(torch.zeros(shape, dtype=dtype), torch.Generator().manual_seed(seed), 1.0)
    return [b(t, s) * math.sqrt((b._index(t) - b._index(s)) / 2**b.LEVELS) for t, s in zip(times[:-1], times[1:])]


def test_brownian_increments_do_not_depend_on_the_grid():
    """The increment over [0.1, 0.9] is the sum of the increments over any finer grid of it, to float64
    rounding: the path is fixed by the seed, not by which times are asked for. Fresh per-step draws (what a
    per-step generator gives) fail this by O(1)."""
    coarse = _path(0, [0.9, 0.1])[0]
    for fine in (torch.linspace(0.9, 0.1, 17, dtype=torch.float64).tolist(), [0.9, 0.7312, 0.5, 0.33, 0.1000001, 0.1]):
        assert (sum(_path(0, fine)) - coarse).abs().max() < 1e-12
    # the same times asked in another order (a second sampler pass) give the same path
    b = BrownianNoise(torch.zeros(5, 2, dtype=torch.float64), torch.Generator().manual_seed(3), 1.0)
    w = [b.path(t).clone() for t in (0.2, 0.8, 0.5)]
    assert torch.equal(b.path(0.8), w[1]) and torch.equal(b.path(0.2), w[0])
    g = torch.Generator().manual_seed(0)
    fresh = sum(torch.randn(2000, 3, generator=g, dtype=torch.float64) * math.sqrt(0.05) for _ in range(16))
    assert (fresh - coarse).abs().mean() > 0.3


def test_brownian_increments_are_independent_standard_normals():
    """Normalised increments over disjoint intervals: mean 0, variance 1, kurtosis 3, uncorrelated, at n =
    200,000 entries (tolerances: 5 standard errors; sd of the sample variance is sqrt(2/n), of the
    kurtosis sqrt(96/n))."""
    n = 200_000
    b = BrownianNoise(torch.zeros(n // 2, 2, dtype=torch.float64), torch.Generator().manual_seed(1), 1.0)
    z1, z2, z3 = (b(t, s).flatten() for t, s in ((1.0, 0.6), (0.6, 0.59), (0.3, 0.0)))
    for z in (z1, z2, z3):
        assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
        assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)
    for a, c in ((z1, z2), (z2, z3), (z1, z3)):
        assert abs((a * c).mean()) < 5 / math.sqrt(n)
    # a short increment is still N(0, 1) after normalisation: the bridge's fine levels are right
    assert abs(b(0.123456, 0.1234559).var() - 1) < 5 * math.sqrt(2 / n) * 2


def test_brownian_path_of_a_sample_depends_on_its_seed_alone():
    """With per-sample generators (what `unstir sample` uses), sample 6's path is the same in a batch of three
    and alone; the batch-wide generator is reproducible from its seed; a CPU path moved to another device
    is the one computed there (the arithmetic is integer hashing plus float64 log/cos)."""
    many = BrownianNoise(torch.zeros(3, 4), SeedGenerators([5, 6, 7]), 2.0)
    one = BrownianNoise(torch.zeros(1, 4), SeedGenerators([6]), 2.0)
    assert torch.equal(many(1.7, 0.3)[1], one(1.7, 0.3)[0])
    assert not torch.allclose(many(1.7, 0.3)[0], many(1.7, 0.3)[1])
    a = _path(11, [0.8, 0.4])[0]
    assert torch.equal(a, _path(11, [0.8, 0.4])[0]) and not torch.equal(a, _path(12, [0.8, 0.4])[0])


def test_brownian_refuses_times_it_cannot_resolve():
    b = BrownianNoise(torch.zeros(2, 2), torch.Generator().manual_seed(0), 1.0)
    with pytest.raises(ValueError, match="closer than T / 2"):
        b(0.5, 0.5 + 1e-12)
    with pytest.raises(ValueError, match=r"defined on \[0, 1\]"):
        b(1.5, 0.5)


def _oracle(name="vp"):
    p = unstir.make_process(name)
    return unequal_2d().denoiser(p), p


def test_dpmpp_sde_first_order_is_the_ddpm_posterior_step():
    """At eta = 1 and first order the exponential integrator's step is DDPM's: mean
    (sigma_s/sigma_t) e^{-h} x_t + alpha_s (1 - e^{-2h}) x0 and std sigma_s sqrt(1 - e^{-2h}). With fresh draws
    from the same generator the two samplers give the same samples to float64 rounding."""
    model, p = _oracle("vp")
    x = p.prior_sample((500, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = unstir.time_grid(p, 12, "log_snr")
    a = dpmpp(model, x, grid, order=1, eta=1.0, noise="fresh", generator=torch.Generator().manual_seed(4))
    b = ddpm(model, x, grid, generator=torch.Generator().manual_seed(4))
    assert (a - b).abs().max() < 1e-10


def test_dpmpp_sde_at_eta_zero_is_the_ode_solver():
    model, p = _oracle("ve")
    x = p.prior_sample((300, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = unstir.time_grid(p, 10, "log_snr")
    for order in (2, 3):
        assert torch.equal(dpmpp(model, x, grid, order=order, eta=0.0), dpmpp(model, x, grid, order=order))


@pytest.mark.parametrize("sampler", ["dpm++2m_sde", "dpm++3m_sde"])
def test_sde_solver_converges_pathwise_on_the_brownian_path(sampler):
    """Strong convergence: on one Brownian path the sample at N steps approaches the sample at 4N as N grows
    (the distance falls by more than 3x from N = 20 to N = 160 on the log-SNR grid). With a fresh draw per
    step the two runs are different samples, a distance of the data's own spread (more than 10x larger), so
    this fails for noise that changes with the grid."""
    model, p = _oracle("vp")
    x = p.prior_sample((400, 2), torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(steps, noise):
        return unstir.sample(model, p, x, sampler=sampler, steps=steps, grid="log_snr",
                             generator=torch.Generator().manual_seed(9), noise=noise).x

    gap = {n: (run(n, "brownian") - run(4 * n, "brownian")).norm(dim=1).mean().item() for n in (20, 160)}
    fresh = (run(160, "fresh") - run(640, "fresh")).norm(dim=1).mean().item()
    assert gap[160] < gap[20] / 3, gap
    assert fresh > 10 * gap[160], (fresh, gap)


def test_euler_ancestral_is_k_diffusions_formula_and_ddim_with_eta():
    """k-diffusion's sample_euler_ancestral in sigma (VE, alpha = 1): sigma_up = min(sigma_s, eta sqrt(sigma_s^2
    (sigma_t^2 - sigma_s^2) / sigma_t^2)), sigma_down = sqrt(sigma_s^2 - sigma_up^2), x <- x + (sigma_down -
    sigma_t) d + sigma_up z with d = eps. Written out here independently; unstir's is DDIM's eta line."""
    model, p = _oracle("ve")
    grid = unstir.time_grid(p, 9, "edm")
    x0 = p.prior_sample((300, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    for eta in (1.0, 0.5):
        g = torch.Generator().manual_seed(2)
        x = x0.clone()
        times = grid.tolist()
        for t, s in zip(times[:-1], times[1:]):
            out = model(x, t)
            if s == 0.0:
                x = out.x0
                continue
            st, ss = unstir.processes.coefficients(p, t).sigma, unstir.processes.coefficients(p, s).sigma
            up = min(ss, eta * math.sqrt(ss**2 * (st**2 - ss**2) / st**2))
            down = math.sqrt(ss**2 - up**2)
            x = x + (down - st) * out.eps + up * torch.randn(x.shape, generator=g, dtype=x.dtype)
        ours = unstir.sample(model, p, x0, sampler="euler_ancestral", grid=grid, eta=eta,
                             generator=torch.Generator().manual_seed(2)).x
        assert (ours - x).abs().max() < 1e-9, eta


def test_restart_with_no_restarts_is_edm_heun_and_counts_its_evaluations():
    model, p = _oracle("vp")
    x = p.prior_sample((200, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = unstir.time_grid(p, 12, "edm")
    assert torch.equal(restart(model, x, grid, restarts=0), edm(model, x, grid, churn=0.0))
    for opts in ({}, {"restarts": 1, "restart_steps": 5}):
        r = run_sampler(model, x, grid, "restart", generator=torch.Generator().manual_seed(0), **opts)
        assert r.nfe == nfe_for_steps("restart", 12, **opts) == 2 * 11 + 1 + 2 * opts.get("restarts", 2) * \
            opts.get("restart_steps", 3)
        assert steps_for_nfe("restart", r.nfe, **opts) == 12
    with pytest.raises(ValueError, match="its NFE is 2 m \\+ 13"):
        steps_for_nfe("restart", 10)


def test_restart_contracts_error_made_at_high_noise():
    """Xu et al.'s claim (2023, Thm. 2): the forward jump and the ODE back down contract the error the sampler
    accumulated before the restart interval. The model is the exact score plus a constant eps error wherever
    sigma/alpha > 1. Measured (seed 1 for x_T, 3 for restarts): at 8, 12 and 18 Heun steps, restart with the
    interval (0.06, 1.5) gives sliced-W2 0.27, 0.46, 0.47 where Heun at the same evaluations (27, 35, 47) gives
    0.86, 0.90, 0.92, and the default interval (0.06, 0.30) 0.37, 0.70, 0.75. With the exact score there is
    nothing to contract, and a finer Heun grid does better (0.03 against 0.15 at 27 evaluations): restart's
    gain is on model error, which is why the benchmark judges it on learned models."""
    from unstir.metrics import sliced_w2

    gm = unequal_2d()
    p = unstir.make_process("vp")
    bias = torch.tensor([1.0, -0.5], dtype=torch.float64)

    def net(x, t):
        c = unstir.processes.coefficients(p, t[0].item())
        return -c.sigma * gm.score(x, t[0].item(), p) + (0.5 if c.sigma / c.alpha > 1.0 else 0.0) * bias

    model = unstir.Denoiser(net, p, "eps")
    ref = gm.sample(20000, torch.Generator().manual_seed(100))
    x = p.prior_sample((20000, 2), torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = unstir.time_grid(p, 12, "edm")
    heun = sliced_w2(edm(model, x, grid, churn=0.0), ref)
    wide = unstir.sample(model, p, x, sampler="restart", grid=grid, interval=(0.06, 1.5),
                         generator=torch.Generator().manual_seed(3))
    default = unstir.sample(model, p, x, sampler="restart", grid=grid, generator=torch.Generator().manual_seed(3))
    same_cost = unstir.sample(model, p, x, sampler="edm", churn=0.0, steps=12 + (wide.nfe - 23) // 2)
    assert same_cost.nfe == wide.nfe == default.nfe
    w_wide, w_default, w_heun = sliced_w2(wide.x, ref), sliced_w2(default.x, ref), sliced_w2(same_cost.x, ref)
    assert w_wide < 0.6 * w_heun and w_default < 0.9 * w_heun and w_default < heun, (w_wide, w_default, w_heun)


def test_bad_options_of_the_new_samplers():
    model, p = _oracle("vp")
    for sampler, opts, text in [("dpm++2m_sde", {"eta": 1.5}, "eta must be in"),
                                ("dpm++2m_sde", {"noise": "pink"}, "noise"),
                                ("restart", {"interval": (0.3, 0.06)}, "0 < sbar_min < sbar_max"),
                                ("restart", {"restarts": -1}, "restarts must be an integer >= 0"),
                                ("restart", {"restart_steps": 0}, "restart_steps must be an integer >= 1")]:
        with pytest.raises(ValueError, match=text):
            unstir.sample(model, p, (4, 2), sampler=sampler, steps=5, **opts)


def test_the_new_samplers_are_registered_as_stochastic():
    for name in ("euler_ancestral", "dpm++2m_sde", "dpm++3m_sde", "restart", "sa_solver"):
        assert SAMPLERS[name].stochastic


def test_the_command_line_reaches_the_new_samplers_and_their_options(tmp_path, capsys):
    """`sample --sampler restart --nfe 27` makes 8 Heun steps and 12 restart evaluations and says so; options
    reach only the samplers that take them (one line, exit 2, nothing written)."""
    from unstir.cli import main

    run = tmp_path / "run"
    assert main(["train", "--steps", "10", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "s.npy"
    assert main(["sample", "--run", str(run), "--sampler", "restart", "--nfe", "27", "-n", "64", "--out", str(out)]) == 0
    assert "(27 model evaluations" in capsys.readouterr().out
    assert main(["sample", "--run", str(run), "--sampler", "dpm++2m_sde", "--noise", "fresh", "--eta", "0.5",
                 "--steps", "6", "-n", "64", "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    # --afs takes the run's stored data mean, in the pilot that places the grid and in the sampler
    assert main(["sample", "--run", str(run), "--afs", "--nfe", "5", "-n", "64", "--out", str(out), "--force"]) == 0
    assert "(5 model evaluations" in capsys.readouterr().out
    bad = tmp_path / "bad.npy"
    for argv, text in [(["--sampler", "ddpm", "--restarts", "1"], "--restarts does not apply to sampler 'ddpm'"),
                       (["--sampler", "dpm++2m", "--eta", "1"], "--eta does not apply to sampler 'dpm++2m'"),
                       (["--sampler", "restart", "--nfe", "10"], "its NFE is 2 m + 13"),
                       (["--sampler", "restart", "--interval", "0.3", "0.1"], "0 < sbar_min < sbar_max")]:
        assert main(["sample", "--run", str(run), "-n", "8", "--out", str(bad)] + argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, (argv, err)
    assert not bad.exists()


def test_sa_solver_weights_are_dpm_solvers_closed_forms():
    """The quadrature weights b_j equal the exponential integrator's closed forms: one node, 1 - e^{-kh}
    (-phi_1 at h_eta = k h); two nodes 0 and -r h, the linear interpolant's integral -phi_1 m0 + phi_2 (m0 - m1)/r
    (DPM-Solver++'s Taylor form at h_eta)."""
    from unstir.samplers.stochastic import _exp_lagrange_weights

    for h, k, r in ((0.3, 1.0, 1.0), (1.7, 2.0, 0.6), (0.05, 1.25, 2.0)):
        he = k * h
        phi1 = math.expm1(-he)
        phi2 = phi1 / he + 1
        (b0,) = _exp_lagrange_weights([0.0], h, k)
        assert abs(b0 + phi1) < 1e-13
        c0, c1 = _exp_lagrange_weights([0.0, -r * h], h, k)
        assert abs(c0 - (-phi1 + phi2 / r)) < 1e-12 and abs(c1 + phi2 / r) < 1e-12


def test_sa_solver_at_tau_zero_draws_no_noise_and_tau_one_does():
    model, p = _oracle("vp")
    x = p.prior_sample((200, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [unstir.sample(model, p, x, sampler="sa_solver", steps=10, tau=tau,
                          generator=torch.Generator().manual_seed(seed)).x for tau in (0.0, 1.0) for seed in (1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[2], runs[3])
    r = unstir.sample(model, p, x, sampler="sa_solver", steps=10)
    assert r.nfe == 10  # the corrector reuses the next step's evaluation
    for opts, text in (({"tau": -1.0}, "tau must be in"), ({"predictor_order": 5}, "predictor_order must be"),
                       ({"window": (0.8, 0.2)}, "window must be")):
        with pytest.raises(ValueError, match=text):
            unstir.sample(model, p, x, sampler="sa_solver", steps=5, **opts)
