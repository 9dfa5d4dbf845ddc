// CUDA kernels of the decode-step op: one recurrent step of the selective SSM, the fp32 state read
// once and written once (16-byte vector loads/stores where aligned). Up to 16 aligned states, a
// warp takes 32 rows, each lane doing one row's per-row work, the state and A staged into shared
// memory by cp.async (state_update_warp_rows_kernel);
// otherwise a row (batch, channel) is handled by kTPR lanes of a warp, each owning kChunks chunks
// of 4 states, all loaded before any is used; y is reduced over the row's lanes by shuffles. Row
// indices are 32-bit and split into (batch, channel) by a precomputed multiply-shift. The decay is
// the scan's (scan_common.cuh), so that a prefill by the scan and steps by these kernels follow the
// same arithmetic.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../env_setting.h"
#include "scan_common.cuh"
#include "state_update_cuda.h"

namespace selective_scan {
namespace {

using cuda_detail::decay_exp2;
using cuda_detail::from_float;
using cuda_detail::kLog2e;
using cuda_detail::to_float;

// Per-row math at full accuracy (each row pays it once): softplus with torch's threshold 20 and silu.
__device__ __forceinline__ float softplus_exact(float v) { return v > 20.f ? v : log1pf(expf(v)); }
__device__ __forceinline__ float silu_exact(float z) { return z / (1.f + expf(-z)); }

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ float load(const void* base, int64_t i) {
  return to_float(__ldg(static_cast<const T*>(base) + i));
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
      for (int j = 0; j < 4; ++j) v[j] = to_float(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < valid ? to_float(__ldg(p + j)) : 0.f;
  }
}

// x / d by a multiply and a shift, for 0 <= x < 2^31 (d >= 1): with l = ceil(log2 d) and
// m = ceil(2^(31 + l) / d) < 2^32, x / d = floor(x m / 2^(31 + l)). Set up on the host, so that the
// row -> (batch, channel) split costs no division on the GPU.
struct FastDiv {
  uint32_t mul = 0, shift = 0, one = 1;
  FastDiv() = default;
  explicit FastDiv(uint32_t d) {
    if (d <= 1) return;
    one = 0;
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    mul = static_cast<uint32_t>(((uint64_t{1} << (31 + l)) + d - 1) / d);
    shift = l - 1;
  }
  __device__ __forceinline__ uint32_t div(uint32_t x) const { return one ? x : __umulhi(x, mul) >> shift; }
};

struct RowSplit {
  FastDiv by_dim, by_group_dim;
};

// The row of a thread's pass, clamped to the last row (so that every lane reaches the shuffles).
// Rows are 32-bit: the host launches batch slabs of fewer than 2^31 rows.
struct RowRef {
  uint32_t row, b, d, g;
  bool active;
};

__device__ __forceinline__ RowRef row_ref(const StateUpdateParams& p, const RowSplit& split, uint32_t row,
                                          uint32_t rows) {
  RowRef r;
  r.active = row < rows;
  r.row = r.active ? row : rows - 1;
  r.b = split.by_dim.div(r.row);
  r.d = r.row - r.b * static_cast<uint32_t>(p.dim);
  r.g = split.by_group_dim.div(r.d);
  return r;
}

template <int kTPR, int kChunks, typename TIn, typename TBC>
__global__ void __launch_bounds__(kThreads)
state_update_kernel(const StateUpdateParams p, const RowSplit split, const bool vec) {
  constexpr uint32_t kRowsPerBlock = kThreads / kTPR;
  const uint32_t rows = static_cast<uint32_t>(p.batch * p.dim);
  const int lane = threadIdx.x % kTPR;
  const RowRef rr = row_ref(p, split, blockIdx.x * kRowsPerBlock + threadIdx.x / kTPR, rows);
  const uint32_t b = rr.b, d = rr.d;
  // Lane `lane` owns states 4 (lane + i kTPR) .. +3 for i < kChunks: at each i the row's lanes read
  // one contiguous run.
  auto first_state = [&](int i) { return 4 * (lane + i * kTPR); };
  auto valid_states = [&](int n0) {
    return n0 >= p.dstate ? 0 : static_cast<int>(p.dstate - n0 < 4 ? p.dstate - n0 : 4);
  };

  float* s = p.state + b * p.state_batch_stride + d * p.state_dim_stride;
  float sv[kChunks][4];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int n0 = first_state(i), valid = valid_states(n0);
    if (vec && valid == 4) {
      const float4 q = __ldcs(reinterpret_cast<const float4*>(s + n0));
      sv[i][0] = q.x; sv[i][1] = q.y; sv[i][2] = q.z; sv[i][3] = q.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) sv[i][j] = j < valid ? s[n0 + j] : 0.f;
    }
  }
  const float x = load<TIn>(p.x, b * p.x_batch_stride + d * p.x_dim_stride);
  float dt = load<TIn>(p.dt, b * p.dt_batch_stride + d * p.dt_dim_stride);
  if (p.dt_bias) dt += __ldg(p.dt_bias + d);
  if (p.dt_softplus) dt = softplus_exact(dt);
  const float dtx = dt * x;
  const float* A = p.A + d * p.A_dim_stride;
  const TBC* B = static_cast<const TBC*>(p.B) + b * p.B_batch_stride + rr.g * p.B_group_stride;
  const TBC* C = static_cast<const TBC*>(p.C) + b * p.C_batch_stride + rr.g * p.C_group_stride;
  float y = 0.f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int n0 = first_state(i), valid = valid_states(n0);
    float av[4], bv[4], cv[4];
    if (vec && valid == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(A + n0));
      av[0] = a.x; av[1] = a.y; av[2] = a.z; av[3] = a.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) av[j] = j < valid ? __ldg(A + n0 + j) : 0.f;
    }
    load4<TBC>(B + n0, vec && valid == 4, valid, bv);
    load4<TBC>(C + n0, vec && valid == 4, valid, cv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sv[i][j] = fmaf(decay_exp2(dt * av[j] * kLog2e), sv[i][j], bv[j] * dtx);
      y = fmaf(cv[j], sv[i][j], y);  // zero for states past dstate: cv is 0 there
    }
  }
  if (rr.active) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int n0 = first_state(i), valid = valid_states(n0);
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
  if (rr.active && lane == 0) {
    if (p.D) y = fmaf(__ldg(p.D + d), x, y);
    if (p.z) {
      const float z = load<TIn>(p.z, b * p.z_batch_stride + d * p.z_dim_stride);
      y *= silu_exact(z);
    }
    static_cast<TIn*>(p.out)[rr.row] = from_float<TIn>(y);
  }
}

