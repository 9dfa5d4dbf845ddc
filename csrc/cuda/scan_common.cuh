// Device helpers shared by the forward and backward CUDA kernels: element conversion, row-segment
// loads and stores, the block layout (which thread owns which channel and states) and the math
// primitives. Torch-free; see docs/design.md for the algorithm.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../selective_scan.h"

namespace selective_scan {
namespace cuda_detail {

// Timesteps staged in shared memory at a time: one checkpoint chunk.
constexpr int kChunk = static_cast<int>(kCheckpointChunk);
// Row stride of per-channel staged arrays [channel][step]: one float of padding puts the rows of
// the channels that a warp reads at the same step in different banks.
constexpr int kRow = kChunk + 1;
// The forward's rows: a stride of kChunk + 4 keeps each row 16-byte aligned, so that a thread reads
// or writes four steps with one 16-byte access; the eight channels a warp reads at the same steps
// then fall on banks 4 c + t, all distinct (docs/design.md, item 30).
constexpr int kRowFwd = kChunk + 4;
// The backward recomputes a chunk in sub-chunks of kSub steps held in registers.
constexpr int kSub = 8;
constexpr int kVec = 8;  // elements per vector load/store of a row segment
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two 16-bit values packed into one 32-bit word (lower address in the low half), so that a row
// segment of 16-bit values is stored as four words, i.e. one 16-byte store.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  static_assert(sizeof(T) == 2, "16-bit values");
  uint16_t a, b;
  __builtin_memcpy(&a, &lo, 2);
  __builtin_memcpy(&b, &hi, 2);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// 2^x on the special-function unit (flushes denormal results to zero, which is harmless here).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^t for the decays exp(d * A) = 2^(d * A * log2(e)). Near 1 (|t| < 1/32) by its series to
// third order, 1 + t (ln2 + t (ln2^2/2 + t ln2^3/6)) in one fused chain (truncation below 1e-8, so
// the decay is 1 + m with m = 2^t - 1 accurate to a few 1e-7 relative): decays near 1 compound over
// long memories, and the special-function unit's absolute error of about 1e-7 there would be a
// large relative error in m. Elsewhere on the special-function unit. Used where a decay is carried
// on by itself: a chunk's decay (carried_decay_error below) and the decode step's.
__device__ __forceinline__ float decay_exp2(float t) {
  const float e = fast_exp2(t);
  const float s = fmaf(t, fmaf(t, fmaf(t, 0.05550410866482158f, 0.2402265069591007f), 0.6931471805599453f), 1.f);
  return fabsf(t) < 0.03125f ? s : e;
}

// Inside a chunk the kernels take each step's decay from the special-function unit alone
// (fast_exp2): its error is tiny but not centred, and it compounds only over the chunk's kChunk
// steps. What is carried from one chunk to the next (the state forward, the adjoint backward) is
// corrected to the chunk's decay formed once from the chunk's summed d, exp2(A2 * dsum) by
// decay_exp2, so that over long memories the state decays by accurately formed factors
// (docs/design.md, "Decays near 1"). x_in: the carried value entering the chunk; x_decayed: x_in
// multiplied by the chunk's per-step decays one at a time, in the order the recurrence applies
// them (so that its roundings follow those of the recurrence; a product started from 1 would
// round with a bias of its own). Returns exp2(A2 * dsum) x_in - x_decayed, the amount to add to
// the carried value; 0 where the two differ by more than a rounding-level amount (an overflow, or
// a chunk that decays so far that nothing carries over), which leaves the per-step decays in use.
__device__ __forceinline__ float carried_decay_error(float A2, float dsum, float x_in, float x_decayed) {
  const float exact = decay_exp2(A2 * dsum);
  const float err = fmaf(exact, x_in, -x_decayed);
  return fabsf(err) < 1e-3f * fabsf(exact * x_in) ? err : 0.f;
}

// The same correction divided by exp2(A2 * dsum), to be added where the carried value enters the
// chunk rather than where it leaves (the backward forms x_decayed before the pass that carries
// the adjoint through the chunk); the division by a decay that is not small (else the result is
// 0) keeps it accurate to far below the rounding of the values it corrects.
__device__ __forceinline__ float carried_decay_error_at_entry(float A2, float dsum, float x_in, float x_decayed) {
  const float exact = decay_exp2(A2 * dsum);
  const float err = fmaf(exact, x_in, -x_decayed);
  return fabsf(err) < 1e-3f * fabsf(exact * x_in) ? __fdividef(err, exact) : 0.f;
}

// log2(x) on the special-function unit (x >= 1 here).
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// torch's softplus with threshold 20: max(x, 0) + log1p(exp(-|x|)), with log1p by its series
// where the argument is small (the fast log loses relative accuracy near 1) and the fast log
// elsewhere. Above 20, exp(-x) < 2.1e-9 is below half an ulp of x, so the sum is x exactly, as the
// threshold asks, without a test; below -87.3 exp(x) is subnormal and flushes to zero (torch
// returns the subnormal). Both candidates are formed and one selected, without branches, so that
// the staging loops that call this for a run of elements can interleave them.
__device__ __forceinline__ float softplus(float x) {
  const float e = fast_exp2(-fabsf(x) * kLog2e);  // (0, 1]
  const float series = e * (1.f - e * (0.5f - e * (1.f / 3.f - e * (0.25f - e * (0.2f - e * (1.f / 6.f))))));
  const float l = e < 0.125f ? series : fast_log2(1.f + e) * 0.6931471805599453f;
  return fmaxf(x, 0.f) + l;
}

// d softplus(x)/dx from d = softplus(x): sigmoid(x) = 1 - exp(-d) = -expm1(-d), by its series for
// small d. Both forms are evaluated and one selected, without branches, so that the vectorised
// stores that call this for a run of elements interleave them. Above 20 (the threshold, where
// d = x) exp(-d) < 2.1e-9 is below half an ulp of 1, so the result is exactly 1 without a test.
__device__ __forceinline__ float softplus_grad_from_value(float d) {
  const float series = d * (1.f - d * (0.5f - d * (1.f / 6.f - d * (1.f / 24.f - d * (1.f / 120.f - d * (1.f / 720.f))))));
  const float direct = 1.f - fast_exp2(-d * kLog2e);
  return d < 0.25f ? series : direct;
}

// sigmoid(x) with the fast reciprocal (2 ulp; no IEEE division with its range test and slow path
// per element) and the flushing exp2 (__expf keeps denormal results, at three more instructions per
// element; exp(-x) below 2^-126 is far below an ulp of 1 anyway). For x below about -88, exp(-x)
// overflows to inf and the result is 0.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + fast_exp2(-x * kLog2e)); }

template <typename T>
__device__ __forceinline__ void store_vec(T* row, int t, int len, bool aligned, const float (&v)[kVec]) {
  if (aligned && t + kVec <= len) {
    // (Explicit 16-byte stores: written through a uint4 or float4 pointer, the compiler split
    // them into 4-byte stores, eight per vector in fp32; docs/design.md, item 49.)
    if constexpr (sizeof(T) == 4) {
      asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(row + t), "f"(v[0]), "f"(v[1]), "f"(v[2]),
                   "f"(v[3])
                   : "memory");
      asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(row + t + 4), "f"(v[4]), "f"(v[5]), "f"(v[6]),
                   "f"(v[7])
                   : "memory");
    } else {
      uint32_t w[kVec / 2];
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i) w[i] = pack2(from_float<T>(v[2 * i]), from_float<T>(v[2 * i + 1]));
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(row + t), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                   "r"(w[3])
                   : "memory");
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (t + i < len) row[t + i] = from_float<T>(v[i]);
  }
}

