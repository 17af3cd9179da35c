// CUDA implementation of distilpose::simhm_targets_ext: tensor checks and unpacking, then the
// torch-free launcher of targets_cuda.cu on the current stream of the input's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../targets_common.h"
#include "targets_cuda.h"

namespace distilpose {
namespace {

std::tuple<at::Tensor, at::Tensor> simhm_targets_ext_cuda(const at::Tensor& keypoints, const at::Tensor& visibility,
                                                          int64_t input_h, int64_t input_w, int64_t heatmap_h,
                                                          int64_t heatmap_w, double sigma, int64_t encoding) {
  check_targets_inputs(keypoints, visibility, input_h, input_w, heatmap_h, heatmap_w, sigma, encoding,
                       c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(keypoints.device());
  const int64_t N = keypoints.size(0), K = keypoints.size(1);
  const auto opts = keypoints.options();
  at::Tensor maps = at::empty({N, K, heatmap_h, heatmap_w}, opts);
  at::Tensor weights = at::empty({N, K, 1}, opts);
  const TargetConsts c = target_consts(input_h, input_w, heatmap_h, heatmap_w, sigma, static_cast<int>(encoding));
  C10_CUDA_CHECK(cuda::launch_simhm_targets(keypoints.const_data_ptr<float>(), visibility.const_data_ptr<float>(),
                                            N * K, heatmap_h, heatmap_w, c, static_cast<int>(encoding),
                                            maps.data_ptr<float>(), weights.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream()));
  return {maps, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, CUDA, m) { m.impl("simhm_targets_ext", &simhm_targets_ext_cuda); }

}  // namespace distilpose
