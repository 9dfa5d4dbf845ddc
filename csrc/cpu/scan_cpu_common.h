// Helpers shared by the CPU selective-scan kernels (scan_fwd_cpu.cpp, scan_bwd_cpu.cpp): element
// conversion of rows and B/C chunks into compute-type buffers, vectorised exp, softplus and sigmoid,
// and the fixed partition of the channels into blocks that never straddle a B or C group.
// Everything lives in namespace cpu::SELECTIVE_SCAN_CPU_ISA, one per instruction set compiled.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../selective_scan.h"

#ifndef SELECTIVE_SCAN_CPU_ISA
#define SELECTIVE_SCAN_CPU_ISA generic
#endif

namespace selective_scan {
namespace cpu {
namespace SELECTIVE_SCAN_CPU_ISA {

constexpr int64_t kChunk = kCheckpointChunk;

template <typename T>
using Vec = at::vec::Vectorized<T>;

// dstate rounded up to whole vectors: state-sized buffers are zero padded to this length, so the
// dstate loops run over whole vectors only (padded lanes stay exactly zero, see docs/cpu.md).
template <typename T>
inline int64_t padded_dstate(int64_t dstate) {
  const int64_t w = Vec<T>::size();
  return (dstate + w - 1) / w * w;
}

// ---------------------------------------------------------------------------------------------
// Element conversion.

template <typename T, typename Elem>
inline void convert_in(const Elem* src, int64_t count, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]));
}
template <typename T>
inline void convert_in(const double* src, int64_t count, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<T>(src[i]);
}
template <typename T>
inline void convert_in(const float* src, int64_t count, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<T>(src[i]);
}

// dst[0..count) = elements offset..offset+count of `base` (element type `kind`) in type T.
template <typename T>
inline void load_elements(const void* base, ScalarKind kind, int64_t offset, int64_t count, T* dst) {
  switch (kind) {
    case ScalarKind::kFloat32: convert_in(static_cast<const float*>(base) + offset, count, dst); break;
    case ScalarKind::kFloat64: convert_in(static_cast<const double*>(base) + offset, count, dst); break;
    case ScalarKind::kFloat16: convert_in(static_cast<const c10::Half*>(base) + offset, count, dst); break;
    case ScalarKind::kBFloat16: convert_in(static_cast<const c10::BFloat16*>(base) + offset, count, dst); break;
  }
}

template <typename Elem, typename T>
inline void convert_out(const T* src, int64_t count, Elem* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<Elem>(src[i]);
}

// Elements offset..offset+count of `base` (element type `kind`) = src[0..count).
template <typename T>
inline void store_elements(const T* src, int64_t count, void* base, ScalarKind kind, int64_t offset) {
  switch (kind) {
    case ScalarKind::kFloat32: convert_out(src, count, static_cast<float*>(base) + offset); break;
    case ScalarKind::kFloat64: convert_out(src, count, static_cast<double*>(base) + offset); break;
    case ScalarKind::kFloat16: convert_out(src, count, static_cast<c10::Half*>(base) + offset); break;
    case ScalarKind::kBFloat16: convert_out(src, count, static_cast<c10::BFloat16*>(base) + offset); break;
  }
}

// Offset of row (b, d) of a (batch, dim, seqlen) tensor.
inline int64_t row_offset(const RowTensor& r, int64_t b, int64_t d) {
  return b * r.batch_stride + d * r.dim_stride;
}

// Time-invariant B or C: row d as dstate values into dst (padded length; the padding is left as is).
template <typename T>
inline void load_bc_row(const BCParams& bc, int64_t d, int64_t dstate, T* dst) {
  for (int64_t n = 0; n < dstate; ++n) {
    load_elements(bc.ptr, bc.type, d * bc.dim_stride + n * bc.dstate_stride, 1, dst + n);
  }
}

// Variable B or C: steps t0..t0+len of (batch b, group g) transposed into dst[t * ld + n].
template <typename T>
inline void load_bc_chunk(const BCParams& bc, int64_t b, int64_t g, int64_t t0, int64_t len,
                          int64_t dstate, int64_t ld, T* dst, T* scratch_row) {
  const int64_t base = b * bc.batch_stride + g * bc.group_stride + t0;
  for (int64_t n = 0; n < dstate; ++n) {
    load_elements(bc.ptr, bc.type, base + n * bc.dstate_stride, len, scratch_row);
    for (int64_t t = 0; t < len; ++t) dst[t * ld + n] = scratch_row[t];
  }
}

// ---------------------------------------------------------------------------------------------
// Math.

