// CUDA kernels of soft-argmax (forward / backward) and heatmap decoding (argmax, DARK).
//
// One thread block per heatmap, warp-shuffle reductions, float32 accumulation for
// fp16/bf16/fp32 (float64 for float64). Only CUDA headers are included (see decode_cuda.h),
// which keeps the nvcc compile of this file to seconds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cctype>
#include <cstring>
#include <string>
#include <type_traits>

#include "../decode_math.h"
#include "decode_cuda.h"
#include "soft_argmax_vec.cuh"

namespace distilpose {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }  // x <= 0 or NaN here
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max_nan(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t w = __shfl_xor_sync(kFullMask, v, o);
    v = better_max(w, v) ? w : v;
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Block-wide NaN-propagating max, broadcast to every thread. smem: >= 32 entries.
template <typename acc_t>
__device__ acc_t block_max_nan(acc_t v, acc_t* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_max_nan(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    acc_t w = lane < nwarps ? smem[lane] : neg_inf<acc_t>();
    w = warp_max_nan(w);
    if (lane == 0) smem[32] = w;
  }
  __syncthreads();
  const acc_t r = smem[32];
  __syncthreads();
  return r;
}

// Block-wide sums of three values; the result is valid in thread 0. smem: >= 96 entries.
template <typename acc_t>
__device__ void block_sum3(acc_t& a, acc_t& b, acc_t& c, acc_t* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    smem[warp] = a;
    smem[32 + warp] = b;
    smem[64 + warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < nwarps ? smem[lane] : acc_t(0));
    b = warp_sum(lane < nwarps ? smem[32 + lane] : acc_t(0));
    c = warp_sum(lane < nwarps ? smem[64 + lane] : acc_t(0));
  }
}

// The block's sums -> (x, y) = (Sx, Sy) / S, confidence 1 / S (the peak's probability, since
// the max's exponent is 1), and the max, written by thread 0 for map b.
template <typename acc_t>
__device__ __forceinline__ void finish_soft_argmax(acc_t S, acc_t Sx, acc_t Sy, acc_t m, int64_t b, acc_t* smem,
                                                   acc_t* __restrict__ coords, acc_t* __restrict__ conf,
                                                   acc_t* __restrict__ hmax) {
  block_sum3(S, Sx, Sy, smem);
  if (threadIdx.x == 0) {
    coords[2 * b] = Sx / S;
    coords[2 * b + 1] = Sy / S;
    conf[b] = acc_t(1) / S;
    hmax[b] = m;
  }
}

template <typename T, typename acc_t>
__global__ void soft_argmax_fwd_kernel(const T* __restrict__ in, int HW, int W, acc_t beta, acc_t* __restrict__ coords,
                                       acc_t* __restrict__ conf, acc_t* __restrict__ hmax) {
  __shared__ acc_t smem[96];
  const int64_t b = blockIdx.x;
  const T* h = in + b * HW;
  acc_t m = neg_inf<acc_t>();
  for (int i = threadIdx.x; i < HW; i += blockDim.x) {
    const acc_t v = to_acc(h[i]);
    m = better_max(v, m) ? v : m;
  }
  m = block_max_nan(m, smem);
  // Second pass re-reads the map (from L1/L2). exp(beta * (h - max)) <= 1 never overflows;
  // NaN max (NaN in the map) and all -inf / +inf maps propagate NaN to every output.
  acc_t S = 0, Sx = 0, Sy = 0;
  int u = threadIdx.x % W, v = threadIdx.x / W;
  const int du = blockDim.x % W, dv = blockDim.x / W;
  for (int i = threadIdx.x; i < HW; i += blockDim.x) {
    const acc_t e = exp_acc(beta * (to_acc(h[i]) - m));
    S += e;
    Sx += e * static_cast<acc_t>(u);
    Sy += e * static_cast<acc_t>(v);
    u += du;
    v += dv;
    if (u >= W) {
      u -= W;
      ++v;
    }
  }
  finish_soft_argmax(S, Sx, Sy, m, b, smem, coords, conf, hmax);
}

