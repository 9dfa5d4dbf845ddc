// The column moves of variable-length sequences (python/selective_scan/varlen.py): torch-free
// params shared by the CPU loop and the CUDA kernel. Each of `columns` columns k copies `rows`
// elements, element m from src[src_offset[k] + m * src_stride[k]] (zero where src_offset[k] < 0)
// to dst[dst_offset[k] + m * dst_stride[k]]. Elements are moved as raw bits of `elem_bytes`
// (2, 4 or 8); src_numel is the span of src's memory from its first element (a strided view is
// read in place). Indices outside src read zero and outside dst are not written, so no input can make
// the move touch memory it does not own. An offset or stride tensor may also hold one value for
// every column (a tensor expanded from one element: `*_step` 0 instead of 1).
#pragma once

#include <cstdint>

namespace selective_scan {

struct ColumnMoves {
  const void* src = nullptr;
  void* dst = nullptr;
  int64_t src_numel = 0, dst_numel = 0;
  const int64_t* src_offset = nullptr;
  const int64_t* src_stride = nullptr;
  const int64_t* dst_offset = nullptr;
  const int64_t* dst_stride = nullptr;
  int64_t src_offset_step = 1, src_stride_step = 1, dst_offset_step = 1, dst_stride_step = 1;
  int64_t rows = 0, columns = 0;
  int elem_bytes = 0;
};

void move_columns_cpu(const ColumnMoves& p);

}  // namespace selective_scan
