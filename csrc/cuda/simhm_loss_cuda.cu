// CUDA kernels of the simulated-heatmap loss (distilpose::simhm_loss_ext_fwd / _bwd).
//
// forward:  simhm_loss_fwd_kernel    one block per teacher map: 16-byte vector loads (4 fp32
//                                    or 8 fp16/bf16 pixels; scalar loads when W is not a
//                                    multiple of that or the maps are misaligned), up to
//                                    kItems vectors in flight per thread, one exp2 per pixel,
//                                    five block-reduced sums -> the map's 8 statistics
//           simhm_loss_fwd_persistent_kernel / simhm_loss_fwd_pipelined_kernel: the same per-map
//                                    math with the maps' loads kept in flight across maps
//                                    (fwd_kernel 1 / 2; Python times the three once per shape)
//           simhm_loss_finalize_kernel one block: per-joint sums over the batch (fixed order,
//                                    deterministic) -> wk (K,) and the two losses
// backward: simhm_loss_bwd_kernel    elementwise over N*K from the statistics
// Torch-free (CUDA runtime + shared headers), like decode_cuda.cu: nvcc compiles it quickly and
// the tensors are checked in simhm_loss_cuda_ops.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "../simhm_math.h"
#include "simhm_loss_cuda.h"
#include "soft_argmax_vec.cuh"  // VecTraits, vec_load, vec_widen, vec_exp2

namespace distilpose {
namespace cuda {
namespace {

constexpr int kItems = 4;           // vectors per thread per pass (loads issued before any math)
constexpr int kMaxThreads = 256;    // forward block size cap
constexpr int kFinalizeThreads = 1024;
constexpr int kFinalizeUnroll = 4;     // samples per finalize thread whose loads are in flight together
constexpr float kLog2e = 1.4426950408889634f;

// Programmatic dependent launch (sm_90+), every kernel's first step: wait until the previous
// kernel in the stream has completed and its writes are visible (returns at once when this grid
// was not launched with PDL), then let the next kernel, if launched with PDL, be scheduled (its
// blocks wait here in turn, so starting early only hides its launch).
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launch facts of this file's kernels, queried once per device and kernel: the CUDA queries
// behind them cost microseconds each, and an eager call of the loss is host-bound. Never
// destroyed (a launch from another thread during static destruction stays safe).
struct LaunchFacts {
  std::mutex mu;
  std::map<std::pair<int, const void*>, bool> pdl;                        // pdl_ok
  std::map<std::tuple<int, const void*, int, size_t>, int64_t> resident;  // (dev, kernel, threads, smem)
  std::map<std::pair<int, const void*>, std::pair<int, size_t>> smem;     // (optin max, static bytes)
  std::map<std::pair<int, const void*>, size_t> dyn_max;                  // dynamic smem opted in so far
};

LaunchFacts& launch_facts() {
  static LaunchFacts* facts = new LaunchFacts;
  return *facts;
}

// Whether `kernel` may be launched with programmatic dependent launch on the current device: a
// device of compute capability 9.0+ running code compiled for a 9.0+ virtual architecture. (Code
// JIT-compiled from older PTX, e.g. a "8.0+PTX" build on an H100, has no griddepcontrol.wait: it
// could read its predecessor's outputs before they are written.) `refused` records a launch the
// runtime refused, so later launches go plain at once.
bool pdl_ok(const void* kernel, bool refused = false) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();  // clear it: PDL is an option, not a reason to fail the launch
    return false;
  }
  LaunchFacts& f = launch_facts();
  const std::lock_guard<std::mutex> lock(f.mu);
  const auto key = std::make_pair(dev, kernel);
  if (refused) return f.pdl[key] = false;
  const auto it = f.pdl.find(key);
  if (it != f.pdl.end()) return it->second;
  int major = 0;
  cudaFuncAttributes attr;
  const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                  cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && major >= 9 && attr.ptxVersion >= 90;
  if (!ok) cudaGetLastError();
  f.pdl[key] = ok;
  return ok;
}

// kernel<<<grid, block, smem, stream>>>(args...); with pdl where pdl_ok, with programmatic stream
// serialization (the kernel may be scheduled before its predecessor ends). A launch the runtime
// refuses with the attribute (an older driver) is retried without it, except during a CUDA-graph
// capture, which the refusal has already invalidated (the error is returned).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool pdl, Args&&... args) {
#if CUDART_VERSION >= 11080
  if (pdl && pdl_ok(reinterpret_cast<const void*>(kernel))) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
    if (err != cudaErrorNotSupported && err != cudaErrorInvalidValue) return err;
    pdl_ok(reinterpret_cast<const void*>(kernel), /*refused=*/true);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) return err;
    cudaGetLastError();  // refused outside a capture: the plain launch below
  }