// The same computation with each thread's elements held in registers between the two passes:
// the ITEMS loads of a thread are independent and issued together (the loop above waits on
// one load per iteration, twice), and the map is read from memory once. Element order and
// accumulation order are those of soft_argmax_fwd_kernel, so results are bitwise equal.
template <typename T, typename acc_t, int ITEMS>
__global__ void soft_argmax_fwd_reg_kernel(const T* __restrict__ in, int HW, int W, acc_t beta,
                                           acc_t* __restrict__ coords, acc_t* __restrict__ conf,
                                           acc_t* __restrict__ hmax) {
  __shared__ acc_t smem[96];
  const int64_t b = blockIdx.x;
  const T* h = in + b * HW;
  acc_t x[ITEMS];
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    x[j] = i < HW ? to_acc(h[i]) : neg_inf<acc_t>();
  }
  acc_t m = neg_inf<acc_t>();
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) m = better_max(x[j], m) ? x[j] : m;
  m = block_max_nan(m, smem);
  acc_t S = 0, Sx = 0, Sy = 0;
  int u = threadIdx.x % W, v = threadIdx.x / W;
  const int du = blockDim.x % W, dv = blockDim.x / W;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    if (threadIdx.x + j * blockDim.x < HW) {
      const acc_t e = exp_acc(beta * (x[j] - m));
      S += e;
      Sx += e * static_cast<acc_t>(u);
      Sy += e * static_cast<acc_t>(v);
    }
    u += du;
    v += dv;
    if (u >= W) {
      u -= W;
      ++v;
    }
  }
  finish_soft_argmax(S, Sx, Sy, m, b, smem, coords, conf, hmax);
}

// 16-byte vector loads, per-vector (column, row) bookkeeping: see soft_argmax_vec.cuh.
// fp32/fp16/bf16 only; one block of kVecBlock threads per map, ITEMS vectors per thread.
constexpr int kVecBlock = 256;

template <typename T, int ITEMS>
__global__ void __launch_bounds__(kVecBlock)
    soft_argmax_fwd_vec_kernel(const T* __restrict__ in, int HW, int W, float beta, float* __restrict__ coords,
                               float* __restrict__ conf, float* __restrict__ hmax) {
  __shared__ float smem[96];
  const int64_t b = blockIdx.x;
  const int nvec = HW / VecTraits<T>::kElems;
  float x[ITEMS][VecTraits<T>::kElems];
  float m = vec_load_max<T, ITEMS>(in + b * HW, nvec, threadIdx.x, kVecBlock, x);
  m = block_max_nan(m, smem);
  float S = 0.f, Sx = 0.f, Sy = 0.f;
  vec_partial_sums<T, ITEMS>(x, nvec, threadIdx.x, kVecBlock, W, m, beta, S, Sx, Sy);
  finish_soft_argmax(S, Sx, Sy, m, b, smem, coords, conf, hmax);
}

template <typename T, typename acc_t>
__global__ void soft_argmax_bwd_kernel(const acc_t* __restrict__ grad_coords, const T* __restrict__ in,
                                       const acc_t* __restrict__ coords, const acc_t* __restrict__ conf,
                                       const acc_t* __restrict__ hmax, int HW, int W, acc_t beta,
                                       T* __restrict__ grad_in) {
  const int64_t b = blockIdx.x;
  const T* h = in + b * HW;
  T* g = grad_in + b * HW;
  const acc_t gx = grad_coords[2 * b], gy = grad_coords[2 * b + 1];
  const acc_t x = coords[2 * b], y = coords[2 * b + 1], c = conf[b], m = hmax[b];
  int u = threadIdx.x % W, v = threadIdx.x / W;
  const int du = blockDim.x % W, dv = blockDim.x / W;
  for (int i = threadIdx.x; i < HW; i += blockDim.x) {
    const acc_t p = exp_acc(beta * (to_acc(h[i]) - m)) * c;
    const acc_t r = beta * p * (gx * (static_cast<acc_t>(u) - x) + gy * (static_cast<acc_t>(v) - y));
    if constexpr (sizeof(acc_t) == sizeof(T) && sizeof(T) == 8) {
      g[i] = r;
    } else {
      g[i] = from_float<T>(static_cast<float>(r));
    }
    u += du;
    v += dv;
    if (u >= W) {
      u -= W;
      ++v;
    }
  }
}

struct BlurKernel {
  float g[kMaxBlurKernel + 1];
};

