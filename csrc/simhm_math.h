// Shared scalar math of the simulated-heatmap loss (Reg2HM + score loss), used by the C++ CPU
// kernels and the CUDA kernels alike. The same quantities as the Triton kernels of
// distilpose_kernels/heatmap_triton.py, in the same (8, N, K) float32 statistics layout, so the
// paths can be checked against each other and against the float64 reference.
//
// Per map (n, k), with mu = coords * (W, H), a = sigma^2 + 1e-9, g = exp(-dx^2/2a_x - dy^2/2a_y)
// times the 3-sigma in-grid flag, r = g - T (T the teacher map), q = r * g:
//   S = sum r^2,  X1 = sum q dx,  X2 = sum q dx^2,  Y1 = sum q dy,  Y2 = sum q dy^2.
// dS/dmu_x = 2 X1 / a_x, dS/dsigma_x = 2 sigma_x X2 / a_x^2 (likewise y); mu_x = c_x * W.
#pragma once

#include <cmath>
#include <cstdint>

#include "decode_math.h"  // DP_HD

namespace distilpose {

// Rows of the (8, N, K) statistics buffer.
enum SimHMStat : int {
  kStS = 0,      // sum (g - T)^2
  kStDcx = 1,    // dS / dcoord_x
  kStDcy = 2,    // dS / dcoord_y
  kStDsx = 3,    // dS / dsigma_x
  kStDsy = 4,    // dS / dsigma_y
  kStWreg = 5,   // keypoint weight * in-grid flag (the Reg2HM weight)
  kStErr = 6,    // score * w - T(nearest pixel) * w (the score error)
  kStWscore = 7  // keypoint weight (the score loss weight)
};
constexpr int kSimHMNumStats = 8;

// The CUDA forward kernels (argument fwd_kernel of distilpose::simhm_loss_ext(_fwd)): one block
// per map; persistent blocks holding the next map in registers; persistent blocks streaming maps
// through shared memory with asynchronous copies. The same statistics up to fp32 summation
// order. The CPU kernels accept and ignore it.
enum SimHMFwdKernel : int { kSimHMFwdBlocks = 0, kSimHMFwdPersistent = 1, kSimHMFwdPipelined = 2 };
constexpr int kSimHMNumFwdKernels = 3;

// The Gaussian of one prediction.
struct SimHMMap {
  float cx, cy, sx, sy, kw, sc;  // normalised coords, sigmas, keypoint weight, score
  float mux, muy;                // centre in heatmap pixels
  float in_grid;                 // 0 when [mu - 3 sigma, mu + 3 sigma + 1] lies wholly off the grid
  float inv_ax, inv_ay;          // 1 / (sigma^2 + 1e-9)
};

DP_HD SimHMMap simhm_map(float cx, float cy, float sx, float sy, float kw, float sc, int H, int W) {
  SimHMMap m;
  const float Hf = static_cast<float>(H), Wf = static_cast<float>(W);
  m.cx = cx;
  m.cy = cy;
  m.sx = sx;
  m.sy = sy;
  m.kw = kw;
  m.sc = sc;
  m.mux = cx * Wf;
  m.muy = cy * Hf;
  const bool off = (m.mux - 3.f * sx >= Wf) || (m.muy - 3.f * sy >= Hf) || (m.mux + 3.f * sx + 1.f < 0.f) ||
                   (m.muy + 3.f * sy + 1.f < 0.f);
  m.in_grid = off ? 0.f : 1.f;
  m.inv_ax = 1.f / (sx * sx + 1e-9f);
  m.inv_ay = 1.f / (sy * sy + 1e-9f);
  return m;
}

// torch.round (ties to even) of a finite v >= 0.
DP_HD float simhm_round_half_even(float v) {
  const float r = floorf(v + 0.5f);
  const bool tie = (r - v) == 0.5f;
  const bool odd = (r - 2.f * floorf(r * 0.5f)) == 1.f;
  return (tie && odd) ? r - 1.f : r;
}

// Flat index of the pixel nearest to the prediction (the score target), or -1 when the
// prediction lies outside [0, 1]^2 (NaN counts as outside): the target is then 0.
DP_HD int64_t simhm_score_pixel(const SimHMMap& m, int H, int W) {
  const bool inside = (m.cx >= 0.f) && (m.cx <= 1.f) && (m.cy >= 0.f) && (m.cy <= 1.f);
  if (!inside) return -1;
  const float px = simhm_round_half_even(m.cx * static_cast<float>(W - 1));
  const float py = simhm_round_half_even(m.cy * static_cast<float>(H - 1));
  return static_cast<int64_t>(py) * W + static_cast<int64_t>(px);
}

// The eight statistics of one map from its sums and the teacher value at the score pixel.
DP_HD void simhm_map_stats(const SimHMMap& m, float S, float X1, float Y1, float X2, float Y2, float tv, int H,
                           int W, float (&out)[kSimHMNumStats]) {
  out[kStS] = S;
  out[kStDcx] = 2.f * X1 * m.inv_ax * static_cast<float>(W);
  out[kStDcy] = 2.f * Y1 * m.inv_ay * static_cast<float>(H);
  out[kStDsx] = 2.f * (X2 * m.inv_ax) * (m.sx * m.inv_ax);
  out[kStDsy] = 2.f * (Y2 * m.inv_ay) * (m.sy * m.inv_ay);
  out[kStWreg] = m.kw * m.in_grid;
  out[kStErr] = m.sc * m.kw - tv * m.kw;
  out[kStWscore] = m.kw;
}

// Gradients of one (n, k) from the statistics: coefficient c of dS, and the score's sign.
// released: c = gr * wk_k / (K N^2 HW) (wk_k = sum_i w_ik^2); per-sample: c = gr * w^2 / (N K HW).
DP_HD float simhm_reg_coef(bool released, float wk_k, float w, float gr, float N, float K, float HW) {
  return gr * (released ? wk_k / (K * N * N * HW) : w * w / (N * K * HW));
}

DP_HD float simhm_score_grad(float err, float kw, float gs, float N, float K) {
  const float sgn = err > 0.f ? 1.f : (err < 0.f ? -1.f : 0.f);
  return gs * sgn * kw / (N * K);
}

// The gradients of element i of the (8, NK) statistics: out = (d cx, d cy, d sx, d sy, d score).
DP_HD void simhm_element_grads(const float* stats, int64_t NK, int64_t i, float wk_k, float gr, float gs,
                               bool released, float N, float K, float HW, float (&out)[5]) {
  const float c = simhm_reg_coef(released, wk_k, stats[kStWreg * NK + i], gr, N, K, HW);
  out[0] = c * stats[kStDcx * NK + i];
  out[1] = c * stats[kStDcy * NK + i];
  out[2] = c * stats[kStDsx * NK + i];
  out[3] = c * stats[kStDsy * NK + i];
  out[4] = simhm_score_grad(stats[kStErr * NK + i], stats[kStWscore * NK + i], gs, N, K);
}

}  // namespace distilpose
