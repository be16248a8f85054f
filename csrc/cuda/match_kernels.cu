// Fused QAConv matching on the GPU: CUDA headers only (the torch binding is match_cuda.cpp).
//
// Forward: one CTA per (query image, gallery image) pair at a time (grid-stride over pairs, 64-bit).
// The pair's similarity matrix S = q_p g_n^T is produced in 64 x 64 tiles, each accumulated in
// registers over channel chunks staged through shared memory; the tile is then reduced in shared
// memory to per-row and per-column maxima (with argmax), which are merged into the pair's running
// maxima. Only the maxima (match) or one float per pair (score, head folded into the epilogue)
// reach global memory; S never does.
//
// Backward: owner computes. One warp owns one output row (an image's location) and sums, in a fixed
// order, every gradient contribution that reaches it through the argmax indices: deterministic,
// no atomics.
#include "match_kernels.h"

#include "device_api.cuh"

#include <algorithm>
#include <cmath>

namespace qaconv {
namespace cuda {
namespace {

constexpr int kTile = 64;      // S tile: kTile query locations x kTile gallery locations
constexpr int kChunk = 16;     // channels staged per step
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
using plan::kMaxLocations;
constexpr int kWarpsPerBlock = 4;   // backward
constexpr int kChannelsPerPass = 128;  // backward: 4 channels per lane and pass
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Candidates are visited in increasing index order: a later one wins only when it is strictly larger,
// or the first NaN (torch.max semantics: NaN propagates, ties keep the smallest index).
__device__ __forceinline__ bool beats(float candidate, float current) {
  return !isnan(current) && (isnan(candidate) || candidate > current);
}

template <typename T, bool kScore, bool kIndex>
__global__ void __launch_bounds__(kThreads)
    match_pairs_kernel(const T* __restrict__ q, const T* __restrict__ g, T* __restrict__ values,
                       int64_t* __restrict__ indices, const float* __restrict__ weight,
                       const float* __restrict__ bias, float* __restrict__ out, int64_t P, int64_t N, int64_t d,
                       int Lq, int Lg) {
  // [channel][location] chunks of the query and gallery; one padding column, so the fill (16 channels
  // of a location from consecutive threads) hits 16 different banks.
  __shared__ float a_s[kChunk][kTile + 1];
  __shared__ float b_s[kChunk][kTile + 1];
  __shared__ float s_tile[kTile][kTile + 1];
  __shared__ float row_max[kMaxLocations];
  __shared__ float col_max[kMaxLocations];
  __shared__ int row_arg[kIndex ? kMaxLocations : 1];
  __shared__ int col_arg[kIndex ? kMaxLocations : 1];
  __shared__ float warp_sums[kThreads / 32];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int L = Lq + Lg;
  const int64_t pairs = P * N;

  for (int64_t pair = blockIdx.x; pair < pairs; pair += gridDim.x) {
    const int64_t p = pair / N, n = pair % N;
    const T* qp = q + p * Lq * d;
    const T* gn = g + n * Lg * d;

    for (int r0 = 0; r0 < Lq; r0 += kTile) {
      for (int c0 = 0; c0 < Lg; c0 += kTile) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

        for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
          for (int e = tid; e < kTile * kChunk; e += kThreads) {
            const int loc = e / kChunk, k = e % kChunk;
            const int64_t ch = k0 + k;
            a_s[k][loc] = (r0 + loc < Lq && ch < d) ? to_float(qp[(r0 + loc) * d + ch]) : 0.f;
            b_s[k][loc] = (c0 + loc < Lg && ch < d) ? to_float(gn[(c0 + loc) * d + ch]) : 0.f;
          }
          __syncthreads();
#pragma unroll
          for (int k = 0; k < kChunk; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = a_s[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = b_s[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
          }
          __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) s_tile[ty + 16 * i][tx + 16 * j] = acc[i][j];
        __syncthreads();

        // Tile maxima, merged into the pair's running maxima. Row r sees column tiles in increasing
        // order and column c sees row tiles in increasing order, so strict comparisons keep ties first.
        const int rows = min(kTile, Lq - r0), cols = min(kTile, Lg - c0);
        if (tid < kTile) {
          const int r = tid;
          if (r < rows) {
            float best = s_tile[r][0];
            int arg = 0;
            for (int c = 1; c < cols; ++c) {
              const float v = s_tile[r][c];
              if (beats(v, best)) { best = v; arg = c; }
            }
            if (c0 == 0 || beats(best, row_max[r0 + r])) {
              row_max[r0 + r] = best;
              if (kIndex) row_arg[r0 + r] = c0 + arg;
            }
          }
        } else if (tid < 2 * kTile) {
          const int c = tid - kTile;
          if (c < cols) {
            float best = s_tile[0][c];
            int arg = 0;
            for (int r = 1; r < rows; ++r) {
              const float v = s_tile[r][c];
              if (beats(v, best)) { best = v; arg = r; }
            }
            if (r0 == 0 || beats(best, col_max[c0 + c])) {
              col_max[c0 + c] = best;
              if (kIndex) col_arg[c0 + c] = r0 + arg;
            }
          }
        }
        __syncthreads();
      }
    }

    if (kScore) {
      // Folded head: one dot product of the maxima with the weight; a NaN maximum makes the score NaN.
      float partial = 0.f;
      for (int i = tid; i < L; i += kThreads) {
        const float m = i < Lq ? row_max[i] : col_max[i - Lq];
        partial = fmaf(m, weight[i], partial);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) partial += __shfl_xor_sync(kFullMask, partial, offset);
      if (tid % 32 == 0) warp_sums[tid / 32] = partial;
      __syncthreads();
      if (tid == 0) {
        float total = 0.f;
        for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
        out[pair] = total + (bias != nullptr ? *bias : 0.f);
      }
    } else {
      T* vals = values + pair * L;
      for (int i = tid; i < L; i += kThreads) vals[i] = from_float<T>(i < Lq ? row_max[i] : col_max[i - Lq]);
      if (kIndex) {
        int64_t* idx = indices + pair * L;
        for (int i = tid; i < L; i += kThreads) idx[i] = i < Lq ? row_arg[i] : col_arg[i - Lq];
      }
    }
    __syncthreads();  // the running maxima are reused by the next pair
  }
}

// Gradient of one side. The "owner" image (grad_q: query p; grad_g: gallery n) has Lown locations;
// each pair with an "other" image m contributes to owner location i
//   * grad[own i] += gv[own i] * src[m, idx[own i]]               (i's maximum came from idx[own i]);
//   * grad[own i] += gv[oth r] * src[m, r]  for every r with idx[oth r] == i  (i was r's argmax).
// The pair's [Lq + Lg] row starts at o * own_stride + m * oth_stride; the owner's entries at own_off,
// the other image's at oth_off. One warp owns one (o, i); lanes split the channels.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    match_backward_kernel(const float* __restrict__ gv, const int64_t* __restrict__ idx, const T* __restrict__ src,
                          float* __restrict__ dst, int64_t owners, int64_t others, int64_t own_stride,
                          int64_t oth_stride, int own_off, int oth_off, int Lown, int Loth, int64_t d) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; w < owners * Lown;
       w += warps) {
    const int64_t o = w / Lown;
    const int i = static_cast<int>(w % Lown);
    for (int64_t c0 = 0; c0 < d; c0 += kChannelsPerPass) {
      float acc[kChannelsPerPass / 32];
#pragma unroll
      for (int k = 0; k < kChannelsPerPass / 32; ++k) acc[k] = 0.f;
      auto add_row = [&](float a, const T* row) {
#pragma unroll
        for (int k = 0; k < kChannelsPerPass / 32; ++k) {
          const int64_t c = c0 + lane + 32 * k;
          if (c < d) acc[k] = fmaf(a, to_float(row[c]), acc[k]);
        }
      };
      for (int64_t m = 0; m < others; ++m) {
        const int64_t base = o * own_stride + m * oth_stride;
        const float a = gv[base + own_off + i];
        if (a != 0.f) add_row(a, src + (m * Loth + idx[base + own_off + i]) * d);
        for (int r0 = 0; r0 < Loth; r0 += 32) {
          const int r = r0 + lane;
          float ar = 0.f;
          bool hit = false;
          if (r < Loth) {
            ar = gv[base + oth_off + r];
            hit = ar != 0.f && idx[base + oth_off + r] == i;
          }
          unsigned mask = __ballot_sync(kFullMask, hit);
          while (mask != 0u) {  // lowest lane first: a fixed summation order
            const int b = __ffs(mask) - 1;
            mask &= mask - 1u;
            const float a_hit = __shfl_sync(kFullMask, ar, b);
            add_row(a_hit, src + (m * Loth + r0 + b) * d);
          }
        }
      }
      float* row = dst + (o * Lown + i) * d;
#pragma unroll
      for (int k = 0; k < kChannelsPerPass / 32; ++k) {
        const int64_t c = c0 + lane + 32 * k;
        if (c < d) row[c] = acc[k];
      }
    }
  }
}

