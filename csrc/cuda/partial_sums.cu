// The backward's last step on CUDA: the fixed-order sums of its partial buffers (dA, dB, dC, dD,
// d(delta_bias)) into the gradients, all in one launch. Each gradient element is the sum of its
// slots in slot order (blocks of eight slots summed pairwise, the blocks added in order), rounded
// once into the gradient's type, so the result does not depend on the launch shape: the backward
// stays bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "scan_launch.cuh"

namespace selective_scan {
namespace {

// A launch's jobs. A job whose rows (runs of contiguous gradient elements: the whole gradient
// where it is contiguous, a state slice's columns otherwise) are a multiple of four elements long
// is summed four elements per thread by 16-byte loads (kVec4 units; the four are then in one row),
// others one element per thread: each element's sum is formed the same way in both.
constexpr int kVec4 = 4;
struct SlotSumJobs {
  SlotSum job[kMaxSlotSums];
  int unit[kMaxSlotSums];      // elements per thread: kVec4 or 1
  int64_t end[kMaxSlotSums];   // running totals of the jobs' units
  int count = 0;
};

// Sums over `slots` of the kN consecutive floats at src + s * stride, s in slot order (see the
// file comment); kN = kVec4 reads them by one 16-byte load per slot.
template <int kN>
__device__ __forceinline__ void sum_slots(const float* __restrict__ src, int64_t slots, int64_t stride,
                                          float (&total)[kN]) {
  using Vec = std::conditional_t<kN == kVec4, float4, float>;
  static_assert(sizeof(Vec) == kN * sizeof(float), "one load per slot");
#pragma unroll
  for (int k = 0; k < kN; ++k) total[k] = 0.f;
  for (int64_t s0 = 0; s0 < slots; s0 += 8) {
    float x[8][kN];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      Vec v;
      if (s0 + j < slots) {
        v = *reinterpret_cast<const Vec*>(src + (s0 + j) * stride);
      } else {
        v = Vec{};
      }
      memcpy(x[j], &v, sizeof(v));
    }
#pragma unroll
    for (int k = 0; k < kN; ++k)
      total[k] += ((x[0][k] + x[1][k]) + (x[2][k] + x[3][k])) + ((x[4][k] + x[5][k]) + (x[6][k] + x[7][k]));
  }
}

// Where element e of a job (in the element order of a slot) lies in its gradient.
__device__ __forceinline__ int64_t dst_offset(const SlotSum& w, int64_t e) {
  return w.row_stride == w.inner ? e : (e / w.inner) * w.row_stride + e % w.inner;
}

__device__ __forceinline__ void store_sum(const SlotSum& w, int64_t o, float v) {
  switch (w.dst_type) {
    case ScalarKind::kBFloat16: static_cast<__nv_bfloat16*>(w.dst)[o] = __float2bfloat16_rn(v); break;
    case ScalarKind::kFloat16: static_cast<__half*>(w.dst)[o] = __float2half_rn(v); break;
    default: {
      float* dst = static_cast<float*>(w.dst) + o;
      *dst = w.accumulate ? *dst + v : v;
    }
  }
}

__global__ void sum_partial_slots_kernel(const SlotSumJobs jobs) {
  const int64_t total = jobs.end[jobs.count - 1];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int j = 0;
    while (i >= jobs.end[j]) ++j;
    const SlotSum& w = jobs.job[j];
    const int64_t stride = w.rows * w.inner;
    if (jobs.unit[j] == kVec4) {
      const int64_t e = (i - (j > 0 ? jobs.end[j - 1] : 0)) * kVec4;  // first element within the job
      float v[kVec4];
      sum_slots<kVec4>(w.src + e, w.slots, stride, v);
      const int64_t o = dst_offset(w, e);  // (the four elements lie in one row)
#pragma unroll
      for (int k = 0; k < kVec4; ++k) store_sum(w, o + k, v[k]);
    } else {
      const int64_t e = i - (j > 0 ? jobs.end[j - 1] : 0);
      float v[1];
      sum_slots<1>(w.src + e, w.slots, stride, v);
      store_sum(w, dst_offset(w, e), v[0]);
    }
  }
}

}  // namespace

void sum_partial_slots_cuda(const SlotSum* sums, int count, cudaStream_t stream) {
  if (count < 0 || count > kMaxSlotSums)
    throw std::runtime_error("selective_scan: too many partial sums in one launch");
  SlotSumJobs jobs;
  int64_t total = 0;
  for (int k = 0; k < count; ++k) {
    const SlotSum& w = sums[k];
    if (w.dst_type == ScalarKind::kFloat64 || (w.accumulate && w.dst_type != ScalarKind::kFloat32))
      throw std::runtime_error("selective_scan: partial sums go into fp32, fp16 or bf16 (accumulate: fp32)");
    const int64_t elements = w.rows * w.inner;
    if (elements == 0) continue;
    const bool vec = w.inner % kVec4 == 0 && reinterpret_cast<uintptr_t>(w.src) % 16 == 0;
    jobs.unit[jobs.count] = vec ? kVec4 : 1;
    total += vec ? elements / kVec4 : elements;
    jobs.job[jobs.count] = w;
    jobs.end[jobs.count] = total;
    ++jobs.count;
  }
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{8} * cuda_detail::sm_count());
  cuda_detail::launch_checked(sum_partial_slots_kernel, dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream,
                              "sum_partial_slots_kernel launch", jobs);
}

}  // namespace selective_scan
