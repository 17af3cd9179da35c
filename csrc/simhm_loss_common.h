// Host-side checks and input preparation of the simulated-heatmap loss ops (CPU and CUDA glue).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

#include "simhm_math.h"

namespace distilpose {

inline bool simhm_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_simhm_device(const at::Tensor& t, const char* name, c10::DeviceType device, const char* op) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, ": expected a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
}

// The forward's inputs, on `device` (the kernels' device type).
inline void check_simhm_inputs(const at::Tensor& coords, const at::Tensor& sigma, const at::Tensor& score,
                               const at::Tensor& teacher, const at::Tensor& kw, c10::DeviceType device,
                               const char* op) {
  TORCH_CHECK(teacher.dim() == 4, op, ": teacher_heatmaps: expected a 4-D tensor (N, K, H, W), got shape ",
              teacher.sizes());
  TORCH_CHECK(simhm_float_dtype(teacher.scalar_type()), op,
              ": teacher_heatmaps: expected float32, float16, bfloat16 or float64, got ", teacher.scalar_type());
  const int64_t N = teacher.size(0), K = teacher.size(1), H = teacher.size(2), W = teacher.size(3);
  TORCH_CHECK(N > 0 && K > 0 && H > 0 && W > 0, op, ": teacher_heatmaps: expected a non-empty tensor, got shape ",
              teacher.sizes());
  TORCH_CHECK(H * W < (int64_t(1) << 24), op, ": teacher_heatmaps: H*W must be < 2^24 (pixel indices in float32), got ",
              teacher.sizes());
  TORCH_CHECK(N * K < (int64_t(1) << 31), op, ": teacher_heatmaps: N*K must be < 2^31, got shape ", teacher.sizes());
  struct Arg {
    const at::Tensor& t;
    const char* name;
    int64_t last;
  };
  for (const Arg& a : {Arg{coords, "coords", 2}, Arg{sigma, "sigma", 2}, Arg{score, "score", 1},
                       Arg{kw, "keypoint_weight", 1}}) {
    TORCH_CHECK(a.t.dim() == 3 && a.t.size(0) == N && a.t.size(1) == K && a.t.size(2) == a.last, op, ": ", a.name,
                ": expected shape (", N, ", ", K, ", ", a.last, ") to match teacher_heatmaps ", teacher.sizes(),
                ", got ", a.t.sizes());
    TORCH_CHECK(simhm_float_dtype(a.t.scalar_type()), op, ": ", a.name, ": expected a floating-point tensor, got ",
                a.t.scalar_type());
    TORCH_CHECK(a.t.device() == teacher.device(), op, ": ", a.name, ": expected a tensor on ", teacher.device(),
                " (the device of teacher_heatmaps), got one on ", a.t.device());
  }
  check_simhm_device(teacher, "teacher_heatmaps", device, op);
}

// fwd_kernel names one of the CUDA forward kernels (SimHMFwdKernel).
inline void check_simhm_fwd_kernel(int64_t fwd_kernel, const char* op) {
  TORCH_CHECK(fwd_kernel >= 0 && fwd_kernel < kSimHMNumFwdKernels, op, ": fwd_kernel: expected 0 (blocks), ",
              "1 (persistent) or 2 (pipelined), got ", fwd_kernel);
}

// The backward's inputs, checked, on `device`: the statistics and per-joint weights contiguous,
// the two incoming gradients as float32.
struct SimHMBwdInputs {
  at::Tensor stats, wk, grad_reg, grad_score;
};

