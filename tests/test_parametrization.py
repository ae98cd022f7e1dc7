"""Every conversion between eps, x0, v, score and velocity is exact."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unstir
from unstir.parametrization import PREDICTIONS, convert
from unstir.processes import Coefficients

from .conftest import ALL_PROCESSES


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_every_conversion_pair_round_trips(name):
    p = unstir.make_process(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = p.t_min + (p.T - p.t_min) * torch.rand(64, generator=g, dtype=torch.float64)
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    c = p.coefficients(t).expand_as(x0)
    # alpha' and sigma' by central differences of the marginal's own coefficients: an independent route.
    h = 1e-6 * (p.T - p.t_min)
    tp, tm = (t + h).clamp(max=p.T), (t - h).clamp(min=p.t_min)
    da = ((p.alpha(tp) - p.alpha(tm)) / (tp - tm))[:, None]
    ds = ((p.sigma(tp) - p.sigma(tm)) / (tp - tm))[:, None]
    x = a * x0 + s * eps
    truth = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s, "velocity": da * x0 + ds * eps,
             "edm": edm_target(x0, x, a, s)}
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        tol = 1e-4 if "velocity" in (src, dst) else 1e-10  # the finite-difference truth limits velocity
        if name == "ddpm" and "velocity" in (src, dst):
            continue  # piecewise-linear log-SNR: derivatives jump at the knots; covered by the identity below
        got = convert(truth[src], src, dst, x, c)
        torch.testing.assert_close(got, truth[dst], rtol=tol, atol=tol, msg=f"{src}->{dst}")
        back = convert(got, dst, src, x, c)
        torch.testing.assert_close(back, truth[src], rtol=1e-10, atol=1e-10, msg=f"{src}->{dst}->{src}")
    # velocity is alpha' x0 + sigma' eps with the record's own derivatives on every process, DDPM included.
    torch.testing.assert_close(convert(eps, "eps", "velocity", x, c), c.dalpha * x0 + c.dsigma * eps,
                               rtol=1e-10, atol=1e-10)


def edm_target(x0, x, a, s, sd=0.5):
    """EDM's F as Karras et al. (2022, Table 1 and eq. 7-8) write it, for x / s(t) at sigma~ = sigma / alpha:
    D(x~) = c_skip x~ + c_out F with x~ = x / alpha, so F = (x0 - c_skip x~) / c_out."""
    sb = s / a
    c_skip, c_out = sd**2 / (sb**2 + sd**2), sb * sd / (sb**2 + sd**2).sqrt()
    return (x0 - c_skip * x / a) / c_out


def edm_net(gm, p, sd=0.5):
    """An EDM-preconditioned network around the oracle's exact x0: it sees only c_in x and c_noise, recovers
    t and x from them (with EDM's own formulas) and returns F."""
    def net(x_in, c_noise):
        t = p.t_from_log_snr(-4 * c_noise.to(torch.float64))
        a, s = p.alpha(t), p.sigma(t)
        shape = (-1,) + (1,) * (x_in.dim() - 1)
        a, s = a.reshape(shape), s.reshape(shape)
        sb = s / a
        x = x_in.to(torch.float64) * (sb**2 + sd**2).sqrt() * a  # c_in(sigma~) = 1 / sqrt(sigma~^2 + sd^2) on x / alpha
        x0 = gm.x0(x, t, p)
        return edm_target(x0, x, a, s, sd).to(x_in.dtype)
    return net


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_denoiser_exposes_every_prediction_for_any_prediction(kind):
    """A network that predicts `kind` exactly (from the oracle) yields the oracle's eps, x0, score, v, velocity."""
    p = unstir.make_process("vp")
    gm = unstir.oracle.unequal_2d()
    exact = gm.denoiser(p)
    x = torch.randn(32, 2, dtype=torch.float64)
    t = 0.3
    ref = exact(x, t)
    net = lambda x, t_in: getattr(gm.denoiser(p)(x, t_in.to(torch.float64)), kind)  # noqa: E731
    if kind == "edm":
        net = edm_net(gm, p)
    out = unstir.Denoiser(net, p, kind)(x, t)
    for k in PREDICTIONS:
        torch.testing.assert_close(getattr(out, k), getattr(ref, k), rtol=1e-10, atol=1e-10)
    # Tweedie, explicitly: score = -eps / sigma and x0 = (x + sigma^2 score) / alpha.
    torch.testing.assert_close(ref.score, -ref.eps / p.sigma(t).item(), rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.x0, gm.x0(x, t, p), rtol=1e-12, atol=1e-12)


def test_discrete_labels_reach_the_network():
    p = unstir.make_process("ddpm")
    seen = []
    model = unstir.Denoiser(lambda x, t: seen.append(t) or torch.zeros_like(x), p, discrete_labels=True)
    model(torch.zeros(3, 2), p.t_from_timestep(499).item())
    model(torch.zeros(3, 2), p.t_from_timestep(torch.tensor([0, 10, 999])))
    assert seen[0].tolist() == pytest.approx([499.0] * 3)
    assert seen[1].tolist() == pytest.approx([0.0, 10.0, 999.0])


@given(alpha=st.floats(1e-3, 1.0), sigma=st.floats(1e-3, 60.0), drift=st.floats(-50.0, 0.0),
       g2=st.floats(1e-3, 1e3), kind=st.sampled_from(PREDICTIONS), seed=st.integers(0, 2**16))
@settings(max_examples=200, deadline=None)
def test_conversions_round_trip_for_any_coefficients(alpha, sigma, drift, g2, kind, seed):
    """Property: for any coefficient record, not only those of the built-in processes, every prediction
    converts to eps and back exactly (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    c = Coefficients(alpha, sigma, 0.0, drift, g2)
    pred = convert(eps, "eps", kind, x, c)
    scale = 1 + (abs(drift) * 2 * sigma / g2 * x.abs().max().item() if kind == "velocity" else 0)
    torch.testing.assert_close(convert(pred, kind, "eps", x, c), eps, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(convert(eps, "eps", "x0", x, c), x0, rtol=1e-9, atol=1e-9 * (1 + sigma / alpha))
