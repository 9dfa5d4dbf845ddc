// The scan's op schemas and their CPU and CUDA impls: input checks, params filling, the state
// slices, the partial sums' reduction. The pybind11 module `selective_scan._C` is module.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "env_setting.h"
#include "message_text.h"
#include "selective_scan.h"

#ifdef SELECTIVE_SCAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/scan_cuda.h"
#endif

namespace selective_scan {
namespace {

using at::Tensor;
using c10::optional;

std::string shape_str(const Tensor& t) { return shape_text(t.sizes()); }

std::string dtype_str(const Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

ScalarKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kDouble: return ScalarKind::kFloat64;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

void check_shape(const char* name, const Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", shape_text(expected), ", got ",
                    shape_str(t));
}

void check_dtype(const char* name, const Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, name, ": expected dtype ", expected, ", got ",
                   dtype_str(t));
}

void check_device(const char* name, const Tensor& t, const Tensor& u) {
  TORCH_CHECK(t.device() == u.device(), name, ": expected a tensor on ", u.device(), " (u's device), got ",
              t.device());
}

// Sizes and dtypes every op call agrees on, read off u and A.
struct Problem {
  int64_t batch, dim, seqlen, dstate;
  at::ScalarType input_type, compute_type;
};

// A (batch, dim, seqlen) tensor with unit seqlen stride: a copy only when the last stride is not 1.
Tensor rows_last_contiguous(const Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

RowTensor row_tensor(const Tensor& t) {
  RowTensor r;
  r.ptr = t.data_ptr();
  r.batch_stride = t.stride(0);
  r.dim_stride = t.stride(1);
  return r;
}

Problem check_problem(const Tensor& u, const Tensor& delta, const Tensor& A) {
  TORCH_CHECK_VALUE(u.dim() == 3, "u: expected 3 dims (batch, dim, seqlen), got shape ", shape_str(u));
  const auto it = u.scalar_type();
  TORCH_CHECK_TYPE(it == at::kFloat || it == at::kHalf || it == at::kBFloat16 || it == at::kDouble,
                   "u: expected dtype float32, float16 or bfloat16 (float64 on CPU), got ", dtype_str(u));
  TORCH_CHECK_TYPE(it != at::kDouble || u.device().is_cpu(),
                   "u: float64 inputs are supported on CPU only, got float64 on ", u.device());
  check_device("delta", delta, u);
  check_shape("delta", delta, u.sizes());
  check_dtype("delta", delta, it);
  check_device("A", A, u);
  TORCH_CHECK_TYPE(!A.is_complex(), "A: complex A is not supported, got dtype ", dtype_str(A));
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(0) == u.size(1),
                    "A: expected shape (dim, dstate) with dim = ", num_text(u.size(1)), ", got ", shape_str(A));
  const int64_t dstate = A.size(1);
  TORCH_CHECK_VALUE(dstate >= 1 && dstate <= kMaxDstate, "A: expected 1 <= dstate <= ", num_text(kMaxDstate),
                    ", got dstate = ", num_text(dstate));
  const auto ct = it == at::kDouble ? at::kDouble : at::kFloat;
  check_dtype("A", A, ct);
  return {u.size(0), u.size(1), u.size(2), dstate, it, ct};
}

// The kernels' view of a checked B or C: time-invariant (dim, dstate), or variable (batch, dstate,
// seqlen) / (batch, n_groups, dstate, seqlen) with unit seqlen stride.
BCParams bc_params(const Tensor& X) {
  BCParams bc;
  bc.type = kind_of(X.scalar_type());
  bc.ptr = X.data_ptr();
  bc.is_variable = X.dim() != 2;
  if (!bc.is_variable) {
    bc.dim_stride = X.stride(0);
    bc.dstate_stride = X.stride(1);
  } else {
    bc.n_groups = X.dim() == 3 ? 1 : X.size(1);
    bc.batch_stride = X.stride(0);
    bc.group_stride = X.dim() == 3 ? 0 : X.stride(1);
    bc.dstate_stride = X.stride(-2);
  }
  return bc;
}

BCParams check_bc(const char* name, const Tensor& X, const Problem& p, const Tensor& u) {
  check_device(name, X, u);
  TORCH_CHECK_TYPE(X.scalar_type() == p.input_type || X.scalar_type() == p.compute_type, name,
                   ": expected dtype ", p.input_type, " (u's) or ", p.compute_type, ", got ", dtype_str(X));
  if (X.dim() == 2) {
    check_shape(name, X, {p.dim, p.dstate});
    return bc_params(X);
  }
  TORCH_CHECK_VALUE(X.dim() == 3 || X.dim() == 4, name,
                    ": expected (dim, dstate), (batch, dstate, seqlen) or (batch, n_groups, dstate, "
                    "seqlen), got shape ", shape_str(X));
  const int64_t groups = X.dim() == 3 ? 1 : X.size(1);
  if (X.dim() == 3) {
    check_shape(name, X, {p.batch, p.dstate, p.seqlen});
  } else {
    TORCH_CHECK_VALUE(groups >= 1 && p.dim % groups == 0, name, ": expected n_groups dividing dim = ",
                      num_text(p.dim), ", got n_groups = ", num_text(groups));
    check_shape(name, X, {p.batch, groups, p.dstate, p.seqlen});
  }
  TORCH_CHECK(X.size(-1) <= 1 || X.stride(-1) == 1, name, ": internal error, seqlen stride must be 1");
  return bc_params(X);
}

// Unit seqlen stride for variable B/C (time-invariant ones keep their strides).
Tensor bc_last_contiguous(const Tensor& X) {
  return X.dim() >= 3 && X.size(-1) > 1 && X.stride(-1) != 1 ? X.contiguous() : X;
}

void check_vector(const char* name, const optional<Tensor>& t, const Problem& p, const Tensor& u) {
  if (!t.has_value()) return;
  check_device(name, *t, u);
  check_shape(name, *t, {p.dim});
  check_dtype(name, *t, p.compute_type);
}

// Every input checked and made kernel-ready (unit seqlen strides, contiguous small tensors).
struct Inputs {
  Problem p;
  Tensor u, delta, A, B, C;
  optional<Tensor> D, z, delta_bias, initial_state;
  ScanParams params;
};

Inputs prepare_inputs(const Tensor& u_in, const Tensor& delta_in, const Tensor& A_in, const Tensor& B_in,
                      const Tensor& C_in, const optional<Tensor>& D, const optional<Tensor>& z_in,
                      const optional<Tensor>& delta_bias, const optional<Tensor>& initial_state,
                      bool delta_softplus) {
  Inputs in;
  in.p = check_problem(u_in, delta_in, A_in);
  const Problem& p = in.p;
  in.u = rows_last_contiguous(u_in);
  in.delta = rows_last_contiguous(delta_in);
  in.A = A_in.contiguous();
  in.B = bc_last_contiguous(B_in);
  in.C = bc_last_contiguous(C_in);
  check_vector("D", D, p, u_in);
  check_vector("delta_bias", delta_bias, p, u_in);
  if (D) in.D = D->contiguous();
  if (delta_bias) in.delta_bias = delta_bias->contiguous();
  if (z_in) {
    check_device("z", *z_in, u_in);
    check_shape("z", *z_in, u_in.sizes());
    check_dtype("z", *z_in, p.input_type);
    in.z = rows_last_contiguous(*z_in);
  }
  if (initial_state) {
    check_device("initial_state", *initial_state, u_in);
    check_shape("initial_state", *initial_state, {p.batch, p.dim, p.dstate});
    check_dtype("initial_state", *initial_state, p.compute_type);
    in.initial_state = initial_state->contiguous();
  }

  ScanParams& s = in.params;
  s.batch = p.batch;
  s.dim = p.dim;
  s.seqlen = p.seqlen;
  s.dstate = p.dstate;
  s.input_type = kind_of(p.input_type);
  s.delta_softplus = delta_softplus;
  s.B = check_bc("B", in.B, p, u_in);
  s.C = check_bc("C", in.C, p, u_in);
  s.u = row_tensor(in.u);
  s.delta = row_tensor(in.delta);
  if (in.z) s.z = row_tensor(*in.z);
  s.A = in.A.data_ptr();
  s.D = in.D ? in.D->data_ptr() : nullptr;
  s.delta_bias = in.delta_bias ? in.delta_bias->data_ptr() : nullptr;
  s.initial_state = in.initial_state ? in.initial_state->data_ptr() : nullptr;
  return in;
}

bool has_work(const Problem& p) { return p.batch > 0 && p.dim > 0 && p.seqlen > 0; }

#ifdef SELECTIVE_SCAN_WITH_CUDA
// The CUDA kernels hold at most kStateSlice states of a channel per launch; a larger dstate runs as
// slices of consecutive states, each its own launch with its own A, B, C, states and checkpoints
// (docs/design.md, "State slices"). The recurrence of each state is independent, and every output
// is a sum over states of per-state terms, so each slice writes fp32 partial outputs (D u, D dy
// in the first slice only) that are added in slice order and rounded once. The forward's fixed
// layouts at 8 and 16 threads per channel write fp32 outputs from 16-bit inputs; other slices
// (and the backward's) run the fp32 kernels on inputs widened once.
// SELECTIVE_SCAN_STATE_SLICE (read per call) sets a narrower width for tuning and tests; the
// kernels hold at most kMaxLaunchStates states, so a wider one is refused.
constexpr int64_t kStateSlice = kMaxLaunchStates;

int64_t state_slice_width() {
  return env_integer("SELECTIVE_SCAN_STATE_SLICE", kStateSlice, 1, kStateSlice, "a number of states");
}

// The slices [first state, states) of dstate > width: ceil(dstate / width) of them, as equal as
// can be (dstate 72 at width 64: 36 and 36, not 64 and 8).
std::vector<std::pair<int64_t, int64_t>> state_slices(int64_t dstate, int64_t width) {
  const int64_t count = (dstate + width - 1) / width, base = dstate / count, extra = dstate % count;
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (int64_t i = 0, n0 = 0; i < count; ++i) {
    const int64_t ns = base + (i < extra ? 1 : 0);
    slices.emplace_back(n0, ns);
    n0 += ns;
  }
  return slices;
}

Tensor as_f32(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// The row inputs and B, C a slice runs on: the problem's own, or widened to fp32.
struct SliceInputs {
  Tensor u, delta, B, C;
  optional<Tensor> z;
  ScalarKind type;
  static SliceInputs own(const Inputs& in) { return {in.u, in.delta, in.B, in.C, in.z, in.params.input_type}; }
  static SliceInputs wide(const Inputs& in) {
    return {as_f32(in.u), as_f32(in.delta), as_f32(in.B), as_f32(in.C),
            in.z ? optional<Tensor>(as_f32(*in.z)) : optional<Tensor>(), ScalarKind::kFloat32};
  }
};

// States [n0, n0 + ns) of a tensor shaped like B or C (B, C or their gradients): a strided view.
Tensor bc_states(const Tensor& X, int64_t n0, int64_t ns) { return X.narrow(X.dim() == 2 ? 1 : X.dim() - 2, n0, ns); }

// After slice i of `count` has written `part` (slice 0: `sum`): adds it to the fp32 sum of the
// slices before, in slice order; the last addition writes `result` (rounded once to its type).
void add_slice(size_t i, size_t count, Tensor& sum, const Tensor& part, Tensor& result) {
  if (i == 0) return;
  if (i + 1 < count) {
    sum.add_(part);
  } else {
    at::add_out(result, sum, part);
  }
}

// The forward's params for states [n0, n0 + ns) on inputs `w`: the slice's A and initial state
// (contiguous copies, kept alive in `keep`), D in the first slice only; outputs left to the caller.
ScanParams slice_params(const Inputs& in, const SliceInputs& w, int64_t n0, int64_t ns, std::vector<Tensor>& keep) {
  ScanParams s = in.params;
  s.dstate = ns;
  s.input_type = w.type;
  s.u = row_tensor(w.u);
  s.delta = row_tensor(w.delta);
  if (w.z) s.z = row_tensor(*w.z);
  s.B = bc_params(bc_states(w.B, n0, ns));
  s.C = bc_params(bc_states(w.C, n0, ns));
  keep.push_back(in.A.narrow(1, n0, ns).contiguous());
  s.A = keep.back().data_ptr();
  if (n0 > 0) s.D = nullptr;
  if (in.initial_state) {
    keep.push_back(in.initial_state->narrow(2, n0, ns).contiguous());
    s.initial_state = keep.back().data_ptr();
  }
  return s;
}

// The forward in state slices of at most `width` (< dstate) states: out is the rounded sum of the
// slices' fp32 outputs (the last addition writes out, rounding once); last_state is written per
// slice into its columns, and each slice writes its columns of the checkpoints in place
// (ScanParams::checkpoint_row).
void scan_fwd_cuda_sliced(const Inputs& in, Tensor& out, Tensor& last, Tensor& checkpoints, int64_t width,
                          cudaStream_t stream) {
  const Problem& p = in.p;
  const SliceInputs own = SliceInputs::own(in);
  optional<SliceInputs> wide;  // widened at the first slice that needs it
  auto f32 = in.u.options().dtype(at::kFloat);
  Tensor sum, part;
  const auto slices = state_slices(p.dstate, width);
  for (size_t i = 0; i < slices.size(); ++i) {
    const int64_t n0 = slices[i].first, ns = slices[i].second;
    Tensor& y = i == 0 ? sum : part;
    y = at::empty({p.batch, p.dim, p.seqlen}, f32);
    Tensor last_s = at::empty({p.batch, p.dim, ns}, f32);
    auto run = [&](const SliceInputs& w) {
      std::vector<Tensor> keep;
      ScanParams s = slice_params(in, w, n0, ns, keep);
      s.out = row_tensor(y);
      s.out_f32 = true;
      s.last_state = last_s.data_ptr();
      s.checkpoints = checkpoints.data_ptr<float>() + n0;  // (its columns, in place)
      s.checkpoint_row = p.dstate;
      return scan_fwd_cuda(s, stream);
    };
    if (!run(own)) {
      if (!wide) wide = SliceInputs::wide(in);
      TORCH_CHECK(run(*wide), "selective_scan: internal error, no fp32 forward for a state slice");
    }
    add_slice(i, slices.size(), sum, part, out);
    last.narrow(2, n0, ns).copy_(last_s);
  }
}
#endif

std::tuple<Tensor, Tensor, Tensor> scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                            const Tensor& B, const Tensor& C, const optional<Tensor>& D,
                                            const optional<Tensor>& z, const optional<Tensor>& delta_bias,
                                            const optional<Tensor>& initial_state, bool delta_softplus) {
  Inputs in = prepare_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus);
  const Problem& p = in.p;
  auto fopts = u.options().dtype(p.compute_type);
  Tensor out = at::empty({p.batch, p.dim, p.seqlen}, u.options());
  Tensor checkpoints = at::empty({p.batch, p.dim, num_checkpoints(p.seqlen), p.dstate}, fopts);
  if (!has_work(p)) {
    Tensor last = in.initial_state ? in.initial_state->clone() : at::zeros({p.batch, p.dim, p.dstate}, fopts);
    return {out, last, checkpoints};
  }
  Tensor last = at::empty({p.batch, p.dim, p.dstate}, fopts);
  ScanParams& s = in.params;
  s.out = row_tensor(out);
  s.last_state = last.data_ptr();
  s.checkpoints = checkpoints.data_ptr();
  if (u.is_cpu()) {
    scan_fwd_cpu(s);
  } else {
#ifdef SELECTIVE_SCAN_WITH_CUDA
    const int64_t width = state_slice_width();
    const c10::cuda::CUDAGuard guard(u.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    if (p.dstate > width) {
      scan_fwd_cuda_sliced(in, out, last, checkpoints, width, stream);
    } else {
      scan_fwd_cuda(s, stream);
    }
#else
    TORCH_CHECK(false, "selective_scan was built without CUDA");
#endif
  }
  return {out, last, checkpoints};
}

#ifdef SELECTIVE_SCAN_WITH_CUDA
// Where one backward launch's parameter gradients go: the whole gradients, or a state slice's
// columns of dA, dB and dC (strided views).
struct BwdDests {
  Tensor dA, dB, dC;
  optional<Tensor> dD;  // absent: not written (the state slices after the first)
  Tensor ddelta_bias;
  bool add_bias;        // add to ddelta_bias instead of writing it
};

// The sum over the `slots` slices of the fp32 partial buffer at `src` (`floats` in all) into
// `grad` (a gradient, or a state slice's columns of one: rows of contiguous elements at one
// stride; its element order is that of a slice), for sum_partial_slots_cuda.
SlotSum slot_sum(const float* src, int64_t slots, int64_t floats, const Tensor& grad, bool accumulate) {
  SlotSum w;
  w.src = src;
  w.slots = slots;
  w.dst = grad.data_ptr();
  w.dst_type = kind_of(grad.scalar_type());
  w.accumulate = accumulate;
  int64_t d = grad.dim() - 1, inner = 1;
  for (; d >= 0 && (grad.size(d) == 1 || grad.stride(d) == inner); --d) inner *= grad.size(d);
  int64_t rows = 1, row_stride = inner;
  if (d >= 0) {
    row_stride = grad.stride(d);
    for (; d >= 0; --d) {
      TORCH_CHECK(grad.size(d) == 1 || grad.stride(d) == rows * row_stride,
                  "selective_scan: internal error, a gradient view the partial sums cannot write");
      rows *= grad.size(d);
    }
  }
  TORCH_CHECK(floats == w.slots * rows * inner, "selective_scan: internal error, partial buffer size");
  w.rows = rows;
  w.inner = inner;
  w.row_stride = row_stride;
  return w;
}

// Runs the CUDA backward of `b` and reduces its partial sums (fixed slots, summed in a fixed order:
// the backward is deterministic) into `dests`, in one launch (sum_partial_slots_cuda). A sequence
// split into `pieces` gives the per-row partials one batch block of rows per piece. The partial
// buffers are parts of one allocation (a short call's host time counts: docs/design.md, item 62).
// false, with nothing run or written, where b.fwd.out_f32 asks for a layout without an
// fp32-gradient build (scan_bwd_cuda).
bool scan_bwd_cuda_reduce(const ScanBwdParams& b, const at::TensorOptions& opts, BwdDests& dests,
                          cudaStream_t stream) {
  const ScanParams& q = b.fwd;
  const ScanBwdPartialShape shape = scan_bwd_cuda_partial_shape(q);
  const int64_t pieces = shape.seq_splits;
  const int64_t partial_rows = pieces * q.batch;
  // slices and floats of each buffer: dB, dC (variable: (slots, batch, n_groups, dstate, seqlen);
  // time-invariant: (partial_rows, dim, dstate)), dA, dD, d(bias), the pieces' adjoints
  enum { kB, kC, kA, kD, kBias, kAdjoints, kBuffers };
  int64_t slots[kBuffers], floats[kBuffers];
  auto bc_buffer = [&](const BCParams& bc, int64_t bc_slots, int i) {
    slots[i] = bc.is_variable ? bc_slots : partial_rows;
    floats[i] = bc.is_variable ? bc_slots * q.batch * bc.n_groups * q.dstate * q.seqlen : partial_rows * q.dim * q.dstate;
  };
  bc_buffer(q.B, shape.B_slots, kB);
  bc_buffer(q.C, shape.C_slots, kC);
  slots[kA] = slots[kD] = slots[kBias] = partial_rows;
  floats[kA] = partial_rows * q.dim * q.dstate;
  floats[kD] = floats[kBias] = partial_rows * q.dim;
  slots[kAdjoints] = 0;
  floats[kAdjoints] = pieces > 1 ? 2 * pieces * q.batch * q.dim * q.dstate : 0;
  // each buffer starts 256-byte aligned (the kernels access them 16 bytes at a time)
  int64_t offsets[kBuffers], total = 0;
  for (int i = 0; i < kBuffers; ++i) {
    offsets[i] = total;
    total += (floats[i] + 63) / 64 * 64;
  }
  Tensor buffer = at::empty({total}, opts.dtype(at::kFloat));
  float* base = buffer.data_ptr<float>();
  ScanBwdPartials parts{base + offsets[kB], base + offsets[kC], base + offsets[kA], base + offsets[kD],
                        base + offsets[kBias], pieces > 1 ? base + offsets[kAdjoints] : nullptr};
  if (!scan_bwd_cuda(b, parts, stream)) return false;
  // dB / dC: variable (batch, n_groups, dstate, seqlen) in the element order of B's (batch, dstate,
  // seqlen) or (batch, n_groups, dstate, seqlen); time-invariant (dim, dstate).
  auto sum_of = [&](int i, const Tensor& grad, bool accumulate) {
    return slot_sum(base + offsets[i], slots[i], floats[i], grad, accumulate);
  };
  SlotSum sums[kMaxSlotSums] = {sum_of(kA, dests.dA, false), sum_of(kB, dests.dB, false),
                                sum_of(kC, dests.dC, false), sum_of(kBias, dests.ddelta_bias, dests.add_bias)};
  int count = 4;
  if (dests.dD) sums[count++] = sum_of(kD, *dests.dD, false);
  sum_partial_slots_cuda(sums, count, stream);
  return true;
}

// The gradients scan_bwd returns (du, ddelta, dz in the input type; the rest fp32).
struct BwdGrads {
  Tensor du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinit;
};

// The backward in state slices of at most `width` (< dstate) states, as the forward: du, ddelta
// and dz are the rounded sums of the slices' fp32 gradients (D dy and D u enter in the first
// slice), d(bias) the sum of the slices' (each is the sum over steps of its part of ddelta), dD the
// first slice's (sum_t dy u does not depend on the states); dA, dB, dC and d initial_state are
// written per slice. A slice runs on the problem's own inputs where its layout has an fp32-gradient
// build for them, which reads the slice's columns of the checkpoints in place
// (ScanParams::checkpoint_row), else on inputs widened to fp32, from a contiguous copy of its columns.
void scan_bwd_cuda_sliced(const Inputs& in, const Tensor& dout, const optional<Tensor>& dlast,
                          const Tensor& checkpoints, BwdGrads g, int64_t width, cudaStream_t stream) {
  const Problem& p = in.p;
  const SliceInputs own = SliceInputs::own(in);
  optional<SliceInputs> wide;  // widened at the first slice that needs it, with dout
  Tensor dout_wide;
  auto f32 = in.u.options().dtype(at::kFloat);
  Tensor sum_du, sum_dd, sum_dz, part_du, part_dd, part_dz;
  const auto slices = state_slices(p.dstate, width);
  for (size_t i = 0; i < slices.size(); ++i) {
    const int64_t n0 = slices[i].first, ns = slices[i].second;
    const bool first = i == 0;
    const Tensor dlast_s = dlast ? dlast->narrow(2, n0, ns).contiguous() : Tensor();
    Tensor& du_s = first ? sum_du : part_du;
    Tensor& dd_s = first ? sum_dd : part_dd;
    Tensor& dz_s = first ? sum_dz : part_dz;
    du_s = at::empty({p.batch, p.dim, p.seqlen}, f32);
    dd_s = at::empty({p.batch, p.dim, p.seqlen}, f32);
    if (in.z) dz_s = at::empty({p.batch, p.dim, p.seqlen}, f32);
    Tensor dinit_s = at::empty({p.batch, p.dim, ns}, f32);
    auto run = [&](const SliceInputs& w, const Tensor& dout_w) {
      std::vector<Tensor> keep;
      ScanBwdParams b;
      b.fwd = slice_params(in, w, n0, ns, keep);
      b.fwd.out_f32 = true;
      b.dout = row_tensor(dout_w);
      if (dlast) b.dlast_state = dlast_s.data_ptr();
      if (w.type != ScalarKind::kFloat32) {  // (the fp32-gradient build of 16-bit inputs, if any)
        b.checkpoints = checkpoints.data_ptr<float>() + n0;
        b.fwd.checkpoint_row = p.dstate;
      } else {
        keep.push_back(checkpoints.narrow(3, n0, ns).contiguous());
        b.checkpoints = keep.back().data_ptr();
      }
      b.du = row_tensor(du_s);
      b.ddelta = row_tensor(dd_s);
      if (in.z) b.dz = row_tensor(dz_s);
      b.dinitial_state = dinit_s.data_ptr();
      BwdDests dests{g.dA.narrow(1, n0, ns), bc_states(g.dB, n0, ns), bc_states(g.dC, n0, ns),
                     first ? optional<Tensor>(g.dD) : optional<Tensor>(), g.ddelta_bias, !first};
      return scan_bwd_cuda_reduce(b, in.u.options(), dests, stream);
    };
    if (!run(own, dout)) {
      if (!wide) {
        wide = SliceInputs::wide(in);
        dout_wide = as_f32(dout);
      }
      TORCH_CHECK(run(*wide, dout_wide), "selective_scan: internal error, no fp32 backward for a state slice");
    }
    add_slice(i, slices.size(), sum_du, part_du, g.du);
    add_slice(i, slices.size(), sum_dd, part_dd, g.ddelta);
    if (in.z) add_slice(i, slices.size(), sum_dz, part_dz, g.dz);
    g.dinit.narrow(2, n0, ns).copy_(dinit_s);
  }
}
#endif

using BwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

BwdResult scan_bwd(const Tensor& dout_in, const optional<Tensor>& dlast_state, const Tensor& u,
                   const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                   const optional<Tensor>& D, const optional<Tensor>& z, const optional<Tensor>& delta_bias,
                   const optional<Tensor>& initial_state, const Tensor& checkpoints_in, bool delta_softplus) {
  Inputs in = prepare_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus);
  const Problem& p = in.p;
  check_device("dout", dout_in, u);
  check_shape("dout", dout_in, u.sizes());
  check_dtype("dout", dout_in, p.input_type);
  Tensor dout = rows_last_contiguous(dout_in);
  optional<Tensor> dlast;
  if (dlast_state) {
    check_device("dlast_state", *dlast_state, u);
    check_shape("dlast_state", *dlast_state, {p.batch, p.dim, p.dstate});
    check_dtype("dlast_state", *dlast_state, p.compute_type);
    dlast = dlast_state->contiguous();
  }
  check_device("checkpoints", checkpoints_in, u);
  check_shape("checkpoints", checkpoints_in, {p.batch, p.dim, num_checkpoints(p.seqlen), p.dstate});
  check_dtype("checkpoints", checkpoints_in, p.compute_type);
  Tensor checkpoints = checkpoints_in.contiguous();

