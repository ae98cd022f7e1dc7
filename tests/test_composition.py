"""The composition matrix: every model wrapper under every use of the score (docs/composition.md).

Each row is a model built from the exact Gaussian-mixture oracle through one wrapper or adapter, paired with the
exact oracle model it must equal as a function of (x, t), derivatives included: a prediction type converted,
a guided model at scale 1 (the class's own mixture), cfg at s = 1 (the conditional) and s = 0 (the
unconditional), PiGDM on isotropic Gaussian data (the exact posterior), the diffusers and k-diffusion
adapters (the model they wrap). Each column is a use. A cell runs the use on the row's model and on its exact
reference with the same noise and asserts the same numbers to rounding; the uses themselves are checked
against closed forms on the references in test_samplers, test_likelihood, test_inversion, test_inverse and
test_tuning. A cell that cannot be exact is refused with one line (``REFUSED``), and the test checks the line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import unstir
from unstir.adapters.diffusers import from_diffusers, process_from_config
from unstir.adapters.karras import from_karras, to_karras
from unstir.inverse import Measurement, dps, pigdm, repaint, twisted_smc
from unstir.oracle import GaussianMixture, unequal_2d
from unstir.parametrization import Denoiser, from_eps
from unstir.teleport import Moments

CLASSES = [0, 1, 1]
GM = unequal_2d()
TARGET = GM.subset([1, 2])  # class 1 of CLASSES
GAUSS = GaussianMixture([1.0], [[0.3, -0.2]], [0.5])
GAUSS_M = Measurement(torch.tensor([[1.0, 0.5]], dtype=torch.float64), torch.tensor([0.4]), 0.3, data_shape=(2,))
POSTERIOR = GAUSS.posterior_given(GAUSS_M.matrix, GAUSS_M.y, 0.3)
VP = unstir.make_process("vp")
DIFFUSERS_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
DDPM = process_from_config(DIFFUSERS_CONFIG)[0]
KARRAS_SIGMAS = (float(VP.sigma(VP.t_min) / VP.alpha(VP.t_min)), float(VP.sigma(VP.T) / VP.alpha(VP.T)))
KARRAS_VE = from_karras(lambda x, s: x, *KARRAS_SIGMAS).process
RF = unstir.make_process("rf")


def _predicting(kind: str, mixture: GaussianMixture, process, *, detached: bool = False) -> Denoiser:
    """A network that outputs the exact ``kind`` prediction, wrapped as a network would be."""
    def net(x, t):
        x_in = x.detach() if detached else x
        return from_eps(kind, mixture.eps(x_in, t, process), x_in, process.coefficients(t).expand_as(x))
    net.device = mixture.means.device
    return Denoiser(net, process, kind, time_dtype=torch.float64, data_shape=(2,))


def _preconditioned(mixture: GaussianMixture, process, sigma_data: float = 0.7) -> Denoiser:
    """EDM's preconditioned network (prediction 'edm') around the exact eps: it sees only c_in x and c_noise."""
    def net(x_in, c_noise):
        t = process.t_from_log_snr(-4 * c_noise.to(torch.float64))
        c = process.coefficients(t).expand_as(x_in)
        x = x_in * (c.sigma**2 + c.alpha**2 * sigma_data**2).sqrt()  # undo c_in = 1 / r
        return from_eps("edm", mixture.eps(x, t, process), x, c, sigma_data)
    net.device = mixture.means.device
    return Denoiser(net, process, "edm", time_dtype=torch.float64, data_shape=(2,), sigma_data=sigma_data)


def _conditional():
    return GM.class_conditional_denoiser(VP, CLASSES)


def _diffusers_model():
    """A diffusers-style UNet call (sample, integer-scale timestep) -> v prediction, from the oracle."""
    def unet(sample, timestep):
        t = (timestep.to(torch.float64) + 1) / DDPM.num_steps
        eps = GM.eps(sample, t, DDPM)
        return from_eps("v", eps, sample, DDPM.coefficients(t).expand_as(sample))
    unet.device = GM.means.device
    return from_diffusers(unet, DIFFUSERS_CONFIG, data_shape=(2,))


# the exact oracle models the rows must equal
REFERENCES = {
    "mixture": lambda: GM.denoiser(VP),
    "class 1": lambda: TARGET.denoiser(VP),
    "posterior": lambda: POSTERIOR.denoiser(VP),
    "mixture (ddpm)": lambda: GM.denoiser(DDPM),
    "mixture (ve)": lambda: GM.denoiser(KARRAS_VE),
    "mixture (rf)": lambda: GM.denoiser(RF),
}

