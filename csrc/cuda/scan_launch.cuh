// Launch templates shared by the per-dtype translation units (scan_{fwd,bwd}_<dtype>.cu) and the
// host entry points (scan_cuda.cu): the block shape, the launch of one kernel instantiation, and
// the launch check.
#pragma once

#include <stdexcept>
#include <string>

#include "scan_common.cuh"
#include "scan_cuda.h"

namespace selective_scan {
namespace cuda_detail {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("selective_scan CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// Grants a kernel the dynamic shared memory it needs (beyond the default 48 KB).
template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
  }
}

inline int64_t grid_blocks(const ScanParams& p, const BlockShape& s) {
  const int64_t blocks = p.batch * s.segments * s.blocks_per_seg;
  if (blocks > 2147483647LL) throw std::runtime_error("selective_scan: batch * dim too large for one grid");
  return blocks;
}

template <typename input_t>
void launch_scan_fwd(const ScanParams& p, const BlockShape& s, cudaStream_t stream);
template <typename input_t>
void launch_scan_bwd(const ScanBwdParams& p, const ScanBwdPartials& parts, const BlockShape& s,
                     cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace selective_scan
