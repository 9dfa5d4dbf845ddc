// CPU kernel of the decode-step op: one recurrent step of the selective SSM per (batch, channel) row,
// the fp32 state updated in place in one pass; rows in parallel (at::parallel_for), results independent
// of the thread count; loops written so the compiler vectorises them (exp and log1p by polynomials).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "../state_update.h"

namespace selective_scan {
namespace {

template <typename T>
inline float ld(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

// The clamps in exp_poly are selects; GCC turns them into vector blends only when comparisons
// may not trap, so the two vectorised functions are compiled with -fno-trapping-math.
#if defined(__GNUC__) && !defined(__clang__)
#define SSU_VECTORISE __attribute__((optimize("no-trapping-math")))
#else
#define SSU_VECTORISE
#endif

// exp(x) within 2 ulp on [-87, 88] (clamped outside), in plain arithmetic so that loops over it
// vectorise: x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite, two-part ln2), exp(r) by its degree-7
// Taylor polynomial (truncation below 1e-8 relative), 2^k from the exponent bits.
SSU_VECTORISE inline float exp_poly(float x) {
  x = x > -87.f ? x : -87.f;
  x = x < 88.f ? x : 88.f;
  const float kShift = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float k = (x * 1.44269504088896341f + kShift) - kShift;
  float r = x - k * 0.693145751953125f;
  r = r - k * 1.42860682030941723e-06f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// One row: s = exp(dt A) s + (dt x) B, prod = C s. Vectorisable: no calls, restrict pointers.
SSU_VECTORISE inline void row_update(float* __restrict s, const float* __restrict A, const float* __restrict B,
                       const float* __restrict C, float* __restrict prod, float dt, float dtx, int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    const float sn = exp_poly(dt * A[n]) * s[n] + B[n] * dtx;
    s[n] = sn;
    prod[n] = C[n] * sn;
  }
}

inline float sum_fixed_order(const float* v, int64_t N) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) {
    acc[0] += v[n];
    acc[1] += v[n + 1];
    acc[2] += v[n + 2];
    acc[3] += v[n + 3];
  }
  for (; n < N; ++n) acc[0] += v[n];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// log(1 + e) for e >= 0, vectorisable: log(y) of y = 1 + e by y = m 2^k, m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh((m-1)/(m+1)) by its series to s^9 (|s| <= 0.172: below 1e-9 relative), times
// e / (y - 1), which undoes the rounding of 1 + e; e - e^2/2 below 1e-4.
SSU_VECTORISE inline float log1p_poly(float e) {
  const float y = 1.f + e;
  int32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  const int32_t k = (bits - 0x3f3504f3) >> 23;  // 0x3f3504f3: sqrt(1/2)
  const int32_t mbits = bits - (k << 23);
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const float t = (m - 1.f) / (m + 1.f), t2 = t * t;
  float q = 2.f / 9.f;
  q = q * t2 + 2.f / 7.f;
  q = q * t2 + 2.f / 5.f;
  q = q * t2 + 2.f / 3.f;
  q = q * t2 + 2.f;
  const float log_y = static_cast<float>(k) * 0.693147180559945f + t * q;
  const float u = y - 1.f;
  const float big = log_y * (e / (u > 0.f ? u : 1.f));
  return e < 1e-4f ? e - 0.5f * e * e : big;
}

// v = softplus(v) (v itself above 20, as torch) for n values.
SSU_VECTORISE void softplus_rows(float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = v[i];
    const float sp = log1p_poly(exp_poly(a));
    v[i] = a > 20.f ? a : sp;
  }
}

// v = silu(v) = v / (1 + exp(-v)) for n values.
SSU_VECTORISE void silu_rows(float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] / (1.f + exp_poly(-v[i]));
}