# row name -> (model factory, its reference, labels passed at use time)
ROWS = {
    **{f"Denoiser({k})": (lambda k=k: _predicting(k, GM, VP), "mixture", None)
       for k in ("eps", "x0", "v", "score", "velocity")},
    "Denoiser(edm)": (lambda: _preconditioned(GM, VP), "mixture", None),
    "class-conditional": (lambda: GM.class_conditional_denoiser(VP, CLASSES), "class 1", 1),
    "guided (exact classifier, scale 1)": (
        lambda: unstir.guided(GM.denoiser(VP), GM.classifier(VP, CLASSES), y=1), "class 1", None),
    "cfg (s = 1)": (lambda: unstir.cfg(GM.class_conditional_denoiser(VP, CLASSES), y=1, scale=1.0),
                    "class 1", None),
    "cfg (s = 0)": (lambda: unstir.cfg(GM.class_conditional_denoiser(VP, CLASSES), y=1, scale=0.0),
                    "mixture", None),
    "cfg interval (s = 3, no level inside)": (lambda: unstir.cfg(_conditional(), y=1, scale=3.0, interval=(1e5, 1e6)),
                                              "class 1", None),
    "cfg rescale (s = 1, phi = 0.7)": (lambda: unstir.cfg(_conditional(), y=1, scale=1.0, rescale=0.7), "class 1", None),
    "cfg apg (s = 1)": (lambda: unstir.cfg(_conditional(), y=1, scale=1.0, apg={"eta": 0.0, "momentum": -0.5}),
                        "class 1", None),
    "autoguidance (guide = the model, s = 2)": (
        lambda: unstir.autoguidance(_conditional(), _conditional(), y=1, scale=2.0), "class 1", None),
    "pigdm (Gaussian Jacobian)": (lambda: pigdm(GAUSS.denoiser(VP), GAUSS_M, 0.5), "posterior", None),
    "pigdm (vjp Jacobian)": (lambda: pigdm(GAUSS.denoiser(VP), GAUSS_M, 0.5, jacobian="vjp"),
                             "posterior", None),
    "diffusers adapter": (_diffusers_model, "mixture (ddpm)", None),
    "k-diffusion adapter": (lambda: from_karras(to_karras(GM.denoiser(VP)), *KARRAS_SIGMAS, data_shape=(2,)),
                            "mixture (ve)", None),
    "rf (velocity)": (lambda: _predicting("velocity", GM, RF), "mixture (rf)", None),
    "rf (edm)": (lambda: _preconditioned(GM, RF), "mixture (rf)", None),
    "detached network (eps)": (lambda: _predicting("eps", GM, VP, detached=True), "mixture", None),
    "detached network (x0)": (lambda: _predicting("x0", GM, VP, detached=True), "mixture", None),
}

DETERMINISTIC = ("ddim", "ode_euler", "ode_heun", "ode_rk45", "dpm++2m", "dpm++3m", "deis", "ipndm", "unipc")
MASK = Measurement(torch.tensor([1, 0]), torch.tensor([0.4]), 0.2, data_shape=(2,))


def _x_T(model):
    return model.process.prior_sample((6, 2), torch.Generator().manual_seed(1), dtype=torch.float64)


def _data():
    return torch.tensor([[0.5, 0.3], [-1.0, 0.8], [1.2, -0.4], [0.0, 0.0]], dtype=torch.float64)


def _gen(seed=2):
    return torch.Generator().manual_seed(seed)


def _sample(sampler):
    return lambda m, y: unstir.sample(m, None, _x_T(m), sampler=sampler, steps=6, y=y, generator=_gen()).x


def _below_T(p):
    return torch.tensor([0.5 * p.T, 0.2 * p.T, 0.05 * p.T, p.t_min, 0.0], dtype=torch.float64)


MOMENTS = Moments(torch.tensor([0.3, -0.2]), torch.tensor([[1.0, 0.4], [0.4, 0.8]]))  # teleport's Gaussian

