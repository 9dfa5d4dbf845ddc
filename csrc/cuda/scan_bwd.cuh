// The backward CUDA kernel: the same block layout as the forward, walking the chunks in reverse.
// Per chunk it recomputes the states from the forward's checkpoint (keeping the state at every
// kSub-step boundary in shared memory), then per sub-chunk recomputes kSub states and decays into
// registers and runs the adjoint recurrence backwards. Channel sums (dB, dC of variable B/C) are
// reduced in shared memory in a fixed order and written as per-block partials: no atomics, so the
// result is bitwise deterministic. With few rows the sequence is split into pieces: an
// adjoint-only pass gives each later piece's adjoint contribution from zero and its decay,
// scan_bwd_combine_kernel chains them from the right into each piece's incoming adjoint, then the
// full pass runs all pieces at once. docs/design.md has the math.
#pragma once

#include <type_traits>

#include "../cuda/scan_cuda.h"
#include "scan_common.cuh"

namespace selective_scan {
namespace cuda_detail {

struct BwdFlags {
  bool u_aligned, delta_aligned, z_aligned, dout_aligned;  // inputs
  bool grads_aligned;                                      // du, ddelta, dz (contiguous outputs)
};

// Slot of this block among the blocks that write partial sums for one group of B (or C).
__device__ __forceinline__ int64_t partial_slot(const ScanParams& p, const BlockShape& s, const BCParams& bc,
                                                const BlockRows& r) {
  const int64_t segs_per_group = s.segments / bc.n_groups;
  const int64_t seg = (r.d0 / s.seg_dim);
  return (seg % segs_per_group) * s.blocks_per_seg + r.cb;
}

// kTPC: threads per channel fixed at compile time (4, 8 or 16, with kSPT 4: dstate 9-64, the
// warp-sums path below), or 0 for s.tpc. The kernels are held to three blocks' registers (168; at
// one state per thread, left free, ptxas took 180-190 and two blocks fitted: docs/design.md,
// item 42).
// kAdjointOnly: the first pass of a sequence split, over pieces 1.. (blockIdx.y + 1): from a zero
// adjoint at the piece's end, the adjoint carried out of its first step (F) and the piece's decay
// exp(A sum_t delta_t) (P), into parts.piece_adjoints[0][piece] and [1][piece]; nothing else.
// kVarBC: B and C both variable (only C for the adjoint-only pass, which reads no B), so that
// their tile strides are compile-time constants and the reverse loop carries no branch for
// time-invariant B or C (instantiated at 4, 8 and 16 threads per channel; the adjoint-only pass at 4).
// kOutF32: du, ddelta and dz are fp32 with 16-bit inputs (ScanParams::out_f32: a state slice's
// partial gradients; instantiated at 16 threads per channel, the slices' layout).
template <typename input_t, int kSPT, int kTPC, bool kAdjointOnly, bool kVarBC = false, bool kOutF32 = false>
__global__ void __launch_bounds__(128, 3) scan_bwd_kernel(const ScanBwdParams bp, const BlockShape s, const BwdFlags f,
                                const ScanBwdPartials parts) {
  const ScanParams& p = bp.fwd;
  extern __shared__ float4 smem_b4[];
  float* smem = reinterpret_cast<float*>(smem_b4);
  // Four states per thread, kTPC threads per channel: sums over states and channels by shuffles.
  constexpr bool kWarpSums = kSPT == 4 && kTPC >= 4;
  // At 4 and 8 threads per channel the lanes of a warp's upper half (lane bit 4) hold their four
  // states in the order 2, 3, 0, 1 (register j: state n0 + (j ^ jswap)), reading B and C from
  // half-swapped copies of the tiles, so that the first level of the dB / dC warp sums needs no
  // selects (warp_channel_sums). Host side: bwd_swapped_tiles.
  constexpr bool kSwapHalves = kWarpSums && kTPC <= 8 && !kAdjointOnly;
  const int tpc = kTPC > 0 ? kTPC : s.tpc;
  // The warp-sums kernels run 128 threads, 128 / kTPC channels (launch_scan_bwd checks). At 16
  // threads per channel that layout is taken as compile-time constants, so that the index
  // arithmetic folds (dstate 64: -3%); at 4 and 8 the same measured slower (+0.1 to +0.7% against
  // the run-time values; docs/design.md, item 49).
  constexpr bool kConstLayout = kWarpSums && kTPC >= 16;
  const int threads = kConstLayout ? 128 : s.threads;
  const int cpb = kConstLayout ? 128 / (kTPC > 0 ? kTPC : 1) : s.cpb;
  const BlockShape shape{kSPT, tpc, cpb, threads};
  const BwdSmem L = bwd_smem_layout(shape);
  // L.npad, spelled as a compile-time constant where kTPC is one (the compiler does not fold L's).
  const int npad = kTPC > 0 ? kTPC * kSPT : L.npad;
  float* s_B = smem;
  float* s_C = s_B + kChunk * npad;
  // Half-swapped copies of the tiles (kSwapHalves; L.tiles has room for them at 4 and 8 threads
  // per channel), kSwapPad floats further on.
  float* s_Bsw = kSwapHalves ? s_C + kChunk * npad + kSwapPad : nullptr;
  float* s_Csw = kSwapHalves ? s_Bsw + kChunk * npad : nullptr;
  float* s_u = smem + L.tiles;
  float* s_d = s_u + cpb * kRow;    // d, then d(loss)/d(delta) once a sub-chunk is done
  float* s_du = s_d + cpb * kRow;   // d * u, then d(loss)/du once a sub-chunk is done
  float* s_dy = s_du + cpb * kRow;  // dout * silu(z)
  float* s_hck = s_dy + cpb * kRow;
  float* s_y = s_hck + L.hck;           // staging and forward recompute: dout silu'(z), then dz [cpb][kRow]
  float* s_sA = s_y;                    // reverse phase: per-thread sums over states
  float* s_sB = s_sA + kSub * threads;
  float* s_dBr = s_sB + kSub * threads;  // per-channel dB / dC of one sub-chunk
  float* s_dCr = s_dBr + cpb * L.cstride;
  float* s_wB = s_y;                    // reverse phase with kWarpSums: [warp][kSub][npad + pad] dB / dC
  float* s_wC = s_wB + (threads / 32) * kSub * (npad + kWarpRowPad);

  const BlockRows rows = block_rows(p, s);
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int c = tid / tpc;
  const int q = tid % tpc;
  const int n0 = q * kSPT;
  const int jswap = kSwapHalves && (lane & 16) ? 2 : 0;  // register j holds state n0 + (j ^ jswap)
  const bool c_valid = c < rows.valid;
  const int64_t d = rows.d0 + (c_valid ? c : 0);
  const int dstate = static_cast<int>(p.dstate);
  const int64_t row = rows.b * p.dim + d;
  const int64_t n_chunks = num_checkpoints(p.seqlen);
  // This block's chunks [k_begin, k_end): all of them, or its piece of a sequence split. A piece's
  // per-row partials go to its own batch block of rows (prow).
  const int64_t piece = kAdjointOnly ? blockIdx.y + 1 : blockIdx.y;
  const int64_t k_begin = s.seq_splits > 1 ? piece * s.chunks_per_split : 0;
  const int64_t k_end = s.seq_splits > 1 ? min(n_chunks, k_begin + s.chunks_per_split) : n_chunks;
  const int64_t piece_states = p.batch * p.dim * dstate;  // one piece's slice of piece_adjoints
  const int64_t prow = piece * p.batch * p.dim + row;

  float A2[kSPT], Af[kSPT];
  float G[kSPT];  // exp(d_{t+1} A) g_{t+1}: the adjoint carried into step t
  float dA_acc[kSPT], dB_acc[kSPT], dC_acc[kSPT];
  const float* A = static_cast<const float*>(p.A);
#pragma unroll
  for (int j = 0; j < kSPT; ++j) {
    const int n = n0 + (j ^ jswap);
    const bool nv = n < dstate;
    Af[j] = nv ? A[d * dstate + n] : 0.f;
    A2[j] = Af[j] * kLog2e;
    // The adjoint entering the piece's last step: dlast_state for the last piece (or no split),
    // the combine kernel's result for an earlier one, zero in the adjoint-only pass.
    if (kAdjointOnly || !nv) {
      G[j] = 0.f;
    } else if (k_end < n_chunks) {
      G[j] = parts.piece_adjoints[(piece + 1) * piece_states + row * dstate + n];
    } else {
      G[j] = bp.dlast_state != nullptr ? static_cast<const float*>(bp.dlast_state)[row * dstate + n] : 0.f;
    }
    dA_acc[j] = dB_acc[j] = dC_acc[j] = 0.f;
  }
  int Bstep, Cstep;
  const float* Bsrc = bc_source<input_t, kSPT>(p.B, s_B, d, c, n0, npad, dstate, Bstep, jswap, s_Bsw);
  const float* Csrc = bc_source<input_t, kSPT>(p.C, s_C, d, c, n0, npad, dstate, Cstep, jswap, s_Csw);
  if constexpr (kVarBC) Bstep = Cstep = npad;  // (the launcher checks the forms)
  float dD_acc = 0.f, dbias_acc = 0.f;
  // kWarpSums: dD and d(delta_bias) accumulated per staged vector of 8 steps; a thread stages the
  // same vectors (v = tid and tid + threads, at most two: kChunk / kVec * cpb <= 2 * threads) of
  // every chunk.
  float dD_vec[2] = {0.f, 0.f}, dbias_vec[2] = {0.f, 0.f};
  const float D_row = p.D ? static_cast<const float*>(p.D)[d] : 0.f;

  const input_t* u_base = static_cast<const input_t*>(p.u.ptr) + rows.b * p.u.batch_stride;
  const input_t* delta_base = static_cast<const input_t*>(p.delta.ptr) + rows.b * p.delta.batch_stride;
  const input_t* z_base = p.z.ptr ? static_cast<const input_t*>(p.z.ptr) + rows.b * p.z.batch_stride : nullptr;
  const input_t* dout_base = static_cast<const input_t*>(bp.dout.ptr) + rows.b * bp.dout.batch_stride;
  using grad_t = std::conditional_t<kOutF32, float, input_t>;
  grad_t* du_base = static_cast<grad_t*>(bp.du.ptr) + rows.b * bp.du.batch_stride;
  grad_t* ddelta_base = static_cast<grad_t*>(bp.ddelta.ptr) + rows.b * bp.ddelta.batch_stride;
  grad_t* dz_base = bp.dz.ptr ? static_cast<grad_t*>(bp.dz.ptr) + rows.b * bp.dz.batch_stride : nullptr;
  const float* D = static_cast<const float*>(p.D);
  const float* delta_bias = static_cast<const float*>(p.delta_bias);
  // The checkpoints' row length: a state slice's fp32-gradient build (kOutF32, which only the
  // slices launch) reads its columns of the whole problem's checkpoints in place, rows of
  // p.checkpoint_row states; the other kernels read rows of dstate (launch_scan_bwd checks). Only
  // that build reads the field: reading it in every kernel changed the dstate-16 kernels'
  // registers and made them slower (docs/design.md, item 51).
  const int ck_row = kOutF32 ? static_cast<int>(p.checkpoint_row) : dstate;
  const float* ckpt = static_cast<const float*>(bp.checkpoints) + row * n_chunks * ck_row;
  const int vecs = cpb * (kChunk / kVec);
  const int64_t slotB = p.B.is_variable ? partial_slot(p, s, p.B, rows) : 0;
  const int64_t slotC = p.C.is_variable ? partial_slot(p, s, p.C, rows) : 0;

  // The chunk's checkpoint copied ahead into shared memory (cp.async): at 16 threads per
  // channel, where it measured faster (dstate 64: -1.3%; at 4 and 8 it did not pay, item 48).
  constexpr bool kCkptAsync = kWarpSums && !kAdjointOnly && kTPC >= 16;
  static_assert(!(kCkptAsync && kSwapHalves), "the checkpoint's copies are in state order");
  const bool ckpt_async = kCkptAsync && dstate % 2 == 0 &&
                          (!kOutF32 || (ck_row % 2 == 0 && reinterpret_cast<uintptr_t>(bp.checkpoints) % 8 == 0));
  float delta_sum = 0.f;  // adjoint-only pass: sum of the piece's delta (after bias and softplus)

  // Loads ahead (the full pass at 16 threads per channel with 16-bit inputs, all four rows 16-byte
  // aligned): chunk k - 1's segments are issued into those registers once chunk k's reverse phase
  // is done, so that their latency overlaps chunk k's du / ddelta stores, and the staging of chunk
  // k - 1 converts them. Only whole chunks, by 16-byte loads only, as in the forward (item 25):
  // every chunk but the first walked, which may be partial and loads when staged. At 4 and 8
  // threads per channel the same made the backward 2.4-4.3% slower, at 16 2.1% faster
  // (docs/design.md, item 59), but not in fp32, whose segments take twice the registers (item 61).
  constexpr bool kRowsAhead = kWarpSums && !kAdjointOnly && kTPC >= 16 && sizeof(input_t) < 4;
  const bool rows_ahead = kRowsAhead && f.u_aligned && f.delta_aligned && f.dout_aligned &&
                          (z_base == nullptr || f.z_aligned);
  // This thread's segments v = tid and tid + threads of the next chunk's u, delta, dout and z.
  RawSeg<input_t> ahead_u[2], ahead_d[2], ahead_g[2], ahead_z[2];
  auto zero_rows_ahead = [&](int i) {
    zero_seg(ahead_u[i]);
    zero_seg(ahead_d[i]);
    zero_seg(ahead_g[i]);
    zero_seg(ahead_z[i]);
  };
  auto load_rows_whole = [&](int64_t k) {
    const int64_t t0 = k * kChunk;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int v = tid + i * threads;
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      if (v < vecs && cc < rows.valid) {
        const int64_t dc = rows.d0 + cc;
        ahead_u[i] = load_seg_whole(u_base + dc * p.u.dim_stride + t0, t);
        ahead_d[i] = load_seg_whole(delta_base + dc * p.delta.dim_stride + t0, t);
        ahead_g[i] = load_seg_whole(dout_base + dc * bp.dout.dim_stride + t0, t);
        if (z_base) ahead_z[i] = load_seg_whole(z_base + dc * p.z.dim_stride + t0, t);
        else zero_seg(ahead_z[i]);
      } else {
        zero_rows_ahead(i);
      }
    }
  };
  for (int64_t k = k_end - 1; k >= k_begin; --k) {
    const int64_t t0 = k * kChunk;
    const int len = static_cast<int>(p.seqlen - t0 < kChunk ? p.seqlen - t0 : kChunk);
    // This block's partial dB / dC rows of the chunk (variable B / C): [n][t] with row stride seqlen.
    float* dB_chunk = p.B.is_variable ? parts.dB + ((slotB * p.batch + rows.b) * p.B.n_groups + rows.gB) * dstate * p.seqlen + t0 : nullptr;
    float* dC_chunk = p.C.is_variable ? parts.dC + ((slotC * p.batch + rows.b) * p.C.n_groups + rows.gC) * dstate * p.seqlen + t0 : nullptr;

    // ckpt_async (even dstate, 8-byte aligned pairs of states): the chunk's checkpoint is copied
    // into this thread's slot of the first sub-chunk in s_hck, where the recompute reads it, while
    // the staging's loads are in flight (before, its load waited just before the recompute;
    // docs/design.md, item 48): two 8-byte copies, zeros past dstate.
    if (ckpt_async) {
      const float* ck = ckpt + k * ck_row;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int n = n0 + 2 * half;
        cp_async_8(s_hck + tid * kSPT + 2 * half, n < dstate ? ck + n : ck, n < dstate ? 8 : 0);
      }
    }

