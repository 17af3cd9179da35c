// Shared scalar math of the teacher targets (distilpose::simhm_targets_ext), used by the C++ CPU
// kernel and the CUDA kernel alike. The same float32 arithmetic, in the same order, as the Triton
// kernel `_targets_kernel` of distilpose_kernels/heatmap_triton.py; distilpose_kernels/targets.py
// documents the encodings (mmpose's msra / unbiased / udp conventions, quirks included).
//
// Per keypoint: the Gaussian's centre (cx, cy) in heatmap pixels, the box [x0, x1) x [y0, y1)
// where it is drawn, the weight (visibility, or 0 off the grid / not finite) and whether it is
// drawn at all (weight > 0.5). Pixel (r, c) of the map is gy(r) * gx(c), separable.
#pragma once

#include <cmath>
#include <cstdint>

#include "decode_math.h"  // DP_HD

namespace distilpose {

enum TargetEncoding : int { kEncMsra = 0, kEncUnbiased = 1, kEncUdp = 2 };

// Per-call constants, as distilpose_kernels.targets.encoding_constants computes them (float64,
// then rounded to float32 as the Triton launch passes Python floats).
struct TargetConsts {
  float stride_x, stride_y, tmp_size, gsize, half, inv_two_s2;
};

inline TargetConsts target_consts(int64_t ih, int64_t iw, int64_t hh, int64_t hw, double sigma, int encoding) {
  double sx, sy;
  if (encoding == kEncUdp) {
    sx = (iw - 1.0) / (hw - 1.0);
    sy = (ih - 1.0) / (hh - 1.0);
  } else {
    sx = static_cast<double>(iw) / static_cast<double>(hw);
    sy = static_cast<double>(ih) / static_cast<double>(hh);
  }
  const double tmp = 3.0 * sigma;
  const double size = 2.0 * tmp + 1.0;
  // capped at the largest float32 (a sigma < 4e-20 would overflow it to inf: 0 * inf = NaN)
  const double inv = 1.0 / (2.0 * sigma * sigma);
  const double fmax = 3.4028234663852886e38;
  TargetConsts c;
  c.stride_x = static_cast<float>(sx);
  c.stride_y = static_cast<float>(sy);
  c.tmp_size = static_cast<float>(tmp);
  c.gsize = static_cast<float>(std::ceil(size));
  c.half = static_cast<float>(std::floor(size / 2.0));
  c.inv_two_s2 = static_cast<float>(inv < fmax ? inv : fmax);
  return c;
}

struct TargetMap {
  float cx, cy;    // Gaussian centre, heatmap pixels
  float x0, x1;    // drawn columns [x0, x1)
  float y0, y1;    // drawn rows [y0, y1)
  float weight;    // the keypoint's target weight
  float draw;      // 1 when drawn (weight > 0.5), else 0: the whole map is zero
};

// Python int() / torch.trunc of a float, kept in float (no int32 overflow for huge sigmas).
DP_HD float target_trunc(float v) { return v < 0.f ? ceilf(v) : floorf(v); }

DP_HD float target_fmin(float a, float b) { return a < b ? a : b; }
DP_HD float target_fmax(float a, float b) { return a > b ? a : b; }

DP_HD TargetMap target_map(float x, float y, float v, int64_t H, int64_t W, const TargetConsts& c, int encoding) {
  const float Wf = static_cast<float>(W), Hf = static_cast<float>(H);
  const bool finite = fabsf(x) < INFINITY && fabsf(y) < INFINITY;  // false for NaN too
  // clamped (the box test's answer is unchanged) so float -> int conversions stay defined
  x = target_fmin(target_fmax(finite ? x : 0.f, -1e7f), 1e7f);
  y = target_fmin(target_fmax(finite ? y : 0.f, -1e7f), 1e7f);
  const float fx = x / c.stride_x;
  const float fy = y / c.stride_y;
  TargetMap m;
  bool off;
  if (encoding == kEncUnbiased) {  // sub-pixel centre, full grid
    m.cx = fx;
    m.cy = fy;
    off = (fx - c.tmp_size >= Wf) || (fy - c.tmp_size >= Hf) || (fx + c.tmp_size + 1.f < 0.f) ||
          (fy + c.tmp_size + 1.f < 0.f);
    m.x0 = 0.f;
    m.x1 = Wf;
    m.y0 = 0.f;
    m.y1 = Hf;
  } else {  // msra / udp: integer centre, the window of the Gaussian patch
    const float mx = target_trunc(fx + 0.5f);
    const float my = target_trunc(fy + 0.5f);
    const float ulx = target_trunc(mx - c.tmp_size);
    const float uly = target_trunc(my - c.tmp_size);
    const float brx = target_trunc(mx + c.tmp_size + 1.f);
    const float bry = target_trunc(my + c.tmp_size + 1.f);
    off = (ulx >= Wf) || (uly >= Hf) || (brx < 0.f) || (bry < 0.f);
    m.cx = ulx + c.half;  // patch pixel i sits at ul + i, value exp(-(i - half)^2 / (2 s^2))
    m.cy = uly + c.half;
    if (encoding == kEncUdp) {  // the sub-pixel offset inside the Gaussian
      m.cx += fx - mx;
      m.cy += fy - my;
    }
    m.x0 = target_fmax(ulx, 0.f);
    m.y0 = target_fmax(uly, 0.f);
    m.x1 = target_fmin(target_fmin(brx, Wf), ulx + c.gsize);
    m.y1 = target_fmin(target_fmin(bry, Hf), uly + c.gsize);
  }
  float w = off ? 0.f : v;
  w = finite ? w : 0.f;
  m.weight = w;
  m.draw = w > 0.5f ? 1.f : 0.f;
  return m;
}

// One factor of the separable Gaussian at pixel coordinate p (column or row index as float).
DP_HD float target_factor(float p, float centre, float lo, float hi, float inv_two_s2) {
  const float d = p - centre;
  return (p >= lo && p < hi) ? expf(-(d * d) * inv_two_s2) : 0.f;
}

}  // namespace distilpose