#endif
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

template <typename T>
__device__ __forceinline__ float load1(const T* p, int i) {
  return vec_widen(p[i]);
}

// Block-wide sum of NV values per thread (deterministic: fixed shuffle tree, then warp 0).
// Preconditions: blockDim.x a multiple of 32 and every thread of the block calls it (full-mask
// shuffles and a __syncthreads); every launch below meets them (fwd_threads rounds up to warps).
template <int NV>
__device__ __forceinline__ void block_sum(float (&v)[NV], float (*smem)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) smem[i][warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float s = lane < nwarps ? smem[i][lane] : 0.f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      v[i] = s;
    }
  }
}

// kItems vectors of V pixels per thread, starting at vector j0 (stride blockDim.x), into x.
template <typename T, int V>
__device__ __forceinline__ void load_vectors(const T* __restrict__ map, int j0, int nvec, float (&x)[kItems][V]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int j = j0 + k * blockDim.x;
    if (j < nvec) {
      if constexpr (V == 1) {
        x[k][0] = load1<T>(map, j);
      } else {
        vec_load<T>(map, j, x[k]);
      }
    }
  }
}

// Adds one vector of V teacher pixels x, at (row, col .. col + V - 1), to the five sums S, X1,
// X2, Y1, Y2 (one exp2 per pixel): the per-map math of every forward kernel.
template <int V>
__device__ __forceinline__ void accumulate_vector(const SimHMMap& m, float kx, float ky, int row, int col,
                                                  const float (&x)[V], float (&acc)[5]) {
  const float dy = static_cast<float>(row) - m.muy;
  const float ey = ky * dy * dy;
  float q_row = 0.f;
#pragma unroll
  for (int c = 0; c < V; ++c) {
    const float dx = static_cast<float>(col + c) - m.mux;
    const float g = vec_exp2(fmaf(kx * dx, dx, ey)) * m.in_grid;
    const float r = g - x[c];
    acc[0] = fmaf(r, r, acc[0]);
    const float q = r * g;
    const float qd = q * dx;
    acc[1] += qd;
    acc[2] = fmaf(qd, dx, acc[2]);
    q_row += q;
  }
  acc[3] = fmaf(q_row, dy, acc[3]);
  acc[4] = fmaf(q_row * dy, dy, acc[4]);
}

// Adds the vectors loaded by load_vectors(j0) to the five sums S, X1, X2, Y1, Y2.
template <int V>
__device__ __forceinline__ void accumulate_vectors(const SimHMMap& m, float kx, float ky, int j0, int nvec, int W,
                                                   const float (&x)[kItems][V], float (&acc)[5]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int j = j0 + k * blockDim.x;
    if (j < nvec) {
      const int e0 = j * V;
      const int row = e0 / W, col = e0 - row * W;  // V divides W: the vector is in one row
      accumulate_vector<V>(m, kx, ky, row, col, x[k], acc);
    }
  }
}

