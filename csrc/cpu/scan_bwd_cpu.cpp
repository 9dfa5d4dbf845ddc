// CPU backward of the selective scan by chunked recomputation: per chunk of kCheckpointChunk steps,
// the states are recomputed from the forward's checkpoint, then the adjoint runs backwards over the
// chunk. Cross-channel and cross-batch sums go through fixed-order partials (docs/cpu.md).
#include <ATen/Parallel.h>

#include "scan_cpu_common.h"
#include "scan_cpu_dispatch.h"

namespace selective_scan {
namespace cpu {
namespace SELECTIVE_SCAN_CPU_ISA {
namespace {

// Channels per backward task. Partial dB/dC of variable B/C are summed per block of this many
// channels, then over the blocks in order: a constant, so the sums do not depend on the threads.
constexpr int64_t kBwdChannelBlock = 32;

// Budget, in elements, for the per-block partial dB/dC of one wave of chunks.
constexpr int64_t kWaveScratchElements = int64_t{1} << 20;

// Per-task working memory, compute type; state-sized rows have the padded length ld.
template <typename T>
struct BwdWorkspace {
  int64_t ld;
  std::vector<T> B, C;          // (kChunk, ld) transposed chunk, or one row if time-invariant
  std::vector<T> A;             // (ld)
  std::vector<T> states;        // (kChunk + 1, ld): [0] the checkpoint, [t + 1] h_t of the chunk
  std::vector<T> decays;        // (kChunk, ld): exp(d_t A)
  std::vector<T> adjoint;       // (ld): exp(d_{t+1} A) g_{t+1}, carried backwards
  std::vector<T> dA_acc, dB_acc, dC_acc;  // (ld): sums over the chunk of one row
  std::vector<T> u, dt, dsoftplus, dout, z, gate, dy, y, du, ddelta, dz, row_tmp;  // (kChunk)

  explicit BwdWorkspace(int64_t dstate)
      : ld(padded_dstate<T>(dstate)), B(kChunk * ld, T(0)), C(kChunk * ld, T(0)), A(ld, T(0)),
        states((kChunk + 1) * ld, T(0)), decays(kChunk * ld, T(0)), adjoint(ld, T(0)), dA_acc(ld), dB_acc(ld),
        dC_acc(ld), u(kChunk), dt(kChunk), dsoftplus(kChunk), dout(kChunk), z(kChunk), gate(kChunk), dy(kChunk), y(kChunk), du(kChunk), ddelta(kChunk), dz(kChunk),
        row_tmp(kChunk) {}
};

// Sums over time kept per (batch, channel) row until the final, batch-ordered reduction.
template <typename T>
struct RowPartials {
  std::vector<T> dA, dB, dC;   // (batch, dim, dstate); dB/dC only for time-invariant B/C
  std::vector<T> dD, ddelta_bias;  // (batch, dim)
};

// Where a task writes partial dB/dC of variable B/C: (batch, n_blocks, wave_chunks, kChunk, ld).
template <typename T>
struct WavePartials {
  std::vector<T> dB, dC;
  int64_t wave_chunks = 1;
  int64_t n_blocks = 0;
  T* chunk(std::vector<T>& v, int64_t b, int64_t block, int64_t chunk_in_wave, int64_t ld) {
    return v.empty() ? nullptr : v.data() + ((b * n_blocks + block) * wave_chunks + chunk_in_wave) * kChunk * ld;
  }
};

// One row (b, d), one chunk c: recompute, reverse recurrence, row outputs and sums.
// dB_chunk/dC_chunk: the block's (len, ld) partials for variable B/C, else nullptr.
template <typename T>
void bwd_row_chunk(const ScanBwdParams& bp, int64_t b, int64_t d, int64_t c, BwdWorkspace<T>& ws,
                   T* dB_chunk, T* dC_chunk, RowPartials<T>& rows) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const ScanParams& p = bp.fwd;
  const int64_t N = p.dstate, L = p.seqlen, ld = ws.ld;
  const int64_t n_chunks = num_checkpoints(L);
  const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
  const int64_t row = b * p.dim + d;
  const T* D = static_cast<const T*>(p.D);
  const T* delta_bias = static_cast<const T*>(p.delta_bias);
  const T D_d = D ? D[d] : T(0);

