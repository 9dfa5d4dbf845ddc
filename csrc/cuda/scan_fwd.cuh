// The forward CUDA kernel. A block owns `cpb` channels of one batch row; `tpc` threads share a
// channel, each keeping `kSPT` states in registers and running the recurrence sequentially through
// the sequence, one staged chunk of kChunk steps at a time. docs/design.md has the details.
#pragma once

#include "scan_common.cuh"

namespace selective_scan {
namespace cuda_detail {

struct FwdFlags {
  bool u_aligned, delta_aligned, z_aligned, out_aligned;
};

template <typename input_t, int kSPT>
__global__ void __launch_bounds__(128) scan_fwd_kernel(const ScanParams p, const BlockShape s, const FwdFlags f) {
  extern __shared__ float4 smem_f4[];
  float* smem = reinterpret_cast<float*>(smem_f4);
  const int npad = s.tpc * kSPT;
  float* s_B = smem;
  float* s_C = s_B + kChunk * npad;
  float* s_u = s_C + kChunk * npad;
  float* s_d = s_u + s.cpb * kRow;
  float* s_du = s_d + s.cpb * kRow;
  float* s_y = s_du + s.cpb * kRow;

  const BlockRows rows = block_rows(p, s);
  const int tid = threadIdx.x;
  const int c = tid / s.tpc;  // this thread's channel within the block
  const int q = tid % s.tpc;  // which slice of the states
  const int n0 = q * kSPT;
  const bool c_valid = c < rows.valid;
  const int64_t d = rows.d0 + (c_valid ? c : 0);
  const int dstate = static_cast<int>(p.dstate);

  // Per-thread constants: A * log2(e) (zero for padded states, so they stay zero), time-invariant B/C.
  float A2[kSPT], h[kSPT];
  const float* A = static_cast<const float*>(p.A);
#pragma unroll
  for (int j = 0; j < kSPT; ++j) {
    const int n = n0 + j;
    const bool nv = n < dstate;
    A2[j] = nv ? A[d * dstate + n] * kLog2e : 0.f;
    h[j] = (nv && p.initial_state != nullptr)
               ? static_cast<const float*>(p.initial_state)[(rows.b * p.dim + d) * dstate + n]
               : 0.f;
  }

  int Bstep, Cstep;
  const float* Bsrc = bc_source<input_t, kSPT>(p.B, s_B, d, c, n0, npad, dstate, Bstep);
  const float* Csrc = bc_source<input_t, kSPT>(p.C, s_C, d, c, n0, npad, dstate, Cstep);
  const input_t* u_base = static_cast<const input_t*>(p.u.ptr) + rows.b * p.u.batch_stride;
  const input_t* delta_base = static_cast<const input_t*>(p.delta.ptr) + rows.b * p.delta.batch_stride;
  const input_t* z_base = p.z.ptr ? static_cast<const input_t*>(p.z.ptr) + rows.b * p.z.batch_stride : nullptr;
  input_t* out_base = static_cast<input_t*>(p.out.ptr) + rows.b * p.out.batch_stride;
  const float* D = static_cast<const float*>(p.D);
  const float* delta_bias = static_cast<const float*>(p.delta_bias);
  const int64_t n_chunks = num_checkpoints(p.seqlen);
  float* ckpt = static_cast<float*>(p.checkpoints) + (rows.b * p.dim + d) * n_chunks * dstate;
  const int vecs = s.cpb * (kChunk / kVec);

  for (int64_t k = 0; k < n_chunks; ++k) {
    const int64_t t0 = k * kChunk;
    const int len = static_cast<int>(p.seqlen - t0 < kChunk ? p.seqlen - t0 : kChunk);

    // Stage u, d = softplus(delta + bias) and d * u for the block's channels (zeros past the end,
    // so padded steps leave the state unchanged), and variable B / C.
    for (int v = tid; v < vecs; v += s.threads) {
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      float uu[kVec], dd[kVec];
      if (cc < rows.valid) {
        const int64_t dc = rows.d0 + cc;
        load_vec(u_base + dc * p.u.dim_stride + t0, t, len, f.u_aligned, uu);
        load_vec(delta_base + dc * p.delta.dim_stride + t0, t, len, f.delta_aligned, dd);
        const float bias = delta_bias ? delta_bias[dc] : 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          float x = dd[i] + bias;
          if (p.delta_softplus) x = softplus(x);
          dd[i] = t + i < len ? x : 0.f;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) uu[i] = dd[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        s_u[cc * kRow + t + i] = uu[i];
        s_d[cc * kRow + t + i] = dd[i];
        s_du[cc * kRow + t + i] = dd[i] * uu[i];
      }
    }
    if (p.B.is_variable) stage_bc<input_t>(p.B, rows.b, rows.gB, t0, len, dstate, npad, s_B);
    if (p.C.is_variable) stage_bc<input_t>(p.C, rows.b, rows.gC, t0, len, dstate, npad, s_C);

    // The state before this chunk, for the backward.
    if (c_valid) {
#pragma unroll
      for (int j = 0; j < kSPT; ++j)
        if (n0 + j < dstate) ckpt[k * dstate + n0 + j] = h[j];
    }
    __syncthreads();

    // The recurrence over the chunk, one exp per (step, state), in groups of kGroup steps whose
    // outputs are summed over the channel's threads together (independent shuffles).
    const float* __restrict__ my_d = s_d + c * kRow;
    const float* __restrict__ my_du = s_du + c * kRow;
    for (int t8 = 0; t8 < kChunk; t8 += kGroup) {
      float ys[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int t = t8 + i;
        const float dt = my_d[t];
        const float dut = my_du[t];
        float Bt[kSPT], Ct[kSPT];
        load_smem<kSPT>(Bsrc + t * Bstep, Bt);
        load_smem<kSPT>(Csrc + t * Cstep, Ct);
        float y = 0.f;
#pragma unroll
        for (int j = 0; j < kSPT; ++j) {
          const float a = decay_exp2(dt * A2[j]);
          h[j] = fmaf(a, h[j], dut * Bt[j]);
          y = fmaf(Ct[j], h[j], y);
        }
        ys[i] = y;
      }
      channel_sum_group(ys, s.tpc);
      if (q == 0) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) s_y[c * kRow + t8 + i] = ys[i];
      }
    }
    __syncthreads();