// Element (b, g, n, t) of variable B/C, or (d, n) of time-invariant B/C, as float.
template <typename input_t>
__device__ __forceinline__ float load_bc(const BCParams& bc, int64_t offset) {
  return bc.type == ScalarKind::kFloat32 ? static_cast<const float*>(bc.ptr)[offset]
                                         : to_float(static_cast<const input_t*>(bc.ptr)[offset]);
}

// Which threads own which channels and states. A block handles `cpb` channels of one batch row,
// all in one group of B and of C; `tpc` consecutive threads share a channel, each holding `spt`
// consecutive states, so the padded state count is tpc * spt >= dstate.
struct BlockShape {
  int spt = 4;      // states per thread (the kernel's template argument)
  int tpc = 4;      // threads per channel (a power of two <= 32)
  int cpb = 32;     // channels per block
  int threads = 128;
  int64_t segments = 1;     // channel ranges within which B's and C's groups are constant
  int64_t seg_dim = 1;      // channels per segment
  int64_t blocks_per_seg = 1;
  int smem_bytes = 0;
  // Sequence split (few rows): the chunks are cut into `seq_splits` pieces of `chunks_per_split`
  // chunks, one per blockIdx.y (docs/design.md, "Sequence split").
  int64_t seq_splits = 1;
  int64_t chunks_per_split = 0;
  // Forward: the 16-bit four-threads-per-channel kernel takes its build with 128 registers per
  // thread instead of 102: where the grid needs no more waves at four blocks per SM than at five,
  // or as SELECTIVE_SCAN_FWD_REGS forces (docs/design.md, items 33 and 34).
  bool fwd_more_regs = false;
};

