// CPU kernel of the decode-step op: one recurrent step of the selective SSM over every
// (batch, channel) row, the fp32 state updated in place in one pass. Rows run in parallel
// (at::parallel_for); each row's arithmetic is sequential, so results do not depend on threads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "../state_update.h"

namespace selective_scan {
namespace {

template <typename T>
inline float ld(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

inline float softplus(float v) { return v > 20.f ? v : std::log1p(std::exp(v)); }

template <typename TIn, typename TBC>
void run(const StateUpdateParams& p) {
  const int64_t rows = p.batch * p.dim;
  const int64_t dim_per_group = p.dim / p.n_groups;
  const int64_t N = p.dstate;
  // A row touches 2 * dstate floats of state; aim at a few thousand floats per task.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.dim, d = r % p.dim, g = d / dim_per_group;
      const float x = ld<TIn>(p.x, b * p.x_batch_stride + d * p.x_dim_stride);
      float dt = ld<TIn>(p.dt, b * p.dt_batch_stride + d * p.dt_dim_stride);
      if (p.dt_bias) dt += p.dt_bias[d];
      if (p.dt_softplus) dt = softplus(dt);
      const float dtx = dt * x;
      float* s = p.state + b * p.state_batch_stride + d * p.state_dim_stride;
      const float* A = p.A + d * p.A_dim_stride;
      const TBC* B = static_cast<const TBC*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
      const TBC* C = static_cast<const TBC*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;
      float y = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float sn = std::exp(dt * A[n]) * s[n] + static_cast<float>(B[n]) * dtx;
        s[n] = sn;
        y += static_cast<float>(C[n]) * sn;
      }
      if (p.D) y += p.D[d] * x;
      if (p.z) {
        const float z = ld<TIn>(p.z, b * p.z_batch_stride + d * p.z_dim_stride);
        y *= z / (1.f + std::exp(-z));
      }
      static_cast<TIn*>(p.out)[r] = static_cast<TIn>(y);
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
