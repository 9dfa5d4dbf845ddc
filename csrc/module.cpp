// The pybind11 module `selective_scan._C`: importing it loads the library, whose static
// initializers register the ops (bindings.cpp, state_update_bindings.cpp), and it reports how the
// library was built. It includes pybind11 alone, not torch/extension.h, which took most of the
// host code's compile time when bindings.cpp included it.
#include <pybind11/pybind11.h>

#include "selective_scan.h"

#ifdef SELECTIVE_SCAN_WITH_CUDA
#include "cuda/scan_cuda.h"
#endif

#ifndef SELECTIVE_SCAN_VERSION
#define SELECTIVE_SCAN_VERSION "0.0.0"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selective_scan native ops (registered under torch.ops.selective_scan) and build info";
  m.attr("__version__") = SELECTIVE_SCAN_VERSION;
#ifdef SELECTIVE_SCAN_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = selective_scan::scan_cuda_archs();
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
  m.attr("checkpoint_chunk") = selective_scan::kCheckpointChunk;
  m.attr("max_dstate") = selective_scan::kMaxDstate;
}
