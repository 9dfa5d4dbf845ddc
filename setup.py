"""Builds the selective_scan extension: the CPU kernels always, the CUDA kernels where nvcc and a
CUDA-enabled torch are present. Respects TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch)
and MAX_JOBS. SELECTIVE_SCAN_FORCE_CPU=1 builds the CPU kernels only."""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    if os.environ.get("SELECTIVE_SCAN_FORCE_CPU", "0") == "1":
        return False
    import torch

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime_api.h")):
        print(f"selective_scan: no CUDA headers under {cpp_extension.CUDA_HOME}; building the CPU kernels only")
        return False
    return True


sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
define_macros = [("SELECTIVE_SCAN_VERSION", f'"{VERSION}"')]
cxx_flags = ["-O3"]
link_flags = []
if sys.platform.startswith("linux"):
    # at::parallel_for runs in parallel only in code compiled with OpenMP; torch already loads libgomp.
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
if want_cuda():
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        # No GPU to take the arch from: build for Hopper (sm_90) rather than torch's long default list.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources += rel("csrc/cuda/*.cu")
    define_macros.append(("SELECTIVE_SCAN_WITH_CUDA", None))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                  "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    ext = cpp_extension.CUDAExtension(
        "selective_scan._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
else:
    ext = cpp_extension.CppExtension(
        "selective_scan._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

setup(
    name="selective_scan",
    version=VERSION,
    description="Mamba's selective scan (S6) for PyTorch: CUDA and CPU kernels, forward and backward",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest"], "plot": ["matplotlib"]},
)