inline SimHMBwdInputs prepare_simhm_bwd(const at::Tensor& grad_reg, const at::Tensor& grad_score,
                                        const at::Tensor& stats, const at::Tensor& wk, int64_t hw,
                                        c10::DeviceType device, const char* op) {
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == kSimHMNumStats && stats.scalar_type() == at::kFloat, op,
              ": stats: expected a float32 (8, N, K) tensor, got ", stats.scalar_type(), " ", stats.sizes());
  TORCH_CHECK(wk.dim() == 1 && wk.size(0) == stats.size(2) && wk.scalar_type() == at::kFloat, op,
              ": joint_w2: expected a float32 (K,) tensor, got ", wk.scalar_type(), " ", wk.sizes());
  TORCH_CHECK(grad_reg.numel() == 1 && grad_score.numel() == 1, op,
              ": grad_reg, grad_score_loss: expected one-element tensors, got ", grad_reg.sizes(), " and ",
              grad_score.sizes());
  TORCH_CHECK(hw > 0 && hw < (int64_t(1) << 24), op, ": hw: expected 0 < H*W < 2^24 (as the forward), got ", hw);
  TORCH_CHECK(stats.size(1) * stats.size(2) < (int64_t(1) << 31), op, ": stats: N*K must be < 2^31, got ",
              stats.sizes());
  check_simhm_device(stats, "stats", device, op);
  for (const at::Tensor* t : {&grad_reg, &grad_score, &wk}) {
    TORCH_CHECK(t->device() == stats.device(), op, ": expected every tensor on ", stats.device(), ", got one on ",
                t->device());
  }
  return {stats.contiguous(), wk.contiguous(), grad_reg.to(at::kFloat).contiguous(),
          grad_score.to(at::kFloat).contiguous()};
}

// The kernels' inputs: predictions as contiguous float32, the teacher contiguous (float64 as float32).
struct SimHMInputs {
  at::Tensor coords, sigma, score, kw, teacher;
  int64_t N, K, H, W;
};

inline SimHMInputs prepare_simhm_inputs(const at::Tensor& coords, const at::Tensor& sigma, const at::Tensor& score,
                                        const at::Tensor& teacher, const at::Tensor& kw) {
  SimHMInputs in;
  in.coords = coords.to(at::kFloat).contiguous();
  in.sigma = sigma.to(at::kFloat).contiguous();
  in.score = score.to(at::kFloat).contiguous();
  in.kw = kw.to(at::kFloat).contiguous();
  in.teacher = teacher.scalar_type() == at::kDouble ? teacher.to(at::kFloat).contiguous() : teacher.contiguous();
  in.N = teacher.size(0);
  in.K = teacher.size(1);
  in.H = teacher.size(2);
  in.W = teacher.size(3);
  return in;
}

// Outputs of a forward (float32, on the inputs' device): stats (8, N, K), wk (K,), reg, sl.
struct SimHMFwdOut {
  at::Tensor stats, wk, reg, sl;
  explicit SimHMFwdOut(const SimHMInputs& in)
      : stats(at::empty({kSimHMNumStats, in.N, in.K}, in.coords.options())),
        wk(at::empty({in.K}, in.coords.options())),
        reg(at::empty({}, in.coords.options())),
        sl(at::empty({}, in.coords.options())) {}
  // the op's outputs: (reg2hm in coords' dtype, score loss in score's dtype, stats, wk)
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result(at::ScalarType coords_dtype,
                                                                    at::ScalarType score_dtype) const {
    return {reg.to(coords_dtype), sl.to(score_dtype), stats, wk};
  }
};

// Gradients of a backward: float32 (N, K, 2), (N, K, 2), (N, K, 1), returned in the inputs' dtypes.
struct SimHMGrads {
  at::Tensor coords, sigma, score;
  explicit SimHMGrads(const at::Tensor& stats)
      : coords(at::empty({stats.size(1), stats.size(2), 2}, stats.options())),
        sigma(at::empty({stats.size(1), stats.size(2), 2}, stats.options())),
        score(at::empty({stats.size(1), stats.size(2), 1}, stats.options())) {}
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(at::ScalarType c, at::ScalarType s, at::ScalarType q) const {
    return {coords.to(c), sigma.to(s), score.to(q)};
  }
};

}  // namespace distilpose
