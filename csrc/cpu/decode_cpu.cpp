// CPU kernels of soft-argmax (forward / backward) and heatmap decoding (argmax, DARK).
// Parallel over the N*K heatmaps with at::parallel_for; float32 math for fp16/bf16/fp32
// inputs (float64 for float64). The float paths use a branch-free exp and `omp simd`
// reductions (built with -fopenmp-simd: vectorisation only, no OpenMP runtime) so the
// compiler vectorises them; on x86-64 an AVX2(+FMA) clone is chosen at load time by CPU features.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ops_common.h"

// Feature-based clones (an "arch=haswell" clone would be chosen by CPU model, not by
// features, and never run on AMD CPUs): x86-64-v3 = AVX2 + FMA + BMI2 (GCC >= 12), else AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && !defined(DISTILPOSE_NO_CLONES)
#define DP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DISTILPOSE_NO_CLONES)
#define DP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DP_CLONES
#endif

namespace distilpose {
namespace {

// exp(x) for x <= 0 or NaN (Cephes expf: range reduction + degree-6 polynomial, ~2 ulp).
// Exactly 0 below -87.33 (and for -inf), NaN stays NaN. Branch-free (selects only) so the
// loops vectorise; needs -fno-trapping-math for GCC to if-convert (set by setup.py).
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const float lo = -87.33654475f;
  const float xc = x < lo ? lo : x;  // NaN passes through
  const float t = xc * 1.44269504088896341f;
  // round to nearest without a branch or SSE4.1: |t| <= 127 < 2^22
  float n = (t + 12582912.f) - 12582912.f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  n = n == n ? n : 0.f;  // keeps the float->int conversion defined for NaN input (p is NaN then)
  const float scale = __builtin_bit_cast(float, (static_cast<int>(n) + 127) << 23);
  const float keep = x < lo ? 0.f : 1.f;  // exact 0 below the float range and for -inf
  return p * scale * keep;                // NaN * 0 = NaN: NaN propagates
}

// ----------------------------------------------------------------------------- soft-argmax

struct FwdOut {
  float x, y, conf, hmax;
};

// Pixel coordinates of a flattened H x W map (xs[i] = i % W, ys[i] = i / W), so the kernels
// below are single flat loops that vectorise without per-row overhead.
struct PixelGrid {
  std::vector<float> xs, ys;
  PixelGrid(int64_t H, int64_t W) : xs(H * W), ys(H * W) {
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < W; ++c) {
        xs[r * W + c] = static_cast<float>(c);
        ys[r * W + c] = static_cast<float>(r);
      }
  }
};

// One float32 heatmap (contiguous, n = H * W pixels).
DP_CLONES FwdOut softargmax_fwd_f32(const float* __restrict h, int n, const float* __restrict xs,
                                    const float* __restrict ys, float beta) {
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int i = 0; i < n; ++i) {
    m = h[i] > m ? h[i] : m;
    nan |= (h[i] != h[i]);
  }
  const float nanv = std::numeric_limits<float>::quiet_NaN();
  if (nan) return {nanv, nanv, nanv, nanv};
  // exp(beta * (h - max)) <= 1: no overflow for any beta; -inf logits weigh exactly 0.
  // An all -inf (or any +inf) map gives -inf - -inf = NaN, hence NaN outputs (documented).
  // float partial sums over blocks of 1024 pixels (vector lanes), accumulated in double:
  // large maps (256 x 192) keep ~1e-5 px accuracy.
  constexpr int kBlock = 1024;
  double S = 0.0, Sx = 0.0, Sy = 0.0;
  for (int b0 = 0; b0 < n; b0 += kBlock) {
    const int b1 = n - b0 < kBlock ? n : b0 + kBlock;
    float s = 0.f, sx = 0.f, sy = 0.f;
#pragma omp simd reduction(+ : s, sx, sy)
    for (int i = b0; i < b1; ++i) {
      const float e = exp_nonpos(beta * (h[i] - m));
      s += e;
      sx += e * xs[i];
      sy += e * ys[i];
    }
    S += s;
    Sx += sx;
    Sy += sy;
  }
  return {static_cast<float>(Sx / S), static_cast<float>(Sy / S), static_cast<float>(1.0 / S), m};
}

DP_CLONES void softargmax_bwd_f32(const float* __restrict h, int n, const float* __restrict xs,
                                  const float* __restrict ys, float beta, float gx, float gy, float x, float y,
                                  float conf, float m, float* __restrict out) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float p = exp_nonpos(beta * (h[i] - m)) * conf;
    out[i] = beta * p * (gx * (xs[i] - x) + gy * (ys[i] - y));
  }
}