// Four consecutive elements of B or C as loaded (16-byte aligned for float, 8-byte for 16-bit
// types), kept packed until used.
template <typename T>
struct Packed4 {
  using type = std::conditional_t<sizeof(T) == 4, float4, uint2>;
  type v;
  __device__ __forceinline__ void load(const T* ptr) { v = __ldg(reinterpret_cast<const type*>(ptr)); }
  __device__ __forceinline__ float operator[](int j) const {
    if constexpr (sizeof(T) == 4) {
      return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
    } else {
      return to_float(reinterpret_cast<const T*>(&v)[j]);
    }
  }
};

// 16 bytes from global to shared memory without passing through registers (cp.async, sm_80 and
// later; built for an earlier architecture, a plain load and store), so that the loads a thread
// has in flight do not hold its registers; complete once cp_async_wait_all returns, for the
// issuing thread.
__device__ __forceinline__ void cp_async_16(float4* dst, const float* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src) : "memory");
#else
  *dst = *reinterpret_cast<const float4*>(src);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Up to 16 states with aligned 4-state chunks: a warp takes 32 consecutive rows. Lane l does the
// per-row work of row l once (indices, x, dt with its bias and softplus, gating, the output store:
// coalesced across lanes), where the kernel above repeats it on every lane of a row. The warp's
// 32 x dstate states are then covered in kTPR passes of one 4-state chunk per lane (row
// i 32/kTPR + l/kTPR, chunk l % kTPR at pass i), the row's b, d and dt fetched from its owner lane
// by shuffles; y is reduced over the kTPR lanes of a row, then handed back to the owner lane.
// Every load of the warp (state, A, B, C for all passes; x, dt, z, D, dt_bias) is issued before
// any result is used, so that a warp waits for memory once: the kernel is bound by the state's
// traffic, and a short chain after the loads keeps the end of the grid (its tail) short. The state
// and A go to shared memory by cp.async, not to registers: 64 registers a thread instead of 91 (at
// 16-bit inputs), eight blocks per SM instead of five, and 60% more state bytes in flight per SM
// (measured: 70% -> 75% of the copy bandwidth at batch 64, 80% -> 87% at batch 256).
template <int kTPR, typename TIn, typename TBC>
__global__ void __launch_bounds__(kThreads)
state_update_warp_rows_kernel(const StateUpdateParams p, const RowSplit split) {
  // Each thread's chunks of the state and A at every pass, copied in by cp.async.
  __shared__ float4 staged_state[kTPR][kThreads], staged_A[kTPR][kThreads];
  constexpr int kRowsPerPass = 32 / kTPR;
  const uint32_t rows = static_cast<uint32_t>(p.batch * p.dim);
  const int lane = threadIdx.x % 32;
  const uint32_t warp_row0 = (blockIdx.x * (kThreads / 32) + threadIdx.x / 32) * 32;
  const RowRef own = row_ref(p, split, warp_row0 + lane, rows);
  const int n0 = 4 * (lane % kTPR);  // this lane's first state at every pass
  const bool has_chunk = n0 < p.dstate;

  // The owner lane's per-row inputs.
  const float x = load<TIn>(p.x, own.b * p.x_batch_stride + own.d * p.x_dim_stride);
  float dt = load<TIn>(p.dt, own.b * p.dt_batch_stride + own.d * p.dt_dim_stride);
  const float dt_bias = p.dt_bias ? __ldg(p.dt_bias + own.d) : 0.f;
  const float D = p.D ? __ldg(p.D + own.d) : 0.f;
  const float z = p.z ? load<TIn>(p.z, own.b * p.z_batch_stride + own.d * p.z_dim_stride) : 0.f;

  // Each pass's row (from its owner lane) and this lane's chunk of its state, A, B and C.
  float* srow[kTPR];
  Packed4<TBC> bv[kTPR], cv[kTPR];
#pragma unroll
  for (int i = 0; i < kTPR; ++i) {
    const int src = i * kRowsPerPass + lane / kTPR;
    const uint32_t b = __shfl_sync(0xffffffffu, own.b, src);
    const uint32_t d = __shfl_sync(0xffffffffu, own.d, src);
    const uint32_t g = split.by_group_dim.div(d);
    srow[i] = p.state + b * p.state_batch_stride + d * p.state_dim_stride + n0;
    if (has_chunk) {
      cp_async_16(&staged_state[i][threadIdx.x], srow[i]);
      cp_async_16(&staged_A[i][threadIdx.x], p.A + d * p.A_dim_stride + n0);
      bv[i].load(static_cast<const TBC*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride + n0);
      cv[i].load(static_cast<const TBC*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride + n0);
    }
  }

  dt += dt_bias;
  if (p.dt_softplus) dt = softplus_exact(dt);
  const float dtx = dt * x;
  const float gate = p.z ? silu_exact(z) : 1.f;
  cp_async_wait_all();

  float y_own = 0.f;
#pragma unroll
  for (int i = 0; i < kTPR; ++i) {
    const int src = i * kRowsPerPass + lane / kTPR;
    const float dt_i = __shfl_sync(0xffffffffu, dt, src);
    const float dtx_i = __shfl_sync(0xffffffffu, dtx, src);
    float y = 0.f;
    if (has_chunk) {
      const float4 sv = staged_state[i][threadIdx.x], av = staged_A[i][threadIdx.x];
      float s[4] = {sv.x, sv.y, sv.z, sv.w};
      const float a[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j] = fmaf(decay_exp2(dt_i * a[j] * kLog2e), s[j], bv[i][j] * dtx_i);
        y = fmaf(cv[i][j], s[j], y);
      }
      if (warp_row0 + src < rows) __stcs(reinterpret_cast<float4*>(srow[i]), make_float4(s[0], s[1], s[2], s[3]));
    }
#pragma unroll
    for (int off = kTPR / 2; off > 0; off /= 2) y += __shfl_xor_sync(0xffffffffu, y, off);
    // Row i kRowsPerPass + r's sum sits on lane r kTPR: the owner lane takes it at its pass.
    const float y_row = __shfl_sync(0xffffffffu, y, (lane % kRowsPerPass) * kTPR);
    if (lane / kRowsPerPass == i) y_own = y_row;
  }
  if (own.active) {
    const float y = (p.D ? fmaf(D, x, y_own) : y_own) * gate;
    static_cast<TIn*>(p.out)[own.row] = from_float<TIn>(y);
  }
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Splits the rows into batch slabs of fewer than 2^31 rows, so that row indices are 32-bit in the
// kernels (SELECTIVE_SCAN_DECODE_SLAB_ROWS lowers the bound, so that tests can reach several
// slabs), and calls launch(slab params, row split, blocks) for each, rows_per_block rows a block.
template <typename TBC, typename Launch>
void for_each_slab(const StateUpdateParams& p, int64_t rows_per_block, Launch launch) {
  if (p.dim >= (int64_t{1} << 31)) throw std::runtime_error("state_update_cuda: dim must be below 2^31");
  RowSplit split;
  split.by_dim = FastDiv(static_cast<uint32_t>(p.dim));
  split.by_group_dim = FastDiv(static_cast<uint32_t>(p.dim / p.n_groups));
  constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;
  const int64_t max_rows = env_integer("SELECTIVE_SCAN_DECODE_SLAB_ROWS", kMaxRows, 1, kMaxRows, "a number of rows");
  const int64_t slab = std::max<int64_t>(1, max_rows / p.dim);
  const int64_t in_size = p.input_type == ScalarKind::kFloat32 ? 4 : 2;
  for (int64_t b0 = 0; b0 < p.batch; b0 += slab) {
    StateUpdateParams q = p;
    q.batch = std::min(slab, p.batch - b0);
    q.state = p.state + b0 * p.state_batch_stride;
    q.x = static_cast<const char*>(p.x) + b0 * p.x_batch_stride * in_size;
    q.dt = static_cast<const char*>(p.dt) + b0 * p.dt_batch_stride * in_size;
    if (p.z) q.z = static_cast<const char*>(p.z) + b0 * p.z_batch_stride * in_size;
    q.B = static_cast<const TBC*>(p.B) + b0 * p.B_batch_stride;
    q.C = static_cast<const TBC*>(p.C) + b0 * p.C_batch_stride;
    q.out = static_cast<char*>(p.out) + b0 * p.dim * in_size;
    launch(q, split, static_cast<unsigned>((q.batch * q.dim + rows_per_block - 1) / rows_per_block));
  }
}

