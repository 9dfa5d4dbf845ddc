"""selective_scan: Mamba's selective state-space scan (S6) as a PyTorch op, with CUDA and CPU
kernels for forward and backward. See README.md and docs/api.md."""
import torch  # noqa: F401  (loads libtorch, which the native library links against)

from . import _C
from .functional import CHECKPOINT_CHUNK, SelectiveScanFn, selective_scan, selective_scan_fn
from .reference import selective_scan_parallel_ref, selective_scan_ref
from .decode import selective_state_update, selective_state_update_ref
from . import nn, ssm  # noqa: E402  (modules, generation, SSM tools; see docs/modules.md)

__version__ = _C.__version__


def build_info() -> dict:
    """How the native library was built: version, CUDA support and the compiled CUDA archs."""
    return {"version": _C.__version__, "with_cuda": bool(_C.with_cuda), "cuda_archs": _C.cuda_archs}


__all__ = ["selective_scan", "selective_scan_fn", "SelectiveScanFn", "selective_scan_ref",
           "selective_scan_parallel_ref", "build_info",
           "selective_state_update", "selective_state_update_ref", "nn", "ssm", "CHECKPOINT_CHUNK", "__version__"]
