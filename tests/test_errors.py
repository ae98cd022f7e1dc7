"""Bad input raises a ValueError that names the bad value and what is allowed."""

import pytest
import torch

import unstir
from unstir.oracle import GaussianMixture, ring
from unstir.processes import DDPM


def test_unknown_process_name():
    with pytest.raises(ValueError, match=r"unknown process 'vpp'.*'ddpm'.*'subvp'.*'ve'.*'vp'"):
        unstir.make_process("vpp")


def test_unknown_schedule_grid_and_prediction_names():
    p = unstir.make_process("vp")
    with pytest.raises(ValueError, match=r"unknown grid 'karras'.*'edm'.*'log_snr'"):
        unstir.time_grid(p, 10, "karras")
    with pytest.raises(ValueError, match=r"unknown prediction 'noise'.*'eps'"):
        unstir.Denoiser(lambda x, t: x, p, "noise")


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_beta_outside_open_unit_interval(bad):
    betas = torch.linspace(1e-4, 0.02, 10, dtype=torch.float64)
    betas[3] = bad
    with pytest.raises(ValueError, match=r"open interval \(0, 1\); beta\[3\] = "):
        DDPM(betas)


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm"])
def test_t_outside_range(name):
    p = unstir.make_process(name)
    for t in [p.t_min / 2, p.T + 0.01, -1.0, float("nan")]:
        with pytest.raises(ValueError, match=r"t must lie in \[t_min, T\]"):
            p.alpha(t)
    with pytest.raises(ValueError, match=r"t must lie in \[t_min, T\]"):
        ring().denoiser(p)(torch.zeros(2, 2), p.T * 2)


def test_mismatched_shapes():
    p = unstir.make_process("vp")
    with pytest.raises(ValueError, match=r"noise shape \(3, 2\) must equal x0 shape \(3, 3\)"):
        p.perturb(torch.zeros(3, 3), 0.5, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(3,\), got shape \(4,\)"):
        p.perturb(torch.zeros(3, 3), torch.full((4,), 0.5), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\), got \(4, 3\)"):
        ring().score(torch.zeros(4, 3), 0.5, p)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        GaussianMixture([1.0, 1.0, 1.0], torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match=r"covs must have shape \(2, 2, 2\)"):
        GaussianMixture([1.0, 1.0], torch.zeros(2, 2), torch.ones(2, 3, 3))


def test_covariance_not_positive_definite():
    covs = torch.stack([torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])]).double()
    with pytest.raises(ValueError, match=r"covariance 1 is not positive definite: smallest eigenvalue -1"):
        GaussianMixture([0.5, 0.5], torch.zeros(2, 2), covs)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture([1.0], torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))


def test_process_parameters():
    with pytest.raises(ValueError, match=r"beta_min and beta_max must be positive.*beta_min=-1"):
        unstir.make_process("vp", beta_min=-1.0)
    with pytest.raises(ValueError, match=r"0 < sigma_min < sigma_max.*sigma_min=5.*sigma_max=1"):
        unstir.make_process("ve", sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        unstir.time_grid(unstir.make_process("vp"), 0)
