// The forward CUDA kernels. A block owns `cpb` channels of one batch row; `tpc` threads share a
// channel, each keeping `kSPT` states in registers and running the recurrence sequentially through
// the sequence (or its piece blockIdx.y of a sequence split), one staged chunk of kChunk steps at a
// time. With few rows the sequence is split: a state-only pass gives each piece's end state from
// zero and its decay, scan_fwd_combine_kernel chains them into each piece's start state, then the
// full pass runs all pieces at once. docs/design.md has the details.
#pragma once

#include <type_traits>

#include "scan_common.cuh"

namespace selective_scan {
namespace cuda_detail {

struct FwdFlags {
  bool u_aligned, delta_aligned, z_aligned, out_aligned;
  // Software pipelining (below): the next chunk's u and delta (pre_ud) and B and C (pre_bc) are
  // loaded into registers during this chunk. Decided by the launcher, so that the kernel reads
  // them from its parameters instead of holding them in registers.
  bool pre_ud, pre_bc;
  // B and C variable, in the input type, with aligned rows (what pre_bc needs besides room).
  bool bc_vec;
  // The checkpoints' states as 16-byte aligned groups of four (dstate and row multiples of 4,
  // aligned start).
  bool ckpt_vec4;
};

// B or C, variable, with every [t, t + kVec) row segment 16-byte aligned for t a multiple of kVec
// (true of a contiguous tensor whose seqlen is a multiple of 16 / element size).
inline bool bc_rows_aligned(const BCParams& bc, int esize) {
  return (reinterpret_cast<uintptr_t>(bc.ptr) % 16 == 0) && (bc.batch_stride * esize) % 16 == 0 &&
         (bc.group_stride * esize) % 16 == 0 && (bc.dstate_stride * esize) % 16 == 0;
}

// Whether the forward's next-chunk loads fit the registers (see FwdFlags): at most two u / delta /
// z segments and one B and one C segment per thread; B or C in fp32 with 16-bit inputs loads when
// staged (the registers hold the input type). The loads in flight are whole 16-byte vectors only,
// so the rows must be aligned: the compiler then waits for them only where the next chunk is
// staged (with a partial segment's element loads in the same code it drained them before the
// recurrence, docs/design.md item 25).
template <typename input_t>
void fwd_prefetch_flags(const ScanParams& p, const BlockShape& s, FwdFlags& f) {
  const int npad = s.tpc * s.spt;
  f.pre_ud = s.cpb * (kChunk / kVec) <= 2 * s.threads && f.u_aligned && f.delta_aligned && f.z_aligned;
  auto fits = [](const BCParams& bc) {
    return !bc.is_variable ||
           ((!bc_fp32<input_t>(bc) || sizeof(input_t) == 4) && bc_rows_aligned(bc, sizeof(input_t)));
  };
  f.bc_vec = p.B.is_variable && p.C.is_variable && fits(p.B) && fits(p.C);
  f.pre_bc = npad * (kChunk / kVec) <= s.threads && fits(p.B) && fits(p.C);
}

// kStateOnly: the first pass of a sequence split. Piece y starts from zero and writes its end state
// E_y into checkpoint slot k1 (its last chunk + 1) and its decay exp(A sum_t delta_t) into slot
// k1 - 1 (pieces span at least two chunks, so no other piece uses these slots before the full
// pass rewrites them); no outputs.
// kTPC: 4, 8 or 16 threads per channel at four states per thread (dstate 9-64) with variable B and
// C in the input type and aligned rows (for the state-only pass, which reads no C: 4 only), so
// that the layout and the tile strides are compile-time constants; 0 for any layout (s.tpc).
// kMoreRegs: compiled for four blocks of 128 threads per SM (128 registers per thread) also for
// 16-bit inputs, which otherwise compile for five (102 registers); with more registers ptxas places
// the step loop's exps further ahead of their uses. Launched where the grid needs no more waves at
// four blocks per SM than at five (BlockShape::fwd_more_regs).
// kOutF32: out is fp32 with 16-bit inputs (ScanParams::out_f32: the partial outputs of a state
// slice); instantiated for the fixed layouts at 8 and 16 threads per channel.
template <typename input_t, int kSPT, int kTPC, bool kStateOnly, bool kMoreRegs = false, bool kOutF32 = false>
__global__ void __launch_bounds__(128, sizeof(input_t) == 4 || kMoreRegs ? 4 : 5)
    scan_fwd_kernel(const ScanParams p, const BlockShape s, const FwdFlags f) {
  static_assert(kTPC == 0 || (kSPT == 4 && (kTPC == 4 || (!kStateOnly && (kTPC == 8 || kTPC == 16)))),
                "fixed layouts: four states per thread at 4, 8 or 16 threads per channel");
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int tpc = kTPC > 0 ? kTPC : s.tpc;
  // The fixed layouts run 128 / kTPC channels in 128 threads (the launcher checks), so the
  // segments per thread are compile-time constants (at kTPC 4: two of u, delta and z, one of B
  // and C).
  const int threads = kTPC > 0 ? 128 : s.threads;
  const int cpb = kTPC > 0 ? 128 / kTPC : s.cpb;
  // Segments of u, delta, z and out per thread and chunk: at most two (the launcher checks); in
  // the fixed layouts at 8 or 16 threads per channel one (cpb * kChunk / kVec <= 128).
  constexpr int kSegs = kTPC > 0 && (128 / (kTPC > 0 ? kTPC : 1)) * (kChunk / kVec) <= 128 ? 1 : 2;
  const int npad = tpc * kSPT;
  float* s_B = smem;
  float* s_C = s_B + kChunk * npad;
  float* s_u = s_C + kChunk * npad;
  float* s_d = s_u + cpb * kRowFwd;
  float* s_du = s_d + cpb * kRowFwd;
  float* s_y = s_du + cpb * kRowFwd;

  const BlockRows rows = block_rows(p, s);
  const int tid = threadIdx.x;
  const int c = tid / tpc;  // this thread's channel within the block
  const int q = tid % tpc;  // which slice of the states
  const int n0 = q * kSPT;
  const bool c_valid = c < rows.valid;
  const int64_t d = rows.d0 + (c_valid ? c : 0);
  const int dstate = static_cast<int>(p.dstate);

  const int64_t n_chunks = num_checkpoints(p.seqlen);
  const int ck_row = static_cast<int>(p.checkpoint_row);  // (a state slice's row is the whole problem's)
  float* ckpt = static_cast<float*>(p.checkpoints) + (rows.b * p.dim + d) * n_chunks * ck_row;
  // This block's chunks [k_begin, k_end): all of them, or piece blockIdx.y of a sequence split.
  const int64_t k_begin = s.seq_splits > 1 ? blockIdx.y * s.chunks_per_split : 0;
  const int64_t k_end = s.seq_splits > 1 ? min(n_chunks, k_begin + s.chunks_per_split) : n_chunks;

  // Per-thread constants: A * log2(e) (zero for padded states, so they stay zero), time-invariant
  // B/C. The start state: the initial state (or zero) for the first piece and for state-only
  // pieces; for a later piece of the full pass, the combine kernel's result in its first slot.
  float A2[kSPT], h[kSPT];
  const float* A = static_cast<const float*>(p.A);
#pragma unroll
  for (int j = 0; j < kSPT; ++j) {
    const int n = n0 + j;
    const bool nv = n < dstate;
    A2[j] = nv ? A[d * dstate + n] * kLog2e : 0.f;
    if (kStateOnly || !nv) {
      h[j] = 0.f;
    } else if (k_begin > 0) {
      h[j] = ckpt[k_begin * ck_row + n];
    } else {
      h[j] = p.initial_state != nullptr
                 ? static_cast<const float*>(p.initial_state)[(rows.b * p.dim + d) * dstate + n]
                 : 0.f;
    }
  }
  float delta_sum = 0.f;  // state-only pass: sum of the piece's delta (after bias and softplus)

  int Bstep, Cstep;
  const float* Bsrc = bc_source<input_t, kSPT>(p.B, s_B, d, c, n0, npad, dstate, Bstep);
  const float* Csrc = bc_source<input_t, kSPT>(p.C, s_C, d, c, n0, npad, dstate, Cstep);
  if constexpr (kTPC > 0) Bstep = Cstep = npad;  // (variable B, and C in the full pass: the launcher checks)
  const input_t* u_base = static_cast<const input_t*>(p.u.ptr) + rows.b * p.u.batch_stride;
  const input_t* delta_base = static_cast<const input_t*>(p.delta.ptr) + rows.b * p.delta.batch_stride;
  const input_t* z_base = p.z.ptr ? static_cast<const input_t*>(p.z.ptr) + rows.b * p.z.batch_stride : nullptr;
  using out_t = std::conditional_t<kOutF32, float, input_t>;
  out_t* out_base = static_cast<out_t*>(p.out.ptr) + rows.b * p.out.batch_stride;
  const float* D = static_cast<const float*>(p.D);
  const float* delta_bias = static_cast<const float*>(p.delta_bias);
  const int vecs = cpb * (kChunk / kVec);  // segments of u, delta, z and out per chunk
  const int bc_vecs = npad * (kChunk / kVec);
  // kTPC > 0 (4, 8 or 16 threads per channel): launched only with variable B and C in the input
  // type, aligned rows and pre_ud (FwdFlags::bc_vec); the B and C tiles are loaded ahead where one
  // segment per thread covers them (kTPC 4), else all at once when staged. The forms of B and C,
  // the loads ahead and (at kTPC 4) this thread's tile segment are then compile-time facts, which
  // lets the compiler see that every register loaded ahead is read (FwdFlags).
  constexpr bool kFixedAheadBC = kTPC > 0 && kTPC * kSPT * (kChunk / kVec) == 128;
  const bool b_var = kTPC > 0 || p.B.is_variable;
  const bool c_var = kTPC > 0 || p.C.is_variable;
  const bool has_bc_seg = kFixedAheadBC || tid < bc_vecs;
  // Software pipelining: while a chunk is computed, the next chunk's u, delta, B and C and this
  // chunk's z are in flight in registers, packed as loaded (FwdFlags says when they fit); larger
  // shares load when staged.
  const bool pre_ud = kTPC > 0 || f.pre_ud;
  const bool pre_bc = kTPC > 0 ? kFixedAheadBC : f.pre_bc;
  // The full pass at four threads per channel, except its 16-bit 128-register build, holds fewer
  // loads in registers during the step loop, so that ptxas can issue the loop's shared loads and
  // exps further ahead of their uses (docs/design.md, item 37): this chunk's z is only fetched into
  // the L2 cache at the chunk's start and loaded in the epilogue (kZByL2), and in the 16-bit
  // 102-register build so are the next chunk's u, delta, B and C, loaded when that chunk is staged
  // (kNextByL2).
  constexpr bool kZByL2 = kTPC == 4 && !kStateOnly && (sizeof(input_t) == 4 || !kMoreRegs);
  constexpr bool kNextByL2 = kZByL2 && sizeof(input_t) < 4;
  RawSeg<input_t> ru[2], rd[2], rz[2], rb, rc;
  // delta_bias and D of the channels of this thread's segments v = tid, tid + threads (the same
  // in every chunk), loaded once.
  float seg_bias[2], seg_D[2];
#pragma unroll
  for (int i = 0; i < kSegs; ++i) {
    const int v = tid + i * threads;
    const int cc = v / (kChunk / kVec);
    const bool ok = v < vecs && cc < rows.valid;
    seg_bias[i] = ok && delta_bias ? delta_bias[rows.d0 + cc] : 0.f;
    seg_D[i] = ok && D ? D[rows.d0 + cc] : 0.f;
  }

  // Calls f(i, dc, t) for this thread's whole-chunk segments i (v = tid + i * threads) of channels
  // in the block's range: channel dc, first step t within the chunk.
  auto for_own_segments = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < kSegs; ++i) {
      const int v = tid + i * threads;
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      if (v < vecs && cc < rows.valid) f(i, rows.d0 + cc, t);
    }
  };
  auto chunk_len = [&](int64_t k) {
    return static_cast<int>(p.seqlen - k * kChunk < kChunk ? p.seqlen - k * kChunk : kChunk);
  };
  // Segments first + tid and first + tid + threads of u and delta of chunk k (zeros for channels
  // past the block's range).
  auto load_ud = [&](int64_t k, int first) {
    const int64_t t0 = k * kChunk;
    const int len = chunk_len(k);
#pragma unroll
    for (int i = 0; i < kSegs; ++i) {
      const int v = first + tid + i * threads;
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      if (v < vecs && cc < rows.valid) {
        const int64_t dc = rows.d0 + cc;
        ru[i] = load_seg(u_base + dc * p.u.dim_stride + t0, t, len, f.u_aligned);
        rd[i] = load_seg(delta_base + dc * p.delta.dim_stride + t0, t, len, f.delta_aligned);
      } else {
        zero_seg(ru[i]);
        zero_seg(rd[i]);
      }
    }
  };
  // The same for a whole chunk (with pre_ud, aligned rows): vector loads only.
  auto load_ud_whole = [&](int64_t k) {
    const int64_t t0 = k * kChunk;
#pragma unroll
    for (int i = 0; i < kSegs; ++i) {
      zero_seg(ru[i]);
      zero_seg(rd[i]);
    }
#pragma unroll
    for (int i = 0; i < kSegs; ++i) {
      const int v = tid + i * threads;
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      if (v < vecs && cc < rows.valid) {
        const int64_t dc = rows.d0 + cc;
        ru[i] = load_seg_whole(u_base + dc * p.u.dim_stride + t0, t);
        rd[i] = load_seg_whole(delta_base + dc * p.delta.dim_stride + t0, t);
      }
    }
  };
  // Stages u, d = softplus(delta + bias) and d * u (zeros past the end, so padded steps leave the
  // state unchanged) from the loaded segments. The softplus of both segments runs in one branch:
  // sixteen independent evaluations that the compiler interleaves.
  auto stage_ud = [&](int64_t k, int first) {
    const int len = chunk_len(k);
    float x[2][kVec];
#pragma unroll
    for (int i = 0; i < kSegs; ++i) {
      const int v = first + tid + i * threads;
      const int cc = v / (kChunk / kVec);
      const float bias = first == 0                               ? seg_bias[i]
                         : v < vecs && cc < rows.valid && delta_bias ? delta_bias[rows.d0 + cc]
                                                                     : 0.f;
      seg_floats(rd[i], x[i]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[i][j] += bias;
    }
    if (p.delta_softplus) {
#pragma unroll
      for (int i = 0; i < kSegs; ++i) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[i][j] = softplus(x[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < kSegs; ++i) {
      const int v = first + tid + i * threads;
      float uu[kVec];
      seg_floats(ru[i], uu);  // (before the test, so that every path reads the registers)
      if (v >= vecs) continue;
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      // Steps of this segment that exist (none for a channel past the block's range): in the
      // fixed layouts only a partial chunk or such a channel takes the zeroing, so whole segments
      // skip its selects (the general kernel selects always: the branch made it spill).
      const int steps = cc < rows.valid ? len - t : 0;
      float dd[kVec], ddu[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) dd[j] = x[i][j];
      if (kTPC == 0 || steps < kVec) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) dd[j] = j < steps ? dd[j] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) ddu[j] = dd[j] * uu[j];
      store_smem<kVec>(s_u + cc * kRowFwd + t, uu);
      store_smem<kVec>(s_d + cc * kRowFwd + t, dd);
      store_smem<kVec>(s_du + cc * kRowFwd + t, ddu);
    }
  };
  auto load_bc = [&](int64_t k) {
    if (!has_bc_seg) return;
    const int len = chunk_len(k);
    if (b_var) rb = load_bc_seg<input_t>(p.B, rows.b, rows.gB, k * kChunk, len, dstate, npad, tid);
    if (!kStateOnly && c_var) rc = load_bc_seg<input_t>(p.C, rows.b, rows.gC, k * kChunk, len, dstate, npad, tid);
  };
  // B and C of a whole chunk (with pre_bc, aligned rows).
  auto load_bc_whole = [&](int64_t k) {
    if (!has_bc_seg) return;
    if (b_var) rb = load_bc_seg_whole<input_t>(p.B, rows.b, rows.gB, k * kChunk, dstate, npad, tid);
    if (!kStateOnly && c_var)
      rc = load_bc_seg_whole<input_t>(p.C, rows.b, rows.gC, k * kChunk, dstate, npad, tid);
  };
  // Only whole chunks are loaded ahead (a partial last chunk loads when staged).
  auto whole = [&](int64_t k) { return (k + 1) * kChunk <= p.seqlen; };

  if (!kNextByL2 && whole(k_begin)) {
    if (pre_ud) load_ud_whole(k_begin);
    if (pre_bc) load_bc_whole(k_begin);
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int64_t t0 = k * kChunk;
    const int len = chunk_len(k);
    const bool ahead = whole(k);  // this chunk's u, delta, B, C were loaded ahead (with pre_ud, pre_bc)

    // Staged from the registers the loads ahead went to, or that this chunk's loads go to now, so
    // that every path waits for those registers' earlier loads here.
    if (pre_ud) {
      if (kNextByL2 && ahead) load_ud_whole(k);
      else if (!ahead) load_ud(k, 0);
      stage_ud(k, 0);
    } else {
      for (int first = 0; first < vecs; first += kSegs * threads) {
        load_ud(k, first);
        stage_ud(k, first);
      }
    }
    if (pre_bc) {
      if (kNextByL2 && ahead) load_bc_whole(k);
      else if (!ahead) load_bc(k);
      if (has_bc_seg) {
        if (b_var) store_bc_seg_whole(rb, npad, dstate, tid, s_B);
        if (!kStateOnly && c_var) store_bc_seg_whole(rc, npad, dstate, tid, s_C);
      }
    } else if constexpr (kTPC > 0) {
      // kBCSegs segments of each tile per thread, one tile at a time, all its loads issued
      // before the first store.
      constexpr int kBCSegs = kTPC * kSPT * (kChunk / kVec) / 128;
      auto stage_tile = [&](const BCParams& bc, int64_t g, float* tile) {
        RawSeg<input_t> seg[kBCSegs];
#pragma unroll
        for (int i = 0; i < kBCSegs; ++i)
          seg[i] = ahead ? load_bc_seg_whole<input_t>(bc, rows.b, g, t0, dstate, npad, tid + i * 128)
                         : load_bc_seg<input_t>(bc, rows.b, g, t0, len, dstate, npad, tid + i * 128);
#pragma unroll
        for (int i = 0; i < kBCSegs; ++i) store_bc_seg_whole(seg[i], npad, dstate, tid + i * 128, tile);
      };
      stage_tile(p.B, rows.gB, s_B);
      stage_tile(p.C, rows.gC, s_C);
    } else {
      if (b_var) stage_bc<input_t>(p.B, rows.b, rows.gB, t0, len, dstate, npad, s_B);
      if (!kStateOnly && c_var) stage_bc<input_t>(p.C, rows.b, rows.gC, t0, len, dstate, npad, s_C);
    }

    // The state before this chunk, for the backward: one 16-byte store where a thread's four
    // states all exist (dstate a multiple of 4) and are 16-byte aligned.
    if (!kStateOnly && c_valid) {
      bool stored = false;
      if constexpr (kSPT == 4 && kTPC > 0) {
        if (f.ckpt_vec4) {
          if (n0 < dstate) *reinterpret_cast<float4*>(ckpt + k * ck_row + n0) = make_float4(h[0], h[1], h[2], h[3]);
          stored = true;
        }
      }
      if (!stored) {
#pragma unroll
        for (int j = 0; j < kSPT; ++j)
          if (n0 + j < dstate) ckpt[k * ck_row + n0 + j] = h[j];
      }
    }
    __syncthreads();

    // The chunk's start state, that state carried through the per-step decays alone, and the
    // chunk's summed d: the state carried out of the chunk is corrected with them
    // (carried_decay_error).
    float h_in[kSPT], h_decayed[kSPT];
    float dsum = 0.f;
#pragma unroll
    for (int j = 0; j < kSPT; ++j) h_in[j] = h_decayed[j] = h[j];
    if (k + 1 < k_end && whole(k + 1)) {
      if constexpr (kNextByL2) {  // (a fixed layout: pre_ud and pre_bc hold)
        for_own_segments([&](int, int64_t dc, int t) {
          prefetch_l2(u_base + dc * p.u.dim_stride + t0 + kChunk + t);
          prefetch_l2(delta_base + dc * p.delta.dim_stride + t0 + kChunk + t);
        });
        prefetch_l2(bc_seg_whole_ptr<input_t>(p.B, rows.b, rows.gB, t0 + kChunk, dstate, npad, tid));
        prefetch_l2(bc_seg_whole_ptr<input_t>(p.C, rows.b, rows.gC, t0 + kChunk, dstate, npad, tid));
      } else {
        if (pre_ud) load_ud_whole(k + 1);
        if (pre_bc) load_bc_whole(k + 1);
      }
    }
    auto correct_carried_state = [&]() {
#pragma unroll
      for (int j = 0; j < kSPT; ++j) h[j] += carried_decay_error(A2[j], dsum, h_in[j], h_decayed[j]);
    };
    if (kStateOnly) {
      // The piece's end state from zero and its summed delta; no outputs.
      const float* __restrict__ my_d = s_d + c * kRowFwd;
      const float* __restrict__ my_du = s_du + c * kRowFwd;
#pragma unroll 8
      for (int t = 0; t < kChunk; ++t) {
        const float dt = my_d[t];
        const float dut = my_du[t];
        float Bt[kSPT];
        load_smem<kSPT>(Bsrc + t * Bstep, Bt);
#pragma unroll
        for (int j = 0; j < kSPT; ++j) {
          const float a = fast_exp2(dt * A2[j]);
          h_decayed[j] *= a;
          h[j] = fmaf(a, h[j], dut * Bt[j]);
        }
        dsum += dt;
      }
      correct_carried_state();
      delta_sum += dsum;
      __syncthreads();
      continue;
    }
    const bool z_ahead = !kZByL2 && z_base && pre_ud && ahead;
    if (kZByL2 && z_base && ahead)
      for_own_segments([&](int, int64_t dc, int t) { prefetch_l2(z_base + dc * p.z.dim_stride + t0 + t); });
    if (z_ahead)
      for_own_segments([&](int i, int64_t dc, int t) { rz[i] = load_seg_whole(z_base + dc * p.z.dim_stride + t0, t); });

    // The recurrence over the chunk, one exp per (step, state), in groups of kGroup steps whose
    // outputs are summed over the channel's threads together (independent shuffles). The outputs
    // use the per-step decays; the state carried to the next chunk is corrected afterwards.
    const float* __restrict__ my_d = s_d + c * kRowFwd;
    const float* __restrict__ my_du = s_du + c * kRowFwd;
    for (int t8 = 0; t8 < kChunk; t8 += kGroup) {
      float ys[kGroup];
      // The fixed layouts read d and d * u of four steps by one 16-byte load each; the general
      // kernel one step at a time (the four-step registers made it spill).
      float dq[4], duq[4];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int t = t8 + i;
        if (kTPC > 0 && i % 4 == 0) {
          load_smem<4>(my_d + t, dq);
          load_smem<4>(my_du + t, duq);
        }
        const float dt = kTPC > 0 ? dq[i % 4] : my_d[t];
        const float dut = kTPC > 0 ? duq[i % 4] : my_du[t];
        float Bt[kSPT], Ct[kSPT];
        load_smem<kSPT>(Bsrc + t * Bstep, Bt);
        load_smem<kSPT>(Csrc + t * Cstep, Ct);
        float y = 0.f;
#pragma unroll
        for (int j = 0; j < kSPT; ++j) {
          const float a = fast_exp2(dt * A2[j]);
          h_decayed[j] *= a;
          h[j] = fmaf(a, h[j], dut * Bt[j]);
          y = fmaf(Ct[j], h[j], y);
        }
        ys[i] = y;
        dsum += dt;
      }
      int first;
      const int count = channel_sum_steps<kTPC>(ys, tpc, q, first);
      store_step_sums(ys, count, first, s_y + c * kRowFwd + t8);
    }
    correct_carried_state();
    __syncthreads();

    // Sum the partial outputs of each channel's threads, add D u, gate with silu(z), store.
    for (int first = 0; first < vecs; first += kSegs * threads) {
#pragma unroll
      for (int i = 0; i < kSegs; ++i) {
        const int v = first + tid + i * threads;
        const int cc = v / (kChunk / kVec);
        const int t = (v % (kChunk / kVec)) * kVec;
        if (v >= vecs || cc >= rows.valid || t >= len) continue;
        const int64_t dc = rows.d0 + cc;
        const float Dd = first == 0 ? seg_D[i] : D ? D[dc] : 0.f;
        float y[kVec], uu[kVec];
        load_smem<kVec>(s_y + cc * kRowFwd + t, y);
        load_smem<kVec>(s_u + cc * kRowFwd + t, uu);
#pragma unroll
        for (int j = 0; j < kVec; ++j) y[j] = fmaf(Dd, uu[j], y[j]);
        if (z_base) {
          float zz[kVec];
          if (!z_ahead) rz[i] = load_seg(z_base + dc * p.z.dim_stride + t0, t, len, f.z_aligned);
          seg_floats(rz[i], zz);
#pragma unroll
          for (int j = 0; j < kVec; ++j) y[j] *= zz[j] * sigmoid(zz[j]);
        }
        store_vec(out_base + dc * p.out.dim_stride + t0, t, len, f.out_aligned, y);
      }
    }
    __syncthreads();
  }