template <int kTPR, int kChunks, typename TIn, typename TBC>
void launch_rows(const StateUpdateParams& p, bool vec, cudaStream_t stream) {
  for_each_slab<TBC>(p, kThreads / kTPR, [&](const StateUpdateParams& q, const RowSplit& split, unsigned blocks) {
    state_update_kernel<kTPR, kChunks, TIn, TBC><<<blocks, kThreads, 0, stream>>>(q, split, vec);
  });
}

template <int kTPR, typename TIn, typename TBC>
void launch_warp_rows(const StateUpdateParams& p, cudaStream_t stream) {
  for_each_slab<TBC>(p, kThreads, [&](const StateUpdateParams& q, const RowSplit& split, unsigned blocks) {
    state_update_warp_rows_kernel<kTPR, TIn, TBC><<<blocks, kThreads, 0, stream>>>(q, split);
  });
}

// SELECTIVE_SCAN_DECODE_WARP_ROWS=0 selects the lanes-per-row kernel where the warp-rows kernel
// would run (0 or 1, read per call, so that tests can compare both).
bool warp_rows_enabled() { return env_choice("SELECTIVE_SCAN_DECODE_WARP_ROWS", 1, {0, 1}) == 1; }

template <typename TIn, typename TBC>
void launch_typed(const StateUpdateParams& p, cudaStream_t stream) {
  const int64_t bc = sizeof(TBC);
  const bool vec = p.dstate % 4 == 0 && aligned(p.state, 16) && p.state_batch_stride % 4 == 0 &&
                   p.state_dim_stride % 4 == 0 && aligned(p.A, 16) && p.A_dim_stride % 4 == 0 &&
                   aligned(p.B, 4 * bc) && p.B_batch_stride % 4 == 0 && p.B_group_stride % 4 == 0 &&
                   aligned(p.C, 4 * bc) && p.C_batch_stride % 4 == 0 && p.C_group_stride % 4 == 0;
  const int64_t chunks = (p.dstate + 3) / 4;  // of 4 states
  // Up to 16 states in aligned chunks: the warp-rows kernel. Otherwise up to 16 states one chunk
  // per lane, the row's lanes reading one contiguous run; above, four chunks per lane, so that the
  // per-row work (indices, softplus, gating) is shared by fewer lanes (measured fastest at dstate 64).
  if (vec && chunks <= 4 && warp_rows_enabled()) {
    if (chunks <= 1) launch_warp_rows<1, TIn, TBC>(p, stream);
    else if (chunks <= 2) launch_warp_rows<2, TIn, TBC>(p, stream);
    else launch_warp_rows<4, TIn, TBC>(p, stream);
  } else if (chunks <= 1) launch_rows<1, 1, TIn, TBC>(p, vec, stream);
  else if (chunks <= 2) launch_rows<2, 1, TIn, TBC>(p, vec, stream);
  else if (chunks <= 4) launch_rows<4, 1, TIn, TBC>(p, vec, stream);
  else if (chunks <= 8) launch_rows<2, 4, TIn, TBC>(p, vec, stream);
  else if (chunks <= 16) launch_rows<4, 4, TIn, TBC>(p, vec, stream);
  else if (chunks <= 32) launch_rows<8, 4, TIn, TBC>(p, vec, stream);
  else if (chunks <= 64) launch_rows<16, 4, TIn, TBC>(p, vec, stream);
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