int resident_blocks_hint() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    sms = 108;
  return sms * 8;
}

template <typename T, bool kScore, bool kIndex>
cudaError_t launch_pairs(const void* q, const void* g, void* values, int64_t* indices, const float* weight,
                         const float* bias, float* out, int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg,
                         cudaStream_t stream) {
  if (P == 0 || N == 0) return cudaSuccess;
  if (Lq > kMaxLocations || Lg > kMaxLocations || Lq <= 0 || Lg <= 0 || d <= 0) return cudaErrorInvalidValue;
  const int64_t grid = std::min<int64_t>(P * N, resident_blocks_hint());
  return launch(match_pairs_kernel<T, kScore, kIndex>, dim3(static_cast<unsigned>(grid)), dim3(kThreads), 0, stream,
                static_cast<const T*>(q), static_cast<const T*>(g), static_cast<T*>(values), indices, weight, bias,
                out, P, N, d, static_cast<int>(Lq), static_cast<int>(Lg));
}

template <typename T>
cudaError_t launch_backward(const float* gv, const int64_t* idx, const void* q, const void* g, float* grad_q,
                            float* grad_g, int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg,
                            cudaStream_t stream) {
  if (P == 0 || N == 0) return cudaSuccess;
  const int64_t L = Lq + Lg;
  const int64_t cap = resident_blocks_hint() * 4;
  if (grad_q != nullptr) {
    const int64_t grid_q = std::min<int64_t>((P * Lq + kWarpsPerBlock - 1) / kWarpsPerBlock, cap);
    const cudaError_t err =
        launch(match_backward_kernel<T>, dim3(static_cast<unsigned>(grid_q)), dim3(kWarpsPerBlock * 32), 0, stream, gv,
               idx, static_cast<const T*>(g), grad_q, P, N, N * L, L, 0, static_cast<int>(Lq), static_cast<int>(Lq),
               static_cast<int>(Lg), d);
    if (err != cudaSuccess) return err;
  }
  if (grad_g == nullptr) return cudaSuccess;
  const int64_t grid_g = std::min<int64_t>((N * Lg + kWarpsPerBlock - 1) / kWarpsPerBlock, cap);
  return launch(match_backward_kernel<T>, dim3(static_cast<unsigned>(grid_g)), dim3(kWarpsPerBlock * 32), 0, stream, gv,
                idx, static_cast<const T*>(q), grad_g, N, P, L, N * L, static_cast<int>(Lq), 0, static_cast<int>(Lg),
                static_cast<int>(Lq), d);
}

}  // namespace

