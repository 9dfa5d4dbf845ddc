// Helpers shared by the CPU selective-scan kernels (scan_fwd_cpu.cpp, scan_bwd_cpu.cpp): element
// conversion of rows and B/C chunks into compute-type buffers, a vectorised exp, softplus and silu,
// and the fixed partition of the channels into blocks that never straddle a B or C group.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../selective_scan.h"

namespace selective_scan {
namespace cpu {

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

// Sum of the lanes in a fixed order.
template <typename T>
inline T lane_sum(const Vec<T>& v) {
  constexpr int w = Vec<T>::size();
  T lanes[w];
  v.store(lanes);
  T s = lanes[0];
  for (int i = 1; i < w; ++i) s += lanes[i];
  return s;
}

// torch's softplus (beta 1, threshold 20) and its derivative (torch's softplus_backward).
template <typename T>
inline T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}
template <typename T>
inline T softplus_grad(T x) {
  if (x > T(20)) return T(1);
  const T e = std::exp(x);
  return e / (e + T(1));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
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

}  // namespace cpu
}  // namespace selective_scan