template <typename acc_t>
void softargmax_fwd_generic(const acc_t* h, int64_t H, int64_t W, acc_t beta, acc_t* out4) {
  const int64_t n = H * W;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    m = h[i] > m ? h[i] : m;
    nan |= (h[i] != h[i]);
  }
  if (nan) {
    for (int j = 0; j < 4; ++j) out4[j] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  acc_t S = 0, Sx = 0, Sy = 0;
  for (int64_t r = 0; r < H; ++r) {
    acc_t rs = 0, rx = 0;
    for (int64_t c = 0; c < W; ++c) {
      const acc_t e = std::exp(beta * (h[r * W + c] - m));
      rs += e;
      rx += e * static_cast<acc_t>(c);
    }
    S += rs;
    Sx += rx;
    Sy += rs * static_cast<acc_t>(r);
  }
  out4[0] = Sx / S;
  out4[1] = Sy / S;
  out4[2] = acc_t(1) / S;
  out4[3] = m;
}

template <typename acc_t>
void softargmax_bwd_generic(const acc_t* h, int64_t H, int64_t W, acc_t beta, acc_t gx, acc_t gy, acc_t x,
                            acc_t y, acc_t conf, acc_t m, acc_t* out) {
  for (int64_t r = 0; r < H; ++r) {
    for (int64_t c = 0; c < W; ++c) {
      const acc_t p = std::exp(beta * (h[r * W + c] - m)) * conf;
      out[r * W + c] = beta * p * (gx * (static_cast<acc_t>(c) - x) + gy * (static_cast<acc_t>(r) - y));
    }
  }
}

int64_t grain_for(int64_t hw) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(hw, 1)); }

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got one on ", t.device());
}

