// CUDA implementations of the distilpose decode ops: tensor checks and unpacking, then the
// torch-free launchers of decode_cuda.cu on the current stream of the input's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../ops_common.h"
#include "decode_cuda.h"

namespace distilpose {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      TORCH_CHECK(false, "distilpose: unsupported dtype ", t);
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor, got one on ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_argmax_fwd_cuda(const at::Tensor& heatmaps, double beta) {
  check_heatmaps(heatmaps, "soft_argmax");
  check_beta(beta, "soft_argmax");
  check_cuda(heatmaps, "soft_argmax", "heatmaps");
  const c10::cuda::CUDAGuard guard(heatmaps.device());
  const at::Tensor hm = heatmaps.contiguous();
  const int64_t N = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3);
  const auto opts = hm.options().dtype(acc_dtype(hm.scalar_type()));
  at::Tensor coords = at::empty({N, K, 2}, opts);
  at::Tensor conf = at::empty({N, K}, opts);
  at::Tensor hmax = at::empty({N, K}, opts);
  C10_CUDA_CHECK(cuda::launch_soft_argmax_fwd(to_dtype(hm.scalar_type()), hm.const_data_ptr(), N * K, H, W, beta,
                                              coords.data_ptr(), conf.data_ptr(), hmax.data_ptr(),
                                              c10::cuda::getCurrentCUDAStream()));
  return {coords, conf, hmax};
}

at::Tensor soft_argmax_bwd_cuda(const at::Tensor& grad_coords, const at::Tensor& heatmaps, const at::Tensor& coords,
                                const at::Tensor& confidence, const at::Tensor& hmax, double beta) {
  const char* op = "soft_argmax_backward";
  check_heatmaps(heatmaps, op);
  check_beta(beta, op);
  check_cuda(heatmaps, op, "heatmaps");
  check_aux(grad_coords, "grad_coords", heatmaps, 2, op);
  check_aux(coords, "coords", heatmaps, 2, op);
  check_aux(confidence, "confidence", heatmaps, 0, op);
  check_aux(hmax, "hmax", heatmaps, 0, op);
  const c10::cuda::CUDAGuard guard(heatmaps.device());
  const at::Tensor hm = heatmaps.contiguous();
  const auto acc = acc_dtype(hm.scalar_type());
  const at::Tensor g = grad_coords.to(acc).contiguous();
  const at::Tensor xy = coords.to(acc).contiguous();
  const at::Tensor cf = confidence.to(acc).contiguous();
  const at::Tensor mx = hmax.to(acc).contiguous();
  const int64_t N = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3);
  at::Tensor grad = at::empty({N, K, H, W}, hm.options());
  C10_CUDA_CHECK(cuda::launch_soft_argmax_bwd(to_dtype(hm.scalar_type()), g.const_data_ptr(), hm.const_data_ptr(),
                                              xy.const_data_ptr(), cf.const_data_ptr(), mx.const_data_ptr(), N * K,
                                              H, W, beta, grad.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return grad;
}

std::tuple<at::Tensor, at::Tensor> decode_heatmaps_cuda(const at::Tensor& heatmaps, c10::string_view method,
                                                        int64_t kernel) {
  check_heatmaps(heatmaps, "decode_heatmaps");
  check_cuda(heatmaps, "decode_heatmaps", "heatmaps");
  const int meth = parse_method(method);
  check_kernel(kernel);
  float g[kMaxBlurKernel];
  gaussian_kernel_1d(static_cast<int>(kernel), g);
  const c10::cuda::CUDAGuard guard(heatmaps.device());
  const at::Tensor hm = heatmaps.contiguous();
  const int64_t N = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3);
  const auto opts = hm.options().dtype(acc_dtype(hm.scalar_type()));
  at::Tensor coords = at::empty({N, K, 2}, opts);
  at::Tensor maxvals = at::empty({N, K}, opts);
  C10_CUDA_CHECK(cuda::launch_decode_heatmaps(to_dtype(hm.scalar_type()), hm.const_data_ptr(), N * K, H, W, meth, g,
                                              static_cast<int>(kernel), coords.data_ptr(), maxvals.data_ptr(),
                                              c10::cuda::getCurrentCUDAStream()));
  return {coords, maxvals};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, CUDA, m) {
  m.impl("soft_argmax_fwd", &soft_argmax_fwd_cuda);
  m.impl("soft_argmax_bwd", &soft_argmax_bwd_cuda);
  m.impl("decode_heatmaps", &decode_heatmaps_cuda);
}

}  // namespace distilpose