// The channel range and batch row of this block.
struct BlockRows {
  int64_t b, d0;   // batch row, first channel
  int valid;       // channels of this block that exist (the last block of a segment may be short)
  int64_t cb;      // block index within the segment
  int64_t gB, gC;  // groups of B and C (0 when time-invariant)
};

__device__ __forceinline__ BlockRows block_rows(const ScanParams& p, const BlockShape& s) {
  BlockRows r;
  int64_t blk = blockIdx.x;
  r.cb = blk % s.blocks_per_seg;
  blk /= s.blocks_per_seg;
  const int64_t seg = blk % s.segments;
  r.b = blk / s.segments;
  const int64_t first_in_seg = r.cb * s.cpb;
  r.d0 = seg * s.seg_dim + first_in_seg;
  const int64_t left = s.seg_dim - first_in_seg;
  r.valid = left < s.cpb ? static_cast<int>(left) : s.cpb;
  r.gB = p.B.is_variable ? r.d0 / (p.dim / p.B.n_groups) : 0;
  r.gC = p.C.is_variable ? r.d0 / (p.dim / p.C.n_groups) : 0;
  return r;
}

// A row segment of kVec elements as loaded from memory, kept packed in registers until it is
// converted and staged (so that the next chunk's loads can be in flight during this chunk's work).
template <typename T>
struct RawSeg {
  static constexpr int kWords = static_cast<int>(sizeof(T)) * kVec / 16;  // 16-byte words
  uint4 w[kWords];
};

template <typename T>
__device__ __forceinline__ void zero_seg(RawSeg<T>& s) {
#pragma unroll
  for (int i = 0; i < RawSeg<T>::kWords; ++i) s.w[i] = make_uint4(0u, 0u, 0u, 0u);
}