# use name -> use(model, labels) -> the numbers it produces
USES = {
    **{f"sample {s}": _sample(s) for s in DETERMINISTIC},
    "sample deis_gauss": lambda m, y: unstir.sample(m, None, _x_T(m), sampler="deis_gauss", steps=6, y=y,
                                                    teleport=MOMENTS).x,
    "sample ddpm": _sample("ddpm"),
    "log_likelihood exact": lambda m, y: unstir.log_likelihood(m, _data(), y=y).nats,
    "log_likelihood hutchinson": lambda m, y: unstir.log_likelihood(m, _data(), y=y, divergence="hutchinson",
                                                                    probes=2, generator=_gen()).nats,
    "encode ode_rk45": lambda m, y: unstir.encode(m, _data(), y=y).z,
    "encode ddim exact": lambda m, y: unstir.encode(m, _data(), sampler="ddim", steps=40, exact=True,
                                                           tol=1e-8, y=y).z,
    "decode ode_rk45": lambda m, y: unstir.decode(m, _x_T(m), y=y).x,
    "decode ddim": lambda m, y: unstir.decode(m, _x_T(m), sampler="ddim", steps=8, y=y).x,
    "interpolate": lambda m, y: unstir.interpolate(m, _data()[0], _data()[1], 4, y=y).x,
    "sample teleport": lambda m, y: unstir.sample(m, None, _x_T(m), sampler="ipndm", y=y, teleport=MOMENTS,
                                                  grid=_below_T(m.process)).x,
    "pilot_grid teleport": lambda m, y: unstir.pilot_grid(m, "ipndm", 4, n=8, fine=20, y=y, teleport=MOMENTS,
                                                          dtype=torch.float64).grid,
    "tune_grid": lambda m, y: unstir.tune_grid(m, "dpm++2m", 5, n=8, max_evals=6, y=y, dtype=torch.float64).grid,
    "repaint": lambda m, y: repaint(m, MASK, _x_T(m), 10, jump_length=5, resamples=2, y=y, generator=_gen()).x,
    "dps": lambda m, y: dps(m, MASK, _x_T(m), 10, zeta=0.5, y=y, generator=_gen()).x,
    "twisted_smc": lambda m, y: twisted_smc(m, MASK, 2, 10, particles=3, data_var=0.9, y=y, dtype=torch.float64,
                                            generator=_gen()).x,
}

# (row, use) -> the start of the one-line refusal
REFUSED = {
    (f"detached network ({k})", use): why for k in ("eps", "x0") for use, why in (
        ("log_likelihood exact", "the likelihood differentiates the model's output in x, but this model's output is "
                                 "detached"),
        ("log_likelihood hutchinson", "the likelihood differentiates the model's output in x, but this model's "
                                      "output is detached"),
        ("dps", "dps differentiates the model's output in x, but this model's output is detached"))
}

_cache: dict = {}


def _reference(row: str, use: str):
    key = (ROWS[row][1], use)
    if key not in _cache:
        _cache[key] = USES[use](REFERENCES[ROWS[row][1]](), None)
    return _cache[key]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an exact inversion that did not converge is no exact cell
@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("row", list(ROWS))
def test_every_model_under_every_use(row, use):
    factory, _, y = ROWS[row]
    model = factory()
    if (row, use) in REFUSED:
        with pytest.raises(ValueError, match="^" + re.escape(REFUSED[row, use])) as info:
            USES[use](model, y)
        assert "\n" not in str(info.value)
        return
    got = USES[use](model, y)
    torch.testing.assert_close(got, _reference(row, use), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("row", list(ROWS))
def test_every_model_under_every_use_on_another_device(row, use, monkeypatch):
    """The same cell with the model's data (the oracle's tensors), x_T and the data on a pretend CUDA device
    (tests/fake_device.py): a tensor born on the CPU and combined with the model's fails as on a GPU, and the
    numbers must be the CPU's (the noise is drawn on the CPU generator and moved)."""
    import tests.test_composition as here
    from tests.fake_device import other_device

    if (row, use) in REFUSED:
        return
    reference = _reference(row, use)
    x_T, data = here._x_T, here._data
    with other_device() as device:
        for name in ("GM", "TARGET", "GAUSS"):
            monkeypatch.setattr(here, name, getattr(here, name).to(device))
        monkeypatch.setattr(here, "_x_T", lambda m: x_T(m).to(device))
        monkeypatch.setattr(here, "_data", lambda: data().to(device))
        factory, _, y = ROWS[row]
        got = USES[use](factory(), y)
        if "grid" not in use:  # grids are CPU float64 by design (unstir.grids); samples follow the model
            assert got.device == device, f"{row} x {use}: the result is on {got.device}, the model on {device}"
        got = got.cpu()
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)


def test_the_documented_matrix_is_the_tested_one():
    """docs/composition.md names every row and use tested here, and marks exactly the refused cells."""
    text = (Path(__file__).parent.parent / "docs" / "composition.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model \\ use |"))
    table = [line for line in lines[start:] if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")][1:]
    assert header == list(USES)
    rows = {}
    for line in table[1:]:
        if line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    assert list(rows) == list(ROWS)
    for row, cells in rows.items():
        for use, cell in zip(USES, cells):
            assert cell == ("refused" if (row, use) in REFUSED else "exact"), (row, use, cell)