// exp over a vector. float: Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, degree-7 Taylor
// polynomial of e^r (truncation below 1e-8 relative), scaled by 2^k as two factors 2^(k/2) so that
// results reaching into the subnormal range or overflowing to inf come out right. NaN propagates.
// double: the C library exp, lane by lane (accuracy first).
inline Vec<float> vec_exp(const Vec<float>& x_in) {
  using VecI = Vec<int32_t>;
  const Vec<float> x = at::vec::clamp(x_in, Vec<float>(-104.0f), Vec<float>(89.0f));
  const Vec<float> round_magic(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec<float> shifted = at::vec::fmadd(x, Vec<float>(1.44269504088896341f), round_magic);
  const Vec<float> k = shifted - round_magic;
  Vec<float> r = at::vec::fmadd(k, Vec<float>(-0.693145751953125f), x);  // ln2, high part
  r = at::vec::fmadd(k, Vec<float>(-1.428606820309417232e-06f), r);      // ln2, low part
  Vec<float> p(1.0f / 5040.0f);
  p = at::vec::fmadd(p, r, Vec<float>(1.0f / 720.0f));
  p = at::vec::fmadd(p, r, Vec<float>(1.0f / 120.0f));
  p = at::vec::fmadd(p, r, Vec<float>(1.0f / 24.0f));
  p = at::vec::fmadd(p, r, Vec<float>(1.0f / 6.0f));
  p = at::vec::fmadd(p, r, Vec<float>(0.5f));
  p = at::vec::fmadd(p, r, Vec<float>(1.0f));
  p = at::vec::fmadd(p, r, Vec<float>(1.0f));
  // The low mantissa bits of `shifted` hold k as an integer (two's complement offset).
  const VecI ki = at::vec::cast<int32_t>(shifted) - at::vec::cast<int32_t>(round_magic);
  const VecI k_half = ki >> VecI(1);
  const VecI k_rest = ki - k_half;
  const Vec<float> scale_half = at::vec::cast<float>((k_half + VecI(127)) << VecI(23));
  const Vec<float> scale_rest = at::vec::cast<float>((k_rest + VecI(127)) << VecI(23));
  return p * scale_half * scale_rest;
}

inline Vec<double> vec_exp(const Vec<double>& x) {
  constexpr int w = Vec<double>::size();
  double lanes[w];
  x.store(lanes);
  for (int i = 0; i < w; ++i) lanes[i] = std::exp(lanes[i]);
  return Vec<double>::loadu(lanes);
}

// Sum of the lanes, by ATen's fixed-order shuffle reduction.
template <typename T>
inline T lane_sum(const Vec<T>& v) {
  return at::vec::vec_reduce_all([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// The recurrence over one chunk of one row: for t < len,
//   h_t = exp(d_t A) h_{t-1} + d_t u_t B_t,  y[t] = C_t . h_t  (y may be null),
// with B_t = B + t * B_step (C likewise; step 0 for time-invariant rows) and vectors of the padded
// length ld. Without `states`, h holds h_{-1} and is updated in place. With it, states[0..ld)
// holds h_{-1}, row t + 1 receives h_t and row t of `decays` receives exp(d_t A).
template <typename T>
inline void scan_chunk(const T* dt, const T* u, const T* A_row, const T* B, int64_t B_step, const T* C,
                       int64_t C_step, int64_t ld, int64_t len, T* h, T* y, T* states, T* decays) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  T* h_base = states ? states : h;
  const int64_t h_step = states ? ld : 0;
  for (int64_t t = 0; t < len; ++t) {
    const V dt_v(dt[t]), dtu_v(dt[t] * u[t]);
    const T* h_prev = h_base + t * h_step;
    T* h_next = h_base + (t + 1) * h_step;
    const T* B_t = B + t * B_step;
    const T* C_t = C + t * C_step;
    V acc(T(0));
    for (int64_t n = 0; n < ld; n += W) {
      const V decay = vec_exp(dt_v * V::loadu(A_row + n));
      const V h_t = at::vec::fmadd(decay, V::loadu(h_prev + n), dtu_v * V::loadu(B_t + n));
      h_t.store(h_next + n);
      if (decays) decay.store(decays + t * ld + n);
      if (y) acc = at::vec::fmadd(h_t, V::loadu(C_t + n), acc);
    }
    if (y) y[t] = lane_sum(acc);
  }
}

// Row functions over kChunk values (buffers of kChunk elements; lanes past the chunk's length hold
// stale but finite values and are never read back).

// x = dt[i] + bias; dt[i] <- softplus(x), grad[i] <- softplus'(x) (grad may be null), as torch's
// softplus with threshold 20: x above it passes through with derivative exactly 1. Below it,
// softplus(x) = max(x, 0) + log1p(v) with v = exp(-|x|) in (0, 1], log1p(v) = 2 atanh(s) with
// s = v / (2 + v) in [0, 1/3] summed as a series in s^2 (truncation below 2e-9 relative), and
// softplus'(x) = sigmoid(x) = (x >= 0 ? 1 : v) / (1 + v).
inline void softplus_row(float* dt, float* grad, float bias) {
  using V = Vec<float>;
  const V threshold(20.0f), zero(0.0f), one(1.0f);
  for (int64_t i = 0; i < kChunk; i += V::size()) {
    const V x = V::loadu(dt + i) + V(bias);
    const V v = vec_exp(zero - x.abs());
    const V s = v / (V(2.0f) + v);
    const V s2 = s * s;
    V series(1.0f / 15.0f);
    series = at::vec::fmadd(series, s2, V(1.0f / 13.0f));
    series = at::vec::fmadd(series, s2, V(1.0f / 11.0f));
    series = at::vec::fmadd(series, s2, V(1.0f / 9.0f));
    series = at::vec::fmadd(series, s2, V(1.0f / 7.0f));
    series = at::vec::fmadd(series, s2, V(1.0f / 5.0f));
    series = at::vec::fmadd(series, s2, V(1.0f / 3.0f));
    series = at::vec::fmadd(series, s2, one);
    const V softplus = at::vec::maximum(x, zero) + V(2.0f) * s * series;
    const V above = x > threshold;
    V::blendv(softplus, x, above).store(dt + i);
    if (grad) {
      const V sig = V::blendv(v, one, x >= zero) / (one + v);
      V::blendv(sig, one, above).store(grad + i);
    }
  }
}

inline void softplus_row(double* dt, double* grad, double bias) {
  for (int64_t i = 0; i < kChunk; ++i) {
    const double x = dt[i] + bias;
    if (x > 20.0) {
      dt[i] = x;
      if (grad) grad[i] = 1.0;
    } else {
      const double e = std::exp(x);
      dt[i] = std::log1p(e);
      if (grad) grad[i] = e / (e + 1.0);
    }
  }
}

// out[i] = sigmoid(z[i]). float: (z >= 0 ? 1 : v) / (1 + v) with v = exp(-|z|).
inline void sigmoid_row(const float* z, float* out) {
  using V = Vec<float>;
  const V zero(0.0f), one(1.0f);
  for (int64_t i = 0; i < kChunk; i += V::size()) {
    const V x = V::loadu(z + i);
    const V v = vec_exp(zero - x.abs());
    (V::blendv(v, one, x >= zero) / (one + v)).store(out + i);
  }
}

inline void sigmoid_row(const double* z, double* out) {
  for (int64_t i = 0; i < kChunk; ++i) out[i] = 1.0 / (1.0 + std::exp(-z[i]));
}

// ---------------------------------------------------------------------------------------------
// Channel blocks.

// A run of at most kChannelBlock consecutive channels inside one B group and one C group.
struct ChannelBlock {
  int64_t begin = 0, end = 0;
  int64_t group_B = 0, group_C = 0;  // 0 for time-invariant B/C
};

// Channels per group of B or C (dim for time-invariant ones).
inline int64_t channels_per_group(const BCParams& bc, int64_t dim) {
  return bc.is_variable ? dim / bc.n_groups : dim;
}

// The fixed partition of 0..dim into blocks: greedily max_block channels, cut at group edges.
// It depends on the shapes only, never on the number of threads.
inline std::vector<ChannelBlock> plan_channel_blocks(int64_t dim, const BCParams& B, const BCParams& C,
                                                     int64_t max_block) {
  const int64_t per_B = channels_per_group(B, dim), per_C = channels_per_group(C, dim);
  std::vector<ChannelBlock> blocks;
  for (int64_t d0 = 0; d0 < dim;) {
    const int64_t end_B = (d0 / per_B + 1) * per_B, end_C = (d0 / per_C + 1) * per_C;
    const int64_t d1 = std::min({d0 + max_block, dim, end_B, end_C});
    blocks.push_back({d0, d1, B.is_variable ? d0 / per_B : 0, C.is_variable ? d0 / per_C : 0});
    d0 = d1;
  }
  return blocks;
}

}  // namespace SELECTIVE_SCAN_CPU_ISA
}  // namespace cpu
}  // namespace selective_scan