// The prediction of map i: cx, cy, sx, sy, keypoint weight, score (int64 offsets: N*K may
// reach 2^31 - 1, and 2i must not wrap).
__device__ __forceinline__ void load_prediction(const float* __restrict__ coords, const float* __restrict__ sigma,
                                                const float* __restrict__ score, const float* __restrict__ kw,
                                                int64_t i, float (&p)[6]) {
  p[0] = coords[2 * i], p[1] = coords[2 * i + 1], p[2] = sigma[2 * i], p[3] = sigma[2 * i + 1], p[4] = kw[i];
  p[5] = score[i];
}

// A map's five per-thread sums reduced over the block (``smem``: block_sum's scratch), then its
// statistics stored by thread 0 as column ``i`` of stats (kSimHMNumStats, NK).
__device__ __forceinline__ void store_map_stats(const SimHMMap& m, float (&acc)[5], float tv, int H, int W, int NK,
                                                int64_t i, float (*smem)[32], float* __restrict__ stats) {
  block_sum<5>(acc, smem);
  if (threadIdx.x == 0) {
    float out[kSimHMNumStats];
    simhm_map_stats(m, acc[0], acc[1], acc[3], acc[2], acc[4], tv, H, W, out);
#pragma unroll
    for (int s = 0; s < kSimHMNumStats; ++s) stats[static_cast<int64_t>(s) * NK + i] = out[s];
  }
}

// V pixels per vector (V == VecTraits<T>::kElems: 16-byte loads; V == 1: scalar loads).
template <typename T, int V>
__global__ void __launch_bounds__(kMaxThreads) simhm_loss_fwd_kernel(const float* __restrict__ coords,
                                                                      const float* __restrict__ sigma,
                                                                      const float* __restrict__ score,
                                                                      const float* __restrict__ kw,
                                                                      const T* __restrict__ teacher,
                                                                      float* __restrict__ stats, int NK, int H, int W) {
  pdl_enter();
  __shared__ float smem[5][32];
  const int i = blockIdx.x;
  const int HW = H * W, nvec = HW / V;
  const T* map = teacher + static_cast<int64_t>(i) * HW;
  // The first pass's teacher vectors are requested before the prediction is read: their
  // latency then overlaps the prediction's loads and the math that depends on them. (Written
  // after them, the compiler issued the map's loads only once the prediction had arrived: two
  // memory round trips per map, one after the other.)
  float x[kItems][V];
  load_vectors<T, V>(map, threadIdx.x, nvec, x);
  float p[6];
  load_prediction(coords, sigma, score, kw, i, p);
  const SimHMMap m = simhm_map(p[0], p[1], p[2], p[3], p[4], p[5], H, W);
  // g = in_grid * 2^(kx dx^2 + ky dy^2), the Gaussian of the spec with exp -> exp2
  const float kx = -0.5f * kLog2e * m.inv_ax, ky = -0.5f * kLog2e * m.inv_ay;
  // the score target, loaded by the thread that stores the statistics: its latency overlaps
  // the map's math instead of following the block reduction
  float tv = 0.f;
  if (threadIdx.x == 0) {
    const int64_t p = simhm_score_pixel(m, H, W);
    if (p >= 0) tv = load1<T>(map, static_cast<int>(p));
  }
  float acc[5] = {0.f, 0.f, 0.f, 0.f, 0.f};  // S, X1, X2, Y1, Y2
  const int step = blockDim.x * kItems;
  for (int j0 = threadIdx.x; j0 < nvec; j0 += step) {
    if (j0 != static_cast<int>(threadIdx.x)) load_vectors<T, V>(map, j0, nvec, x);
    accumulate_vectors<V>(m, kx, ky, j0, nvec, W, x, acc);
  }
  store_map_stats(m, acc, tv, H, W, NK, i, smem, stats);
}

