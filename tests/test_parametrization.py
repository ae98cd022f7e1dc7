"""Every conversion between eps, x0, v and score is exact."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unstir
from unstir.parametrization import PREDICTIONS, convert

from .conftest import ALL_PROCESSES


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_every_conversion_pair_round_trips(name):
    p = unstir.make_process(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = p.t_min + (p.T - p.t_min) * torch.rand(64, generator=g, dtype=torch.float64)
    a, s = p.alpha(t)[:, None], p.sigma(t)[:, None]
    x = a * x0 + s * eps
    truth = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        got = convert(truth[src], src, dst, x, a, s)
        torch.testing.assert_close(got, truth[dst], rtol=1e-10, atol=1e-10, msg=f"{src}->{dst}")
        back = convert(got, dst, src, x, a, s)
        torch.testing.assert_close(back, truth[src], rtol=1e-10, atol=1e-10, msg=f"{src}->{dst}->{src}")


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_denoiser_exposes_all_four_for_any_prediction(kind):
    """A network that predicts `kind` exactly (from the oracle) yields the oracle's eps, x0, score, v."""
    p = unstir.make_process("vp")
    gm = unstir.oracle.unequal_2d()
    exact = gm.denoiser(p)
    x = torch.randn(32, 2, dtype=torch.float64)
    t = 0.3
    ref = exact(x, t)
    net = lambda x, t_in: getattr(gm.denoiser(p)(x, t_in.to(torch.float64)), kind)  # noqa: E731
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


@given(alpha=st.floats(1e-3, 1.0), sigma=st.floats(1e-3, 60.0), kind=st.sampled_from(PREDICTIONS),
       seed=st.integers(0, 2**16))
@settings(max_examples=200, deadline=None)
def test_conversions_round_trip_for_any_alpha_sigma(alpha, sigma, kind, seed):
    """Property: for any (alpha, sigma), not only those of the built-in processes, every prediction
    converts to eps and back exactly (float64)."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    pred = convert(eps, "eps", kind, x, alpha, sigma)
    torch.testing.assert_close(convert(pred, kind, "eps", x, alpha, sigma), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(convert(eps, "eps", "x0", x, alpha, sigma), x0, rtol=1e-9, atol=1e-9 * (1 + sigma / alpha))