    // Stage u, d, d * u and dy = dout * silu(z); zeros past the end make padded steps inert. Two
    // segments per thread at a time, all loads (and those of B and C when one segment per thread
    // covers their tiles) issued before any of them is used; the softplus of both segments in one
    // branch, so that the compiler interleaves the sixteen evaluations.
    const bool pre_bc = npad * (kChunk / kVec) <= threads &&
                        (!p.B.is_variable || kAdjointOnly || !bc_fp32<input_t>(p.B) || sizeof(input_t) == 4) &&
                        (!p.C.is_variable || !bc_fp32<input_t>(p.C) || sizeof(input_t) == 4);
    RawSeg<input_t> rb, rc;
    if (pre_bc && tid < npad * (kChunk / kVec)) {
      if (!kAdjointOnly && p.B.is_variable) rb = load_bc_seg<input_t>(p.B, rows.b, rows.gB, t0, len, dstate, npad, tid);
      if (p.C.is_variable) rc = load_bc_seg<input_t>(p.C, rows.b, rows.gC, t0, len, dstate, npad, tid);
    }
    const bool loaded_ahead = kRowsAhead && rows_ahead && k < k_end - 1;  // (one pass of the loop below)
    for (int first = 0; first < vecs; first += 2 * threads) {
      // The kernels with loads ahead stage from the registers those went to (where this chunk's
      // loads go too when it was not loaded ahead), the others from registers of the loop's own.
      RawSeg<input_t> own_u[2], own_d[2], own_g[2], own_z[2];
      RawSeg<input_t>(&ru)[2] = kRowsAhead ? ahead_u : own_u;
      RawSeg<input_t>(&rd)[2] = kRowsAhead ? ahead_d : own_d;
      RawSeg<input_t>(&rg)[2] = kRowsAhead ? ahead_g : own_g;
      RawSeg<input_t>(&rz)[2] = kRowsAhead ? ahead_z : own_z;
#pragma unroll
      for (int i = 0; i < 2 && !loaded_ahead; ++i) {
        const int v = first + tid + i * threads;
        const int cc = v / (kChunk / kVec);
        const int t = (v % (kChunk / kVec)) * kVec;
        zero_seg(rz[i]);
        if (v < vecs && cc < rows.valid) {
          const int64_t dc = rows.d0 + cc;
          // (the adjoint-only pass reads neither u nor d * u)
          if (kAdjointOnly) zero_seg(ru[i]);
          else ru[i] = load_seg(u_base + dc * p.u.dim_stride + t0, t, len, f.u_aligned);
          rd[i] = load_seg(delta_base + dc * p.delta.dim_stride + t0, t, len, f.delta_aligned);
          rg[i] = load_seg(dout_base + dc * bp.dout.dim_stride + t0, t, len, f.dout_aligned);
          if (z_base) rz[i] = load_seg(z_base + dc * p.z.dim_stride + t0, t, len, f.z_aligned);
        } else {
          zero_seg(ru[i]);
          zero_seg(rd[i]);
          zero_seg(rg[i]);
        }
      }
      float x[2][kVec];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int v = first + tid + i * threads;
        const int cc = v / (kChunk / kVec);
        const float bias = v < vecs && cc < rows.valid && delta_bias ? delta_bias[rows.d0 + cc] : 0.f;
        seg_floats(rd[i], x[i]);
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[i][j] += bias;
      }
      if (p.delta_softplus) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) x[i][j] = softplus(x[i][j]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int v = first + tid + i * threads;
        if (v >= vecs) continue;
        const int cc = v / (kChunk / kVec);
        const int t = (v % (kChunk / kVec)) * kVec;
        float uu[kVec], dy[kVec];
        seg_floats(ru[i], uu);
        seg_floats(rg[i], dy);
        if (z_base) {
          float zz[kVec];
          seg_floats(rz[i], zz);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const float sg = sigmoid(zz[j]);
            // dout silu'(z) into the y row, where the chunk recompute turns it into dz.
            if (!kAdjointOnly && cc < rows.valid) s_y[cc * kRow + t + j] = dy[j] * sg * (1.f + zz[j] * (1.f - sg));
            dy[j] *= zz[j] * sg;
          }
        }
        const bool cv = cc < rows.valid;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int e = cc * kRow + t + j;
          const float dd = cv && t + j < len ? x[i][j] : 0.f;
          if (!kAdjointOnly) s_u[e] = uu[j];
          s_d[e] = dd;
          if (!kAdjointOnly) s_du[e] = dd * uu[j];
          s_dy[e] = dy[j];
        }
        if constexpr (kWarpSums && !kAdjointOnly) {
          // (v < threads for i = 0, and v >= threads for i = 1: at most two segments per thread)
          float acc = dD_vec[i];
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc = fmaf(dy[j], uu[j], acc);  // zeros past the end
          dD_vec[i] = acc;
        }
      }
    }
    if (pre_bc) {
      if (tid < npad * (kChunk / kVec)) {
        if (!kAdjointOnly && p.B.is_variable) store_bc_seg(rb, npad, tid, s_B, kSwapHalves ? s_Bsw : nullptr);
        if (p.C.is_variable) store_bc_seg(rc, npad, tid, s_C, kSwapHalves ? s_Csw : nullptr);
      }
    } else {
      if (!kAdjointOnly && p.B.is_variable)
        stage_bc<input_t>(p.B, rows.b, rows.gB, t0, len, dstate, npad, s_B, kSwapHalves ? s_Bsw : nullptr);
      if (p.C.is_variable) stage_bc<input_t>(p.C, rows.b, rows.gC, t0, len, dstate, npad, s_C, kSwapHalves ? s_Csw : nullptr);
    }
    if (ckpt_async) cp_async_wait_all();
    __syncthreads();

    const float* __restrict__ my_d = s_d + c * kRow;
    const float* __restrict__ my_du = s_du + c * kRow;
    const float* __restrict__ my_dy = s_dy + c * kRow;

    if (kAdjointOnly && k >= k_begin) {  // (always true in the loop; spelled so that the full pass's
                                          // code below does not read as unreachable to the front end)
      // g_t = C_t dy_t + a_{t+1} g_{t+1}, carried as G = a_t g_t; padded steps (d = 0, dy = 0)
      // leave it unchanged. The adjoint carried out of the chunk is corrected to the chunk's
      // accurately formed decay (carried_decay_error).
      float G_in[kSPT], G_decayed[kSPT];
      float dsum = 0.f;
#pragma unroll
      for (int j = 0; j < kSPT; ++j) G_in[j] = G_decayed[j] = G[j];
      for (int t = kChunk - 1; t >= 0; --t) {
        const float dt = my_d[t], dyt = my_dy[t];
        float Ct[kSPT];
        load_smem<kSPT>(Csrc + t * Cstep, Ct);
#pragma unroll
        for (int j = 0; j < kSPT; ++j) {
          const float a = fast_exp2(dt * A2[j]);
          G_decayed[j] *= a;
          G[j] = a * fmaf(dyt, Ct[j], G[j]);
        }
        dsum += dt;
      }
#pragma unroll
      for (int j = 0; j < kSPT; ++j) G[j] += carried_decay_error(A2[j], dsum, G_in[j], G_decayed[j]);
      delta_sum += dsum;
      __syncthreads();
      continue;
    }

    // Forward recompute from the checkpoint: the state at each sub-chunk start, and (for dz) the
    // per-thread partial outputs, with the forward's per-step decays. Alongside, the adjoint
    // entering the chunk carried through those decays alone and the chunk's summed d: the adjoint
    // is corrected where it enters the chunk so that it leaves multiplied by the chunk's accurately
    // formed decay (carried_decay_error_at_entry).
    {
      float h[kSPT], G_decayed[kSPT];
      float dsum = 0.f;
      if (ckpt_async) {
        load_smem<kSPT>(s_hck + tid * kSPT, h);
      } else {
#pragma unroll
        for (int j = 0; j < kSPT; ++j) {
          const int n = n0 + (j ^ jswap);
          h[j] = n < dstate ? ckpt[k * ck_row + n] : 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < kSPT; ++j) G_decayed[j] = G[j];
      for (int sub = 0; sub < kChunk / kSub; ++sub) {
        if constexpr (kSPT == 4) st_shared_v4(s_hck + (sub * threads + tid) * kSPT, h[0], h[1], h[2], h[3]);
        else store_smem<kSPT>(s_hck + (sub * threads + tid) * kSPT, h);
        float ys[kSub];
#pragma unroll
        for (int kk = 0; kk < kSub; ++kk) {
          const int t = sub * kSub + kk;
          const float dt = my_d[t], dut = my_du[t];
          float Bt[kSPT], Ct[kSPT];
          load_smem<kSPT>(Bsrc + t * Bstep, Bt);
          load_smem<kSPT>(Csrc + t * Cstep, Ct);
          float y = 0.f;
#pragma unroll
          for (int j = 0; j < kSPT; ++j) {
            const float a = fast_exp2(dt * A2[j]);
            G_decayed[j] *= a;
            h[j] = fmaf(a, h[j], dut * Bt[j]);
            y = fmaf(Ct[j], h[j], y);
          }
          ys[kk] = y;
          dsum += dt;
        }
        if (z_base) {
          // dz_t = dout_t silu'(z_t) (y_t + D u_t), formed by the lane that holds the step's sum
          // over states (each step of the channel has one such lane).
          int first;
          const int count = channel_sum_steps<kTPC>(ys, tpc, q, first);
#pragma unroll
          for (int i = 0; i < kSub; ++i) {
            if (i < count) {
              const int e = c * kRow + sub * kSub + first + i;
              s_y[e] *= fmaf(D_row, s_u[e], ys[i]);
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kSPT; ++j) G[j] += carried_decay_error_at_entry(A2[j], dsum, G[j], G_decayed[j]);
    }
    __syncthreads();

    // Store dz of the chunk (the y row).
    if (z_base) {
      for (int v = tid; v < vecs; v += threads) {
        const int cc = v / (kChunk / kVec);
        const int t = (v % (kChunk / kVec)) * kVec;
        if (cc >= rows.valid || t >= len) continue;
        float dz[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) dz[j] = s_y[cc * kRow + t + j];
        store_vec(dz_base + (rows.d0 + cc) * bp.dz.dim_stride + t0, t, len, f.grads_aligned, dz);
      }
      __syncthreads();
    }

    // Reverse through the sub-chunks.
    for (int sub = kChunk / kSub - 1; sub >= 0; --sub) {
      float hs[kSub][kSPT], as[kSub][kSPT], h0[kSPT];
      // kWarpSums: this thread's sums over its states of each step, summed over the channel's
      // lanes once the sub-chunk is done.
      float sAs[kSub], sBs[kSub];
      load_smem<kSPT>(s_hck + (sub * threads + tid) * kSPT, h0);
      {
        float h[kSPT];
#pragma unroll
        for (int j = 0; j < kSPT; ++j) h[j] = h0[j];
#pragma unroll
        for (int kk = 0; kk < kSub; ++kk) {
          const int t = sub * kSub + kk;
          const float dt = my_d[t], dut = my_du[t];
          float Bt[kSPT];
          load_smem<kSPT>(Bsrc + t * Bstep, Bt);
#pragma unroll
          for (int j = 0; j < kSPT; ++j) {
            as[kk][j] = fast_exp2(dt * A2[j]);
            h[j] = fmaf(as[kk][j], h[j], dut * Bt[j]);
            hs[kk][j] = h[j];
          }
        }
      }
      // kWarpSums: the previous step's dB / dC terms, each as per-state factors times a scalar
      float fBlate[kSPT], fClate[kSPT], sBlate = 1.f, sClate = 1.f;
#pragma unroll
      for (int kk = kSub - 1; kk >= 0; --kk) {
        const int t = sub * kSub + kk;
        const float dt = my_d[t], dut = my_du[t], dyt = my_dy[t];
        float Bt[kSPT], Ct[kSPT];
        load_smem<kSPT>(Bsrc + t * Bstep, Bt);
        load_smem<kSPT>(Csrc + t * Cstep, Ct);
        float sA = 0.f, sB = 0.f, gt[kSPT], dBt[kSPT], dCt[kSPT];
#pragma unroll
        for (int j = 0; j < kSPT; ++j) {
          const float g = fmaf(dyt, Ct[j], G[j]);        // g_t = C_t dy_t + a_{t+1} g_{t+1}
          const float hprev = kk > 0 ? hs[kk - 1][j] : h0[j];
          const float ag = as[kk][j] * g;
          const float qv = ag * hprev;                     // g_t a_t h_{t-1}
          dA_acc[j] = fmaf(qv, dt, dA_acc[j]);
          sA = fmaf(Af[j], qv, sA);
          sB = fmaf(g, Bt[j], sB);
          gt[j] = g;
          dBt[j] = g * dut;
          dCt[j] = dyt * hs[kk][j];
          G[j] = ag;
        }
        if constexpr (kWarpSums) {
          sAs[kk] = sA;
          sBs[kk] = sB;
          // dB / dC summed over the warp's channels (invalid channels contribute zeros) for
          // variable B / C, and over time per thread for time-invariant ones. The warp sums run
          // for both forms, without branches, so that the compiler interleaves the two
          // butterflies; the flush and the per-row store below take the form that applies.
          // Each step's sums are formed one step late, after the next step's arithmetic, so that
          // their shuffles' latency overlaps it; and with kVarBC the time-invariant accumulation
          // below is compiled out, so that no branch cuts this loop into one basic block per step
          // (ptxas then issued each shuffle just before the add that waits for it; design.md,
          // item 45).
          if (kk < kSub - 1) {
            const int wrow = (warp * kSub + kk + 1) * (npad + kWarpRowPad);
            warp_channel_sums<kTPC, kSwapHalves>(fBlate, sBlate, lane, n0, s_wB + wrow);
            warp_channel_sums<kTPC, kSwapHalves>(fClate, sClate, lane, n0, s_wC + wrow);
          }
          // The terms g_t d_t u_t and h_t dy_t as factors and scalars: at 4 and 8 threads per
          // channel the adjoints and states with d * u and dy, so that the warp sums fuse the kept
          // terms' products into their first adds (at 4, 29 instructions fewer per sub-chunk; at
          // 8 the compiler had contracted them already), at 16 the products with 1 (there the
          // longer-lived factors spilled; design.md, item 60).
          constexpr bool kFusedTerms = kTPC <= 8;
#pragma unroll
          for (int j = 0; j < kSPT; ++j) {
            fBlate[j] = kFusedTerms ? gt[j] : dBt[j];
            fClate[j] = kFusedTerms ? hs[kk][j] : dCt[j];
          }
          sBlate = kFusedTerms ? dut : 1.f;
          sClate = kFusedTerms ? dyt : 1.f;
          if (kk == 0) {
            const int wrow = (warp * kSub) * (npad + kWarpRowPad);
            warp_channel_sums<kTPC, kSwapHalves>(fBlate, sBlate, lane, n0, s_wB + wrow);
            warp_channel_sums<kTPC, kSwapHalves>(fClate, sClate, lane, n0, s_wC + wrow);
          }
          if (!kVarBC && (!p.B.is_variable || !p.C.is_variable)) {
#pragma unroll
            for (int j = 0; j < kSPT; ++j) {
              dB_acc[j] += dBt[j];
              dC_acc[j] += dCt[j];
            }
          }
          continue;
        }
        s_sA[kk * threads + tid] = sA;
        s_sB[kk * threads + tid] = sB;
        if (p.B.is_variable) store_smem<kSPT>(s_dBr + c * L.cstride + kk * npad + n0, dBt);
        else {
#pragma unroll
          for (int j = 0; j < kSPT; ++j) dB_acc[j] += dBt[j];
        }
        if (p.C.is_variable) store_smem<kSPT>(s_dCr + c * L.cstride + kk * npad + n0, dCt);
        else {
#pragma unroll
          for (int j = 0; j < kSPT; ++j) dC_acc[j] += dCt[j];
        }
      }
      if constexpr (kWarpSums) {
        // The sums over states of the sub-chunk's steps, summed over the channel's lanes by the
        // transposed butterfly of the forward's outputs (each of the first min(8, tpc) lanes ends
        // with `count` consecutive steps from `first`), which then write, in place of u and
        // d * u, d(loss)/d(d_t) before the softplus derivative (the chunk's store applies it) and
        // du of their steps. The channel's other lanes read d * u of these steps above: the
        // __syncwarp orders their reads before the writes (shuffles do not order memory).
        int first;
        const int count = channel_sum_steps<kTPC>(sAs, tpc, q, first);
        channel_sum_steps<kTPC>(sBs, tpc, q, first);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < kSub; ++i) {
          if (i < count) {
            const int e = c * kRow + sub * kSub + first + i;
            const float ut = s_u[e], dt = s_d[e], dyt = s_dy[e];
            s_u[e] = fmaf(ut, sBs[i], sAs[i]);
            s_du[e] = fmaf(dyt, D_row, dt * sBs[i]);
          }
        }
      }
      __syncthreads();

      if constexpr (kWarpSums) {
        // dB / dC of the sub-chunk: the block's warps (at most four: blocks have at most 128
        // threads) summed in warp order; eight consecutive threads take eight consecutive steps of
        // one state (32-byte stores).
        constexpr int kNpad = kTPC * kSPT;
        constexpr int kWarpRows = kSub * (kNpad + kWarpRowPad);  // one warp's buffer
        const int nwarps = threads / 32;
        for (int o = tid; o < 2 * kSub * kNpad; o += threads) {
          const bool is_C = o >= kSub * kNpad;
          const int oc = is_C ? o - kSub * kNpad : o;
          const int n = oc / kSub, kk = oc % kSub;
          const int t = sub * kSub + kk;
          if (!(is_C ? p.C.is_variable : p.B.is_variable) || t >= len || n >= dstate) continue;
          const float* buf = (is_C ? s_wC : s_wB) + kk * (kNpad + kWarpRowPad) + n;
          // All four loads first, so that they are in flight together.
          float part[4];
#pragma unroll
          for (int w = 0; w < 4; ++w) part[w] = w < nwarps ? buf[w * kWarpRows] : 0.f;
          float acc = 0.f;
#pragma unroll
          for (int w = 0; w < 4; ++w) acc += part[w];
          (is_C ? dC_chunk : dB_chunk)[n * p.seqlen + t] = acc;
        }
        __syncthreads();
        continue;
      }

      // Per (channel, step): du and ddelta from the sums over states, in place of d * u and d.
      if (c_valid) {
        const float Dd = D ? D[d] : 0.f;
        for (int kk = q; kk < kSub; kk += s.tpc) {
          const int t = sub * kSub + kk;
          if (t >= len) continue;
          const float* pa = s_sA + kk * threads + c * s.tpc;
          const float* pb = s_sB + kk * threads + c * s.tpc;
          float sA = 0.f, sB = 0.f;
          for (int r = 0; r < s.tpc; ++r) {
            sA += pa[r];
            sB += pb[r];
          }
          const int e = c * kRow + t;
          const float dt = s_d[e], ut = s_u[e], dyt = s_dy[e];
          float ddt = fmaf(ut, sB, sA);
          if (p.delta_softplus) ddt *= softplus_grad_from_value(dt);
          s_du[e] = fmaf(dyt, Dd, dt * sB);
          s_d[e] = ddt;
          dbias_acc += ddt;
          dD_acc = fmaf(dyt, ut, dD_acc);
        }
      }
      // Channel sums of dB / dC for this sub-chunk in a fixed order: `splits` consecutive lanes each
      // sum a contiguous range of channels for one group of kW states, then combine by shuffle.
      if (p.B.is_variable || p.C.is_variable) {
        constexpr int kW = kSPT >= 4 ? 4 : 1;
        const int groups = npad / kW;
        const int per_array = kSub * groups;
        const int outputs = 2 * per_array;  // dB's, then dC's
        int splits = 1;
        while (splits < 32 && 2 * splits * outputs <= threads) splits *= 2;
        const int per_split = (rows.valid + splits - 1) / splits;
        for (int base = 0; base < outputs * splits; base += threads) {
          const int item = base + tid;
          const bool active = item < outputs * splits;
          const int o = active ? item / splits : 0;
          const int part = item % splits;
          const bool is_C = o >= per_array;
          const int oc = is_C ? o - per_array : o;
          const int n = (oc % groups) * kW;
          const int kk = oc / groups;
          const bool wanted = active && (is_C ? p.C.is_variable : p.B.is_variable);
          const float* red = is_C ? s_dCr : s_dBr;
          float acc[kW] = {};
          if (wanted) {
            const int c_end = min(rows.valid, (part + 1) * per_split);
            for (int cc = part * per_split; cc < c_end; ++cc) {
              float v[kW];
              load_smem<kW>(red + cc * L.cstride + kk * npad + n, v);
#pragma unroll
              for (int w = 0; w < kW; ++w) acc[w] += v[w];
            }
          }
          for (int off = 1; off < splits; off <<= 1) {
#pragma unroll
            for (int w = 0; w < kW; ++w) acc[w] += __shfl_xor_sync(0xffffffffu, acc[w], off);
          }
          const int t = sub * kSub + kk;
          if (wanted && part == 0 && t < len && n < dstate) {
            float* dst = (is_C ? dC_chunk : dB_chunk) + n * p.seqlen + t;
#pragma unroll
            for (int w = 0; w < kW; ++w)
              if (n + w < dstate) dst[w * p.seqlen] = acc[w];
          }
        }
      }
      __syncthreads();
    }

    if constexpr (kRowsAhead) {
      if (rows_ahead && k > k_begin) {
        load_rows_whole(k - 1);
      } else {
        // (the registers are written on every path out of the reverse phase, so that they are
        // not held through it)
#pragma unroll
        for (int i = 0; i < 2; ++i) zero_rows_ahead(i);
      }
    }

    // Store du and ddelta of the chunk.
    for (int v = tid; v < vecs; v += threads) {
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      if (cc >= rows.valid || t >= len) continue;
      const int64_t dc = rows.d0 + cc;
      float a[kVec], b[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        a[i] = s_du[cc * kRow + t + i];
        if constexpr (kWarpSums) {
          float ddt = s_u[cc * kRow + t + i];
          if (p.delta_softplus) ddt *= softplus_grad_from_value(s_d[cc * kRow + t + i]);
          b[i] = ddt;
        } else {
          b[i] = s_d[cc * kRow + t + i];
        }
      }
      if constexpr (kWarpSums) {
        float acc = v < threads ? dbias_vec[0] : dbias_vec[1];
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc += t + i < len ? b[i] : 0.f;
        if (v < threads) dbias_vec[0] = acc; else dbias_vec[1] = acc;
      }
      store_vec(du_base + dc * bp.du.dim_stride + t0, t, len, f.grads_aligned, a);
      store_vec(ddelta_base + dc * bp.ddelta.dim_stride + t0, t, len, f.grads_aligned, b);
    }
    __syncthreads();
  }

  if constexpr (kAdjointOnly) {
    if (c_valid) {
#pragma unroll
      for (int j = 0; j < kSPT; ++j) {
        const int n = n0 + (j ^ jswap);
        if (n >= dstate) continue;
        parts.piece_adjoints[piece * piece_states + row * dstate + n] = G[j];
        parts.piece_adjoints[(s.seq_splits + piece) * piece_states + row * dstate + n] = exp2f(A2[j] * delta_sum);
      }
    }
    return;
  }
  // Per-row results: the initial-state gradient is the adjoint carried past step 0.
  if (c_valid) {
#pragma unroll
    for (int j = 0; j < kSPT; ++j) {
      const int n = n0 + (j ^ jswap);
      if (n >= dstate) continue;
      if (k_begin == 0) static_cast<float*>(bp.dinitial_state)[row * dstate + n] = G[j];
      parts.dA[prow * dstate + n] = dA_acc[j];
      if (!p.B.is_variable) parts.dB[prow * dstate + n] = dB_acc[j];
      if (!p.C.is_variable) parts.dC[prow * dstate + n] = dC_acc[j];
    }
  }
  if constexpr (kWarpSums) {
    // dD and d(delta_bias): each channel's eight vectors summed in order through shared memory
    // (free after the last chunk's barrier).
    float* s_red = s_u;  // [2][cpb][8]
    const int vecs_per_row = kChunk / kVec;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int v = tid + i * threads;
      if (v < vecs) {
        s_red[v] = dD_vec[i];
        s_red[vecs + v] = dbias_vec[i];
      }
    }
    __syncthreads();
    if (tid < rows.valid) {
      float sD = 0.f, sb = 0.f;
      for (int i = 0; i < vecs_per_row; ++i) {
        sD += s_red[tid * vecs_per_row + i];
        sb += s_red[vecs + tid * vecs_per_row + i];
      }
      const int64_t prow_c = piece * p.batch * p.dim + rows.b * p.dim + rows.d0 + tid;
      parts.dD[prow_c] = sD;
      parts.ddelta_bias[prow_c] = sb;
    }
  } else {
    // dD and d(delta_bias): sum the channel's threads (consecutive lanes) in a fixed order.
    for (int off = 1; off < tpc; off <<= 1) {
      dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, off);
      dbias_acc += __shfl_xor_sync(0xffffffffu, dbias_acc, off);
    }
    if (c_valid && q == 0) {
      parts.dD[prow] = dD_acc;
      parts.ddelta_bias[prow] = dbias_acc;
    }
  }
}

