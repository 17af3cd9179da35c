// Per-thread work of the vectorised soft-argmax forward (soft_argmax_fwd_vec_kernel).
//
// Why a second forward kernel: the scalar kernels spend ~70 SASS instructions per pixel on
// 4-byte loads, 64-bit address arithmetic and a per-pixel (column, row) update; at N=256 the
// issue slots, not HBM, bound them (about 40 us on an H200 for 53.7 MB). Here a thread loads
// 16-byte vectors (4 fp32 or 8 fp16/bf16 pixels), and the (column, row) bookkeeping and the
// weighted sums are done once per vector:
//     S += s,  Sx += s * u + sum_c c * e_c,  Sy += s * v,   s = sum_c e_c
// for the vector's pixels (u + c, v), c < kElems. Preconditions (checked by the launcher):
// W % kElems == 0 (a vector never straddles two rows), 16-byte aligned maps, H * W < 2^24.
//
// The routines are __host__ __device__ so that tests/native/soft_argmax_vec_host_test.cu can
// run the exact per-thread code on the CPU for every thread of a block and check the
// indexing against a float64 reference without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../decode_math.h"

namespace distilpose {
namespace cuda {

template <typename T>
struct VecTraits {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));  // pixels per 16-byte load
};

DP_HD float vec_widen(float v) { return v; }
DP_HD float vec_widen(__half v) { return __half2float(v); }
DP_HD float vec_widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// 2^v: one MUFU.EX2 on the device (denormal results flush to 0, a contribution below 1e-38 of
// the maximum's); __expf would add a range check and two predicated multiplies per pixel.
DP_HD float vec_exp2(float v) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  return y;
#else
  return std::exp2(v);
#endif
}

// Vector j (16 bytes) of a map, widened to float.
template <typename T>
DP_HD void vec_load(const T* map, int j, float (&out)[VecTraits<T>::kElems]) {
  constexpr int V = VecTraits<T>::kElems;
  T tmp[V];
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(map) + j);
#else
  std::memcpy(tmp, map + static_cast<int64_t>(j) * V, sizeof(tmp));
#endif
#pragma unroll
  for (int c = 0; c < V; ++c) out[c] = vec_widen(tmp[c]);
}

// Thread t of a `block`-thread block loads vectors j = t + k * block (k < ITEMS, j < nvec) into
// x and returns the NaN-propagating maximum of its pixels (-inf when it has none).
template <typename T, int ITEMS>
DP_HD float vec_load_max(const T* map, int nvec, int t, int block, float (&x)[ITEMS][VecTraits<T>::kElems]) {
  constexpr int V = VecTraits<T>::kElems;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int j = t + k * block;
    if (j < nvec) vec_load<T>(map, j, x[k]);
  }
  float m = -INFINITY;
  bool nan = false;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (t + k * block < nvec) {
#pragma unroll
      for (int c = 0; c < V; ++c) {
        m = fmaxf(m, x[k][c]);
        nan = nan || dp_isnan(x[k][c]);
      }
    }
  }
  return nan ? NAN : m;
}

// The thread's partial sums S = sum e, Sx = sum e * column, Sy = sum e * row over the pixels
// vec_load_max gave it, e = exp(beta * (x - m)), m the map's maximum (NaN propagates).
template <typename T, int ITEMS>
DP_HD void vec_partial_sums(const float (&x)[ITEMS][VecTraits<T>::kElems], int nvec, int t, int block, int W,
                            float m, float beta, float& S, float& Sx, float& Sy) {
  constexpr int V = VecTraits<T>::kElems;
  const int e0 = t * V;  // first pixel of vector t
  int row = e0 / W, col = e0 - row * W;
  const int step = block * V;  // pixels between a thread's consecutive vectors
  const int drow = step / W, dcol = step - drow * W;
  const float bl = beta * 1.4426950408889634f;  // exp(beta d) = 2^(beta log2(e) d)
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (t + k * block < nvec) {
      float s = 0.f, w = 0.f;
#pragma unroll
      for (int c = 0; c < V; ++c) {
        const float e = vec_exp2((x[k][c] - m) * bl);
        s += e;
        w += static_cast<float>(c) * e;
      }
      S += s;
      Sx += s * static_cast<float>(col) + w;
      Sy += s * static_cast<float>(row);
    }
    col += dcol;
    row += drow;
    if (col >= W) {
      col -= W;
      ++row;
    }
  }
}

}  // namespace cuda
}  // namespace distilpose
