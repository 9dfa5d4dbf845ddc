// CUDA kernel of the decode-step op: one recurrent step of the selective SSM, the fp32 state read
// once and written once (16-byte vector loads/stores where aligned). A row (batch, channel) is
// handled by kTPR lanes of a warp, each owning kChunks chunks of 4 states (loaded together, so several
// 16-byte loads are in flight per thread); y is reduced by shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "state_update_cuda.h"

namespace selective_scan {
namespace {

constexpr int kThreads = 128;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float load(const void* base, int64_t i) {
  return to_float<T>(__ldg(static_cast<const T*>(base) + i));
}

// Four consecutive elements of B or C as floats; `vec`: aligned to 4 elements.
template <typename T>
__device__ __forceinline__ void load4(const T* p, bool vec, int valid, float (&v)[4]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p));
      v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
      const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = to_float<T>(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < valid ? to_float<T>(__ldg(p + j)) : 0.f;
  }
}

__device__ __forceinline__ float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

template <int kTPR, int kChunks, typename TIn, typename TBC>
__global__ void __launch_bounds__(kThreads)
state_update_kernel(const StateUpdateParams p, const bool vec) {
  constexpr int kRowsPerBlock = kThreads / kTPR;
  const int64_t rows = p.batch * p.dim;
  const int lane = threadIdx.x % kTPR;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kTPR;
  // Rows past the end recompute the last row (so every lane reaches the shuffles) and store nothing.
  const bool active = row < rows;
  if (!active) row = rows - 1;
  const int64_t b = row / p.dim, d = row % p.dim;
  const int64_t g = d / (p.dim / p.n_groups);

  const float x = load<TIn>(p.x, b * p.x_batch_stride + d * p.x_dim_stride);
  float dt = load<TIn>(p.dt, b * p.dt_batch_stride + d * p.dt_dim_stride);
  if (p.dt_bias) dt += __ldg(p.dt_bias + d);
  if (p.dt_softplus) dt = softplus(dt);
  const float dtx = dt * x;

  float* s = p.state + b * p.state_batch_stride + d * p.state_dim_stride;
  const float* A = p.A + d * p.A_dim_stride;
  const TBC* B = static_cast<const TBC*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
  const TBC* C = static_cast<const TBC*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;

  // All loads of the row's states first (several 16-byte loads in flight per thread), then the
  // update, then the stores.
  float sv[kChunks][4], av[kChunks][4], bv[kChunks][4], cv[kChunks][4];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int n0 = 4 * (lane + i * kTPR);
    const int valid = n0 >= p.dstate ? 0 : static_cast<int>(p.dstate - n0 < 4 ? p.dstate - n0 : 4);
    if (vec && valid == 4) {
      const float4 q = __ldcs(reinterpret_cast<const float4*>(s + n0));
      sv[i][0] = q.x; sv[i][1] = q.y; sv[i][2] = q.z; sv[i][3] = q.w;
      const float4 a = __ldg(reinterpret_cast<const float4*>(A + n0));
      av[i][0] = a.x; av[i][1] = a.y; av[i][2] = a.z; av[i][3] = a.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sv[i][j] = j < valid ? s[n0 + j] : 0.f;
        av[i][j] = j < valid ? __ldg(A + n0 + j) : 0.f;
      }
    }
    load4<TBC>(B + n0, vec && valid == 4, valid, bv[i]);
    load4<TBC>(C + n0, vec && valid == 4, valid, cv[i]);
  }
  float y = 0.f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sv[i][j] = expf(dt * av[i][j]) * sv[i][j] + bv[i][j] * dtx;
      y += cv[i][j] * sv[i][j];  // zero for states past dstate: cv is 0 there
    }
  }
  if (active) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int n0 = 4 * (lane + i * kTPR);
      const int valid = n0 >= p.dstate ? 0 : static_cast<int>(p.dstate - n0 < 4 ? p.dstate - n0 : 4);
      if (vec && valid == 4) {
        __stcs(reinterpret_cast<float4*>(s + n0), make_float4(sv[i][0], sv[i][1], sv[i][2], sv[i][3]));
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (j < valid) s[n0 + j] = sv[i][j];
      }
    }
  }
#pragma unroll
  for (int off = kTPR / 2; off > 0; off /= 2) y += __shfl_xor_sync(0xffffffffu, y, off, kTPR);

  if (active && lane == 0) {
    if (p.D) y += __ldg(p.D + d) * x;
    if (p.z) {
      const float z = load<TIn>(p.z, b * p.z_batch_stride + d * p.z_dim_stride);
      y *= z / (1.f + expf(-z));
    }
    static_cast<TIn*>(p.out)[row] = from_float<TIn>(y);
  }
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename TIn, typename TBC>
void launch_typed(const StateUpdateParams& p, cudaStream_t stream) {
  const int64_t bc = sizeof(TBC);
  const bool vec = p.dstate % 4 == 0 && aligned(p.state, 16) && p.state_batch_stride % 4 == 0 &&
                   p.state_dim_stride % 4 == 0 && aligned(p.A, 16) && p.A_dim_stride % 4 == 0 &&
                   aligned(p.B, 4 * bc) && p.B_batch_stride % 4 == 0 && p.B_group_stride % 4 == 0 &&
                   aligned(p.C, 4 * bc) && p.C_batch_stride % 4 == 0 && p.C_group_stride % 4 == 0;
  const int64_t rows = p.batch * p.dim;
  const int64_t chunks = (p.dstate + 3) / 4;  // of 4 states
  auto go = [&](auto kernel, int tpr) {
    const int64_t rows_per_block = kThreads / tpr;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    if (blocks > 0x7fffffff) throw std::runtime_error("state_update_cuda: too many rows");
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, vec);
  };
  // Two chunks of 4 states per lane (two 16-byte state loads in flight per thread).
  if (chunks <= 1) go(state_update_kernel<1, 1, TIn, TBC>, 1);
  else if (chunks <= 2) go(state_update_kernel<1, 2, TIn, TBC>, 1);
  else if (chunks <= 4) go(state_update_kernel<2, 2, TIn, TBC>, 2);
  else if (chunks <= 8) go(state_update_kernel<4, 2, TIn, TBC>, 4);
  else if (chunks <= 16) go(state_update_kernel<8, 2, TIn, TBC>, 8);
  else if (chunks <= 32) go(state_update_kernel<16, 2, TIn, TBC>, 16);
  else if (chunks <= 64) go(state_update_kernel<32, 2, TIn, TBC>, 32);
  else throw std::runtime_error("state_update_cuda: dstate above 256 is not supported");
}

template <typename TIn>
void launch_bc(const StateUpdateParams& p, cudaStream_t stream) {
  if (p.bc_type == ScalarKind::kFloat32) {
    launch_typed<TIn, float>(p, stream);
  } else if (p.bc_type == p.input_type) {
    launch_typed<TIn, TIn>(p, stream);
  } else {
    throw std::runtime_error("state_update_cuda: B/C dtype must be the input dtype or float32");
  }
}

}  // namespace

void state_update_cuda(const StateUpdateParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return;
  switch (p.input_type) {
    case ScalarKind::kFloat32: launch_bc<float>(p, stream); break;
    case ScalarKind::kFloat16: launch_bc<__half>(p, stream); break;
    case ScalarKind::kBFloat16: launch_bc<__nv_bfloat16>(p, stream); break;
    default: throw std::runtime_error("state_update_cuda: unsupported input dtype");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("state_update_cuda: kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace selective_scan