// The persistent form of the forward, for maps read in one pass (H*W <= blockDim * kItems * V):
// gridDim blocks (as many as fit on the device at once) walk the maps i = blockIdx.x, + gridDim.x,
// ... and request map i + gridDim.x's pixels and prediction before the math and the block
// reduction of map i, so every block keeps a map's loads in flight while it computes. (The
// one-block-per-map kernel above issues its loads, then computes, then reduces: a block's memory
// requests stop during its math and its reduction, and a whole wave of blocks starts in step.)
// Per map the same arithmetic in the same order as simhm_loss_fwd_kernel (equal statistics up to
// the compiler's FMA contraction in each kernel; deterministic).
// Opt-in (DISTILPOSE_SIMHM_FWD=persistent) until a GPU run measures it.
template <typename T, int V>
__global__ void __launch_bounds__(kMaxThreads) simhm_loss_fwd_persistent_kernel(
    const float* __restrict__ coords, const float* __restrict__ sigma, const float* __restrict__ score,
    const float* __restrict__ kw, const T* __restrict__ teacher, float* __restrict__ stats, int NK, int H, int W) {
  pdl_enter();
  __shared__ float smem[2][5][32];  // alternate per map: one barrier per map suffices
  const int HW = H * W, nvec = HW / V;
  float x[kItems][V], xn[kItems][V];
  float p[6], pn[6];  // cx, cy, sx, sy, kw, score of the current / next map
  int64_t i = blockIdx.x;  // int64: i + gridDim.x must not wrap when N*K is near 2^31
  if (i >= NK) return;       // the whole block: the grid never exceeds the maps anyway
  load_vectors<T, V>(teacher + i * HW, threadIdx.x, nvec, x);
  load_prediction(coords, sigma, score, kw, i, p);
  for (int it = 0; i < NK; i += gridDim.x, ++it) {
    const int64_t inext = i + gridDim.x;
    if (inext < NK) {  // the next map's requests go out before this map's math
      load_vectors<T, V>(teacher + inext * HW, threadIdx.x, nvec, xn);
      load_prediction(coords, sigma, score, kw, inext, pn);
    }
    const T* map = teacher + i * HW;
    const SimHMMap m = simhm_map(p[0], p[1], p[2], p[3], p[4], p[5], H, W);
    const float kx = -0.5f * kLog2e * m.inv_ax, ky = -0.5f * kLog2e * m.inv_ay;
    float tv = 0.f;
    if (threadIdx.x == 0) {
      const int64_t px = simhm_score_pixel(m, H, W);
      if (px >= 0) tv = load1<T>(map, static_cast<int>(px));
    }
    float acc[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
    accumulate_vectors<V>(m, kx, ky, threadIdx.x, nvec, W, x, acc);
    store_map_stats(m, acc, tv, H, W, NK, i, smem[it & 1], stats);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
#pragma unroll
      for (int c = 0; c < V; ++c) x[k][c] = xn[k][c];
    }
#pragma unroll
    for (int q = 0; q < 6; ++q) p[q] = pn[q];
  }
}

constexpr int kPipeStages = 3;     // maps per block in shared memory: this one and two in flight
constexpr int kPipeThreads = 256;

// Requests this block's share of map `src` (nvec 16-byte vectors) into shared memory `dst`
// (asynchronous copies: cp.async on sm_80+, plain copies before that).
__device__ __forceinline__ void stage_map_async(uint4* dst, const uint4* __restrict__ src, int nvec) {
  for (int j = threadIdx.x; j < nvec; j += blockDim.x) __pipeline_memcpy_async(dst + j, src + j, sizeof(uint4));
}

