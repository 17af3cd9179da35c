// Runs the vectorised soft-argmax forward's per-thread code (csrc/cuda/soft_argmax_vec.cuh) on
// the CPU for every thread of a 256-thread block, combines the threads the way the kernel's
// block reductions do, and compares with a float64 reference. Built and run by
// tests/test_native_host.py with nvcc (host code only: no GPU needed).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "cuda/soft_argmax_vec.cuh"

using namespace distilpose::cuda;

constexpr int kBlock = 256;

static float to_f(float v) { return v; }
static float to_f(__half v) { return __half2float(v); }
static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_f(float v);
template <> float from_f<float>(float v) { return v; }
template <> __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One map through the per-thread code of soft_argmax_fwd_vec_kernel<T, ITEMS>.
template <typename T, int ITEMS>
static void emulate(const T* map, int H, int W, float beta, float& cx, float& cy, float& mx) {
  constexpr int V = VecTraits<T>::kElems;
  const int nvec = H * W / V;
  static float x[kBlock][ITEMS][V];
  float m = -INFINITY;
  for (int t = 0; t < kBlock; ++t) {
    const float mt = vec_load_max<T, ITEMS>(map, nvec, t, kBlock, x[t]);
    if (distilpose::better_max(mt, m)) m = mt;  // block_max_nan
  }
  float S = 0, Sx = 0, Sy = 0;
  for (int t = 0; t < kBlock; ++t) vec_partial_sums<T, ITEMS>(x[t], nvec, t, kBlock, W, m, beta, S, Sx, Sy);
  cx = Sx / S;
  cy = Sy / S;
  mx = m;
}

template <typename T>
static bool run_case(int H, int W, float beta, int kind, unsigned seed) {
  constexpr int V = VecTraits<T>::kElems;
  std::vector<T> map(static_cast<size_t>(H) * W);
  unsigned s = seed;
  for (auto& v : map) {
    s = s * 1664525u + 1013904223u;
    v = from_f<T>(static_cast<float>((s >> 8) & 0xffff) / 65536.0f * 6.0f - 3.0f);
  }
  if (kind == 1) map[(H * W) / 3] = from_f<T>(NAN);
  if (kind == 2) for (auto& v : map) v = from_f<T>(-INFINITY);
  if (kind == 3) for (size_t i = 0; i < map.size(); i += 3) map[i] = from_f<T>(-INFINITY);
  // float64 reference (on the values as stored in T)
  double m = -INFINITY;
  bool nan = false;
  for (auto v : map) {
    const double d = to_f(v);
    nan = nan || std::isnan(d);
    if (d > m) m = d;
  }
  double S = 0, Sx = 0, Sy = 0;
  for (int i = 0; i < H * W; ++i) {
    const double e = std::exp(beta * (static_cast<double>(to_f(map[i])) - m));
    S += e;
    Sx += e * (i % W);
    Sy += e * (i / W);
  }
  const double rx = nan ? NAN : Sx / S, ry = nan ? NAN : Sy / S;
  const int items = (H * W / V + kBlock - 1) / kBlock;
  if (items > 8) return true;  // the launcher uses the streaming kernel for such maps
  float cx, cy, mx;
  if (items <= 1) emulate<T, 1>(map.data(), H, W, beta, cx, cy, mx);
  else if (items <= 2) emulate<T, 2>(map.data(), H, W, beta, cx, cy, mx);
  else if (items <= 4) emulate<T, 4>(map.data(), H, W, beta, cx, cy, mx);
  else emulate<T, 8>(map.data(), H, W, beta, cx, cy, mx);
  bool ok;
  if (std::isnan(rx) || std::isnan(ry)) {
    ok = std::isnan(cx) && std::isnan(cy);
  } else {
    const double tol = 2e-4 * (W > H ? W : H) + 1e-4;
    ok = std::fabs(cx - rx) <= tol && std::fabs(cy - ry) <= tol && std::fabs(mx - m) <= 1e-6 * (1 + std::fabs(m));
  }
  if (!ok) {
    std::printf("FAIL %s H=%d W=%d beta=%g kind=%d: got (%g, %g) max %g, want (%g, %g) max %g\n",
                sizeof(T) == 4 ? "fp32" : "16-bit", H, W, beta, kind, cx, cy, mx, rx, ry, m);
  }
  return ok;
}

int main() {
  // W must be a multiple of the pixels per vector (4 fp32, 8 fp16/bf16): the launcher's rule.
  const int shapes[][2] = {{64, 48}, {80, 64}, {96, 72}, {17, 24}, {1, 8}, {3, 16}, {96, 80}, {5, 40}};
  const float betas[] = {1.0f, 0.1f, 25.0f};
  int n = 0, bad = 0;
  for (auto& hw : shapes) {
    for (float beta : betas) {
      for (int kind = 0; kind < 4; ++kind) {
        const unsigned seed = 7u * hw[0] + 13u * hw[1] + kind;
        const int H = hw[0], W = hw[1];
        bad += !run_case<float>(H, W, beta, kind, seed);
        bad += !run_case<__half>(H, W, beta, kind, seed);
        bad += !run_case<__nv_bfloat16>(H, W, beta, kind, seed);
        n += 3;
      }
    }
  }
  std::printf("%s: %d of %d cases\n", bad ? "FAILED" : "ok", n - bad, n);
  return bad ? 1 : 0;
}
