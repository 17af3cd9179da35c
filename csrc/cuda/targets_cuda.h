// Launcher of the CUDA teacher-targets kernel (csrc/cuda/targets_cuda.cu).
//
// Torch-free, like simhm_loss_cuda.h: tensors are checked and unpacked in targets_cuda_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../targets_math.h"

namespace distilpose {
namespace cuda {

// keypoints (N*K, 2), visibility (N*K): contiguous float32. Writes maps (N*K, H, W) and
// weights (N*K), float32; every element of both.
cudaError_t launch_simhm_targets(const float* keypoints, const float* visibility, int64_t nk, int64_t H, int64_t W,
                                 const TargetConsts& consts, int encoding, float* maps, float* weights,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace distilpose