// Element i of a packed segment of T (2- or 4-byte) as float; i is a constant after unrolling, so
// the segment stays in registers.
__device__ __forceinline__ unsigned word_of(const uint4& q, int k) {
  return k == 0 ? q.x : k == 1 ? q.y : k == 2 ? q.z : q.w;
}
template <typename T> __device__ __forceinline__ float bits_to_float(unsigned bits);
template <> __device__ __forceinline__ float bits_to_float<float>(unsigned bits) { return __uint_as_float(bits); }
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned bits) {
  return __uint_as_float(bits << 16);
}
template <> __device__ __forceinline__ float bits_to_float<__half>(unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <typename T>
__device__ __forceinline__ float seg_elem(const uint4* w, int i) {
  if constexpr (sizeof(T) == 4) {
    return bits_to_float<T>(word_of(w[i / 4], i % 4));
  } else {
    const unsigned word = word_of(w[i / 8], (i / 2) % 4);
    return bits_to_float<T>(i % 2 ? word >> 16 : word & 0xffffu);
  }
}

// Elements [t, t + kVec) of a row, all inside it and 16-byte aligned: vector loads only (what the
// forward keeps in flight during a chunk, see FwdFlags).
template <typename T>
__device__ __forceinline__ RawSeg<T> load_seg_whole(const T* row, int t) {
  RawSeg<T> s;
#pragma unroll
  for (int i = 0; i < RawSeg<T>::kWords; ++i) s.w[i] = reinterpret_cast<const uint4*>(row + t)[i];
  return s;
}

// Elements [t, t + kVec) of a row (zeros past `len`); 16-byte loads when `aligned` (row start
// 16-byte aligned) and the segment is whole.
template <typename T>
__device__ __forceinline__ RawSeg<T> load_seg(const T* row, int t, int len, bool aligned) {
  RawSeg<T> s;
  if (aligned && t + kVec <= len) {
#pragma unroll
    for (int i = 0; i < RawSeg<T>::kWords; ++i) s.w[i] = reinterpret_cast<const uint4*>(row + t)[i];
  } else if constexpr (sizeof(T) == 4) {
    const unsigned* r = reinterpret_cast<const unsigned*>(row);
    unsigned e[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) e[i] = t + i < len ? r[t + i] : 0u;
    s.w[0] = make_uint4(e[0], e[1], e[2], e[3]);
    s.w[1] = make_uint4(e[4], e[5], e[6], e[7]);
  } else {
    const unsigned short* r = reinterpret_cast<const unsigned short*>(row);
    unsigned e[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) e[i] = t + i < len ? r[t + i] : 0u;
    s.w[0] = make_uint4(e[0] | e[1] << 16, e[2] | e[3] << 16, e[4] | e[5] << 16, e[6] | e[7] << 16);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ void seg_floats(const RawSeg<T>& s, float (&out)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = seg_elem<T>(s.w, i);
}

// Elements [t, t + kVec) of a row as floats (zeros past `len`).
template <typename T>
__device__ __forceinline__ void load_vec(const T* row, int t, int len, bool aligned, float (&out)[kVec]) {
  seg_floats(load_seg(row, t, len, aligned), out);
}

template <typename input_t>
__host__ __device__ __forceinline__ bool bc_fp32(const BCParams& bc) {
  return sizeof(input_t) == 4 || bc.type == ScalarKind::kFloat32;
}

// Segment v of a [kChunk][npad] tile: state n = v % npad, first step t = (v / npad) * kVec. npad
// (threads per channel, a power of two, times 1 or 4 states per thread) is a power of two, so
// these are a mask and a shift rather than a division.
__device__ __forceinline__ void tile_seg_pos(int v, int npad, int& n, int& t) {
  n = v & (npad - 1);
  t = (v >> (__ffs(npad) - 1)) * kVec;
}

// Segment v of the [kChunk][npad] tile of B or C for timesteps [t0, t0 + kChunk): state v % npad,
// steps from (v / npad) * kVec (zeros past the sequence end and for padded states), packed in
// the element type T of B or C (the input type, or float).
template <typename T>
__device__ __forceinline__ RawSeg<T> load_bc_seg(const BCParams& bc, int64_t b, int64_t g, int64_t t0, int len,
                                                 int dstate, int npad, int v) {
  RawSeg<T> s;
  zero_seg(s);
  int n, t;
  tile_seg_pos(v, npad, n, t);
  if (n < dstate) {
    const int64_t off = b * bc.batch_stride + g * bc.group_stride + t0 + n * bc.dstate_stride;
    // 16-byte loads need an aligned element offset; checked per segment.
    const bool aligned = ((reinterpret_cast<uintptr_t>(bc.ptr) + (off + t) * sizeof(T)) & 15) == 0;
    s = load_seg(static_cast<const T*>(bc.ptr) + off, t, len, aligned);
  }
  return s;
}

// Where load_bc_seg_whole reads segment v (also what the forward asks the L2 cache for ahead).
template <typename T>
__device__ __forceinline__ const T* bc_seg_whole_ptr(const BCParams& bc, int64_t b, int64_t g, int64_t t0,
                                                     int dstate, int npad, int v) {
  int n, t;
  tile_seg_pos(v, npad, n, t);
  n = n < dstate ? n : dstate - 1;
  return static_cast<const T*>(bc.ptr) + b * bc.batch_stride + g * bc.group_stride + t0 + n * bc.dstate_stride + t;
}

// The same as load_bc_seg for a whole chunk of rows known to be 16-byte aligned: vector loads only,
// and always issued, padded states (n >= dstate) reading state dstate - 1's row, which their
// staging replaces by zeros (store_bc_seg_whole), so that no register is cleared while the loads
// are in flight.
template <typename T>
__device__ __forceinline__ RawSeg<T> load_bc_seg_whole(const BCParams& bc, int64_t b, int64_t g, int64_t t0,
                                                       int dstate, int npad, int v) {
  return load_seg_whole(bc_seg_whole_ptr<T>(bc, b, g, t0, dstate, npad, v), 0);
}

// Copies 8 bytes from global `src` to shared `dst` asynchronously (cp.async, sm_80+; `bytes` 0
// fills zeros and reads nothing); cp_async_wait_all() completes this thread's copies.
__device__ __forceinline__ void cp_async_8(float* dst, const float* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(d), "l"(src), "r"(bytes) : "memory");
#else
  dst[0] = bytes ? src[0] : 0.f;
  dst[1] = bytes ? src[1] : 0.f;
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// One 16-byte shared store of four floats (st.shared.v4). The compiler split a float4 store of
// four values kept in unpaired registers into four 4-byte stores, each of four wavefronts where
// the lanes' addresses are 16 bytes apart (docs/design.md, item 49). No memory clobber: the
// kernels read these values only after a block barrier.
__device__ __forceinline__ void st_shared_v4(float* dst, float a, float b, float c, float d) {
  const unsigned p = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(p), "f"(a), "f"(b), "f"(c), "f"(d));
}

// Asks the L2 cache for the line holding `ptr`: no register is held and nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// Writes segment v into the fp32 tile dst[t * npad + n], and where `swapped` is given into the
// half-swapped copy swapped[t * npad + (n ^ 2)] as well (each aligned group of four states in the
// order 2, 3, 0, 1: the backward's upper half-warps read it, see kSwapHalves in scan_bwd.cuh).
template <typename T>
__device__ __forceinline__ void store_bc_seg(const RawSeg<T>& s, int npad, int v, float* dst,
                                             float* swapped = nullptr) {
  int n, t;
  tile_seg_pos(v, npad, n, t);
  // Consecutive threads take consecutive states, so that these transposed stores fall in different banks.
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float x = seg_elem<T>(s.w, i);
    dst[(t + i) * npad + n] = x;
    if (swapped) swapped[(t + i) * npad + (n ^ 2)] = x;
  }
}

// store_bc_seg for a segment loaded by load_bc_seg_whole: zeros for padded states.
template <typename T>
__device__ __forceinline__ void store_bc_seg_whole(const RawSeg<T>& s, int npad, int dstate, int v, float* dst) {
  int n, t;
  tile_seg_pos(v, npad, n, t);
#pragma unroll
  for (int i = 0; i < kVec; ++i) dst[(t + i) * npad + n] = n < dstate ? seg_elem<T>(s.w, i) : 0.f;
}

// Stages variable B or C for timesteps [t0, t0 + kChunk) as fp32 dst[t * npad + n], loading and
// storing in the same pass (the backward's path, and the forward's general kernel where it does not
// load B and C ahead).
template <typename input_t>
__device__ __forceinline__ void stage_bc(const BCParams& bc, int64_t b, int64_t g, int64_t t0, int len,
                                         int dstate, int npad, float* dst, float* swapped = nullptr) {
  const int vecs = npad * (kChunk / kVec);
  for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
    if (bc_fp32<input_t>(bc)) {
      store_bc_seg(load_bc_seg<float>(bc, b, g, t0, len, dstate, npad, v), npad, v, dst, swapped);
    } else {
      store_bc_seg(load_bc_seg<input_t>(bc, b, g, t0, len, dstate, npad, v), npad, v, dst, swapped);
    }
  }
}

