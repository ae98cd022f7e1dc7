import pytest

import unstir
import unstir.metrics

ALL_PROCESSES = ["vp", "vp_cosine", "subvp", "ve", "ddpm", "rf"]


@pytest.fixture(params=ALL_PROCESSES)
def process(request):
    return unstir.make_process(request.param)


sliced_w2 = unstir.metrics.sliced_w2
