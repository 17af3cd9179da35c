// Autograd of distilpose::simhm_loss_ext, in C++.
//
// Why C++: at the loss's sizes the kernels take tens of microseconds and a Python
// torch.autograd.Function (forward, backward on the autograd engine's device thread, Triton's
// Python launch path) costs several times that per call. Here the forward, the saved
// statistics and the backward never enter Python: a call is one dispatcher call from Python.
//
//   simhm_loss_ext(coords, sigma, score, teacher, kw, released, fwd_kernel, pdl) -> (reg2hm, score_loss)
//     Autograd: SimHMLossExt below (backward: simhm_loss_ext_bwd on the saved statistics);
//     CompositeExplicitAutograd (inference mode): the forward op only.
// The schemas are defined in Python (distilpose_kernels/heatmap.py), like those of the decode ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace distilpose {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Fwd4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Bwd3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Fwd4 call_fwd(const at::Tensor& coords, const at::Tensor& sigma, const at::Tensor& score, const at::Tensor& teacher,
              const at::Tensor& kw, bool released, int64_t fwd_kernel, bool pdl) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("distilpose::simhm_loss_ext_fwd", "")
                             .typed<Fwd4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, bool, int64_t, bool)>();
  return op.call(coords, sigma, score, teacher, kw, released, fwd_kernel, pdl);
}

Bwd3 call_bwd(const at::Tensor& grad_reg, const at::Tensor& grad_score, const at::Tensor& stats, const at::Tensor& wk,
              at::ScalarType c_dt, at::ScalarType s_dt, at::ScalarType q_dt, int64_t hw, bool released, bool pdl) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("distilpose::simhm_loss_ext_bwd", "")
                             .typed<Bwd3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::ScalarType, at::ScalarType, at::ScalarType, int64_t, bool, bool)>();
  return op.call(grad_reg, grad_score, stats, wk, c_dt, s_dt, q_dt, hw, released, pdl);
}

class SimHMLossExt : public torch::autograd::Function<SimHMLossExt> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& coords, const at::Tensor& sigma,
                               const at::Tensor& score, const at::Tensor& teacher, const at::Tensor& kw,
                               bool released, int64_t fwd_kernel, bool pdl) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [reg, sl, stats, wk] = call_fwd(coords, sigma, score, teacher, kw, released, fwd_kernel, pdl);
    ctx->save_for_backward({stats, wk});
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(coords.scalar_type()),
                                                     static_cast<int64_t>(sigma.scalar_type()),
                                                     static_cast<int64_t>(score.scalar_type())};
    ctx->saved_data["hw"] = teacher.size(2) * teacher.size(3);
    ctx->saved_data["released"] = released;
    ctx->saved_data["pdl"] = pdl;  // the backward kernel launches the way the forward's did
    return {reg, sl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> dt = ctx->saved_data["dtypes"].toIntVector();
    // grads are materialised (undefined -> zeros) by the default set_materialize_grads(true)
    auto [gc, gsig, gsc] = call_bwd(grads[0], grads[1], saved[0], saved[1], static_cast<at::ScalarType>(dt[0]),
                                    static_cast<at::ScalarType>(dt[1]), static_cast<at::ScalarType>(dt[2]),
                                    ctx->saved_data["hw"].toInt(), ctx->saved_data["released"].toBool(),
                                    ctx->saved_data["pdl"].toBool());
    // one entry per forward input; no gradient for the teacher, the weights, `released`, `fwd_kernel` or `pdl`
    return {ctx->needs_input_grad(0) ? gc : at::Tensor(), ctx->needs_input_grad(1) ? gsig : at::Tensor(),
            ctx->needs_input_grad(2) ? gsc : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> simhm_loss_ext_autograd(const at::Tensor& coords, const at::Tensor& sigma,
                                                           const at::Tensor& score, const at::Tensor& teacher,
                                                           const at::Tensor& kw, bool released, int64_t fwd_kernel,
                                                           bool pdl) {
  const variable_list out = SimHMLossExt::apply(coords, sigma, score, teacher, kw, released, fwd_kernel, pdl);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> simhm_loss_ext_forward_only(const at::Tensor& coords, const at::Tensor& sigma,
                                                               const at::Tensor& score, const at::Tensor& teacher,
                                                               const at::Tensor& kw, bool released,
                                                               int64_t fwd_kernel, bool pdl) {
  auto out = call_fwd(coords, sigma, score, teacher, kw, released, fwd_kernel, pdl);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, Autograd, m) {
  m.impl("simhm_loss_ext", &simhm_loss_ext_autograd);
}

TORCH_LIBRARY_IMPL(distilpose, CompositeExplicitAutograd, m) {
  m.impl("simhm_loss_ext", &simhm_loss_ext_forward_only);
}

}  // namespace distilpose