  // Per-step scalars of the row.
  T* u = ws.u.data();
  T* dt = ws.dt.data();
  T* dsoftplus = ws.dsoftplus.data();
  T* dout = ws.dout.data();
  T* dy = ws.dy.data();
  load_elements(p.u.ptr, p.input_type, row_offset(p.u, b, d) + t0, len, u);
  load_elements(p.delta.ptr, p.input_type, row_offset(p.delta, b, d) + t0, len, dt);
  load_elements(bp.dout.ptr, p.input_type, row_offset(bp.dout, b, d) + t0, len, dout);
  const T bias = delta_bias ? delta_bias[d] : T(0);
  if (p.delta_softplus) {
    softplus_row(dt, dsoftplus, bias);
  } else {
    for (int64_t t = 0; t < len; ++t) {
      dt[t] += bias;
      dsoftplus[t] = T(1);
    }
  }
  T* z = ws.z.data();
  T* gate = ws.gate.data();
  if (p.z.ptr) {
    load_elements(p.z.ptr, p.input_type, row_offset(p.z, b, d) + t0, len, z);
    sigmoid_row(z, gate);
    for (int64_t t = 0; t < len; ++t) dy[t] = dout[t] * z[t] * gate[t];
  } else {
    std::copy(dout, dout + len, dy);
  }

  const T* A_all = static_cast<const T*>(p.A);
  std::copy(A_all + d * N, A_all + d * N + N, ws.A.data());
  if (!p.B.is_variable) load_bc_row(p.B, d, N, ws.B.data());
  if (!p.C.is_variable) load_bc_row(p.C, d, N, ws.C.data());
  const T* A_row = ws.A.data();
  const int64_t B_step = p.B.is_variable ? ld : 0;
  const int64_t C_step = p.C.is_variable ? ld : 0;

  // Recompute h_t of the chunk from its checkpoint, and exp(d_t A); with a gate also y_t before
  // gating (y_t = C_t . h_t + D u_t) for dz_t = dout_t y_t silu'(z_t).
  T* states = ws.states.data();
  T* decays = ws.decays.data();
  const T* checkpoint = static_cast<const T*>(bp.checkpoints) + (row * n_chunks + c) * N;
  std::copy(checkpoint, checkpoint + N, states);
  T* y = p.z.ptr ? ws.y.data() : nullptr;
  scan_chunk(dt, u, A_row, ws.B.data(), B_step, ws.C.data(), C_step, ld, len, static_cast<T*>(nullptr),
             y, states, decays);
  if (p.z.ptr) {
    T* dz = ws.dz.data();
    for (int64_t t = 0; t < len; ++t) {
      const T s = gate[t];
      dz[t] = dout[t] * (y[t] + D_d * u[t]) * (s * (T(1) + z[t] * (T(1) - s)));
    }
    store_elements(dz, len, bp.dz.ptr, p.input_type, row_offset(bp.dz, b, d) + t0);
  }

  // Adjoint entering the chunk from the right: exp(d_{t0+len} A) g_{t0+len}, or dlast_state.
  T* adjoint = ws.adjoint.data();
  T* carry = static_cast<T*>(bp.dinitial_state) + row * N;  // between chunks, then the output
  if (c == n_chunks - 1) {
    const T* dlast = static_cast<const T*>(bp.dlast_state);
    for (int64_t n = 0; n < N; ++n) adjoint[n] = dlast ? dlast[row * N + n] : T(0);
  } else {
    std::copy(carry, carry + N, adjoint);
  }

  std::fill(ws.dA_acc.begin(), ws.dA_acc.end(), T(0));
  T* dB_base = dB_chunk ? dB_chunk : ws.dB_acc.data();
  T* dC_base = dC_chunk ? dC_chunk : ws.dC_acc.data();
  const int64_t dB_step = dB_chunk ? ld : 0, dC_step = dC_chunk ? ld : 0;
  if (!dB_chunk) std::fill(ws.dB_acc.begin(), ws.dB_acc.end(), T(0));
  if (!dC_chunk) std::fill(ws.dC_acc.begin(), ws.dC_acc.end(), T(0));
  T* dA_acc = ws.dA_acc.data();
  T* du = ws.du.data();
  T* ddelta = ws.ddelta.data();
  T dD_sum = T(0), ddelta_bias_sum = T(0);