// Sum of x over the `tpc` consecutive lanes that share a channel (tpc a power of two <= 32);
// every lane gets the same sum, formed in the same order on every run.
__device__ __forceinline__ float channel_sum(float x, int tpc) {
  for (int off = 1; off < tpc; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Where a thread reads B (or C) at step t: src + t * step. A variable B is staged per chunk as a
// [kChunk][npad] tile (step npad); a time-invariant one is written once into the same tile as
// [channel][npad] rows (step 0), so the per-step read is the same branch-free load. With jswap
// (0 or 2) the thread's register j holds state n0 + (j ^ jswap): a variable B is then read from
// the tile's half-swapped copy `swapped` (store_bc_seg) where jswap is 2, and a time-invariant row
// is written in that order.
template <typename input_t, int kSPT>
__device__ __forceinline__ const float* bc_source(const BCParams& bc, float* tile, int64_t d, int c, int n0,
                                                  int npad, int dstate, int& step, int jswap = 0,
                                                  float* swapped = nullptr) {
  if (bc.is_variable) {
    step = npad;
    return (jswap ? swapped : tile) + n0;
  }
#pragma unroll
  for (int j = 0; j < kSPT; ++j) {
    const int n = n0 + (j ^ jswap);
    tile[c * npad + n0 + j] = n < dstate ? load_bc<input_t>(bc, d * bc.dim_stride + n * bc.dstate_stride) : 0.f;
  }
  step = 0;
  return tile + c * npad + n0;
}

// Steps whose per-thread outputs are reduced over a channel's threads together.
constexpr int kGroup = 8;

// Sums the partial outputs x[0..kGroup) of kGroup steps over the tpc consecutive lanes of a
// channel (tpc a power of two <= 32; q the lane's index among them) by a transposed butterfly:
// at each of the first three levels a lane keeps half of its values and sends the other half, so
// eight values take 4 + 2 + 1 shuffles instead of 8 per level; further levels (tpc 16, 32) add
// the one value left. Afterwards the lane holds the sums of steps first .. first + count - 1 in
// x[0 .. count), where first = 4 (q & 1) + 2 (q >> 1 & 1) + (q >> 2 & 1) over the levels run and
// count = kGroup >> levels; with tpc > 8 the lanes q >= 8 repeat those of q - 8 (count 0 is
// returned for them). The order of the additions is fixed, so the sums are the same on every run.
// kTPC: tpc as a compile-time constant (the kernels' common layouts), or 0 to use tpc_runtime.
template <int kTPC>
__device__ __forceinline__ int channel_sum_steps(float (&x)[kGroup], int tpc_runtime, int q, int& first) {
  static_assert(kGroup == 8, "the transposed butterfly below is written for eight steps");
  const int tpc = kTPC > 0 ? kTPC : tpc_runtime;
  first = 0;
  int count = kGroup;
  if (tpc >= 2) {
    const bool hi = q & 1;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float keep = hi ? x[k + 4] : x[k], send = hi ? x[k] : x[k + 4];
      x[k] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
    }
    first += hi ? 4 : 0;
    count = 4;
  }
  if (tpc >= 4) {
    const bool hi = q & 2;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float keep = hi ? x[k + 2] : x[k], send = hi ? x[k] : x[k + 2];
      x[k] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
    }
    first += hi ? 2 : 0;
    count = 2;
  }
  if (tpc >= 8) {
    const bool hi = q & 4;
    const float keep = hi ? x[1] : x[0], send = hi ? x[0] : x[1];
    x[0] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
    first += hi ? 1 : 0;
    count = 1;
  }
  for (int off = 8; off < tpc; off <<= 1) x[0] += __shfl_xor_sync(0xffffffffu, x[0], off);
  return q < 8 ? count : 0;
}