// The pipelined form of the forward (fwd_kernel 2). Each block takes a contiguous range of maps
// (ranges differ by at most one map) and keeps kPipeStages - 1 maps ahead of the one it computes
// in flight as asynchronous copies into shared memory: the memory system always has about
// (kPipeStages - 1) * 12 KB (fp32 64 x 48) per block requested, whatever the math and the
// block reduction take, and no registers hold them. Per map the arithmetic of
// simhm_loss_fwd_kernel (one exp2 per pixel, the same five sums); only the split of the pixels
// among the threads differs (equal statistics up to fp32 summation order; deterministic).
// Needs 16-byte vectors (W % V == 0, a 16-byte aligned teacher).
template <typename T, int V>
__global__ void __launch_bounds__(kPipeThreads) simhm_loss_fwd_pipelined_kernel(
    const float* __restrict__ coords, const float* __restrict__ sigma, const float* __restrict__ score,
    const float* __restrict__ kw, const T* __restrict__ teacher, float* __restrict__ stats, int NK, int H, int W) {
  pdl_enter();
  extern __shared__ uint4 pipe_stage[];  // kPipeStages maps of nvec vectors each
  __shared__ float red[5][32];
  const int HW = H * W, nvec = HW / V;
  const int nblocks = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  const int per = NK / nblocks, rem = NK % nblocks;
  const int begin = b * per + (b < rem ? b : rem);
  const int count = per + (b < rem ? 1 : 0);
  const uint4* src = reinterpret_cast<const uint4*>(teacher);  // map i: vectors [i * nvec, (i + 1) * nvec)
#pragma unroll
  for (int s = 0; s < kPipeStages - 1; ++s) {
    if (s < count) stage_map_async(pipe_stage + s * nvec, src + static_cast<int64_t>(begin + s) * nvec, nvec);
    __pipeline_commit();  // one group per map, empty ones included: wait_prior counts groups
  }
  float p[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (count > 0) load_prediction(coords, sigma, score, kw, begin, p);
  // a thread's vectors j = t, t + blockDim, ...: their first pixel's row and column, and the step
  const int e0 = static_cast<int>(threadIdx.x) * V;
  const int row0 = e0 / W, col0 = e0 - row0 * W;
  const int step = static_cast<int>(blockDim.x) * V, drow = step / W, dcol = step - drow * W;
  for (int it = 0; it < count; ++it) {
    const int i = begin + it;
    const int ahead = it + kPipeStages - 1;
    if (ahead < count)
      stage_map_async(pipe_stage + (ahead % kPipeStages) * nvec, src + static_cast<int64_t>(begin + ahead) * nvec,
                      nvec);
    __pipeline_commit();
    float pn[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (it + 1 < count) load_prediction(coords, sigma, score, kw, i + 1, pn);  // arrives during this map
    __pipeline_wait_prior(kPipeStages - 1);  // this thread's copies of map `it` have landed
    __syncthreads();                         // ... and every other thread's
    const uint4* cur = pipe_stage + (it % kPipeStages) * nvec;
    const SimHMMap m = simhm_map(p[0], p[1], p[2], p[3], p[4], p[5], H, W);
    const float kx = -0.5f * kLog2e * m.inv_ax, ky = -0.5f * kLog2e * m.inv_ay;
    float tv = 0.f;
    if (threadIdx.x == 0) {
      const int64_t px = simhm_score_pixel(m, H, W);
      if (px >= 0) tv = vec_widen(reinterpret_cast<const T*>(cur)[px]);
    }
    float acc[5] = {0.f, 0.f, 0.f, 0.f, 0.f};  // S, X1, X2, Y1, Y2
    int row = row0, col = col0;
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
      T tmp[V];
      *reinterpret_cast<uint4*>(tmp) = cur[j];
      float x[V];
#pragma unroll
      for (int c = 0; c < V; ++c) x[c] = vec_widen(tmp[c]);
      accumulate_vector<V>(m, kx, ky, row, col, x, acc);
      col += dcol;
      row += drow;
      if (col >= W) {
        col -= W;
        ++row;
      }
    }
    // the block reduction's barrier also orders this map's reads of `cur` before the next copies into it
    store_map_stats(m, acc, tv, H, W, NK, i, red, stats);
#pragma unroll
    for (int q = 0; q < 6; ++q) p[q] = pn[q];
  }
  __pipeline_wait_prior(0);  // no copy outlives the block (only empty groups are left by now)
}

// One block. Joints in chunks of kc <= blockDim; each thread owns (joint k0 + t % kc, slice
// t / kc) and sums its slice of the batch; slices are then added in a fixed order.
__global__ void __launch_bounds__(kFinalizeThreads) simhm_loss_finalize_kernel(const float* __restrict__ stats, int N,
                                                                               int K, int HW, bool released,
                                                                               float* __restrict__ wk,
                                                                               float* __restrict__ reg,
                                                                               float* __restrict__ sl) {
  pdl_enter();
  __shared__ float part[3][kFinalizeThreads];
  __shared__ float red[2][32];
  const int64_t NK = static_cast<int64_t>(N) * K;
  const int t = threadIdx.x;
  const float Nf = static_cast<float>(N), Kf = static_cast<float>(K), HWf = static_cast<float>(HW);
  const int kc = K < static_cast<int>(blockDim.x) ? K : static_cast<int>(blockDim.x);
  const int slices = blockDim.x / kc;
  float reg_acc = 0.f, err_acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += kc) {
    const int kk = t % kc, slice = t / kc, k = k0 + kk;
    float w2 = 0.f, s = 0.f, e = 0.f;
    if (slice < slices && k < K) {
      // kFinalizeUnroll samples' loads are issued before their sums (a loop of one load round
      // trip per sample took most of this kernel's time); the sums keep the order n = slice,
      // slice + slices, ...
      for (int n0 = slice; n0 < N; n0 += kFinalizeUnroll * slices) {
        float wv[kFinalizeUnroll], sv[kFinalizeUnroll], ev[kFinalizeUnroll];
#pragma unroll
        for (int u = 0; u < kFinalizeUnroll; ++u) {
          const int n = n0 + u * slices;
          const int64_t idx = static_cast<int64_t>(n < N ? n : 0) * K + k;
          wv[u] = stats[kStWreg * NK + idx];
          sv[u] = stats[kStS * NK + idx];
          ev[u] = stats[kStErr * NK + idx];
        }
#pragma unroll
        for (int u = 0; u < kFinalizeUnroll; ++u) {
          if (n0 + u * slices < N) {
            w2 = fmaf(wv[u], wv[u], w2);
            s += released ? sv[u] : wv[u] * wv[u] * sv[u];
            e += fabsf(ev[u]);
          }
        }
      }
    }
    part[0][t] = w2;
    part[1][t] = s;
    part[2][t] = e;
    __syncthreads();
    if (t < kc && k < K) {
      float W2 = 0.f, S = 0.f, E = 0.f;
      for (int sl_i = 0; sl_i < slices; ++sl_i) {
        W2 += part[0][sl_i * kc + t];
        S += part[1][sl_i * kc + t];
        E += part[2][sl_i * kc + t];
      }
      wk[k] = W2;
      reg_acc += released ? (W2 / Nf) * (S / (Nf * HWf)) : S;
      err_acc += E;
    }
    __syncthreads();
  }
  float v[2] = {reg_acc, err_acc};
  block_sum<2>(v, red);
  if (t == 0) {
    *reg = released ? v[0] / Kf : v[0] / (Nf * Kf * HWf);
    *sl = v[1] / (Nf * Kf);
  }
}