  auto fopts = u.options().dtype(p.compute_type);
  Tensor du = at::empty_like(in.u, at::MemoryFormat::Contiguous);
  Tensor ddelta = at::empty_like(in.u, at::MemoryFormat::Contiguous);
  Tensor dz = in.z ? at::empty_like(in.u, at::MemoryFormat::Contiguous) : at::empty({0}, u.options());
  // The CUDA path writes the parameter gradients whole (sums of its partials); the CPU kernel and
  // an empty problem need them zeroed.
  const bool zeroed = u.is_cpu() || !has_work(p);
  auto grad = [&](at::IntArrayRef sizes) { return zeroed ? at::zeros(sizes, fopts) : at::empty(sizes, fopts); };
  Tensor dA = grad({p.dim, p.dstate});
  // The CUDA backward in one launch writes dB and dC in B's and C's types (its partial sums round
  // once into them); elsewhere (the CPU, an empty problem, a dstate above `width`, which runs in
  // state slices) they are formed in the compute type and converted at the end.
#ifdef SELECTIVE_SCAN_WITH_CUDA
  const int64_t width = zeroed ? kStateSlice : state_slice_width();  // (read for the CUDA kernels only)
  const bool bc_own_type = !zeroed && p.dstate <= width;
#else
  const bool bc_own_type = false;
#endif
  Tensor dB = bc_own_type ? at::empty(B.sizes(), B.options().memory_format(at::MemoryFormat::Contiguous)) : grad(B.sizes());
  Tensor dC = bc_own_type ? at::empty(C.sizes(), C.options().memory_format(at::MemoryFormat::Contiguous)) : grad(C.sizes());
  Tensor dD = grad({p.dim});
  Tensor ddelta_bias = grad({p.dim});
  Tensor dinit = at::empty({p.batch, p.dim, p.dstate}, fopts);