// Between the two passes of a sequence split: for each (b, d, n), from the last piece to the
// second, H = P_y H + F_y with H starting at dlast_state (or zero); H then is the adjoint entering
// piece y - 1's last step, and overwrites F_y, where that piece reads it.
static __global__ void scan_bwd_combine_kernel(const ScanBwdParams bp, const BlockShape s, float* piece_adjoints) {
  const ScanParams& p = bp.fwd;
  const int64_t states = p.batch * p.dim * p.dstate;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (b, d, n)
  if (i >= states) return;
  float H = bp.dlast_state ? static_cast<const float*>(bp.dlast_state)[i] : 0.f;
  for (int64_t y = s.seq_splits - 1; y >= 1; --y) {
    H = fmaf(piece_adjoints[(s.seq_splits + y) * states + i], H, piece_adjoints[y * states + i]);
    piece_adjoints[y * states + i] = H;
  }
}

}  // namespace cuda_detail
}  // namespace selective_scan

#include "scan_launch.cuh"

namespace selective_scan {
namespace cuda_detail {

template <typename input_t>
bool launch_scan_bwd(const ScanBwdParams& bp, const ScanBwdPartials& parts, const BlockShape& s,
                     cudaStream_t stream) {
  const ScanParams& p = bp.fwd;
  const int esize = sizeof(input_t);
  const bool out_f32 = p.out_f32 && esize < 4;  // (fp32 inputs write fp32 anyway)
  const int gsize = out_f32 ? 4 : esize;
  if (out_f32 && !(bwd_warp_sums(s) && s.tpc == 16)) return false;
  // (rows of checkpoints wider than dstate: a state slice's columns, read in place by the
  // fp32-gradient build only)
  if (p.checkpoint_row != p.dstate && !out_f32)
    throw std::runtime_error("selective_scan: internal error, checkpoint rows wider than dstate need the fp32-gradient build");
  const BwdFlags f{rows_aligned(p.u, esize), rows_aligned(p.delta, esize),
                   p.z.ptr == nullptr || rows_aligned(p.z, esize), rows_aligned(bp.dout, esize),
                   rows_aligned(bp.du, gsize) && rows_aligned(bp.ddelta, gsize) &&
                       (bp.dz.ptr == nullptr || rows_aligned(bp.dz, gsize))};
  const int smem = bwd_smem_layout(s).total * static_cast<int>(sizeof(float));
  const unsigned blocks = static_cast<unsigned>(grid_blocks(p, s));
  const auto launch = [&](auto spt, auto tpc) {
    constexpr int kSPT = decltype(spt)::value, kTPC = decltype(tpc)::value;
    // The both-variable kernels (kVarBC): the full pass at 4, 8 and 16 threads per channel, the
    // adjoint-only pass (sequence splits, mostly dstate 16) at 4.
    using kVarFull = std::bool_constant<kTPC == 4 || kTPC == 8 || kTPC == 16>;
    using kVarAdj = std::bool_constant<kTPC == 4>;
    // One pass's kernel (adjoint-only or full; fp32 gradients or not): its both-variable build
    // where that is compiled (kVar) and `both_variable` holds, else the general one.
    const auto launch_pass = [&](auto adjoint_only, auto var_build, auto grads_f32, bool both_variable,
                                 const dim3& grid, const char* what) {
      constexpr bool kAdj = decltype(adjoint_only)::value, kVar = decltype(var_build)::value;
      constexpr bool kF32 = decltype(grads_f32)::value;
      if constexpr (kVar) {
        if (both_variable) {
          launch_checked(scan_bwd_kernel<input_t, kSPT, kTPC, kAdj, true, kF32>, grid, s.threads, smem, stream,
                         what, bp, s, f, parts);
          return;
        }
      }
      launch_checked(scan_bwd_kernel<input_t, kSPT, kTPC, kAdj, false, kF32>, grid, s.threads, smem, stream, what,
                     bp, s, f, parts);
    };
    if constexpr (kSPT != 1) {  // block_shape splits only at four states per thread
      if (s.seq_splits > 1) {
        if (parts.piece_adjoints == nullptr) throw std::runtime_error("selective_scan: sequence split without scratch");
        // (the adjoint-only pass reads no B)
        launch_pass(std::true_type{}, kVarAdj{}, std::false_type{}, p.C.is_variable,
                    dim3(blocks, static_cast<unsigned>(s.seq_splits - 1)), "scan_bwd_kernel (adjoint-only) launch");
        launch_checked(scan_bwd_combine_kernel, per_state_grid(p), 256, 0, stream, "scan_bwd_combine_kernel launch",
                       bp, s, parts.piece_adjoints);
      }
    }
    const dim3 grid(blocks, static_cast<unsigned>(s.seq_splits));
    const bool both_variable = p.B.is_variable && p.C.is_variable;
    if constexpr (kTPC == 16 && sizeof(input_t) < 4) {
      if (out_f32) {
        launch_pass(std::false_type{}, kVarFull{}, std::true_type{}, both_variable, grid,
                    "scan_bwd_kernel (fp32 gradients) launch");
        return;
      }
    }
    launch_pass(std::false_type{}, kVarFull{}, std::false_type{}, both_variable, grid, "scan_bwd_kernel launch");
  };
  if (bwd_warp_sums(s)) {
    // (the warp-sums kernels assume 128 threads, 128 / tpc channels; at 16 threads per channel
    // they take that layout as compile-time constants, kConstLayout)
    if (s.threads != 128 || s.cpb * s.tpc != 128)
      throw std::runtime_error("selective_scan: the backward's warp-sums kernels need blocks of 128 threads");
    constexpr std::integral_constant<int, 4> four;
    switch (s.tpc) {
      case 4: launch(four, std::integral_constant<int, 4>{}); break;
      case 8: launch(four, std::integral_constant<int, 8>{}); break;
      case 16: launch(four, std::integral_constant<int, 16>{}); break;
      default: throw std::runtime_error("selective_scan: unsupported threads per channel");
    }
  } else {
    dispatch_spt(s.spt, [&](auto spt) { launch(spt, std::integral_constant<int, 0>{}); });
  }
  return true;
}

}  // namespace cuda_detail
}  // namespace selective_scan
