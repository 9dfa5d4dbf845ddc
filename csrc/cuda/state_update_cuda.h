// Host entry point of the CUDA decode-step kernel (cuda/state_update.cu). Torch-free: the binding
// passes the params struct and the current stream; nothing here allocates.
#pragma once

#include <cuda_runtime.h>

#include "../state_update.h"

namespace selective_scan {

// Launches on `stream` and checks the launch; throws std::runtime_error on a CUDA error.
void state_update_cuda(const StateUpdateParams& params, cudaStream_t stream);

}  // namespace selective_scan