__global__ void simhm_loss_bwd_kernel(const float* __restrict__ stats, const float* __restrict__ wk,
                                      const float* __restrict__ grad_reg, const float* __restrict__ grad_score, int N,
                                      int K, int HW, bool released, float* __restrict__ gcoords,
                                      float* __restrict__ gsigma, float* __restrict__ gscore) {
  pdl_enter();
  const int64_t NK = static_cast<int64_t>(N) * K;
  const float gr = *grad_reg, gs = *grad_score;
  const float Nf = static_cast<float>(N), Kf = static_cast<float>(K), HWf = static_cast<float>(HW);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < NK;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g[5];
    simhm_element_grads(stats, NK, i, wk[i % K], gr, gs, released, Nf, Kf, HWf, g);
    reinterpret_cast<float2*>(gcoords)[i] = make_float2(g[0], g[1]);
    reinterpret_cast<float2*>(gsigma)[i] = make_float2(g[2], g[3]);
    gscore[i] = g[4];
  }
}

int fwd_threads(int nvec) {
  int t = (nvec + kItems - 1) / kItems;
  t = (t + 31) / 32 * 32;
  return t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t);
}

// Blocks of the persistent / pipelined forward: as many as are resident at once on the current
// device (never more than the maps); 0 when not even one block fits (the caller falls back).
template <typename Kernel>
cudaError_t resident_grid(Kernel kernel, int threads, size_t smem, int64_t nk, int* grid) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  LaunchFacts& f = launch_facts();
  const std::lock_guard<std::mutex> lock(f.mu);
  const auto key = std::make_tuple(dev, reinterpret_cast<const void*>(kernel), threads, smem);
  auto it = f.resident.find(key);
  if (it == f.resident.end()) {
    int sms = 0, per_sm = 0;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
    if (err != cudaSuccess) return err;
    it = f.resident.emplace(key, static_cast<int64_t>(sms) * per_sm).first;
  }
  *grid = static_cast<int>(it->second < nk ? it->second : nk);
  return cudaSuccess;
}

