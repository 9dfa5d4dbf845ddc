// Launch templates shared by the per-dtype translation units (scan_{fwd,bwd}_<dtype>.cu), the
// host entry points (scan_cuda.cu) and the partial sums (partial_sums.cu): the block shape, the
// launch of one kernel instantiation, and the launch check.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "scan_common.cuh"
#include "scan_cuda.h"

namespace selective_scan {
namespace cuda_detail {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("selective_scan CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// An attribute of the current device.
inline int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&value, attr, dev), "cudaDeviceGetAttribute");
  return value;
}

// Streaming multiprocessors of the current device.
inline int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// Grants a kernel the dynamic shared memory it needs (beyond the default 48 KB).
template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute");
  }
}

// Calls f(std::integral_constant<int, spt>{}) for the states-per-thread values the kernels are
// compiled for (1 and 4).
template <typename F>
void dispatch_spt(int spt, F&& f) {
  switch (spt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: throw std::runtime_error("selective_scan: unsupported states per thread");
  }
}

// Launches `kernel` with `smem` bytes of dynamic shared memory on `stream` and checks the launch.
template <typename Kernel, typename... Args>
void launch_checked(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, const char* what,
                    const Args&... args) {
  set_smem(kernel, smem);
  kernel<<<grid, threads, smem, stream>>>(args...);
  check_cuda(cudaGetLastError(), what);
}

inline int64_t grid_blocks(const ScanParams& p, const BlockShape& s) {
  const int64_t blocks = p.batch * s.segments * s.blocks_per_seg;
  if (blocks > 2147483647LL) throw std::runtime_error("selective_scan: batch * dim too large for one grid");
  return blocks;
}

// The grid of the sequence split's combine kernels: 256 threads, one per (b, d, n).
inline dim3 per_state_grid(const ScanParams& p) {
  return dim3(static_cast<unsigned>((p.batch * p.dim * p.dstate + 255) / 256));
}

// false where p.out_f32 asks for a layout that has no fp32-output build (nothing is launched).
template <typename input_t>
bool launch_scan_fwd(const ScanParams& p, const BlockShape& s, cudaStream_t stream);
template <typename input_t>
bool launch_scan_bwd(const ScanBwdParams& p, const ScanBwdPartials& parts, const BlockShape& s,
                     cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace selective_scan