  // g_t = C_t dy_t + exp(d_{t+1} A) g_{t+1}, for t = len-1 .. 0.
  for (int64_t t = len - 1; t >= 0; --t) {
    const T* B_t = ws.B.data() + t * B_step;
    const T* C_t = ws.C.data() + t * C_step;
    T* dB_t = dB_base + t * dB_step;
    T* dC_t = dC_base + t * dC_step;
    const T* h = states + (t + 1) * ld;
    const T* h_prev = states + t * ld;
    const T* decay_t = decays + t * ld;
    const V dy_v(dy[t]), dt_v(dt[t]), dtu_v(dt[t] * u[t]);
    V sum_gB(T(0)), sum_Ax(T(0));
    for (int64_t n = 0; n < ld; n += W) {
      const V g = at::vec::fmadd(V::loadu(C_t + n), dy_v, V::loadu(adjoint + n));
      at::vec::fmadd(dy_v, V::loadu(h + n), V::loadu(dC_t + n)).store(dC_t + n);
      at::vec::fmadd(g, dtu_v, V::loadu(dB_t + n)).store(dB_t + n);
      sum_gB = at::vec::fmadd(g, V::loadu(B_t + n), sum_gB);
      const V decay = V::loadu(decay_t + n);
      const V x = g * decay * V::loadu(h_prev + n);  // g_t exp(d_t A) h_{t-1}
      sum_Ax = at::vec::fmadd(V::loadu(A_row + n), x, sum_Ax);
      at::vec::fmadd(x, dt_v, V::loadu(dA_acc + n)).store(dA_acc + n);
      (decay * g).store(adjoint + n);
    }
    const T gB = lane_sum(sum_gB), Ax = lane_sum(sum_Ax);
    du[t] = dy[t] * D_d + dt[t] * gB;
    ddelta[t] = (Ax + u[t] * gB) * dsoftplus[t];
    dD_sum += dy[t] * u[t];
    ddelta_bias_sum += ddelta[t];
  }

  std::copy(adjoint, adjoint + N, carry);
  store_elements(du, len, bp.du.ptr, p.input_type, row_offset(bp.du, b, d) + t0);
  store_elements(ddelta, len, bp.ddelta.ptr, p.input_type, row_offset(bp.ddelta, b, d) + t0);
  for (int64_t n = 0; n < N; ++n) rows.dA[row * N + n] += dA_acc[n];
  if (!dB_chunk) {
    for (int64_t n = 0; n < N; ++n) rows.dB[row * N + n] += ws.dB_acc[n];
  }
  if (!dC_chunk) {
    for (int64_t n = 0; n < N; ++n) rows.dC[row * N + n] += ws.dC_acc[n];
  }
  rows.dD[row] += dD_sum;
  rows.ddelta_bias[row] += ddelta_bias_sum;
}

// Batch b, one channel block, chunks c_hi down to c_lo.
template <typename T>
void bwd_block_wave(const ScanBwdParams& bp, const ChannelBlock& blk, int64_t block_index, int64_t b,
                    int64_t c_hi, int64_t c_lo, BwdWorkspace<T>& ws, WavePartials<T>& wave,
                    RowPartials<T>& rows) {
  const ScanParams& p = bp.fwd;
  const int64_t N = p.dstate, ld = ws.ld;
  for (int64_t c = c_hi; c >= c_lo; --c) {
    const int64_t t0 = c * kChunk, len = std::min(kChunk, p.seqlen - t0);
    if (p.B.is_variable) load_bc_chunk(p.B, b, blk.group_B, t0, len, N, ld, ws.B.data(), ws.row_tmp.data());
    if (p.C.is_variable) load_bc_chunk(p.C, b, blk.group_C, t0, len, N, ld, ws.C.data(), ws.row_tmp.data());
    T* dB_chunk = wave.chunk(wave.dB, b, block_index, c - c_lo, ld);
    T* dC_chunk = wave.chunk(wave.dC, b, block_index, c - c_lo, ld);
    if (dB_chunk) std::fill(dB_chunk, dB_chunk + len * ld, T(0));
    if (dC_chunk) std::fill(dC_chunk, dC_chunk + len * ld, T(0));
    for (int64_t d = blk.begin; d < blk.end; ++d) bwd_row_chunk(bp, b, d, c, ws, dB_chunk, dC_chunk, rows);
  }
}

// Variable dB (or dC) over steps of chunks c_lo..c_hi: for each (b, group, n, t) the sum of the
// block partials of the group, in block order.
template <typename T>
void reduce_wave_bc(const ScanParams& p, const BCParams& bc, const std::vector<ChannelBlock>& blocks,
                    bool use_group_B, const WavePartials<T>& wave, const std::vector<T>& partials,
                    int64_t c_hi, int64_t c_lo, int64_t ld, T* grad) {
  const int64_t N = p.dstate, L = p.seqlen, G = bc.n_groups;
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  std::vector<int64_t> first_block(G + 1, n_blocks);  // blocks of group g: [first_block[g], first_block[g+1])
  for (int64_t k = n_blocks - 1; k >= 0; --k) {
    first_block[use_group_B ? blocks[k].group_B : blocks[k].group_C] = k;
  }
  at::parallel_for(0, p.batch * G * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i % N, g = (i / N) % G, b = i / (N * G);
      T* out = grad + ((b * G + g) * N + n) * L;
      for (int64_t c = c_lo; c <= c_hi; ++c) {
        const int64_t t0 = c * kChunk, len = std::min(kChunk, L - t0);
        for (int64_t t = 0; t < len; ++t) {
          T s = T(0);
          for (int64_t k = first_block[g]; k < first_block[g + 1]; ++k) {
            s += partials[(((b * n_blocks + k) * wave.wave_chunks + (c - c_lo)) * kChunk + t) * ld + n];
          }
          out[t0 + t] = s;
        }
      }
    }
  });
}

// out[i] = sum over b of per_row[b * count + i], in batch order.
template <typename T>
void sum_over_batch(const std::vector<T>& per_row, int64_t batch, int64_t count, T* out) {
  at::parallel_for(0, count, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T s = T(0);
      for (int64_t b = 0; b < batch; ++b) s += per_row[b * count + i];
      out[i] = s;
    }
  });
}