template <typename scalar_t>
void soft_argmax_fwd_impl(const at::Tensor& hm, double beta, at::Tensor& coords, at::Tensor& conf, at::Tensor& hmax) {
  const int64_t N = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3);
  const int64_t NK = N * K, HW = H * W;
  const scalar_t* in = hm.const_data_ptr<scalar_t>();
  if constexpr (std::is_same_v<scalar_t, double>) {
    double* pc = coords.data_ptr<double>();
    double* pf = conf.data_ptr<double>();
    double* pm = hmax.data_ptr<double>();
    at::parallel_for(0, NK, grain_for(HW), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        double o[4];
        softargmax_fwd_generic<double>(in + i * HW, H, W, beta, o);
        pc[2 * i] = o[0];
        pc[2 * i + 1] = o[1];
        pf[i] = o[2];
        pm[i] = o[3];
      }
    });
  } else {
    float* pc = coords.data_ptr<float>();
    float* pf = conf.data_ptr<float>();
    float* pm = hmax.data_ptr<float>();
    const PixelGrid grid(H, W);
    at::parallel_for(0, NK, grain_for(HW), [&](int64_t b, int64_t e) {
      std::vector<float> buf;
      if constexpr (!std::is_same_v<scalar_t, float>) buf.resize(HW);
      for (int64_t i = b; i < e; ++i) {
        const float* src;
        if constexpr (std::is_same_v<scalar_t, float>) {
          src = in + i * HW;
        } else {
          const scalar_t* s = in + i * HW;
          for (int64_t j = 0; j < HW; ++j) buf[j] = static_cast<float>(s[j]);
          src = buf.data();
        }
        const FwdOut o = softargmax_fwd_f32(src, static_cast<int>(HW), grid.xs.data(), grid.ys.data(),
                                            static_cast<float>(beta));
        pc[2 * i] = o.x;
        pc[2 * i + 1] = o.y;
        pf[i] = o.conf;
        pm[i] = o.hmax;
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_argmax_fwd_cpu(const at::Tensor& heatmaps, double beta) {
  check_heatmaps(heatmaps, "soft_argmax");
  check_beta(beta, "soft_argmax");
  check_cpu(heatmaps, "soft_argmax", "heatmaps");
  const at::Tensor hm = heatmaps.contiguous();
  const int64_t N = hm.size(0), K = hm.size(1);
  const int64_t NK = N * K;
  const auto opts = hm.options().dtype(acc_dtype(hm.scalar_type()));
  at::Tensor coords = at::empty({N, K, 2}, opts);
  at::Tensor conf = at::empty({N, K}, opts);
  at::Tensor hmax = at::empty({N, K}, opts);
  if (NK == 0) return {coords, conf, hmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hm.scalar_type(), "soft_argmax_fwd_cpu",
                                  [&] { soft_argmax_fwd_impl<scalar_t>(hm, beta, coords, conf, hmax); });
  return {coords, conf, hmax};
}

template <typename scalar_t>
void soft_argmax_bwd_impl(const at::Tensor& hm, const at::Tensor& g, const at::Tensor& xy, const at::Tensor& cf,
                          const at::Tensor& mx, double beta, at::Tensor& grad) {
  const int64_t N = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3);
  const int64_t NK = N * K, HW = H * W;
  const scalar_t* in = hm.const_data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t* pg = g.const_data_ptr<acc_t>();
  const acc_t* pc = xy.const_data_ptr<acc_t>();
  const acc_t* pf = cf.const_data_ptr<acc_t>();
  const acc_t* pm = mx.const_data_ptr<acc_t>();
  const PixelGrid grid(std::is_same_v<scalar_t, double> ? 0 : H, W);
  const float* xs = grid.xs.data();
  const float* ys = grid.ys.data();
  const int n = static_cast<int>(HW);
  at::parallel_for(0, NK, grain_for(HW), [&](int64_t b, int64_t e) {
    std::vector<float> ibuf, obuf;
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      ibuf.resize(HW);
      obuf.resize(HW);
    }
    for (int64_t i = b; i < e; ++i) {
      if constexpr (std::is_same_v<scalar_t, double>) {
        softargmax_bwd_generic<double>(in + i * HW, H, W, beta, pg[2 * i], pg[2 * i + 1], pc[2 * i],
                                       pc[2 * i + 1], pf[i], pm[i], out + i * HW);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        softargmax_bwd_f32(in + i * HW, n, xs, ys, static_cast<float>(beta), pg[2 * i], pg[2 * i + 1], pc[2 * i],
                           pc[2 * i + 1], pf[i], pm[i], out + i * HW);
      } else {
        const scalar_t* s = in + i * HW;
        for (int64_t j = 0; j < HW; ++j) ibuf[j] = static_cast<float>(s[j]);
        softargmax_bwd_f32(ibuf.data(), n, xs, ys, static_cast<float>(beta), pg[2 * i], pg[2 * i + 1], pc[2 * i],
                           pc[2 * i + 1], pf[i], pm[i], obuf.data());
        scalar_t* o = out + i * HW;
        for (int64_t j = 0; j < HW; ++j) o[j] = static_cast<scalar_t>(obuf[j]);
      }
    }
  });
}

at::Tensor soft_argmax_bwd_cpu(const at::Tensor& grad_coords, const at::Tensor& heatmaps, const at::Tensor& coords,
                               const at::Tensor& confidence, const at::Tensor& hmax, double beta) {
  const char* op = "soft_argmax_backward";
  check_heatmaps(heatmaps, op);
  check_beta(beta, op);
  check_cpu(heatmaps, op, "heatmaps");
  check_aux(grad_coords, "grad_coords", heatmaps, 2, op);
  check_aux(coords, "coords", heatmaps, 2, op);
  check_aux(confidence, "confidence", heatmaps, 0, op);
  check_aux(hmax, "hmax", heatmaps, 0, op);
  const at::Tensor hm = heatmaps.contiguous();
  const auto acc = acc_dtype(hm.scalar_type());
  const at::Tensor g = grad_coords.to(acc).contiguous();
  const at::Tensor xy = coords.to(acc).contiguous();
  const at::Tensor cf = confidence.to(acc).contiguous();
  const at::Tensor mx = hmax.to(acc).contiguous();
  const int64_t N = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3);
  const int64_t NK = N * K;
  at::Tensor grad = at::empty({N, K, H, W}, hm.options());
  if (NK == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hm.scalar_type(), "soft_argmax_bwd_cpu",
                                  [&] { soft_argmax_bwd_impl<scalar_t>(hm, g, xy, cf, mx, beta, grad); });
  return grad;
}

// ----------------------------------------------------------------------------- decode

// Index of the first maximum (numpy argmax semantics: the first NaN if any) and its value.
DP_CLONES int64_t argmax_f32(const float* __restrict h, int n, float* best) {
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int i = 0; i < n; ++i) {
    m = h[i] > m ? h[i] : m;
    nan |= (h[i] != h[i]);
  }
  for (int i = 0; i < n; ++i) {
    if (nan ? (h[i] != h[i]) : (h[i] == m)) {
      *best = h[i];
      return i;
    }
  }
  *best = h[0];
  return 0;
}

template <typename scalar_t, typename acc_t>
int64_t first_argmax(const scalar_t* h, int64_t n, std::vector<float>& buf, acc_t& best) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return argmax_f32(h, static_cast<int>(n), &best);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    best = h[0];
    int64_t idx = 0;
    for (int64_t j = 1; j < n; ++j) {
      if (better_max(h[j], best)) {
        best = h[j];
        idx = j;
      }
    }
    return idx;
  } else {
    buf.resize(n);
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(h[j]);
    float b;
    const int64_t idx = argmax_f32(buf.data(), static_cast<int>(n), &b);
    best = b;
    return idx;
  }
}

