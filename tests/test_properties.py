"""Property-based tests (hypothesis): processes, grids, samplers and conversions for any process, time,
step count, batch size, data shape and dtype."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unstir
from unstir.oracle import random_mixture
from unstir.parametrization import PREDICTIONS, convert

from .conftest import ALL_PROCESSES

PROCESSES = st.sampled_from(ALL_PROCESSES)
UNIT = st.floats(0.0, 1.0)


def _t(p, u):
    return p.t_min + (p.T - p.t_min) * u


@given(name=PROCESSES, u1=UNIT, u2=UNIT)
@settings(max_examples=300, deadline=None)
def test_process_properties(name, u1, u2):
    """log-SNR strictly decreasing, its inverse round-trips, alpha in (0, 1], sigma > 0, g^2 > 0."""
    p = unstir.make_process(name)
    t1, t2 = sorted((_t(p, u1), _t(p, u2)))
    lam1, lam2 = p.log_snr(t1).item(), p.log_snr(t2).item()
    if t2 - t1 > 1e-9:
        assert lam1 > lam2
    assert abs(p.t_from_log_snr(lam1).item() - t1) <= 1e-7 * max(1.0, t1)
    a, s = p.alpha(t1).item(), p.sigma(t1).item()
    assert 0 < a <= 1 + 1e-12 and s > 0 and p.g2(t1).item() > 0


@given(name=PROCESSES, steps=st.integers(1, 300), kind=st.sampled_from(unstir.GRIDS), denoise=st.booleans())
@settings(max_examples=300, deadline=None)
def test_grid_properties(name, steps, kind, denoise):
    p = unstir.make_process(name)
    g = unstir.time_grid(p, steps, kind, denoise=denoise)
    assert len(g) == steps + 1 and g[0].item() == p.T and (torch.diff(g) < 0).all()
    if denoise:
        assert g[-1].item() == 0.0 and (steps == 1 or g[-2].item() == p.t_min)
    else:
        assert g[-1].item() == p.t_min


@given(name=PROCESSES, sampler=st.sampled_from(sorted(unstir.SAMPLERS)), batch=st.integers(1, 9),
       dim=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]), steps=st.integers(1, 12))
@settings(max_examples=120, deadline=None)
def test_samplers_give_finite_samples_of_any_shape(name, sampler, batch, dim, dtype, steps):
    p = unstir.make_process(name)
    spec = unstir.SAMPLERS[sampler]
    if spec.needs is not None and not isinstance(p, spec.needs):
        return
    model = random_mixture(dim, 3, seed=dim).denoiser(p)
    r = unstir.sample(model, p, (batch, dim), sampler=sampler, steps=steps, dtype=dtype,
                      generator=torch.Generator().manual_seed(batch))
    assert r.x.shape == (batch, dim) and r.x.dtype == dtype and torch.isfinite(r.x).all()


@given(name=PROCESSES, u=UNIT, kind=st.sampled_from(PREDICTIONS), seed=st.integers(0, 2**16))
@settings(max_examples=300, deadline=None)
def test_conversions_round_trip_for_any_process_and_time(name, u, kind, seed):
    p = unstir.make_process(name)
    t = _t(p, u)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    c = p.coefficients(t)
    c = unstir.Coefficients(*(v.item() for v in c))
    x = c.alpha * x0 + c.sigma * eps
    pred = convert(eps, "eps", kind, x, c)
    scale = 1 + (abs(c.drift) * 2 * c.sigma / c.g2 * x.abs().max().item() if kind == "velocity" else 0)
    scale *= 1 + (c.sigma / c.alpha if kind in ("x0", "v") else 0) + (1 / c.sigma if kind == "score" else 0)
    assert math.isfinite(pred.abs().max().item())
    torch.testing.assert_close(convert(pred, kind, "eps", x, c), eps, rtol=1e-8, atol=1e-9 * scale)


@given(name=PROCESSES, sampler=st.sampled_from(sorted(unstir.SAMPLERS)), batch=st.integers(1, 5),
       shape=st.sampled_from([(1, 2, 2), (3, 2, 1), (2, 3)]), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=60, deadline=None)
def test_samplers_on_image_and_matrix_shaped_data(name, sampler, batch, shape, dtype):
    """The exact model of a mixture over flattened samples of any shape: every sampler keeps the shape."""
    p = unstir.make_process(name)
    spec = unstir.SAMPLERS[sampler]
    if spec.needs is not None and not isinstance(p, spec.needs):
        return
    d = math.prod(shape)
    flat = random_mixture(d, 2, seed=d).denoiser(p)
    model = unstir.Denoiser(lambda x, t: flat.net(x.reshape(len(x), d), t).reshape(x.shape), p,
                            time_dtype=torch.float64, data_shape=shape)
    r = unstir.sample(model, p, (batch, *shape), sampler=sampler, steps=4, dtype=dtype,
                      generator=torch.Generator().manual_seed(batch))
    assert r.x.shape == (batch, *shape) and r.x.dtype == dtype and torch.isfinite(r.x).all()
