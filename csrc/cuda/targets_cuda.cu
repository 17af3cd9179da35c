// CUDA kernel of the teacher targets (distilpose::simhm_targets_ext).
//
// simhm_targets_kernel  one block per (n, k) map: every thread derives the map's Gaussian
//                       (csrc/targets_math.h, the Triton kernel's float32 math), then writes
//                       pixels gy(row) * gx(col) with 16-byte stores (4 pixels) when the map
//                       rows allow it (H*W a multiple of 4 and the buffer 16-byte aligned),
//                       scalar stores otherwise. Thread 0 writes the weight.
// The op's host cost is one dispatcher call and two allocations: the Triton launch path
// costs tens of microseconds per call on the GPU machines, the kernel itself a few.
// Torch-free (CUDA runtime + shared headers), like simhm_loss_cuda.cu.
#include <cuda_runtime.h>

#include <cstdint>

#include "targets_cuda.h"

namespace distilpose {
namespace cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float target_pixel(int64_t p, int64_t W, const TargetMap& m, float inv) {
  const int64_t r = p / W;
  const int64_t c = p - r * W;
  const float gx = target_factor(static_cast<float>(c), m.cx, m.x0, m.x1, inv) * m.draw;
  const float gy = target_factor(static_cast<float>(r), m.cy, m.y0, m.y1, inv);
  return gy * gx;
}

__global__ void __launch_bounds__(kThreads) simhm_targets_kernel(const float* __restrict__ keypoints,
                                                                 const float* __restrict__ visibility, int64_t H,
                                                                 int64_t W, TargetConsts c, int encoding,
                                                                 bool vec4, float* __restrict__ maps,
                                                                 float* __restrict__ weights) {
  const int64_t i = blockIdx.x;
  const TargetMap m = target_map(keypoints[2 * i], keypoints[2 * i + 1], visibility[i], H, W, c, encoding);
  if (threadIdx.x == 0) weights[i] = m.weight;
  const int64_t HW = H * W;
  float* map = maps + i * HW;
  const float inv = c.inv_two_s2;
  if (vec4) {
    float4* map4 = reinterpret_cast<float4*>(map);
    for (int64_t q = threadIdx.x; q < HW / 4; q += blockDim.x) {
      const int64_t p = 4 * q;
      float4 v;
      v.x = target_pixel(p, W, m, inv);
      v.y = target_pixel(p + 1, W, m, inv);
      v.z = target_pixel(p + 2, W, m, inv);
      v.w = target_pixel(p + 3, W, m, inv);
      map4[q] = v;
    }
  } else {
    for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) map[p] = target_pixel(p, W, m, inv);
  }
}

}  // namespace

cudaError_t launch_simhm_targets(const float* keypoints, const float* visibility, int64_t nk, int64_t H, int64_t W,
                                 const TargetConsts& consts, int encoding, float* maps, float* weights,
                                 cudaStream_t stream) {
  if (nk == 0) return cudaSuccess;
  // every map starts 16-byte aligned when the buffer does and H*W is a multiple of 4
  const bool vec4 = (H * W) % 4 == 0 && reinterpret_cast<uintptr_t>(maps) % 16 == 0;
  simhm_targets_kernel<<<static_cast<unsigned>(nk), kThreads, 0, stream>>>(keypoints, visibility, H, W, consts,
                                                                           encoding, vec4, maps, weights);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace distilpose
