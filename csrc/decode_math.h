// Shared scalar math of the heatmap decoders (argmax + quarter shift, DARK/Taylor).
// Header-only and free of torch includes so that both the C++ CPU kernels and the
// CUDA kernels (compiled by nvcc with only the CUDA runtime headers) use one copy.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DP_HD __host__ __device__ __forceinline__
#else
#define DP_HD inline
#endif

namespace distilpose {

// Largest Gaussian modulation kernel accepted by decode_heatmaps(method="dark").
constexpr int kMaxBlurKernel = 63;

// The 13 points of the blurred log-heatmap the Taylor step reads, as (dx, dy) offsets
// from the integer argmax: centre, +-1 and +-2 along x and y, and the 4 diagonals.
constexpr int kDarkTaps = 13;
DP_HD int dark_tap_dx(int t) {
  constexpr int dx[kDarkTaps] = {0, 1, -1, 2, -2, 0, 0, 0, 0, 1, -1, 1, -1};
  return dx[t];
}
DP_HD int dark_tap_dy(int t) {
  constexpr int dy[kDarkTaps] = {0, 0, 0, 0, 0, 1, -1, 2, -2, 1, 1, -1, -1};
  return dy[t];
}

DP_HD bool dp_isnan(float v) { return v != v; }
DP_HD bool dp_isnan(double v) { return v != v; }
DP_HD bool dp_isfinite(double v) { return v == v && v - v == 0.0; }

// NaN-propagating "is a better maximum": NaN beats everything; ties keep the first index.
template <typename acc_t>
DP_HD bool better_max(acc_t v, acc_t best) {
  return (v > best) || (dp_isnan(v) && !dp_isnan(best));
}

// `load(i)` returns element i (row-major, i = y * W + x) of one heatmap as float: a functor
// so that the CPU (c10::Half ...) and CUDA (__half, built with __CUDA_NO_HALF_CONVERSIONS__)
// callers convert their storage types their own way.

// Zero-padded 2-D separable Gaussian blur of one heatmap evaluated at pixel (qx, qy).
// `g` holds the 1-D kernel (length ksize, odd). Equivalent to mmpose's _gaussian_blur
// (cv2.GaussianBlur on a zero-bordered copy) before its rescaling.
template <typename Load>
DP_HD float blur_at(const Load& load, int H, int W, int qx, int qy, const float* g, int ksize) {
  const int r = ksize / 2;
  float acc = 0.f;
  for (int a = 0; a < ksize; ++a) {
    const int y = qy + a - r;
    if (y < 0 || y >= H) continue;
    float row = 0.f;
    for (int b = 0; b < ksize; ++b) {
      const int x = qx + b - r;
      if (x < 0 || x >= W) continue;
      row += g[b] * load(static_cast<long long>(y) * W + x);
    }
    acc += g[a] * row;
  }
  return acc;
}

// DARK's rescale (mmpose multiplies the blurred map by maxval / max(blur) before
// log(max(., 1e-10))). With maxval > 0 every blurred value is <= maxval (non-negative weights
// summing to <= 1), so the factor is >= 1: if all 13 taps exceed the clamp, so do the rescaled
// ones, and the factor cancels in the derivatives. Only when a tap is at or below this
// threshold (weak peaks in zero-mean noise, sparse maps) must the whole-map blur maximum be
// computed and the taps rescaled. 1e-9 leaves margin over 1e-10 for rounding in the factor.
constexpr float kDarkRescaleBelow = 1e-9f;

// mmpose post-processing ("default"): move the integer argmax a quarter pixel toward the
// higher neighbour, only strictly inside the map (1 < px < W-1, 1 < py < H-1, as mmpose).
// The differences are taken in the type `load` returns: pass a loader returning double for
// float64 maps (a float loader rounds away differences below float resolution and turns
// values beyond the float range into inf). A NaN difference (from +inf values) moves nothing.
template <typename Load, typename acc_t>
DP_HD void quarter_shift(const Load& load, int H, int W, int px, int py, acc_t& x, acc_t& y) {
  if (1 < px && px < W - 1 && 1 < py && py < H - 1) {
    const long long row = static_cast<long long>(py) * W;
    const auto dx = load(row + px + 1) - load(row + px - 1);
    const auto dy = load(row + W + px) - load(row - W + px);
    using d_t = decltype(dx);
    x += dx > d_t(0) ? acc_t(0.25) : (dx < d_t(0) ? acc_t(-0.25) : acc_t(0));
    y += dy > d_t(0) ? acc_t(0.25) : (dy < d_t(0) ? acc_t(-0.25) : acc_t(0));
  }
}

// Whether DARK refines the argmax (px, py): mmpose's _taylor condition 1 < px < W-2.
DP_HD bool dark_applies(int H, int W, int px, int py) {
  return 1 < px && px < W - 2 && 1 < py && py < H - 2;
}

// Taylor step of DARK given the blurred heatmap at the 13 taps (order of dark_tap_dx/dy).
// mmpose also rescales the blurred map to the original maximum before the log: a constant
// factor that cancels in every derivative, so it is skipped (it only moves mmpose's 1e-10
// clamp, which never bites near the peak of a real heatmap).
// Values are clamped at 1e-10 and logged (mmpose: log(max(blur, 1e-10))); the offset
// -H^-1 * grad is added only when the Hessian is invertible and the offset is finite.
template <typename acc_t>
DP_HD void dark_taylor(const float* b, acc_t& x, acc_t& y) {
  double L[kDarkTaps];
  for (int t = 0; t < kDarkTaps; ++t) {
    const double v = static_cast<double>(b[t]);
    L[t] = (v != v) ? v : ::log(v > 1e-10 ? v : 1e-10);  // np.maximum keeps NaN
  }
  // L index: 0 c, 1 x+1, 2 x-1, 3 x+2, 4 x-2, 5 y+1, 6 y-1, 7 y+2, 8 y-2,
  //          9 (x+1,y+1), 10 (x-1,y+1), 11 (x+1,y-1), 12 (x-1,y-1)
  const double dx = 0.5 * (L[1] - L[2]);
  const double dy = 0.5 * (L[5] - L[6]);
  const double dxx = 0.25 * (L[3] - 2.0 * L[0] + L[4]);
  const double dxy = 0.25 * (L[9] - L[11] - L[10] + L[12]);
  const double dyy = 0.25 * (L[7] - 2.0 * L[0] + L[8]);
  const double det = dxx * dyy - dxy * dxy;
  if (det != 0.0) {
    // inverse of [[dxx, dxy], [dxy, dyy]] = [[dyy, -dxy], [-dxy, dxx]] / det
    const double ox = -(dyy * dx - dxy * dy) / det;
    const double oy = -(-dxy * dx + dxx * dy) / det;
    if (dp_isfinite(ox) && dp_isfinite(oy)) {
      x += static_cast<acc_t>(ox);
      y += static_cast<acc_t>(oy);
    }
  }
}

}  // namespace distilpose
