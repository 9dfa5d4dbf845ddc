// The bwd kernels for bf16 inputs: one translation unit per (direction, dtype) so builds run in parallel.
#include "scan_bwd.cuh"

namespace selective_scan {
namespace cuda_detail {
template bool launch_scan_bwd<__nv_bfloat16>(const ScanBwdParams&, const ScanBwdPartials&, const BlockShape&, cudaStream_t);
}  // namespace cuda_detail
}  // namespace selective_scan