  if (!has_work(p)) {
    if (dlast) dinit.copy_(*dlast); else dinit.zero_();
    if (in.z) dz.zero_();
    return {du, ddelta, dA, dB.to(B.scalar_type()), dC.to(C.scalar_type()), dD, dz, ddelta_bias, dinit};
  }

  ScanBwdParams b;
  b.fwd = in.params;
  b.dout = row_tensor(dout);
  b.dlast_state = dlast ? dlast->data_ptr() : nullptr;
  b.checkpoints = checkpoints.data_ptr();
  b.du = row_tensor(du);
  b.ddelta = row_tensor(ddelta);
  if (in.z) b.dz = row_tensor(dz);
  b.dA = dA.data_ptr();
  b.dB = dB.data_ptr();
  b.dC = dC.data_ptr();
  b.dD = dD.data_ptr();
  b.ddelta_bias = ddelta_bias.data_ptr();
  b.dinitial_state = dinit.data_ptr();

  if (u.is_cpu()) {
    scan_bwd_cpu(b);
  } else {
#ifdef SELECTIVE_SCAN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(u.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    if (p.dstate > width) {
      scan_bwd_cuda_sliced(in, dout, dlast, checkpoints, {du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinit},
                           width, stream);
    } else {
      BwdDests dests{dA, dB, dC, dD, ddelta_bias, false};
      TORCH_CHECK(scan_bwd_cuda_reduce(b, u.options(), dests, stream), "selective_scan: internal error, no backward launched");
    }
#else
    TORCH_CHECK(false, "selective_scan was built without CUDA");
#endif
  }
  return {du, ddelta, dA, dB.to(B.scalar_type()), dC.to(C.scalar_type()), dD, dz, ddelta_bias, dinit};
}

}  // namespace
}  // namespace selective_scan

TORCH_LIBRARY(selective_scan, m) {
  m.def(
      "fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, Tensor checkpoints, "
      "bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(selective_scan, CPU, m) {
  m.impl("fwd", &selective_scan::scan_fwd);
  m.impl("bwd", &selective_scan::scan_bwd);
}

#ifdef SELECTIVE_SCAN_WITH_CUDA
TORCH_LIBRARY_IMPL(selective_scan, CUDA, m) {
  m.impl("fwd", &selective_scan::scan_fwd);
  m.impl("bwd", &selective_scan::scan_bwd);
}
#endif
