// Input checks and shared host helpers of the decode ops (CPU and CUDA glue).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "decode_math.h"

namespace distilpose {

inline void check_heatmaps(const at::Tensor& hm, const char* op) {
  TORCH_CHECK(hm.dim() == 4, op, ": heatmaps: expected a 4-D tensor (N, K, H, W), got shape ",
              hm.sizes());
  const auto dt = hm.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": heatmaps: expected dtype float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(hm.size(2) > 0 && hm.size(3) > 0, op, ": heatmaps: H and W must be > 0, got shape ",
              hm.sizes());
  TORCH_CHECK(hm.size(2) * hm.size(3) < (int64_t(1) << 31), op,
              ": heatmaps: H*W must be < 2^31, got shape ", hm.sizes());
  TORCH_CHECK(hm.size(0) * hm.size(1) < (int64_t(1) << 31), op,
              ": heatmaps: N*K must be < 2^31, got shape ", hm.sizes());
}

inline void check_beta(double beta, const char* op) {
  TORCH_CHECK(std::isfinite(beta) && beta > 0.0, op, ": beta: expected a finite value > 0, got ", beta);
}

// Accumulation / output dtype: float64 for float64 heatmaps, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_aux(const at::Tensor& t, const char* name, const at::Tensor& hm, int64_t last,
                      const char* op) {
  const bool shape_ok = last > 0 ? (t.dim() == 3 && t.size(0) == hm.size(0) && t.size(1) == hm.size(1) &&
                                    t.size(2) == last)
                                 : (t.dim() == 2 && t.size(0) == hm.size(0) && t.size(1) == hm.size(1));
  TORCH_CHECK(shape_ok, op, ": ", name, ": shape ", t.sizes(), " does not match heatmaps ", hm.sizes());
  TORCH_CHECK(t.device() == hm.device(), op, ": ", name, ": expected a tensor on ", hm.device(),
              ", got one on ", t.device());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, ": expected a floating-point tensor, got ",
              t.scalar_type());
}

// 0 = argmax (+ quarter shift), 1 = dark
inline int parse_method(c10::string_view method) {
  if (method == "argmax") return 0;
  if (method == "dark") return 1;
  TORCH_CHECK(false, "decode_heatmaps: method: expected 'argmax' or 'dark', got '", std::string(method), "'");
  return -1;
}

inline void check_kernel(int64_t kernel) {
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1 && kernel <= kMaxBlurKernel,
              "decode_heatmaps: kernel: expected an odd size in [1, ", kMaxBlurKernel, "], got ", kernel);
}

// cv2.getGaussianKernel(ksize, sigma=0, CV_32F): fixed tables for ksize <= 7, else
// sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8 (what mmpose's cv2.GaussianBlur(.., 0) uses).
inline void gaussian_kernel_1d(int ksize, float* out) {
  static const float small[4][7] = {
      {1.f},
      {0.25f, 0.5f, 0.25f},
      {0.0625f, 0.25f, 0.375f, 0.25f, 0.0625f},
      {0.03125f, 0.109375f, 0.21875f, 0.28125f, 0.21875f, 0.109375f, 0.03125f}};
  if (ksize <= 7) {
    for (int i = 0; i < ksize; ++i) out[i] = small[ksize / 2][i];
    return;
  }
  const double sigma = ((ksize - 1) * 0.5 - 1) * 0.3 + 0.8;
  const double scale2 = -0.5 / (sigma * sigma);
  double tmp[kMaxBlurKernel];
  double sum = 0.0;
  for (int i = 0; i < ksize; ++i) {
    const double x = i - (ksize - 1) * 0.5;
    tmp[i] = std::exp(scale2 * x * x);
    sum += tmp[i];
  }
  for (int i = 0; i < ksize; ++i) out[i] = static_cast<float>(tmp[i] / sum);
}

}  // namespace distilpose