template <typename T, typename acc_t>
__global__ void decode_heatmaps_kernel(const T* __restrict__ in, int H, int W, int method, BlurKernel bk, int ksize,
                                       acc_t* __restrict__ coords, acc_t* __restrict__ maxvals) {
  __shared__ acc_t sval[32];
  __shared__ int sidx[32];
  __shared__ float sblur[kDarkTaps];
  __shared__ int s_state[4];  // px, py, refine?, rescale?
  __shared__ float s_maxval;
  __shared__ float s_red[33];
  const int HW = H * W;
  const int64_t b = blockIdx.x;
  const T* h = in + b * HW;
  // Argmax, first index among equal maxima (numpy), NaN wins (numpy argmax returns the first NaN).
  acc_t best = neg_inf<acc_t>();
  int bidx = INT32_MAX;
  for (int i = threadIdx.x; i < HW; i += blockDim.x) {
    const acc_t v = to_acc(h[i]);
    if (bidx == INT32_MAX || better_max(v, best)) {
      best = v;
      bidx = i;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  auto combine = [](acc_t& bv, int& bi, acc_t v, int i) {
    if (i == INT32_MAX) return;
    const bool tie = (v == bv) || (dp_isnan(v) && dp_isnan(bv));
    if (bi == INT32_MAX || better_max(v, bv) || (tie && i < bi)) {
      bv = v;
      bi = i;
    }
  };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t v = __shfl_xor_sync(kFullMask, best, o);
    const int i = __shfl_xor_sync(kFullMask, bidx, o);
    combine(best, bidx, v, i);
  }
  if (lane == 0) {
    sval[warp] = best;
    sidx[warp] = bidx;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < nwarps ? sval[lane] : neg_inf<acc_t>();
    bidx = lane < nwarps ? sidx[lane] : INT32_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const acc_t v = __shfl_xor_sync(kFullMask, best, o);
      const int i = __shfl_xor_sync(kFullMask, bidx, o);
      combine(best, bidx, v, i);
    }
    if (lane == 0) {
      const int px = bidx % W, py = bidx / W;
      const bool found = best > acc_t(0);  // mmpose: (-1, -1) when the maximum is <= 0 or NaN
      maxvals[b] = best;
      s_maxval = static_cast<float>(best);
      s_state[0] = px;
      s_state[1] = py;
      s_state[2] = found && method == 1 && dark_applies(H, W, px, py);
      if (!found) {
        coords[2 * b] = acc_t(-1);
        coords[2 * b + 1] = acc_t(-1);
      } else if (method == 0) {
        acc_t x = px, y = py;
        quarter_shift([h](long long j) { return to_acc(h[j]); }, H, W, px, py, x, y);  // float64 maps: double
        coords[2 * b] = x;
        coords[2 * b + 1] = y;
      } else if (!s_state[2]) {
        coords[2 * b] = acc_t(px);
        coords[2 * b + 1] = acc_t(py);
      }
    }
  }
  __syncthreads();
  if (!s_state[2]) return;  // block-uniform
  const int px = s_state[0], py = s_state[1];
  const auto load = [h](long long j) { return static_cast<float>(to_acc(h[j])); };
  if (threadIdx.x < kDarkTaps) {
    const int t = threadIdx.x;
    sblur[t] = blur_at(load, H, W, px + dark_tap_dx(t), py + dark_tap_dy(t), bk.g, ksize);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    bool rescale = false;
    for (int t = 0; t < kDarkTaps; ++t) rescale |= sblur[t] <= kDarkRescaleBelow;
    s_state[3] = rescale;
  }
  __syncthreads();
  if (s_state[3]) {  // block-uniform; rare: the clamp bites (see kDarkRescaleBelow)
    float m = neg_inf<float>();
    for (int i = threadIdx.x; i < HW; i += blockDim.x) {
      const float v = blur_at(load, H, W, i % W, i / W, bk.g, ksize);
      if (better_max(v, m)) m = v;
    }
    m = block_max_nan(m, s_red);  // NaN propagates (np.max)
    if (threadIdx.x == 0)
      for (int t = 0; t < kDarkTaps; ++t) sblur[t] *= s_maxval / m;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    acc_t x = px, y = py;
    dark_taylor(sblur, x, y);
    coords[2 * b] = x;
    coords[2 * b + 1] = y;
  }
}

