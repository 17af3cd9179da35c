// CUDA implementation of distilpose::simhm_targets_ext: tensor checks and unpacking, then the
// torch-free launcher of targets_cuda.cu on the current stream of the input's device.
#include <ATen/core/Tensor.h>
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
  const c10::cuda::CUDAGuard guard(keypoints.device());
  const TargetsCall t = prepare_targets(keypoints, visibility, input_h, input_w, heatmap_h, heatmap_w, sigma,
                                        encoding, c10::DeviceType::CUDA);
  C10_CUDA_CHECK(cuda::launch_simhm_targets(keypoints.const_data_ptr<float>(), visibility.const_data_ptr<float>(),
                                            t.nk, t.H, t.W, t.consts, t.encoding, t.maps.data_ptr<float>(),
                                            t.weights.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {t.maps, t.weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, CUDA, m) { m.impl("simhm_targets_ext", &simhm_targets_ext_cuda); }

}  // namespace distilpose
