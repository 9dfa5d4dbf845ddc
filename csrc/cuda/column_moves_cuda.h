// Host entry point of the CUDA column moves (cuda/column_moves.cu). Torch-free: the binding passes
// the params and the current stream; nothing here allocates.
#pragma once

#include <cuda_runtime.h>

#include "../column_moves.h"

namespace selective_scan {

// Launches on `stream` and checks the launch; throws std::runtime_error on a CUDA error.
void move_columns_cuda(const ColumnMoves& params, cudaStream_t stream);

}  // namespace selective_scan