// Writes the output sums of channel_sum_steps into row[t8 + first ..] (the channel's row of y).
__device__ __forceinline__ void store_step_sums(const float (&x)[kGroup], int count, int first, float* row) {
#pragma unroll
  for (int k = 0; k < kGroup; ++k)
    if (k < count) row[first + k] = x[k];
}

template <int N>
__device__ __forceinline__ void load_smem(const float* src, float (&dst)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + i);
      dst[i] = v.x; dst[i + 1] = v.y; dst[i + 2] = v.z; dst[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

template <int N>
__device__ __forceinline__ void store_smem(float* dst, const float (&src)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4)
      *reinterpret_cast<float4*>(dst + i) = make_float4(src[i], src[i + 1], src[i + 2], src[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// Shared memory (floats): B and C tiles [kChunk][npad] each; u, d, d*u and the outputs y
// [cpb][kRowFwd] each.
__host__ __device__ inline int fwd_smem_floats(const BlockShape& s) {
  const int npad = s.tpc * s.spt;
  return 2 * kChunk * npad + 4 * s.cpb * kRowFwd;
}

// Floats of padding between channels in the dB/dC reduction buffer (keeps 16-byte alignment and
// spreads channels over banks).
constexpr int kRedPad = 16;

struct BwdSmem {
  int npad, cstride, hck, tiles, region, total;
};

// The backward's fast path for four states per thread and 4, 8 or 16 threads per channel (dstate
// 9..64): sums over a channel's threads and over a warp's channels by shuffles, without
// per-thread shared-memory rows. Needs whole warps.
__host__ __device__ inline bool bwd_warp_sums(const BlockShape& s) {
  return s.spt == 4 && s.tpc >= 4 && s.threads % 32 == 0;
}

// Row stride (floats) of the warp-sums buffer [warp][kSub][npad + kWarpRowPad]: the padding puts
// the eight steps that consecutive threads read in different banks.
constexpr int kWarpRowPad = 4;

// f[0..3] * s: this lane's four states (n0..n0+3) of one step's terms, each a per-state factor
// times a per-lane scalar (dB: g_t[n] * d_t u_t, dC: h_t[n] * dy_t). Sums them over the warp's
// channels (32 / kTPC of them: lanes differing in bits log2(kTPC)..4) in a fixed order by a
// transposed butterfly, and writes each state's sum once into row[n] (the warp's row for the
// step): with kTPC 4 and 8 a lane ends with one state (2 * bit4 + bit3 of its four), with 16 two.
// At the first level (lanes 16 apart) a lane of the lower half keeps states 0, 1 and sends 2, 3,
// one of the upper half the reverse; kSwapped: the upper half's f holds its states in the order
// 2, 3, 0, 1, so that every lane keeps f[0], f[1] and sends f[2], f[3], without selects. Only the
// sent terms are formed as products; the kept ones are fused into the first level's adds (one
// FFMA in place of a multiply and an add; docs/design.md, item 60).
template <int kTPC, bool kSwapped = false>
__device__ __forceinline__ void warp_channel_sums(const float (&f)[4], float s, int lane, int n0, float* row) {
  static_assert(kTPC == 4 || kTPC == 8 || kTPC == 16, "warp sums at 4, 8 or 16 threads per channel");
  const bool b4 = (lane >> 4) & 1;
  const bool swap = b4 && !kSwapped;
  const float k0 = swap ? f[2] : f[0], k1 = swap ? f[3] : f[1];
  const float s0 = swap ? f[0] : f[2], s1 = swap ? f[1] : f[3];
  // (a * b + c, which nvcc contracts into one FFMA, and into an add where s is the constant 1)
  const float y0 = k0 * s + __shfl_xor_sync(0xffffffffu, s0 * s, 16);
  const float y1 = k1 * s + __shfl_xor_sync(0xffffffffu, s1 * s, 16);
  if constexpr (kTPC == 16) {
    *reinterpret_cast<float2*>(row + n0 + 2 * b4) = make_float2(y0, y1);
  } else {
    const bool b3 = (lane >> 3) & 1;
    float z = (b3 ? y1 : y0) + __shfl_xor_sync(0xffffffffu, b3 ? y0 : y1, 8);
    if constexpr (kTPC == 4) z += __shfl_xor_sync(0xffffffffu, z, 4);
    if (kTPC == 8 || ((lane >> 2) & 1) == 0) row[n0 + 2 * b4 + b3] = z;
  }
}

// The backward's warp sums at 4 and 8 threads per channel read B and C of the warps' upper halves
// from half-swapped copies of the tiles (kSwapHalves in scan_bwd.cuh).
__host__ __device__ inline bool bwd_swapped_tiles(const BlockShape& s) { return bwd_warp_sums(s) && s.tpc <= 8; }

// Floats between the tiles and their half-swapped copies: at 16 states (4 threads per channel) a
// step's row is 16 floats, and a warp's two halves read it from the tile and from its copy; 16
// floats of offset put the two rows in different banks, so that one access serves the warp.
constexpr int kSwapPad = 16;

__host__ __device__ inline BwdSmem bwd_smem_layout(const BlockShape& s) {
  BwdSmem l;
  l.npad = s.tpc * s.spt;
  l.cstride = kSub * l.npad + kRedPad;
  l.hck = (kChunk / kSub) * s.threads * s.spt;
  l.tiles = bwd_swapped_tiles(s) ? 4 * kChunk * l.npad + kSwapPad : 2 * kChunk * l.npad;
  const int fwd_part = s.cpb * kRow;
  // Reverse phase: per-warp channel sums of dB / dC when the warp reduces them by shuffles
  // (bwd_warp_sums), else per-thread sums over states and per-channel dB / dC rows.
  const int rev_part = bwd_warp_sums(s) ? 2 * (s.threads / 32) * kSub * (l.npad + kWarpRowPad)
                                        : 2 * kSub * s.threads + 2 * s.cpb * l.cstride;
  l.region = fwd_part > rev_part ? fwd_part : rev_part;
  l.total = l.tiles + 4 * s.cpb * kRow + l.hck + l.region;
  return l;
}

// Row-segment alignment: a (batch, dim, seqlen) tensor's rows all start 16-byte aligned.
inline bool rows_aligned(const RowTensor& r, int esize) {
  return (reinterpret_cast<uintptr_t>(r.ptr) % 16 == 0) && ((r.batch_stride * esize) % 16 == 0) &&
         ((r.dim_stride * esize) % 16 == 0);
}

}  // namespace cuda_detail
}  // namespace selective_scan
