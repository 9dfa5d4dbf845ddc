// Host entry points of the CUDA kernels (cuda/*.cu). Torch-free: the binding passes the params
// structs, the current stream and buffers it allocated; nothing here allocates.
#pragma once

#include <cuda_runtime.h>

#include "../selective_scan.h"

namespace selective_scan {

// The most states of a channel one launch of the kernels holds (a larger dstate runs in state
// slices, bindings.cpp); block_shape refuses more.
constexpr int64_t kMaxLaunchStates = 64;

// The shape of the backward's partial buffers for a problem (ScanBwdPartials).
struct ScanBwdPartialShape {
  int64_t seq_splits = 1;  // into how many pieces the backward splits the sequence (1: no split)
  // how many blocks write partial dB (dC) slices for one group of a variable B (C): the leading
  // size of that partial buffer
  int64_t B_slots = 0, C_slots = 0;
};
ScanBwdPartialShape scan_bwd_cuda_partial_shape(const ScanParams& params);

// Partial sums the backward writes; the binding reduces them (in a fixed order) into the gradients.
struct ScanBwdPartials {
  float* dB = nullptr;  // variable B: (partial_slots, batch, n_groups, dstate, seqlen);
                        // time-invariant B: (batch, dim, dstate)
  float* dC = nullptr;  // likewise for C
  float* dA = nullptr;  // (batch, dim, dstate)
  float* dD = nullptr;  // (batch, dim)
  float* ddelta_bias = nullptr;  // (batch, dim)
  // With a sequence split into P pieces (ScanBwdPartialShape::seq_splits), the per-row partials above
  // (dA, dD, ddelta_bias, time-invariant dB/dC) have P * batch leading rows, one batch block per
  // piece, and this is scratch for the pieces' adjoints: (2, P, batch, dim, dstate).
  float* piece_adjoints = nullptr;
};

// Both launch on `stream` and check the launch; they throw std::runtime_error on a CUDA error.
// scan_fwd_cuda returns false, launching nothing, where params.out_f32 (16-bit inputs) asks for a
// layout without an fp32-output build: the fixed layouts at 8 and 16 threads per channel have one
// (dstate 17-64, variable B and C in the input type, 16-byte aligned rows).
bool scan_fwd_cuda(const ScanParams& params, cudaStream_t stream);
// Writes du, ddelta, dz and dinitial_state of `params` and the partials; dA/dB/dC/dD/ddelta_bias
// of `params` are unused. With params.fwd.out_f32 (du, ddelta and dz fp32 with 16-bit inputs) it
// returns false, launching nothing, unless the layout is the warp-sums path at 16 threads per
// channel (dstate 33-64).
bool scan_bwd_cuda(const ScanBwdParams& params, const ScanBwdPartials& partials, cudaStream_t stream);

// One gradient formed from a partial buffer (ScanBwdPartials): the fp32 buffer `src` holds `slots`
// slices of rows * inner elements each, and element (r, i) of the gradient, at
// dst[r * row_stride + i] in dst_type, is the sum of the slices' elements r * inner + i, in slot
// order, rounded once. accumulate (fp32 only) adds the sum to dst instead of writing it.
struct SlotSum {
  const float* src = nullptr;
  int64_t slots = 0;
  void* dst = nullptr;
  ScalarKind dst_type = ScalarKind::kFloat32;
  int64_t rows = 0, inner = 0, row_stride = 0;
  bool accumulate = false;
};
constexpr int kMaxSlotSums = 5;

// Forms up to kMaxSlotSums gradients in one launch on `stream` (partial_sums.cu), each element's
// sum in a fixed order whatever the launch shape. Throws std::runtime_error on a CUDA error.
void sum_partial_slots_cuda(const SlotSum* sums, int count, cudaStream_t stream);

// The compute capabilities the kernels were compiled for, e.g. "9.0".
const char* scan_cuda_archs();

}  // namespace selective_scan