template <typename T>
void scan_bwd_typed(const ScanBwdParams& bp) {
  const ScanParams& p = bp.fwd;
  const int64_t N = p.dstate, n_chunks = num_checkpoints(p.seqlen);
  const int64_t ld = padded_dstate<T>(N);
  const int64_t n_rows = p.batch * p.dim;
  const std::vector<ChannelBlock> blocks = plan_channel_blocks(p.dim, p.B, p.C, kBwdChannelBlock);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());

  RowPartials<T> rows;
  rows.dA.assign(n_rows * N, T(0));
  if (!p.B.is_variable) rows.dB.assign(n_rows * N, T(0));
  if (!p.C.is_variable) rows.dC.assign(n_rows * N, T(0));
  rows.dD.assign(n_rows, T(0));
  rows.ddelta_bias.assign(n_rows, T(0));

  // Chunks per wave: all of them unless partial dB/dC of variable B/C must fit the budget.
  WavePartials<T> wave;
  wave.n_blocks = n_blocks;
  const int64_t n_variable = int64_t{p.B.is_variable} + int64_t{p.C.is_variable};
  const int64_t per_chunk = p.batch * n_blocks * kChunk * ld * n_variable;
  wave.wave_chunks = n_variable == 0 ? n_chunks
                                     : std::max<int64_t>(1, std::min(n_chunks, kWaveScratchElements / per_chunk));
  const int64_t wave_elements = p.batch * n_blocks * wave.wave_chunks * kChunk * ld;
  if (p.B.is_variable) wave.dB.resize(wave_elements);
  if (p.C.is_variable) wave.dC.resize(wave_elements);

  for (int64_t c_hi = n_chunks - 1; c_hi >= 0; c_hi -= wave.wave_chunks) {
    const int64_t c_lo = std::max<int64_t>(0, c_hi - wave.wave_chunks + 1);
    at::parallel_for(0, p.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
      BwdWorkspace<T> ws(N);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task % n_blocks, b = task / n_blocks;
        bwd_block_wave(bp, blocks[k], k, b, c_hi, c_lo, ws, wave, rows);
      }
    });
    if (p.B.is_variable) {
      reduce_wave_bc(p, p.B, blocks, true, wave, wave.dB, c_hi, c_lo, ld, static_cast<T*>(bp.dB));
    }
    if (p.C.is_variable) {
      reduce_wave_bc(p, p.C, blocks, false, wave, wave.dC, c_hi, c_lo, ld, static_cast<T*>(bp.dC));
    }
  }

  sum_over_batch(rows.dA, p.batch, p.dim * N, static_cast<T*>(bp.dA));
  if (!p.B.is_variable) sum_over_batch(rows.dB, p.batch, p.dim * N, static_cast<T*>(bp.dB));
  if (!p.C.is_variable) sum_over_batch(rows.dC, p.batch, p.dim * N, static_cast<T*>(bp.dC));
  if (bp.dD) sum_over_batch(rows.dD, p.batch, p.dim, static_cast<T*>(bp.dD));
  if (bp.ddelta_bias) sum_over_batch(rows.ddelta_bias, p.batch, p.dim, static_cast<T*>(bp.ddelta_bias));
}

}  // namespace

void scan_bwd(const ScanBwdParams& params) {
  if (params.fwd.input_type == ScalarKind::kFloat64) {
    scan_bwd_typed<double>(params);
  } else {
    scan_bwd_typed<float>(params);
  }
}

}  // namespace SELECTIVE_SCAN_CPU_ISA
}  // namespace cpu

#ifndef SELECTIVE_SCAN_CPU_ISA_VARIANT
void scan_bwd_cpu(const ScanBwdParams& params) {
  if (const cpu::IsaKernels* avx2 = cpu::avx2_kernels()) {
    avx2->scan_bwd(params);
  } else {
    cpu::generic::scan_bwd(params);
  }
}
#endif

}  // namespace selective_scan
