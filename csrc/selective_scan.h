// The torch-free interface between the op bindings and the kernels of the selective scan.
// The binding file (bindings.cpp) checks tensors and fills these plain structs; the CPU kernels
// (cpu/) and the CUDA kernels (cuda/) read only these structs. Strides are in elements, 64-bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SELECTIVE_SCAN_HOST_DEVICE __host__ __device__
#else
#define SELECTIVE_SCAN_HOST_DEVICE
#endif

namespace selective_scan {

// Element types a tensor may have. Compute is fp32 (fp64 when the inputs are fp64).
enum class ScalarKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Timesteps between two saved states: the forward saves the state before every chunk of
// kCheckpointChunk steps, and the backward recomputes the states inside a chunk from it.
constexpr int64_t kCheckpointChunk = 64;
constexpr int64_t kMaxDstate = 256;

SELECTIVE_SCAN_HOST_DEVICE inline int64_t num_checkpoints(int64_t seqlen) {
  return (seqlen + kCheckpointChunk - 1) / kCheckpointChunk;
}

// B or C. Time-invariant: (dim, dstate), element [d, n] at d * dim_stride + n * dstate_stride.
// Variable: (batch, n_groups, dstate, seqlen) with unit seqlen stride; channel d reads group
// d / (dim / n_groups); element [b, g, n, l] at b * batch_stride + g * group_stride + n * dstate_stride + l.
struct BCParams {
  const void* ptr = nullptr;
  ScalarKind type = ScalarKind::kFloat32;
  bool is_variable = false;
  int64_t n_groups = 1;
  int64_t batch_stride = 0;
  int64_t group_stride = 0;
  int64_t dstate_stride = 0;
  int64_t dim_stride = 0;
};

// A (batch, dim, seqlen) tensor with unit seqlen stride.
struct RowTensor {
  void* ptr = nullptr;  // const for inputs; the kernels only write outputs
  int64_t batch_stride = 0;
  int64_t dim_stride = 0;
};

struct ScanParams {
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0;
  ScalarKind input_type = ScalarKind::kFloat32;  // u, delta, z, out and their gradients
  bool delta_softplus = false;
  bool out_f32 = false;  // CUDA only: `out` is fp32 whatever the input type (a state slice's partial outputs)

  RowTensor u, delta, z;          // z.ptr == nullptr: no gating
  const void* A = nullptr;        // (dim, dstate) contiguous, compute type
  BCParams B, C;
  const void* D = nullptr;            // (dim,) compute type, or nullptr
  const void* delta_bias = nullptr;   // (dim,) compute type, or nullptr
  const void* initial_state = nullptr;  // (batch, dim, dstate) contiguous compute type, or nullptr

  // Forward outputs.
  RowTensor out;                  // contiguous (batch, dim, seqlen), input type (fp32 with out_f32)
  void* last_state = nullptr;     // (batch, dim, dstate) contiguous, compute type
  void* checkpoints = nullptr;    // (batch, dim, num_checkpoints(seqlen), dstate) contiguous, compute type
  // CUDA only: the checkpoints' row length (elements per (b, d, chunk)) where it is not dstate
  // (0): a state slice writes (forward) or reads (backward, 16-bit inputs) its columns of the
  // whole problem's checkpoints in place, `checkpoints` then pointing at its first column.
  int64_t checkpoint_row = 0;
};

// Backward: the forward's inputs and saved checkpoints (in `fwd`, whose output fields are unused),
// the incoming gradients and the gradient buffers, all contiguous.
struct ScanBwdParams {
  ScanParams fwd;
  RowTensor dout;                   // (batch, dim, seqlen), input type
  const void* dlast_state = nullptr;  // (batch, dim, dstate) compute type, or nullptr
  const void* checkpoints = nullptr;  // as written by the forward

  RowTensor du, ddelta, dz;         // contiguous, input type; dz.ptr == nullptr without z
  void* dA = nullptr;               // (dim, dstate) compute type
  void* dB = nullptr;               // compute type, contiguous, the shape of B
  void* dC = nullptr;               // compute type, contiguous, the shape of C
  void* dD = nullptr;               // (dim,) compute type
  void* ddelta_bias = nullptr;      // (dim,) compute type
  void* dinitial_state = nullptr;   // (batch, dim, dstate) compute type
};

// CPU kernels (cpu/). Deterministic: results do not depend on the number of threads.
void scan_fwd_cpu(const ScanParams& params);
void scan_bwd_cpu(const ScanBwdParams& params);

}  // namespace selective_scan