  if (kStateOnly) {
    if (c_valid) {
#pragma unroll
      for (int j = 0; j < kSPT; ++j) {
        if (n0 + j < dstate) {
          ckpt[k_end * ck_row + n0 + j] = h[j];
          ckpt[(k_end - 1) * ck_row + n0 + j] = exp2f(A2[j] * delta_sum);
        }
      }
    }
  } else if (c_valid && k_end == n_chunks) {
    float* last = static_cast<float*>(p.last_state) + (rows.b * p.dim + d) * dstate;
#pragma unroll
    for (int j = 0; j < kSPT; ++j)
      if (n0 + j < dstate) last[n0 + j] = h[j];
  }
}

// Between the two passes of a sequence split: for each (b, d, n), in order of the pieces,
// H_{y+1} = P_y H_y + E_y with H_0 the initial state (or zero), P_y and E_y as the state-only pass
// left them; H_{y+1} overwrites E_y (slot k1 of piece y = the first slot of piece y + 1), where
// the full pass reads it.
static __global__ void scan_fwd_combine_kernel(const ScanParams p, const BlockShape s) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (b, d, n)
  if (i >= p.batch * p.dim * p.dstate) return;
  const int64_t row = i / p.dstate, n = i % p.dstate;
  const int64_t n_chunks = num_checkpoints(p.seqlen), ck_row = p.checkpoint_row;
  float* ckpt = static_cast<float*>(p.checkpoints) + row * n_chunks * ck_row + n;
  float H = p.initial_state ? static_cast<const float*>(p.initial_state)[i] : 0.f;
  for (int64_t y = 0; y + 1 < s.seq_splits; ++y) {
    const int64_t k1 = (y + 1) * s.chunks_per_split;
    H = fmaf(ckpt[(k1 - 1) * ck_row], H, ckpt[k1 * ck_row]);
    ckpt[k1 * ck_row] = H;
  }
}

}  // namespace cuda_detail
}  // namespace selective_scan

