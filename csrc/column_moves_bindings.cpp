// Registration of torch.ops.selective_scan._move_columns (a fragment of the selective_scan
// library): the data movement between packed variable-length sequences and their padded batches
// (python/selective_scan/varlen.py, which builds the columns and checks them), with the CPU loop
// and the CUDA kernel behind one schema. Internal: the Python layer is its only caller.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "column_moves.h"
#include "message_text.h"

#ifdef SELECTIVE_SCAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/column_moves_cuda.h"
#endif

namespace selective_scan {

namespace {

template <typename T>
void move_typed(const ColumnMoves& p) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  at::parallel_for(0, p.columns, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t so = p.src_offset[k * p.src_offset_step], ss = p.src_stride[k * p.src_stride_step];
      const int64_t dof = p.dst_offset[k * p.dst_offset_step], ds = p.dst_stride[k * p.dst_stride_step];
      for (int64_t m = 0; m < p.rows; ++m) {
        const int64_t s = so + m * ss, d = dof + m * ds;
        if (d < 0 || d >= p.dst_numel) continue;
        dst[d] = so >= 0 && s >= 0 && s < p.src_numel ? src[s] : T(0);
      }
    }
  });
}

}  // namespace

void move_columns_cpu(const ColumnMoves& p) {
  switch (p.elem_bytes) {
    case 2: move_typed<uint16_t>(p); break;
    case 4: move_typed<uint32_t>(p); break;
    case 8: move_typed<uint64_t>(p); break;
    default: TORCH_CHECK_TYPE(false, "_move_columns: src: expected 2-, 4- or 8-byte elements, got ",
                              num_text(p.elem_bytes));
  }
}

namespace {

void check_index(const char* name, const at::Tensor& t, const at::Tensor& src, int64_t columns) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "_move_columns: ", name, ": expected dtype Long, got ",
                   std::string(c10::toString(t.scalar_type())));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == columns, "_move_columns: ", name, ": expected shape [",
                    num_text(columns), "], got ", shape_text(t.sizes()));
  TORCH_CHECK(t.device() == src.device(), "_move_columns: ", name, ": expected a tensor on ", src.device().str(),
              " (src's device), got ", t.device().str());
}

// dst (dst_numel,) in src's dtype: column k's `rows` elements from src's memory at
// src_offset[k] + m * src_stride[k], zeros where src_offset[k] < 0, to dst_offset[k] + m *
// dst_stride[k]. dst elements no column writes are left uninitialised: the caller's columns
// cover dst. The offset and stride tensors are (columns,) int64, or one value expanded to it.
at::Tensor move_columns(const at::Tensor& src, const at::Tensor& src_offset, const at::Tensor& src_stride,
                        const at::Tensor& dst_offset, const at::Tensor& dst_stride, int64_t rows, int64_t dst_numel) {
  const int64_t columns = src_offset.dim() == 1 ? src_offset.size(0) : -1;
  check_index("src_offset", src_offset, src, columns);
  check_index("src_stride", src_stride, src, columns);
  check_index("dst_offset", dst_offset, src, columns);
  check_index("dst_stride", dst_stride, src, columns);
  TORCH_CHECK_VALUE(rows >= 0, "_move_columns: rows: expected >= 0, got ", num_text(rows));
  TORCH_CHECK_VALUE(dst_numel >= 0, "_move_columns: dst_numel: expected >= 0, got ", num_text(dst_numel));
  // src is read as memory from its first element: a strided view in place (its offsets and strides
  // count elements of that memory), within the span its sizes and strides reach; a view with a
  // negative stride is read from a contiguous copy.
  bool positive = true;
  for (int64_t d = 0; d < src.dim(); ++d) positive = positive && src.stride(d) >= 0;
  const at::Tensor s = positive ? src : src.contiguous();
  int64_t span = s.numel() > 0 ? 1 : 0;
  if (s.numel() > 0)
    for (int64_t d = 0; d < s.dim(); ++d) span += (s.size(d) - 1) * s.stride(d);
  at::Tensor dst = at::empty({dst_numel}, src.options());
  // (one value for every column, expanded: read with step 0; anything else as a contiguous copy)
  auto steps_of = [](const at::Tensor& t) { return t.numel() > 1 && t.stride(0) == 0 ? t : t.contiguous(); };
  const at::Tensor so = steps_of(src_offset), ss = steps_of(src_stride);
  const at::Tensor dof = steps_of(dst_offset), ds = steps_of(dst_stride);
  ColumnMoves p;
  p.src = s.data_ptr();
  p.dst = dst.data_ptr();
  p.src_numel = span;
  p.dst_numel = dst_numel;
  p.src_offset = so.data_ptr<int64_t>();
  p.src_stride = ss.data_ptr<int64_t>();
  p.dst_offset = dof.data_ptr<int64_t>();
  p.dst_stride = ds.data_ptr<int64_t>();
  p.src_offset_step = so.stride(0);
  p.src_stride_step = ss.stride(0);
  p.dst_offset_step = dof.stride(0);
  p.dst_stride_step = ds.stride(0);
  p.rows = rows;
  p.columns = columns;
  p.elem_bytes = static_cast<int>(src.element_size());
  if (src.is_cpu()) {
    move_columns_cpu(p);
  } else {
#ifdef SELECTIVE_SCAN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(src.device());
    move_columns_cuda(p, at::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "selective_scan was built without CUDA");
#endif
  }
  return dst;
}

}  // namespace
}  // namespace selective_scan

TORCH_LIBRARY_FRAGMENT(selective_scan, m) {
  m.def(
      "_move_columns(Tensor src, Tensor src_offset, Tensor src_stride, Tensor dst_offset, Tensor dst_stride, "
      "int rows, int dst_numel) -> Tensor");
}

TORCH_LIBRARY_IMPL(selective_scan, CPU, m) { m.impl("_move_columns", &selective_scan::move_columns); }

#ifdef SELECTIVE_SCAN_WITH_CUDA
TORCH_LIBRARY_IMPL(selective_scan, CUDA, m) { m.impl("_move_columns", &selective_scan::move_columns); }
#endif
