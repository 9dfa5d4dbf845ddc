// Launch templates shared by the per-dtype translation units (scan_{fwd,bwd}_<dtype>.cu), the
// host entry points (scan_cuda.cu) and the partial sums (partial_sums.cu): the block shape, the
// launch of one kernel instantiation, and the launch check.
#pragma once

#include <atomic>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "scan_common.cuh"
#include "scan_cuda.h"

namespace selective_scan {
namespace cuda_detail {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("selective_scan CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// The current device.
inline int current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

// An attribute of the current device, read from the driver once per device and attribute (the
// host side of a short call is part of its time: docs/design.md, item 62).
template <cudaDeviceAttr kAttr>
int device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not read yet (static storage starts zeroed)
  const int dev = current_device();
  const bool cached = dev >= 0 && dev < kMaxDevices;
  int value = cached ? known[dev].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    check_cuda(cudaDeviceGetAttribute(&value, kAttr, dev), "cudaDeviceGetAttribute");
    if (cached) known[dev].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Streaming multiprocessors of the current device.
inline int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// The largest dynamic shared memory granted so far to each (kernel, device), and its lock.
inline std::map<std::pair<const void*, int>, int>& smem_granted() {
  static std::map<std::pair<const void*, int>, int> granted;
  return granted;
}
inline std::mutex& smem_granted_mutex() {
  static std::mutex mutex;
  return mutex;
}

// Grants a kernel the dynamic shared memory it needs beyond the default 48 KB. The attribute holds
// for the kernel's later launches on the device, so it is set once per kernel, device and larger
// size, not at every launch.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  const std::lock_guard<std::mutex> lock(smem_granted_mutex());
  int& most = smem_granted()[{reinterpret_cast<const void*>(kernel), current_device()}];
  if (bytes <= most) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             "cudaFuncSetAttribute");
  most = bytes;
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