// The pipelined kernel's shared memory for maps of hw pixels, or 0 when it does not fit on
// this device (the caller then runs the one-block-per-map kernel).
template <typename T, int V>
size_t pipelined_smem(int hw) {
  const size_t bytes = static_cast<size_t>(kPipeStages) * static_cast<size_t>(hw / V) * 16;
  const void* kernel = reinterpret_cast<const void*>(simhm_loss_fwd_pipelined_kernel<T, V>);
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();  // clear the error: the fallback kernel runs instead
    return 0;
  }
  LaunchFacts& f = launch_facts();
  const std::lock_guard<std::mutex> lock(f.mu);
  const auto key = std::make_pair(dev, kernel);
  auto it = f.smem.find(key);
  if (it == f.smem.end()) {
    int optin = 0;
    cudaFuncAttributes attr;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        cudaFuncGetAttributes(&attr, simhm_loss_fwd_pipelined_kernel<T, V>) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    it = f.smem.emplace(key, std::make_pair(optin, attr.sharedSizeBytes)).first;
  }
  // static (the block reduction's scratch) + dynamic shared memory: beyond 48 KB a block needs
  // the opt-in, and never more than the device's opt-in maximum
  const size_t total = bytes + it->second.second;
  if (total > static_cast<size_t>(it->second.first)) return 0;
  // the opt-in only grows, so every size allowed before stays allowed
  if (total > 48 * 1024 && f.dyn_max[key] < bytes) {
    if (cudaFuncSetAttribute(simhm_loss_fwd_pipelined_kernel<T, V>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    f.dyn_max[key] = bytes;
  }
  return bytes;
}

template <typename T>
cudaError_t launch_fwd_t(const float* coords, const float* sigma, const float* score, const float* kw,
                         const void* teacher, int64_t nk, int64_t H, int64_t W, float* stats, int fwd_kernel,
                         cudaStream_t stream) {
  constexpr int V = VecTraits<T>::kElems;
  const T* tp = static_cast<const T*>(teacher);
  const bool vec = (W % V == 0) && (reinterpret_cast<uintptr_t>(tp) % 16 == 0);
  const int hw = static_cast<int>(H * W);
  // the persistent form holds one pass of a map per thread: maps of at most kMaxThreads * kItems vectors
  if (vec && fwd_kernel == kSimHMFwdPersistent && hw / V <= kMaxThreads * kItems) {
    const int threads = fwd_threads(hw / V);
    int grid = 0;
    if (resident_grid(simhm_loss_fwd_persistent_kernel<T, V>, threads, 0, nk, &grid) != cudaSuccess) {
      cudaGetLastError();  // the query failed: the one-block-per-map kernel below, as for the pipelined one
      grid = 0;
    }
    if (grid > 0) {  // else: the one-block-per-map kernel below
      simhm_loss_fwd_persistent_kernel<T, V><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
          coords, sigma, score, kw, tp, stats, static_cast<int>(nk), static_cast<int>(H), static_cast<int>(W));
      return cudaGetLastError();
    }
  }
  if (vec && fwd_kernel == kSimHMFwdPipelined) {
    const size_t smem = pipelined_smem<T, V>(hw);
    int grid = 0;
    if (smem > 0) {
      if (resident_grid(simhm_loss_fwd_pipelined_kernel<T, V>, kPipeThreads, smem, nk, &grid) != cudaSuccess) {
        cudaGetLastError();  // the query failed: the one-block-per-map kernel below
        grid = 0;
      }
    }
    if (grid > 0) {
      simhm_loss_fwd_pipelined_kernel<T, V><<<static_cast<unsigned>(grid), kPipeThreads, smem, stream>>>(
          coords, sigma, score, kw, tp, stats, static_cast<int>(nk), static_cast<int>(H), static_cast<int>(W));
      return cudaGetLastError();
    }
  }
  if (vec) {
    simhm_loss_fwd_kernel<T, V><<<static_cast<unsigned>(nk), fwd_threads(hw / V), 0, stream>>>(
        coords, sigma, score, kw, tp, stats, static_cast<int>(nk), static_cast<int>(H), static_cast<int>(W));
  } else {
    simhm_loss_fwd_kernel<T, 1><<<static_cast<unsigned>(nk), fwd_threads(hw), 0, stream>>>(
        coords, sigma, score, kw, tp, stats, static_cast<int>(nk), static_cast<int>(H), static_cast<int>(W));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_simhm_loss_fwd(DType teacher_dtype, const float* coords, const float* sigma, const float* score,
                                  const float* kw, const void* teacher, int64_t N, int64_t K, int64_t H, int64_t W,
                                  bool released, int fwd_kernel, bool pdl, float* stats, float* wk, float* reg,
                                  float* sl, cudaStream_t stream) {
  const int64_t nk = N * K;
  cudaError_t err;
  switch (teacher_dtype) {
    case DType::kFloat32:
      err = launch_fwd_t<float>(coords, sigma, score, kw, teacher, nk, H, W, stats, fwd_kernel, stream);
      break;
    case DType::kFloat16:
      err = launch_fwd_t<__half>(coords, sigma, score, kw, teacher, nk, H, W, stats, fwd_kernel, stream);
      break;
    case DType::kBFloat16:
      err = launch_fwd_t<__nv_bfloat16>(coords, sigma, score, kw, teacher, nk, H, W, stats, fwd_kernel, stream);
      break;
    default:
      return cudaErrorInvalidValue;  // float64 teachers are converted by the caller
  }
  if (err != cudaSuccess) return err;
  return launch_kernel(simhm_loss_finalize_kernel, dim3(1), dim3(kFinalizeThreads), 0, stream, pdl,
                       static_cast<const float*>(stats), static_cast<int>(N), static_cast<int>(K),
                       static_cast<int>(H * W), released, wk, reg, sl);
}

cudaError_t launch_simhm_loss_bwd(const float* stats, const float* wk, const float* grad_reg, const float* grad_score,
                                  int64_t N, int64_t K, int64_t hw, bool released, bool pdl, float* gcoords,
                                  float* gsigma, float* gscore, cudaStream_t stream) {
  const int64_t nk = N * K;
  const int threads = 256;
  int64_t blocks = (nk + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  return launch_kernel(simhm_loss_bwd_kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream, pdl,
                       stats, wk, grad_reg, grad_score, static_cast<int>(N), static_cast<int>(K), static_cast<int>(hw),
                       released, gcoords, gsigma, gscore);
}

}  // namespace cuda
}  // namespace distilpose
