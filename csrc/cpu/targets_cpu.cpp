// CPU kernel of the teacher targets (distilpose::simhm_targets_ext): the tested mirror of the
// CUDA kernel (csrc/cuda/targets_cuda.cu), the same float32 math (csrc/targets_math.h).
// Parallel over the N*K maps with at::parallel_for; each map is the outer product of its
// column and row factors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../targets_common.h"

namespace distilpose {
namespace {

std::tuple<at::Tensor, at::Tensor> simhm_targets_ext_cpu(const at::Tensor& keypoints, const at::Tensor& visibility,
                                                         int64_t input_h, int64_t input_w, int64_t heatmap_h,
                                                         int64_t heatmap_w, double sigma, int64_t encoding) {
  const TargetsCall t = prepare_targets(keypoints, visibility, input_h, input_w, heatmap_h, heatmap_w, sigma,
                                        encoding, c10::DeviceType::CPU);
  const int64_t H = t.H, W = t.W;
  const float* kp = keypoints.const_data_ptr<float>();
  const float* vis = visibility.const_data_ptr<float>();
  float* out = t.maps.data_ptr<float>();
  float* wout = t.weights.data_ptr<float>();
  at::parallel_for(0, t.nk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gx(W), gy(H);
    for (int64_t i = begin; i < end; ++i) {
      const TargetMap m = target_map(kp[2 * i], kp[2 * i + 1], vis[i], H, W, t.consts, t.encoding);
      wout[i] = m.weight;
      for (int64_t x = 0; x < W; ++x)
        gx[x] = target_factor(static_cast<float>(x), m.cx, m.x0, m.x1, t.consts.inv_two_s2) * m.draw;
      for (int64_t y = 0; y < H; ++y) gy[y] = target_factor(static_cast<float>(y), m.cy, m.y0, m.y1, t.consts.inv_two_s2);
      float* map = out + i * H * W;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) map[y * W + x] = gy[y] * gx[x];
    }
  });
  return {t.maps, t.weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, CPU, m) { m.impl("simhm_targets_ext", &simhm_targets_ext_cpu); }

}  // namespace distilpose