// (batch, channel, group) of a row, advanced row by row without divisions.
struct RowCursor {
  int64_t b, d, g, g_left, dim, per_group;
  RowCursor(int64_t row, int64_t dim_, int64_t per_group_)
      : b(row / dim_), d(row % dim_), g(d / per_group_), g_left(per_group_ - d % per_group_), dim(dim_),
        per_group(per_group_) {}
  void advance() {
    ++d;
    if (--g_left == 0) {
      ++g;
      g_left = per_group;
    }
    if (d == dim) {  // dim is a multiple of per_group: the group wrapped just above
      d = 0;
      g = 0;
      ++b;
    }
  }
};

constexpr int64_t kTile = 64;  // rows whose dt, x and silu(z) are prepared together

template <typename TIn, typename TBC>
void run(const StateUpdateParams& p) {
  const int64_t rows = p.batch * p.dim;
  const int64_t dim_per_group = p.dim / p.n_groups;
  const int64_t N = p.dstate;
  // A row touches 2 * dstate floats of state; aim at a few thousand floats per task.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float Bf[kMaxDstate], Cf[kMaxDstate], prod[kMaxDstate];
    alignas(64) float xs[kTile], dts[kTile], gates[kTile];
    int64_t cached_b = -1, cached_g = -1;
    RowCursor cur(begin, p.dim, dim_per_group);
    for (int64_t r0 = begin; r0 < end; r0 += kTile) {
      const int64_t nr = std::min(kTile, end - r0);
      RowCursor c = cur;
      for (int64_t i = 0; i < nr; ++i, c.advance()) {
        xs[i] = ld<TIn>(p.x, c.b * p.x_batch_stride + c.d * p.x_dim_stride);
        dts[i] = ld<TIn>(p.dt, c.b * p.dt_batch_stride + c.d * p.dt_dim_stride) + (p.dt_bias ? p.dt_bias[c.d] : 0.f);
        gates[i] = p.z ? ld<TIn>(p.z, c.b * p.z_batch_stride + c.d * p.z_dim_stride) : 0.f;
      }
      if (p.dt_softplus) softplus_rows(dts, nr);
      if (p.z) silu_rows(gates, nr);
      for (int64_t i = 0; i < nr; ++i, cur.advance()) {
        const int64_t b = cur.b, d = cur.d, g = cur.g;
        if (b != cached_b || g != cached_g) {  // B and C of this (batch, group), as floats
          const TBC* B = static_cast<const TBC*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
          const TBC* C = static_cast<const TBC*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;
          for (int64_t n = 0; n < N; ++n) {
            Bf[n] = static_cast<float>(B[n]);
            Cf[n] = static_cast<float>(C[n]);
          }
          cached_b = b;
          cached_g = g;
        }
        const float x = xs[i], dt = dts[i];
        float* s = p.state + b * p.state_batch_stride + d * p.state_dim_stride;
        row_update(s, p.A + d * p.A_dim_stride, Bf, Cf, prod, dt, dt * x, N);
        float y = sum_fixed_order(prod, N);
        if (p.D) y += p.D[d] * x;
        if (p.z) y *= gates[i];
        static_cast<TIn*>(p.out)[r0 + i] = static_cast<TIn>(y);
      }
    }
  });
}

template <typename TIn>
void dispatch_bc(const StateUpdateParams& p) {
  if (p.bc_type == ScalarKind::kFloat32) {
    run<TIn, float>(p);
  } else if (p.bc_type == p.input_type) {
    run<TIn, TIn>(p);
  } else {
    throw std::runtime_error("state_update_cpu: B/C dtype must be the input dtype or float32");
  }
}

}  // namespace

void state_update_cpu(const StateUpdateParams& p) {
  if (p.batch == 0 || p.dim == 0) return;
  switch (p.input_type) {
    case ScalarKind::kFloat32: dispatch_bc<float>(p); break;
    case ScalarKind::kFloat16: dispatch_bc<c10::Half>(p); break;
    case ScalarKind::kBFloat16: dispatch_bc<c10::BFloat16>(p); break;
    default: throw std::runtime_error("state_update_cpu: unsupported input dtype");
  }
}

}  // namespace selective_scan
