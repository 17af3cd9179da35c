// Launchers of the CUDA decode kernels (csrc/cuda/decode_cuda.cu).
//
// Deliberately torch-free: the .cu file includes only the CUDA runtime and this header,
// so nvcc compiles it in seconds; tensors are checked and unpacked in decode_cuda_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace distilpose {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// heatmaps: nk contiguous H*W maps of `dtype`. coords (nk, 2), confidence (nk), hmax (nk)
// are float64 for kFloat64 and float32 otherwise.
cudaError_t launch_soft_argmax_fwd(DType dtype, const void* heatmaps, int64_t nk, int64_t H, int64_t W, double beta,
                                   void* coords, void* confidence, void* hmax, cudaStream_t stream);

// grad_heatmaps has the dtype and layout of heatmaps; the other arrays the accumulation dtype.
cudaError_t launch_soft_argmax_bwd(DType dtype, const void* grad_coords, const void* heatmaps, const void* coords,
                                   const void* confidence, const void* hmax, int64_t nk, int64_t H, int64_t W,
                                   double beta, void* grad_heatmaps, cudaStream_t stream);

// method 0 = argmax + quarter shift, 1 = DARK; blur_kernel: the 1-D Gaussian (ksize <= 63).
cudaError_t launch_decode_heatmaps(DType dtype, const void* heatmaps, int64_t nk, int64_t H, int64_t W, int method,
                                   const float* blur_kernel, int ksize, void* coords, void* maxvals,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace distilpose