// The whole-map blur maximum for DARK's rescale (kDarkRescaleBelow in decode_math.h):
// separable, the same arithmetic as blur_at.

template <typename Load>
float blur_max(const Load& load, int H, int W, const float* g, int ksize, std::vector<float>& tmp) {
  const int r = ksize / 2;
  tmp.resize(static_cast<size_t>(H) * W);
  for (int y = 0; y < H; ++y)  // horizontal pass
    for (int x = 0; x < W; ++x) {
      float row = 0.f;
      for (int b = 0; b < ksize; ++b) {
        const int q = x + b - r;
        if (q < 0 || q >= W) continue;
        row += g[b] * load(static_cast<long long>(y) * W + q);
      }
      tmp[static_cast<size_t>(y) * W + x] = row;
    }
  float m = -std::numeric_limits<float>::infinity();
  for (int y = 0; y < H; ++y)  // vertical pass; NaN propagates (np.max)
    for (int x = 0; x < W; ++x) {
      float acc = 0.f;
      for (int a = 0; a < ksize; ++a) {
        const int q = y + a - r;
        if (q < 0 || q >= H) continue;
        acc += g[a] * tmp[static_cast<size_t>(q) * W + x];
      }
      if (better_max(acc, m)) m = acc;
    }
  return m;
}

std::tuple<at::Tensor, at::Tensor> decode_heatmaps_cpu(const at::Tensor& heatmaps, c10::string_view method,
                                                       int64_t kernel) {
  check_heatmaps(heatmaps, "decode_heatmaps");
  check_cpu(heatmaps, "decode_heatmaps", "heatmaps");
  const int meth = parse_method(method);
  check_kernel(kernel);
  float g[kMaxBlurKernel];
  gaussian_kernel_1d(static_cast<int>(kernel), g);
  const int ks = static_cast<int>(kernel);
  const at::Tensor hm = heatmaps.contiguous();
  const int64_t N = hm.size(0), K = hm.size(1), H = hm.size(2), W = hm.size(3);
  const int64_t NK = N * K, HW = H * W;
  const auto opts = hm.options().dtype(acc_dtype(hm.scalar_type()));
  at::Tensor coords = at::empty({N, K, 2}, opts);
  at::Tensor maxvals = at::empty({N, K}, opts);
  if (NK == 0) return {coords, maxvals};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hm.scalar_type(), "decode_heatmaps_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* in = hm.const_data_ptr<scalar_t>();
    acc_t* pc = coords.data_ptr<acc_t>();
    acc_t* pv = maxvals.data_ptr<acc_t>();
    at::parallel_for(0, NK, grain_for(HW), [&](int64_t b, int64_t e) {
      std::vector<float> buf, btmp;
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* h = in + i * HW;
        const auto load = [h](long long j) { return static_cast<float>(h[j]); };  // the blur: float32
        const auto load_acc = [h](long long j) { return static_cast<acc_t>(h[j]); };
        acc_t best;
        const int64_t idx = first_argmax(h, HW, buf, best);
        pv[i] = best;
        acc_t x = -1, y = -1;
        if (best > acc_t(0)) {  // mmpose: no detection (-1, -1) when the maximum is <= 0 or NaN
          const int px = static_cast<int>(idx % W), py = static_cast<int>(idx / W);
          x = px;
          y = py;
          if (meth == 0) {
            quarter_shift(load_acc, static_cast<int>(H), static_cast<int>(W), px, py, x, y);
          } else if (dark_applies(static_cast<int>(H), static_cast<int>(W), px, py)) {
            float bl[kDarkTaps];
            bool rescale = false;
            for (int t = 0; t < kDarkTaps; ++t) {
              bl[t] = blur_at(load, static_cast<int>(H), static_cast<int>(W), px + dark_tap_dx(t),
                              py + dark_tap_dy(t), g, ks);
              rescale |= bl[t] <= kDarkRescaleBelow;
            }
            if (rescale) {
              const float s = static_cast<float>(best) / blur_max(load, static_cast<int>(H), static_cast<int>(W), g, ks, btmp);
              for (int t = 0; t < kDarkTaps; ++t) bl[t] *= s;
            }
            dark_taylor(bl, x, y);
          }
        }
        pc[2 * i] = x;
        pc[2 * i + 1] = y;
      }
    });
  });
  return {coords, maxvals};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilpose, CPU, m) {
  m.impl("soft_argmax_fwd", &soft_argmax_fwd_cpu);
  m.impl("soft_argmax_bwd", &soft_argmax_bwd_cpu);
  m.impl("decode_heatmaps", &decode_heatmaps_cpu);
}

}  // namespace distilpose
