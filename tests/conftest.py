"""pytest configuration: makes the in-place build importable, and skips tests marked `cuda`
(with the reason) when no GPU or no CUDA build of the extension is present."""
import os
import sys

import pytest
import torch  # before the extension: it loads the torch libraries _C links against

try:
    import selective_scan  # noqa: F401
except ImportError:  # an in-place build (setup.py build_ext --inplace) without PYTHONPATH
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import selective_scan  # noqa: F401


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False"
    if not selective_scan.build_info()["with_cuda"]:
        return "needs a CUDA build: selective_scan was built without CUDA kernels"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Each test starts from the same global RNG state (inputs come from seeded generators too)."""
    torch.manual_seed(0)
    yield
