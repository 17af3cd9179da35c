// Input checks of distilpose::simhm_targets_ext (CPU and CUDA glue).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "targets_math.h"

namespace distilpose {

// keypoints (N, K, 2) float32 contiguous, visibility (N, K) float32 contiguous, on `device`; the
// sizes, sigma and encoding as the Python wrapper validated them (checked again: the op is public).
inline void check_targets_inputs(const at::Tensor& keypoints, const at::Tensor& visibility, int64_t input_h,
                                 int64_t input_w, int64_t heatmap_h, int64_t heatmap_w, double sigma,
                                 int64_t encoding, c10::DeviceType device) {
  const char* op = "simhm_targets_ext";
  TORCH_CHECK(keypoints.dim() == 3 && keypoints.size(2) == 2, op,
              ": keypoints: expected shape (N, K, 2), got ", keypoints.sizes());
  TORCH_CHECK(keypoints.scalar_type() == at::kFloat, op, ": keypoints: expected float32, got ",
              keypoints.scalar_type());
  TORCH_CHECK(keypoints.is_contiguous(), op, ": keypoints: expected a contiguous tensor");
  TORCH_CHECK(keypoints.device().type() == device, op, ": keypoints: expected a ", c10::DeviceTypeName(device),
              " tensor, got one on ", keypoints.device());
  const int64_t N = keypoints.size(0), K = keypoints.size(1);
  TORCH_CHECK(visibility.dim() == 2 && visibility.size(0) == N && visibility.size(1) == K, op,
              ": visibility: expected shape (", N, ", ", K, "), got ", visibility.sizes());
  TORCH_CHECK(visibility.scalar_type() == at::kFloat, op, ": visibility: expected float32, got ",
              visibility.scalar_type());
  TORCH_CHECK(visibility.is_contiguous(), op, ": visibility: expected a contiguous tensor");
  TORCH_CHECK(visibility.device() == keypoints.device(), op, ": visibility: expected a tensor on ",
              keypoints.device(), ", got one on ", visibility.device());
  TORCH_CHECK(encoding == kEncMsra || encoding == kEncUnbiased || encoding == kEncUdp, op,
              ": encoding: expected 0 (msra), 1 (unbiased) or 2 (udp), got ", encoding);
  const int64_t minimum = encoding == kEncUdp ? 2 : 1;  // udp divides by (size - 1)
  TORCH_CHECK(input_h >= minimum && input_w >= minimum, op, ": input_size: expected (height, width) >= ", minimum,
              ", got (", input_h, ", ", input_w, ")");
  TORCH_CHECK(heatmap_h >= minimum && heatmap_w >= minimum, op, ": heatmap_size: expected (height, width) >= ",
              minimum, ", got (", heatmap_h, ", ", heatmap_w, ")");
  TORCH_CHECK(heatmap_h < (int64_t(1) << 24) && heatmap_w < (int64_t(1) << 24), op,
              ": heatmap_size: H and W must be < 2^24 (pixel coordinates in float32), got (", heatmap_h, ", ",
              heatmap_w, ")");
  TORCH_CHECK(N * K < (int64_t(1) << 31), op, ": keypoints: N*K must be < 2^31, got ", keypoints.sizes());
  TORCH_CHECK(std::isfinite(sigma) && sigma > 0.0, op, ": sigma: expected a positive finite value, got ", sigma);
}

// The checked call: its outputs (maps (N, K, H, W), weights (N, K, 1), float32, uninitialised:
// the kernels write every element) and the per-call constants. Shared by the CPU and CUDA ops.
struct TargetsCall {
  at::Tensor maps, weights;
  TargetConsts consts;
  int64_t nk, H, W;
  int encoding;
};

inline TargetsCall prepare_targets(const at::Tensor& keypoints, const at::Tensor& visibility, int64_t input_h,
                                   int64_t input_w, int64_t heatmap_h, int64_t heatmap_w, double sigma,
                                   int64_t encoding, c10::DeviceType device) {
  check_targets_inputs(keypoints, visibility, input_h, input_w, heatmap_h, heatmap_w, sigma, encoding, device);
  const int64_t N = keypoints.size(0), K = keypoints.size(1);
  const auto opts = keypoints.options();
  return TargetsCall{at::empty({N, K, heatmap_h, heatmap_w}, opts), at::empty({N, K, 1}, opts),
                     target_consts(input_h, input_w, heatmap_h, heatmap_w, sigma, static_cast<int>(encoding)),
                     N * K, heatmap_h, heatmap_w, static_cast<int>(encoding)};
}

}  // namespace distilpose
