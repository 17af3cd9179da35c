// CUDA implementations of distilpose::simhm_loss_ext_fwd / _bwd: tensor checks and unpacking,
// then the torch-free launchers of simhm_loss_cuda.cu on the current stream of the input's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../simhm_loss_common.h"
#include "simhm_loss_cuda.h"

namespace distilpose {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> simhm_loss_ext_fwd_cuda(
    const at::Tensor& coords, const at::Tensor& sigma, const at::Tensor& score, const at::Tensor& teacher_heatmaps,
    const at::Tensor& keypoint_weight, bool released, int64_t fwd_kernel, bool pdl) {
  const char* op = "simhm_loss_ext_fwd";
  check_simhm_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight, c10::DeviceType::CUDA, op);
  check_simhm_fwd_kernel(fwd_kernel, op);
  const c10::cuda::CUDAGuard guard(teacher_heatmaps.device());
  const SimHMInputs in = prepare_simhm_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight);
  const SimHMFwdOut out(in);
  const auto tdt = in.teacher.scalar_type();
  const cuda::DType dt = tdt == at::kHalf ? cuda::DType::kFloat16
                         : tdt == at::kBFloat16 ? cuda::DType::kBFloat16 : cuda::DType::kFloat32;
  C10_CUDA_CHECK(cuda::launch_simhm_loss_fwd(
      dt, in.coords.const_data_ptr<float>(), in.sigma.const_data_ptr<float>(), in.score.const_data_ptr<float>(),
      in.kw.const_data_ptr<float>(), in.teacher.const_data_ptr(), in.N, in.K, in.H, in.W, released,
      static_cast<int>(fwd_kernel), pdl,
      out.stats.data_ptr<float>(), out.wk.data_ptr<float>(), out.reg.data_ptr<float>(), out.sl.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  return out.result(coords.scalar_type(), score.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simhm_loss_ext_bwd_cuda(
    const at::Tensor& grad_reg, const at::Tensor& grad_score_loss, const at::Tensor& stats, const at::Tensor& joint_w2,
    at::ScalarType coords_dtype, at::ScalarType sigma_dtype, at::ScalarType score_dtype, int64_t hw, bool released,
    bool pdl) {
  const SimHMBwdInputs in = prepare_simhm_bwd(grad_reg, grad_score_loss, stats, joint_w2, hw,
                                              c10::DeviceType::CUDA, "simhm_loss_ext_bwd");
  const c10::cuda::CUDAGuard guard(in.stats.device());
  const SimHMGrads g(in.stats);
  if (in.stats.size(1) * in.stats.size(2) == 0) return g.result(coords_dtype, sigma_dtype, score_dtype);  // no launch
  C10_CUDA_CHECK(cuda::launch_simhm_loss_bwd(in.stats.const_data_ptr<float>(), in.wk.const_data_ptr<float>(),
                                             in.grad_reg.const_data_ptr<float>(), in.grad_score.const_data_ptr<float>(),
                                             in.stats.size(1), in.stats.size(2), hw, released, pdl,
                                             g.coords.data_ptr<float>(), g.sigma.data_ptr<float>(),
                                             g.score.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return g.result(coords_dtype, sigma_dtype, score_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, CUDA, m) {
  m.impl("simhm_loss_ext_fwd", &simhm_loss_ext_fwd_cuda);
  m.impl("simhm_loss_ext_bwd", &simhm_loss_ext_bwd_cuda);
}

}  // namespace distilpose