#include "scan_launch.cuh"

namespace selective_scan {
namespace cuda_detail {

template <typename input_t>
bool launch_scan_fwd(const ScanParams& p, const BlockShape& s, cudaStream_t stream) {
  const int esize = sizeof(input_t);
  const bool out_f32 = p.out_f32 && esize < 4;  // (fp32 inputs write fp32 anyway)
  FwdFlags f{rows_aligned(p.u, esize), rows_aligned(p.delta, esize),
             p.z.ptr == nullptr || rows_aligned(p.z, esize), rows_aligned(p.out, out_f32 ? 4 : esize), false, false,
             false,
             p.dstate % 4 == 0 && p.checkpoint_row % 4 == 0 && reinterpret_cast<uintptr_t>(p.checkpoints) % 16 == 0};
  fwd_prefetch_flags<input_t>(p, s, f);
  // The fixed layouts (dstate 9-64 at four states per thread): aligned rows, variable B and C.
  const bool fixed = s.spt == 4 && s.threads == 128 && f.pre_ud && f.bc_vec;
  if (out_f32 && !(fixed && (s.tpc == 8 || s.tpc == 16))) return false;
  const int smem = fwd_smem_floats(s) * static_cast<int>(sizeof(float));
  const unsigned blocks = static_cast<unsigned>(grid_blocks(p, s));
  dispatch_spt(s.spt, [&](auto spt) {
    constexpr int kSPT = decltype(spt)::value;
    if constexpr (kSPT != 1) {  // block_shape splits only at four states per thread
      if (s.seq_splits > 1) {
        const dim3 grid(blocks, static_cast<unsigned>(s.seq_splits - 1));
        constexpr int kTPCState = kSPT == 4 ? 4 : 0;
        // (the state-only pass reads no C)
        if (kTPCState > 0 && s.tpc == 4 && s.threads == 128 && p.B.is_variable && f.pre_ud && f.pre_bc) {
          launch_checked(scan_fwd_kernel<input_t, kSPT, kTPCState, true>, grid, s.threads, smem, stream,
                         "scan_fwd_kernel (state-only) launch", p, s, f);
        } else {
          launch_checked(scan_fwd_kernel<input_t, kSPT, 0, true>, grid, s.threads, smem, stream,
                         "scan_fwd_kernel (state-only) launch", p, s, f);
        }
        launch_checked(scan_fwd_combine_kernel, per_state_grid(p), 256, 0, stream, "scan_fwd_combine_kernel launch", p,
                       s);
      }
    }
    const dim3 grid(blocks, static_cast<unsigned>(s.seq_splits));
    if constexpr (kSPT == 4) {
      if (fixed) {
        auto launch_fixed = [&](auto tpc, auto more_regs, auto out_f32_kernel) {
          launch_checked(scan_fwd_kernel<input_t, kSPT, decltype(tpc)::value, false, decltype(more_regs)::value,
                                         decltype(out_f32_kernel)::value>,
                         grid, s.threads, smem, stream, "scan_fwd_kernel launch", p, s, f);
        };
        using F = std::false_type;
        if (s.tpc == 4) {
          if constexpr (sizeof(input_t) < 4) {  // (fp32 has 128 registers in either build)
            if (s.fwd_more_regs) return launch_fixed(std::integral_constant<int, 4>{}, std::true_type{}, F{});
          }
          return launch_fixed(std::integral_constant<int, 4>{}, F{}, F{});
        }
        // 8 and 16 threads per channel: the fp32-output build where out_f32 asks for it.
        auto launch_either_out = [&](auto tpc) {
          if constexpr (sizeof(input_t) < 4) {
            if (out_f32) return launch_fixed(tpc, F{}, std::true_type{});
          }
          return launch_fixed(tpc, F{}, F{});
        };
        if (s.tpc == 8) return launch_either_out(std::integral_constant<int, 8>{});
        if (s.tpc == 16) return launch_either_out(std::integral_constant<int, 16>{});
      }
    }
    launch_checked(scan_fwd_kernel<input_t, kSPT, 0, false>, grid, s.threads, smem, stream, "scan_fwd_kernel launch", p,
                   s, f);
  });
  return true;
}

}  // namespace cuda_detail
}  // namespace selective_scan
