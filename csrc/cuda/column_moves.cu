// The CUDA kernel of the column moves (column_moves.h). A thread takes one column and a run of
// kRowsPerThread rows: its column's offsets and strides are read once, and a warp's 32 columns,
// consecutive steps of a sequence, read and write consecutive elements.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../column_moves.h"
#include "column_moves_cuda.h"

namespace selective_scan {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 16;

template <typename T>
__global__ void move_columns_kernel(const ColumnMoves p) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= p.columns) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsPerThread;
  const int64_t so = p.src_offset[k * p.src_offset_step], ss = p.src_stride[k * p.src_stride_step];
  const int64_t dof = p.dst_offset[k * p.dst_offset_step], ds = p.dst_stride[k * p.dst_stride_step];
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  T v[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {  // all loads first, so that they are in flight together
    const int64_t m = m0 + i, s = so + m * ss;
    v[i] = m < p.rows && so >= 0 && s >= 0 && s < p.src_numel ? src[s] : T(0);
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t m = m0 + i, d = dof + m * ds;
    if (m < p.rows && d >= 0 && d < p.dst_numel) dst[d] = v[i];
  }
}

template <typename T>
void launch(const ColumnMoves& p, cudaStream_t stream) {
  const int64_t col_blocks = (p.columns + kThreads - 1) / kThreads;
  const int64_t row_blocks = (p.rows + kRowsPerThread - 1) / kRowsPerThread;
  if (col_blocks > 2147483647LL || row_blocks > 65535)
    throw std::runtime_error("selective_scan: column moves too large for one grid (" + std::to_string(p.columns) +
                             " columns of " + std::to_string(p.rows) + " rows)");
  move_columns_kernel<T><<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks)), kThreads, 0,
                           stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("selective_scan: column moves launch: ") +
                                                   cudaGetErrorString(err));
}

}  // namespace

void move_columns_cuda(const ColumnMoves& p, cudaStream_t stream) {
  if (p.rows == 0 || p.columns == 0) return;
  switch (p.elem_bytes) {
    case 2: launch<unsigned short>(p, stream); break;
    case 4: launch<unsigned int>(p, stream); break;
    case 8: launch<unsigned long long>(p, stream); break;
    default: throw std::runtime_error("selective_scan: column moves of " + std::to_string(p.elem_bytes) + "-byte elements");
  }
}

}  // namespace selective_scan
