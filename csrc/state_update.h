// The torch-free interface of the decode-step op `state_update` (one recurrent step of the
// selective SSM, the state updated in place): the params struct the binding fills and the CPU and
// CUDA kernels read. Strides are in elements, 64-bit; every last (dstate) stride is 1.
#pragma once

#include <cstdint>

#include "selective_scan.h"  // ScalarKind

namespace selective_scan {

// One step, for every batch b and channel d (group g = d / (dim / n_groups)):
//   dt'  = dt[b,d] + dt_bias[d], then softplus(dt') when dt_softplus
//   s[n] = exp(dt' A[d,n]) s[n] + dt' B[b,g,n] x[b,d]        (state updated in place)
//   y    = sum_n C[b,g,n] s[n] + D[d] x[b,d],  times silu(z[b,d]) when z is given
struct StateUpdateParams {
  int64_t batch = 0, dim = 0, dstate = 0, n_groups = 1;
  ScalarKind input_type = ScalarKind::kFloat32;  // x, dt, z and out
  ScalarKind bc_type = ScalarKind::kFloat32;     // B and C: input_type or kFloat32
  bool dt_softplus = false;

  float* state = nullptr;  // (batch, dim, dstate), fp32
  int64_t state_batch_stride = 0, state_dim_stride = 0;

  const void* x = nullptr;  // (batch, dim)
  int64_t x_batch_stride = 0, x_dim_stride = 0;
  const void* dt = nullptr;  // (batch, dim)
  int64_t dt_batch_stride = 0, dt_dim_stride = 0;
  const void* z = nullptr;  // (batch, dim), or nullptr: no gating
  int64_t z_batch_stride = 0, z_dim_stride = 0;

  const float* A = nullptr;  // (dim, dstate)
  int64_t A_dim_stride = 0;
  const void* B = nullptr;  // (batch, n_groups, dstate)
  int64_t B_batch_stride = 0, B_group_stride = 0;
  const void* C = nullptr;  // (batch, n_groups, dstate)
  int64_t C_batch_stride = 0, C_group_stride = 0;

  const float* D = nullptr;        // (dim,) contiguous, or nullptr
  const float* dt_bias = nullptr;  // (dim,) contiguous, or nullptr

  void* out = nullptr;  // (batch, dim) contiguous, input_type
};

// CPU kernel (cpu/state_update_cpu.cpp); parallel over (batch, dim) rows.
void state_update_cpu(const StateUpdateParams& params);

}  // namespace selective_scan
