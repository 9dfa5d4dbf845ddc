// The fwd kernels for bf16 inputs: one translation unit per (direction, dtype) so builds run in parallel.
#include "scan_fwd.cuh"

namespace selective_scan {
namespace cuda_detail {
template bool launch_scan_fwd<__nv_bfloat16>(const ScanParams&, const BlockShape&, cudaStream_t);
}  // namespace cuda_detail
}  // namespace selective_scan
