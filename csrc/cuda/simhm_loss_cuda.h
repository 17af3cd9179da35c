// Launchers of the CUDA simulated-heatmap loss kernels (csrc/cuda/simhm_loss_cuda.cu).
//
// Torch-free, like decode_cuda.h: tensors are checked and unpacked in simhm_loss_cuda_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "decode_cuda.h"  // DType

namespace distilpose {
namespace cuda {

// coords, sigma (N*K, 2), score, kw (N*K): contiguous float32. teacher: N*K contiguous H*W maps
// of teacher_dtype (float32, float16 or bfloat16). Writes stats (8, N*K), wk (K), reg, sl (float32).
// fwd_kernel: kSimHMFwdBlocks, kSimHMFwdPersistent or kSimHMFwdPipelined (simhm_math.h); the
// latter two fall back to the first where they do not apply (unaligned or unvectorisable maps,
// maps too large for them). pdl: launch the finalize kernel with programmatic dependent launch
// (sm_90+; ignored elsewhere), so that it is scheduled while the forward kernel drains; every
// kernel here waits for its predecessor's completion (griddepcontrol.wait) before any memory access.
cudaError_t launch_simhm_loss_fwd(DType teacher_dtype, const float* coords, const float* sigma, const float* score,
                                  const float* kw, const void* teacher, int64_t N, int64_t K, int64_t H, int64_t W,
                                  bool released, int fwd_kernel, bool pdl, float* stats, float* wk, float* reg,
                                  float* sl, cudaStream_t stream);

// grad_reg, grad_score: one float32 each (device). Writes gcoords, gsigma (N*K, 2), gscore (N*K), float32.
// pdl: launch it with programmatic dependent launch (sm_90+; ignored elsewhere).
cudaError_t launch_simhm_loss_bwd(const float* stats, const float* wk, const float* grad_reg, const float* grad_score,
                                  int64_t N, int64_t K, int64_t hw, bool released, bool pdl, float* gcoords,
                                  float* gsigma, float* gscore, cudaStream_t stream);

}  // namespace cuda
}  // namespace distilpose
