import pytest
import torch

import unstir

ALL_PROCESSES = ["vp", "vp_cosine", "subvp", "ve", "ddpm"]


@pytest.fixture(params=ALL_PROCESSES)
def process(request):
    return unstir.make_process(request.param)


def sliced_w2(x, y, n_proj=256, seed=0):
    """Sliced Wasserstein-2 distance between two equal-size samples."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0)
    px, _ = torch.sort(x.double() @ d, 0)
    py, _ = torch.sort(y.double() @ d, 0)
    return ((px - py) ** 2).mean().sqrt().item()
