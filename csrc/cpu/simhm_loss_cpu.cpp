// CPU kernels of the simulated-heatmap loss (distilpose::simhm_loss_ext_fwd / _bwd).
//
// The same contract as the CUDA kernels (csrc/cuda/simhm_loss_cuda.cu) and the Triton ones:
// the forward reads each teacher map once and writes the (8, N, K) float32 statistics, the
// per-joint sum_i w_ik^2 (K,) and the two losses; the backward reads only the statistics.
// Per-map sums accumulate in float64 (these kernels are the CPU path and the tested mirror of
// the CUDA path, not a speed path). Parallel over the N*K maps with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../simhm_loss_common.h"

namespace distilpose {
namespace {

template <typename T>
void simhm_fwd_maps(const float* coords, const float* sigma, const float* score, const float* kw, const T* teacher,
                    float* stats, int64_t NK, int H, int W) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  at::parallel_for(0, NK, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> gx(W), dxs(W);
    for (int64_t i = begin; i < end; ++i) {
      const SimHMMap m = simhm_map(coords[2 * i], coords[2 * i + 1], sigma[2 * i], sigma[2 * i + 1], kw[i], score[i],
                                   H, W);
      for (int x = 0; x < W; ++x) {
        const float dx = static_cast<float>(x) - m.mux;
        dxs[x] = dx;
        gx[x] = std::exp(static_cast<double>(dx) * dx * m.inv_ax * -0.5) * m.in_grid;
      }
      const T* map = teacher + i * HW;
      double S = 0, X1 = 0, X2 = 0, Y1 = 0, Y2 = 0;
      for (int y = 0; y < H; ++y) {
        const double dy = static_cast<double>(static_cast<float>(y) - m.muy);
        const double gy = std::exp(dy * dy * m.inv_ay * -0.5);
        double qrow = 0;
        for (int x = 0; x < W; ++x) {
          const double g = gy * gx[x];
          const double r = g - static_cast<double>(static_cast<float>(map[static_cast<int64_t>(y) * W + x]));
          S += r * r;
          const double q = r * g;
          qrow += q;
          X1 += q * dxs[x];
          X2 += q * dxs[x] * dxs[x];
        }
        Y1 += qrow * dy;
        Y2 += qrow * dy * dy;
      }
      const int64_t p = simhm_score_pixel(m, H, W);
      const float tv = p < 0 ? 0.f : static_cast<float>(map[p]);
      float out[kSimHMNumStats];
      simhm_map_stats(m, static_cast<float>(S), static_cast<float>(X1), static_cast<float>(Y1),
                      static_cast<float>(X2), static_cast<float>(Y2), tv, H, W, out);
      for (int s = 0; s < kSimHMNumStats; ++s) stats[s * NK + i] = out[s];
    }
  });
}

// The losses and wk (K,) from the statistics (float64 sums).
void simhm_finalize(const float* stats, int64_t N, int64_t K, int64_t HW, bool released, float* wk, float* reg,
                    float* sl) {
  const int64_t NK = N * K;
  double reg_acc = 0, err_acc = 0;
  for (int64_t k = 0; k < K; ++k) {
    double w2 = 0, s = 0, ws = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = n * K + k;
      const double w = stats[kStWreg * NK + i];
      const double si = stats[kStS * NK + i];
      w2 += w * w;
      s += si;
      ws += w * w * si;
      err_acc += std::fabs(static_cast<double>(stats[kStErr * NK + i]));
    }
    wk[k] = static_cast<float>(w2);
    reg_acc += released ? (w2 / N) * (s / (static_cast<double>(N) * HW)) : ws;
  }
  *reg = static_cast<float>(released ? reg_acc / K : reg_acc / (static_cast<double>(N) * K * HW));
  *sl = static_cast<float>(err_acc / (static_cast<double>(N) * K));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> simhm_loss_ext_fwd_cpu(
    const at::Tensor& coords, const at::Tensor& sigma, const at::Tensor& score, const at::Tensor& teacher_heatmaps,
    const at::Tensor& keypoint_weight, bool released, int64_t fwd_kernel, bool /*pdl: a CUDA launch option*/) {
  const char* op = "simhm_loss_ext_fwd";
  check_simhm_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight, c10::DeviceType::CPU, op);
  check_simhm_fwd_kernel(fwd_kernel, op);  // a CUDA choice: one CPU kernel serves them all
  const SimHMInputs in = prepare_simhm_inputs(coords, sigma, score, teacher_heatmaps, keypoint_weight);
  const int64_t N = in.N, K = in.K, NK = N * K;
  const int H = static_cast<int>(in.H), W = static_cast<int>(in.W);
  const SimHMFwdOut out(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.teacher.scalar_type(), "simhm_loss_ext_fwd_cpu", [&] {
    simhm_fwd_maps<scalar_t>(in.coords.const_data_ptr<float>(), in.sigma.const_data_ptr<float>(),
                             in.score.const_data_ptr<float>(), in.kw.const_data_ptr<float>(),
                             in.teacher.const_data_ptr<scalar_t>(), out.stats.data_ptr<float>(), NK, H, W);
  });
  simhm_finalize(out.stats.const_data_ptr<float>(), N, K, in.H * in.W, released, out.wk.data_ptr<float>(),
                 out.reg.data_ptr<float>(), out.sl.data_ptr<float>());
  return out.result(coords.scalar_type(), score.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simhm_loss_ext_bwd_cpu(
    const at::Tensor& grad_reg, const at::Tensor& grad_score_loss, const at::Tensor& stats, const at::Tensor& joint_w2,
    at::ScalarType coords_dtype, at::ScalarType sigma_dtype, at::ScalarType score_dtype, int64_t hw, bool released,
    bool /*pdl*/) {
  const SimHMBwdInputs in = prepare_simhm_bwd(grad_reg, grad_score_loss, stats, joint_w2, hw, c10::DeviceType::CPU,
                                              "simhm_loss_ext_bwd");
  const int64_t N = in.stats.size(1), K = in.stats.size(2), NK = N * K;
  const float gr = in.grad_reg.item<float>();
  const float gs = in.grad_score.item<float>();
  const SimHMGrads g(in.stats);
  const float* st = in.stats.const_data_ptr<float>();
  const float* w2 = in.wk.const_data_ptr<float>();
  float* pc = g.coords.data_ptr<float>();
  float* ps = g.sigma.data_ptr<float>();
  float* pq = g.score.data_ptr<float>();
  const float Nf = static_cast<float>(N), Kf = static_cast<float>(K), HWf = static_cast<float>(hw);
  at::parallel_for(0, NK, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float e[5];
      simhm_element_grads(st, NK, i, w2[i % K], gr, gs, released, Nf, Kf, HWf, e);
      pc[2 * i] = e[0];
      pc[2 * i + 1] = e[1];
      ps[2 * i] = e[2];
      ps[2 * i + 1] = e[3];
      pq[i] = e[4];
    }
  });
  return g.result(coords_dtype, sigma_dtype, score_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, CPU, m) {
  m.impl("simhm_loss_ext_fwd", &simhm_loss_ext_fwd_cpu);
  m.impl("simhm_loss_ext_bwd", &simhm_loss_ext_bwd_cpu);
}

}  // namespace distilpose