cudaError_t match_forward(ScalarKind kind, const void* q, const void* g, void* values, int64_t* indices, int64_t P,
                          int64_t N, int64_t d, int64_t Lq, int64_t Lg, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return indices ? launch_pairs<float, false, true>(q, g, values, indices, nullptr, nullptr, nullptr, P, N, d, Lq,
                                                        Lg, stream)
                     : launch_pairs<float, false, false>(q, g, values, nullptr, nullptr, nullptr, nullptr, P, N, d,
                                                         Lq, Lg, stream);
    case ScalarKind::kFloat16:
      return indices ? launch_pairs<__half, false, true>(q, g, values, indices, nullptr, nullptr, nullptr, P, N, d,
                                                         Lq, Lg, stream)
                     : launch_pairs<__half, false, false>(q, g, values, nullptr, nullptr, nullptr, nullptr, P, N, d,
                                                          Lq, Lg, stream);
    case ScalarKind::kBFloat16:
      return indices ? launch_pairs<__nv_bfloat16, false, true>(q, g, values, indices, nullptr, nullptr, nullptr, P,
                                                                N, d, Lq, Lg, stream)
                     : launch_pairs<__nv_bfloat16, false, false>(q, g, values, nullptr, nullptr, nullptr, nullptr, P,
                                                                 N, d, Lq, Lg, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t score_forward(ScalarKind kind, const void* q, const void* g, const float* weight, const float* bias,
                          float* out, int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch_pairs<float, true, false>(q, g, nullptr, nullptr, weight, bias, out, P, N, d, Lq, Lg, stream);
    case ScalarKind::kFloat16:
      return launch_pairs<__half, true, false>(q, g, nullptr, nullptr, weight, bias, out, P, N, d, Lq, Lg, stream);
    case ScalarKind::kBFloat16:
      return launch_pairs<__nv_bfloat16, true, false>(q, g, nullptr, nullptr, weight, bias, out, P, N, d, Lq, Lg,
                                                      stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t match_backward(ScalarKind kind, const float* grad_values, const int64_t* indices, const void* q,
                           const void* g, float* grad_q, float* grad_g, int64_t P, int64_t N, int64_t d, int64_t Lq,
                           int64_t Lg, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch_backward<float>(grad_values, indices, q, g, grad_q, grad_g, P, N, d, Lq, Lg, stream);
    case ScalarKind::kFloat16:
      return launch_backward<__half>(grad_values, indices, q, g, grad_q, grad_g, P, N, d, Lq, Lg, stream);
    case ScalarKind::kBFloat16:
      return launch_backward<__nv_bfloat16>(grad_values, indices, q, g, grad_q, grad_g, P, N, d, Lq, Lg, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t max_locations() { return plan::kMaxLocations; }

}  // namespace cuda
}  // namespace qaconv
