// Registration of the decode-step op torch.ops.selective_scan.state_update (a fragment of the
// selective_scan library): input checks whose messages name the argument, the expected and the
// actual value; params filling; the CPU and CUDA impls. The pybind11 module is module.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "message_text.h"
#include "state_update.h"

#ifdef SELECTIVE_SCAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/state_update_cuda.h"
#endif

namespace selective_scan {
namespace {

using at::Tensor;
using c10::optional;

std::string shape_of(const Tensor& t) { return shape_text(t.sizes()); }

ScalarKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "state_update: unsupported dtype ", t);
  }
}

void check_device(const char* name, const Tensor& t, const Tensor& state) {
  TORCH_CHECK(t.device() == state.device(), "state_update: ", name, ": expected a tensor on ",
              state.device(), " (state's device), got ", t.device());
}

void check_shape(const char* name, const Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "state_update: ", name, ": expected shape ", shape_text(expected),
                    ", got ", shape_of(t));
}

void check_dtype(const char* name, const Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "state_update: ", name, ": expected dtype ", expected,
                   ", got ", t.scalar_type());
}

// x, dt or z: (batch, dim) in the input dtype; any strides.
void check_row(const char* name, const Tensor& t, const Tensor& state, at::ScalarType dtype) {
  check_device(name, t, state);
  check_shape(name, t, {state.size(0), state.size(1)});
  check_dtype(name, t, dtype);
}

// B or C: (batch, dstate) or (batch, n_groups, dstate), the input dtype or fp32, as a 3-D view
// with unit dstate stride.
Tensor check_bc(const char* name, const Tensor& t, const Tensor& state, at::ScalarType dtype) {
  check_device(name, t, state);
  const int64_t batch = state.size(0), dim = state.size(1), dstate = state.size(2);
  if (dtype == at::kFloat) {
    check_dtype(name, t, at::kFloat);
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype || t.scalar_type() == at::kFloat, "state_update: ", name,
                     ": expected dtype ", dtype, " (x's) or Float, got ", t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, "state_update: ", name,
                    ": expected shape (batch, dstate) or (batch, n_groups, dstate), got ", shape_of(t));
  if (t.dim() == 2) {
    check_shape(name, t, {batch, dstate});
    return t.stride(1) == 1 ? t.unsqueeze(1) : t.contiguous().unsqueeze(1);
  }
  const int64_t groups = t.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && dim % groups == 0, "state_update: ", name,
                    ": expected n_groups dividing dim = ", num_text(dim), ", got n_groups = ", num_text(groups));
  check_shape(name, t, {batch, groups, dstate});
  return t.stride(2) == 1 ? t : t.contiguous();
}

void check_vector(const char* name, const optional<Tensor>& t, const Tensor& state) {
  if (!t.has_value()) return;
  check_device(name, *t, state);
  check_shape(name, *t, {state.size(1)});
  check_dtype(name, *t, at::kFloat);
}

Tensor state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B_in,
                    const Tensor& C_in, const optional<Tensor>& D, const optional<Tensor>& z,
                    const optional<Tensor>& dt_bias, bool dt_softplus) {
  TORCH_CHECK_VALUE(state.dim() == 3, "state_update: state: expected 3 dims (batch, dim, dstate), got shape ",
                    shape_of(state));
  check_dtype("state", state, at::kFloat);
  TORCH_CHECK_VALUE(state.size(2) <= 1 || state.stride(2) == 1,
                    "state_update: state: expected unit stride along dstate (it is updated in place), "
                    "got strides ", shape_text(state.strides()));
  const int64_t batch = state.size(0), dim = state.size(1), dstate = state.size(2);
  TORCH_CHECK_VALUE(dstate >= 1 && dstate <= kMaxDstate, "state_update: state: expected 1 <= dstate <= ",
                    num_text(kMaxDstate), ", got dstate = ", num_text(dstate));
  const auto it = x.scalar_type();
  TORCH_CHECK_TYPE(it == at::kFloat || it == at::kHalf || it == at::kBFloat16,
                   "state_update: x: expected dtype float32, float16 or bfloat16, got ", it);
  check_row("x", x, state, it);
  check_row("dt", dt, state, it);
  if (z) check_row("z", *z, state, it);
  check_device("A", A, state);
  check_shape("A", A, {dim, dstate});
  check_dtype("A", A, at::kFloat);
  const Tensor A_c = A.stride(1) == 1 ? A : A.contiguous();
  const Tensor B = check_bc("B", B_in, state, it);
  const Tensor C = check_bc("C", C_in, state, it);
  TORCH_CHECK_VALUE(B.size(1) == C.size(1), "state_update: C: expected n_groups = ", num_text(B.size(1)),
                    " (B's), got ", num_text(C.size(1)));
  TORCH_CHECK_TYPE(B.scalar_type() == C.scalar_type(), "state_update: C: expected dtype ", B.scalar_type(),
                   " (B's), got ", C.scalar_type());
  check_vector("D", D, state);
  check_vector("dt_bias", dt_bias, state);
  const optional<Tensor> D_c = D ? optional<Tensor>(D->contiguous()) : c10::nullopt;
  const optional<Tensor> bias_c = dt_bias ? optional<Tensor>(dt_bias->contiguous()) : c10::nullopt;

  Tensor out = at::empty({batch, dim}, x.options());
  if (batch == 0 || dim == 0) return out;

  StateUpdateParams p;
  p.batch = batch;
  p.dim = dim;
  p.dstate = dstate;
  p.n_groups = B.size(1);
  p.input_type = kind_of(it);
  p.bc_type = kind_of(B.scalar_type());
  p.dt_softplus = dt_softplus;
  p.state = state.data_ptr<float>();
  p.state_batch_stride = state.stride(0);
  p.state_dim_stride = state.stride(1);
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_dim_stride = x.stride(1);
  p.dt = dt.data_ptr();
  p.dt_batch_stride = dt.stride(0);
  p.dt_dim_stride = dt.stride(1);
  if (z) {
    p.z = z->data_ptr();
    p.z_batch_stride = z->stride(0);
    p.z_dim_stride = z->stride(1);
  }
  p.A = A_c.data_ptr<float>();
  p.A_dim_stride = A_c.stride(0);
  p.B = B.data_ptr();
  p.B_batch_stride = B.stride(0);
  p.B_group_stride = p.n_groups == 1 ? 0 : B.stride(1);  // unused with one group; 0 keeps B aligned
  p.C = C.data_ptr();
  p.C_batch_stride = C.stride(0);
  p.C_group_stride = p.n_groups == 1 ? 0 : C.stride(1);
  p.D = D_c ? D_c->data_ptr<float>() : nullptr;
  p.dt_bias = bias_c ? bias_c->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();

  if (state.is_cpu()) {
    state_update_cpu(p);
  } else {
#ifdef SELECTIVE_SCAN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(state.device());
    state_update_cuda(p, at::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "selective_scan was built without CUDA");
#endif
  }
  return out;
}

}  // namespace
}  // namespace selective_scan

TORCH_LIBRARY_FRAGMENT(selective_scan, m) {
  m.def(
      "state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor");
}

TORCH_LIBRARY_IMPL(selective_scan, CPU, m) { m.impl("state_update", &selective_scan::state_update); }

#ifdef SELECTIVE_SCAN_WITH_CUDA
TORCH_LIBRARY_IMPL(selective_scan, CUDA, m) { m.impl("state_update", &selective_scan::state_update); }
#endif