int threads_for(int64_t hw) { return hw >= 2048 ? 256 : (hw >= 512 ? 128 : 64); }

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{}, float{});
      break;
    case DType::kFloat16:
      f(__half{}, float{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{}, float{});
      break;
    case DType::kFloat64:
      f(double{}, double{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

// On by default (measured on an H100, 2026-11-26: 22.0 us against 41.9 us for the scalar
// kernel at N=256, 17x64x48 fp32). The off values are distilpose_kernels._utils.env_switch's:
// 0/false/no/off, any case, surrounding spaces ignored; unset or anything else leaves it on.
bool vec_kernel_requested() {
  const char* v = std::getenv("DISTILPOSE_SOFTARGMAX_VEC");
  if (v == nullptr) return true;
  std::string s(v);
  const auto first = s.find_first_not_of(" \t");
  if (first == std::string::npos) return true;
  s = s.substr(first, s.find_last_not_of(" \t") - first + 1);
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return !(s == "0" || s == "false" || s == "no" || s == "off");
}

// The vectorised forward, unless switched off (DISTILPOSE_SOFTARGMAX_VEC=0), where its
// preconditions hold; returns false to fall back to the scalar kernels.
template <typename T>
bool launch_soft_argmax_fwd_vec(const T* src, int64_t nk, int64_t H, int64_t W, double beta, float* c, float* conf,
                                float* mx, cudaStream_t stream) {
  constexpr int V = VecTraits<T>::kElems;
  const int64_t hw = H * W;
  if (!vec_kernel_requested() || W % V != 0 || hw >= (int64_t{1} << 24) ||
      reinterpret_cast<std::uintptr_t>(src) % 16 != 0) {
    return false;
  }
  const int64_t items = (hw / V + kVecBlock - 1) / kVecBlock;
  const auto grid = static_cast<unsigned>(nk);
  const int ihw = static_cast<int>(hw), iw = static_cast<int>(W);
  const float b = static_cast<float>(beta);
  if (items <= 1) {
    soft_argmax_fwd_vec_kernel<T, 1><<<grid, kVecBlock, 0, stream>>>(src, ihw, iw, b, c, conf, mx);
  } else if (items <= 2) {
    soft_argmax_fwd_vec_kernel<T, 2><<<grid, kVecBlock, 0, stream>>>(src, ihw, iw, b, c, conf, mx);
  } else if (items <= 4) {
    soft_argmax_fwd_vec_kernel<T, 4><<<grid, kVecBlock, 0, stream>>>(src, ihw, iw, b, c, conf, mx);
  } else if (items <= 8) {
    soft_argmax_fwd_vec_kernel<T, 8><<<grid, kVecBlock, 0, stream>>>(src, ihw, iw, b, c, conf, mx);
  } else {
    return false;  // large maps: the streaming kernel
  }
  return true;
}

cudaError_t launch_soft_argmax_fwd(DType dtype, const void* heatmaps, int64_t nk, int64_t H, int64_t W, double beta,
                                   void* coords, void* confidence, void* hmax, cudaStream_t stream) {
  if (nk == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    const int threads = threads_for(H * W);
    const int items = static_cast<int>((H * W + threads - 1) / threads);
    const auto grid = static_cast<unsigned>(nk);
    const auto* src = static_cast<const T*>(heatmaps);
    const int hw = static_cast<int>(H * W), w = static_cast<int>(W);
    auto* c = static_cast<A*>(coords);
    auto* conf = static_cast<A*>(confidence);
    auto* mx = static_cast<A*>(hmax);
    if constexpr (!std::is_same_v<T, double>) {
      if (launch_soft_argmax_fwd_vec<T>(src, nk, H, W, beta, c, conf, mx, stream)) return;
    }
    if (items <= 4) {
      soft_argmax_fwd_reg_kernel<T, A, 4><<<grid, threads, 0, stream>>>(src, hw, w, static_cast<A>(beta), c, conf, mx);
    } else if (items <= 8) {
      soft_argmax_fwd_reg_kernel<T, A, 8><<<grid, threads, 0, stream>>>(src, hw, w, static_cast<A>(beta), c, conf, mx);
    } else if (items <= 16) {
      soft_argmax_fwd_reg_kernel<T, A, 16><<<grid, threads, 0, stream>>>(src, hw, w, static_cast<A>(beta), c, conf, mx);
    } else if (items <= 32) {
      soft_argmax_fwd_reg_kernel<T, A, 32><<<grid, threads, 0, stream>>>(src, hw, w, static_cast<A>(beta), c, conf, mx);
    } else {  // large maps: the streaming two-pass loop (the second pass reads from L2)
      soft_argmax_fwd_kernel<T, A><<<grid, threads, 0, stream>>>(src, hw, w, static_cast<A>(beta), c, conf, mx);
    }
  });
}

cudaError_t launch_soft_argmax_bwd(DType dtype, const void* grad_coords, const void* heatmaps, const void* coords,
                                   const void* confidence, const void* hmax, int64_t nk, int64_t H, int64_t W,
                                   double beta, void* grad_heatmaps, cudaStream_t stream) {
  if (nk == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    soft_argmax_bwd_kernel<T, A><<<static_cast<unsigned>(nk), threads_for(H * W), 0, stream>>>(
        static_cast<const A*>(grad_coords), static_cast<const T*>(heatmaps), static_cast<const A*>(coords),
        static_cast<const A*>(confidence), static_cast<const A*>(hmax), static_cast<int>(H * W), static_cast<int>(W),
        static_cast<A>(beta), static_cast<T*>(grad_heatmaps));
  });
}

cudaError_t launch_decode_heatmaps(DType dtype, const void* heatmaps, int64_t nk, int64_t H, int64_t W, int method,
                                   const float* blur_kernel, int ksize, void* coords, void* maxvals,
                                   cudaStream_t stream) {
  if (nk == 0) return cudaSuccess;
  if (ksize < 1 || ksize > kMaxBlurKernel) return cudaErrorInvalidValue;
  BlurKernel bk{};
  for (int i = 0; i < ksize; ++i) bk.g[i] = blur_kernel[i];
  return dispatch(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    decode_heatmaps_kernel<T, A><<<static_cast<unsigned>(nk), 128, 0, stream>>>(
        static_cast<const T*>(heatmaps), static_cast<int>(H), static_cast<int>(W), method, bk, ksize,
        static_cast<A*>(coords), static_cast<A*>(maxvals));
  });
}

}  // namespace cuda
}  // namespace distilpose
