import os
import secrets

import numpy as np
import pytest

import tinyserve


def pytest_collection_modifyitems(config, items):
    if tinyserve.cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible (or tinyserve built without CUDA)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """Fresh random data on every run; the seed is printed on failure (and can be forced with
    TINYSERVE_TEST_SEED) so a failing draw can be replayed."""
    seed = int(os.environ.get("TINYSERVE_TEST_SEED", secrets.randbits(32)))
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)
