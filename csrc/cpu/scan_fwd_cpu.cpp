// CPU forward of the selective scan: out, the last state and the state before every chunk of
// kChunk = kCheckpointChunk steps, parallel over (batch, channel block), vectorised over dstate.
// The algorithm is described in docs/cpu.md; scan_cpu_dispatch.h says how it is compiled.
#include <ATen/Parallel.h>

#include "scan_cpu_common.h"
#include "scan_cpu_dispatch.h"

namespace selective_scan {
namespace cpu {
namespace SELECTIVE_SCAN_CPU_ISA {
namespace {

// Channels per forward task. The forward has no cross-channel sums, so this only sets the
// granularity of the work and how many channels share one transposed B/C chunk.
constexpr int64_t kFwdChannelBlock = 16;

// Per-task working memory, all in compute type; state-sized rows have the padded length.
template <typename T>
struct FwdWorkspace {
  int64_t ld;                 // padded dstate
  std::vector<T> B, C;        // (kChunk, ld) transposed chunk, or one row if time-invariant
  std::vector<T> A;           // (ld) A[d, :]
  std::vector<T> state;       // (kFwdChannelBlock, ld) running state of the block's channels
  std::vector<T> u, delta, z, gate, y, row_tmp;  // (kChunk) per-step values of one row

  explicit FwdWorkspace(int64_t dstate)
      : ld(padded_dstate<T>(dstate)),
        B(kChunk * ld, T(0)), C(kChunk * ld, T(0)), A(ld, T(0)),
        state(kFwdChannelBlock * ld, T(0)), u(kChunk), delta(kChunk),
        z(kChunk), gate(kChunk), y(kChunk), row_tmp(kChunk) {}
};

// Channels blk.begin..blk.end of batch b, every chunk in order.
template <typename T>
void fwd_block(const ScanParams& p, const ChannelBlock& blk, int64_t b, FwdWorkspace<T>& ws) {
  const int64_t N = p.dstate, L = p.seqlen, ld = ws.ld;
  const int64_t n_chunks = num_checkpoints(L);
  const T* A = static_cast<const T*>(p.A);
  const T* D = static_cast<const T*>(p.D);
  const T* delta_bias = static_cast<const T*>(p.delta_bias);
  const T* initial_state = static_cast<const T*>(p.initial_state);
  T* last_state = static_cast<T*>(p.last_state);
  T* checkpoints = static_cast<T*>(p.checkpoints);
  const int64_t B_step = p.B.is_variable ? ld : 0;  // buffer offset from one step to the next
  const int64_t C_step = p.C.is_variable ? ld : 0;

  for (int64_t d = blk.begin; d < blk.end; ++d) {
    T* h = ws.state.data() + (d - blk.begin) * ld;
    const int64_t row = b * p.dim + d;
    for (int64_t n = 0; n < N; ++n) h[n] = initial_state ? initial_state[row * N + n] : T(0);
  }

  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
    if (p.B.is_variable) load_bc_chunk(p.B, b, blk.group_B, t0, len, N, ld, ws.B.data(), ws.row_tmp.data());
    if (p.C.is_variable) load_bc_chunk(p.C, b, blk.group_C, t0, len, N, ld, ws.C.data(), ws.row_tmp.data());

    for (int64_t d = blk.begin; d < blk.end; ++d) {
      const int64_t row = b * p.dim + d;
      T* h = ws.state.data() + (d - blk.begin) * ld;
      std::copy(h, h + N, checkpoints + (row * n_chunks + c) * N);
      std::copy(A + d * N, A + d * N + N, ws.A.data());
      if (!p.B.is_variable) load_bc_row(p.B, d, N, ws.B.data());
      if (!p.C.is_variable) load_bc_row(p.C, d, N, ws.C.data());

      T* u = ws.u.data();
      T* dt = ws.delta.data();
      load_elements(p.u.ptr, p.input_type, row_offset(p.u, b, d) + t0, len, u);
      load_elements(p.delta.ptr, p.input_type, row_offset(p.delta, b, d) + t0, len, dt);
      const T bias = delta_bias ? delta_bias[d] : T(0);
      if (p.delta_softplus) {
        softplus_row(dt, static_cast<T*>(nullptr), bias);
      } else {
        for (int64_t t = 0; t < len; ++t) dt[t] += bias;
      }

      T* y = ws.y.data();
      scan_chunk(dt, u, ws.A.data(), ws.B.data(), B_step, ws.C.data(), C_step, ld, len, h, y,
                 static_cast<T*>(nullptr), static_cast<T*>(nullptr));

      const T D_d = D ? D[d] : T(0);
      for (int64_t t = 0; t < len; ++t) y[t] += D_d * u[t];
      if (p.z.ptr) {
        T* z = ws.z.data();
        T* gate = ws.gate.data();
        load_elements(p.z.ptr, p.input_type, row_offset(p.z, b, d) + t0, len, z);
        sigmoid_row(z, gate);
        for (int64_t t = 0; t < len; ++t) y[t] *= z[t] * gate[t];
      }
      store_elements(y, len, p.out.ptr, p.input_type, row_offset(p.out, b, d) + t0);
    }
  }

  for (int64_t d = blk.begin; d < blk.end; ++d) {
    const T* h = ws.state.data() + (d - blk.begin) * ld;
    std::copy(h, h + N, last_state + (b * p.dim + d) * N);
  }
}

template <typename T>
void scan_fwd_typed(const ScanParams& p) {
  const std::vector<ChannelBlock> blocks = plan_channel_blocks(p.dim, p.B, p.C, kFwdChannelBlock);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, p.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    FwdWorkspace<T> ws(p.dstate);
    for (int64_t task = begin; task < end; ++task) {
      fwd_block<T>(p, blocks[task % n_blocks], task / n_blocks, ws);
    }
  });
}

}  // namespace

void scan_fwd(const ScanParams& params) {
  if (params.input_type == ScalarKind::kFloat64) {
    scan_fwd_typed<double>(params);
  } else {
    scan_fwd_typed<float>(params);
  }
}

}  // namespace SELECTIVE_SCAN_CPU_ISA
}  // namespace cpu

#ifndef SELECTIVE_SCAN_CPU_ISA_VARIANT
void scan_fwd_cpu(const ScanParams& params) {
  if (const cpu::IsaKernels* avx2 = cpu::avx2_kernels()) {
    avx2->scan_fwd(params);
  } else {
    cpu::generic::scan_fwd(params);
  }
}
#endif

}  // namespace selective_scan