    // Sum the partial outputs of each channel's threads, add D u, gate with silu(z), store.
    for (int v = tid; v < vecs; v += s.threads) {
      const int cc = v / (kChunk / kVec);
      const int t = (v % (kChunk / kVec)) * kVec;
      if (cc >= rows.valid || t >= len) continue;
      const int64_t dc = rows.d0 + cc;
      const float Dd = D ? D[dc] : 0.f;
      float y[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) y[i] = fmaf(Dd, s_u[cc * kRow + t + i], s_y[cc * kRow + t + i]);
      if (z_base) {
        float zz[kVec];
        load_vec(z_base + dc * p.z.dim_stride + t0, t, len, f.z_aligned, zz);
#pragma unroll
        for (int i = 0; i < kVec; ++i) y[i] *= zz[i] * sigmoid(zz[i]);
      }
      store_vec(out_base + dc * p.out.dim_stride + t0, t, len, f.out_aligned, y);
    }
    __syncthreads();
  }

  if (c_valid) {
    float* last = static_cast<float*>(p.last_state) + (rows.b * p.dim + d) * dstate;
#pragma unroll
    for (int j = 0; j < kSPT; ++j)
      if (n0 + j < dstate) last[n0 + j] = h[j];
  }
}

}  // namespace cuda_detail
}  // namespace selective_scan

#include "scan_launch.cuh"

namespace selective_scan {
namespace cuda_detail {

template <typename input_t>
void launch_scan_fwd(const ScanParams& p, const BlockShape& s, cudaStream_t stream) {
  const int esize = sizeof(input_t);
  const FwdFlags f{rows_aligned(p.u, esize), rows_aligned(p.delta, esize),
                   p.z.ptr == nullptr || rows_aligned(p.z, esize), rows_aligned(p.out, esize)};
  const int smem = fwd_smem_floats(s) * static_cast<int>(sizeof(float));
  const dim3 grid(static_cast<unsigned>(grid_blocks(p, s)));
  auto launch = [&](auto kernel) {
    set_smem(kernel, smem);
    kernel<<<grid, s.threads, smem, stream>>>(p, s, f);
    check_cuda(cudaGetLastError(), "scan_fwd_kernel launch");
  };
  switch (s.spt) {
    case 1: launch(scan_fwd_kernel<input_t, 1>); break;
    case 4: launch(scan_fwd_kernel<input_t, 4>); break;
    case 8: launch(scan_fwd_kernel<input_t, 8>); break;
    default: throw std::runtime_error("selective_scan: unsupported states per thread");
  }
}

}  // namespace cuda_detail
}  // namespace selective_scan
