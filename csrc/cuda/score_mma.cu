// qaconv_score on tensor cores (sm_80+): mma.sync m16n8k16 in float16 or bfloat16 with float32
// accumulators, the head folded into the epilogue, one float written per pair. CUDA headers only.
//
// One CTA owns one query image and a chunk of consecutive gallery images. The query's [Lq x d] tile
// is copied into shared memory once; gallery tiles stream through a two-stage cp.async pipeline (the
// next image loads while the current one is matched). The pair's similarity matrix is split into
// 48 x 64 warp tiles (3 x 8 mma tiles, 96 accumulators per thread); each warp reduces its tile in
// registers -- row maxima: in-thread, then shuffles across the 4 lanes of a row; column maxima:
// in-thread, then shuffles across the 8 row groups -- and writes one partial maximum per row and
// column of its tile to shared memory. The CTA then takes the maximum over the partials, multiplies
// by the folded head's weights and sums: S never leaves registers. Consecutive CTAs share their
// gallery chunk and differ in the query, so the chunk is read from L2, not DRAM.
//
// Shared-memory rows are padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix phase
// then fall into distinct banks. Padding rows and channels are zero; padded rows and columns of the
// similarity matrix are excluded from the maxima.
#include "match_kernels.h"
#include "device_api.cuh"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

namespace qaconv {
namespace cuda {
namespace {

using plan::kMaxWarps;
using plan::kMmaM;
using plan::kMmaN;
using plan::kWarpCols;
using plan::kWarpRows;
using plan::MmaPlan;
constexpr unsigned kFullMask = 0xffffffffu;

// Copies one image's [L x d] 16-bit tile into a padded shared-memory tile (16 bytes per cp.async).
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* __restrict__ src, int L, const MmaPlan& s) {
  const int chunks = s.d / 8;
  const int total = L * chunks;
  for (int c = threadIdx.x; c < total; c += blockDim.x) {
    const int r = c / chunks, k = c - r * chunks;
    ptx::cp_async_16(dst + r * s.row_stride + k * 8, src + static_cast<size_t>(r) * s.d + k * 8);
  }
}

// One warp tile (tm, tn) of the pair's similarity matrix: accumulate over all channels, then write
// the tile's row maxima to rowpart[tn][row] and its column maxima to colpart[tm][col].
template <bool kBF16, bool kFull>
__device__ __forceinline__ void tile_maxima(const uint16_t* qs, const uint16_t* gb, const MmaPlan& s, int tm, int tn,
                                            float* rowpart, float* colpart) {
  const int lane = threadIdx.x & 31;
  const int r0 = tm * kWarpRows, c0 = tn * kWarpCols;
  float acc[kMmaM][kMmaN][4];
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // A (query, row-major): lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k + 8.
  const uint16_t* a_ptr = qs + (r0 + (lane & 15)) * s.row_stride + (lane >> 4) * 8;
  // B (gallery, column-major = location rows): matrices (n 0-7, k), (n 0-7, k + 8), (n 8-15, k), (n 8-15, k + 8).
  const uint16_t* b_ptr = gb + (c0 + (lane & 7) + ((lane >> 4) << 3)) * s.row_stride + ((lane >> 3) & 1) * 8;
  for (int k0 = 0; k0 < s.d_pad; k0 += 16) {
    uint32_t a[kMmaM][4];
    uint32_t b[kMmaN][2];
#pragma unroll
    for (int i = 0; i < kMmaM; ++i) ptx::ldmatrix_x4(a[i], a_ptr + i * 16 * s.row_stride + k0);
#pragma unroll
    for (int j = 0; j < kMmaN / 2; ++j) {
      uint32_t r[4];
      ptx::ldmatrix_x4(r, b_ptr + j * 16 * s.row_stride + k0);
      b[2 * j][0] = r[0];
      b[2 * j][1] = r[1];
      b[2 * j + 1][0] = r[2];
      b[2 * j + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < kMmaM; ++i)
#pragma unroll
      for (int j = 0; j < kMmaN; ++j) ptx::mma_16816<kBF16>(acc[i][j], a[i], b[j][0], b[j][1]);
  }

  const int group = lane >> 2, quad = lane & 3;
  // Row maxima: a thread holds rows group and group + 8 of each m16 tile, 2 columns of each n8 tile.
#pragma unroll
  for (int i = 0; i < kMmaM; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = -INFINITY;
#pragma unroll
      for (int j = 0; j < kMmaN; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (kFull || c0 + j * 8 + 2 * quad + e < s.Lg) m = ptx::max_nan(m, acc[i][j][2 * h + e]);
      m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 1));
      m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 2));
      if (quad == 0) rowpart[tn * s.rows_q + r0 + i * 16 + h * 8 + group] = m;
    }
  // Column maxima: reduce a thread's 2 * kMmaM rows, then across the 8 row groups (lane bits 2-4).
#pragma unroll
  for (int j = 0; j < kMmaN; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float m = -INFINITY;
#pragma unroll
      for (int i = 0; i < kMmaM; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (kFull || r0 + i * 16 + h * 8 + group < s.Lq) m = ptx::max_nan(m, acc[i][j][2 * h + e]);
      m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 4));
      m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 8));
      m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 16));
      if (group == 0) colpart[tm * s.rows_g + c0 + j * 8 + 2 * quad + e] = m;
    }
}

template <bool kBF16>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
    score_mma_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ g, const float* __restrict__ weight,
                     const float* __restrict__ bias, float* __restrict__ out, int64_t P, int64_t N, int64_t per_cta,
                     const MmaPlan s) {
  QACONV_DYNAMIC_SMEM(smem);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* gs = qs + static_cast<size_t>(s.rows_q) * s.row_stride;
  const size_t g_elems = static_cast<size_t>(s.rows_g) * s.row_stride;
  float* wts = reinterpret_cast<float*>(gs + s.stages * g_elems);
  float* rowpart = wts + (s.Lq + s.Lg);
  float* colpart = rowpart + s.tiles_n * s.rows_q;
  float* red = colpart + s.tiles_m * s.rows_g;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t p = static_cast<int64_t>(blockIdx.x) % P;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) / P * per_cta;
  const int count = static_cast<int>(std::min<int64_t>(per_cta, N - n0));
  const int L = s.Lq + s.Lg;
  const size_t q_step = static_cast<size_t>(s.Lq) * s.d, g_step = static_cast<size_t>(s.Lg) * s.d;

  // Zero the tiles once (padding rows and channels stay zero), stage the weights.
  {
    uint4* z = reinterpret_cast<uint4*>(smem);
    const size_t n16 = (static_cast<size_t>(s.rows_q) + s.stages * s.rows_g) * s.row_stride * sizeof(uint16_t) / 16;
    for (size_t i = tid; i < n16; i += blockDim.x) z[i] = make_uint4(0u, 0u, 0u, 0u);
    for (int i = tid; i < L; i += blockDim.x) wts[i] = weight[i];
  }
  __syncthreads();
  load_tile(qs, q + p * q_step, s.Lq, s);
  load_tile(gs, g + n0 * g_step, s.Lg, s);
  ptx::cp_async_commit();

  const int tiles = s.tiles_m * s.tiles_n;
  for (int it = 0; it < count; ++it) {
    if (s.stages == 2) {
      if (it + 1 < count) {
        load_tile(gs + ((it + 1) & 1) * g_elems, g + (n0 + it + 1) * g_step, s.Lg, s);
        ptx::cp_async_commit();
        ptx::cp_async_wait<1>();
      } else {
        ptx::cp_async_wait<0>();
      }
    } else {
      if (it > 0) {
        load_tile(gs, g + (n0 + it) * g_step, s.Lg, s);
        ptx::cp_async_commit();
      }
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // this pair's gallery tile has landed (for every thread's copies)

    const uint16_t* gb = gs + (s.stages == 2 ? (it & 1) : 0) * g_elems;
    for (int t = warp; t < tiles; t += s.warps) {
      const int tm = t / s.tiles_n, tn = t - tm * s.tiles_n;
      if ((tm + 1) * kWarpRows <= s.Lq && (tn + 1) * kWarpCols <= s.Lg)
        tile_maxima<kBF16, true>(qs, gb, s, tm, tn, rowpart, colpart);
      else
        tile_maxima<kBF16, false>(qs, gb, s, tm, tn, rowpart, colpart);
    }
    __syncthreads();  // every partial maximum is written; the gallery buffer may be refilled

    // Folded head: max over the partials, times the weight, summed in a fixed order.
    float partial = 0.f;
    for (int i = tid; i < L; i += blockDim.x) {
      float m;
      if (i < s.Lq) {
        m = rowpart[i];
        for (int tn = 1; tn < s.tiles_n; ++tn) m = ptx::max_nan(m, rowpart[tn * s.rows_q + i]);
      } else {
        const int j = i - s.Lq;
        m = colpart[j];
        for (int tm = 1; tm < s.tiles_m; ++tm) m = ptx::max_nan(m, colpart[tm * s.rows_g + j]);
      }
      partial = fmaf(m, wts[i], partial);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) partial += __shfl_xor_sync(kFullMask, partial, offset);
    if (lane == 0) red[warp] = partial;
    __syncthreads();
    if (tid == 0) {
      float total = 0.f;
      for (int w = 0; w < s.warps; ++w) total += red[w];
      out[p * N + n0 + it] = total + (bias != nullptr ? *bias : 0.f);
    }
  }
}

}  // namespace

cudaError_t score_forward_mma(ScalarKind kind, const void* q, const void* g, const float* weight, const float* bias,
                              float* out, int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg,
                              cudaStream_t stream) {
  if (kind != ScalarKind::kFloat16 && kind != ScalarKind::kBFloat16) return cudaErrorInvalidValue;
  if (d <= 0 || d % 8 != 0 || Lq <= 0 || Lg <= 0 || d > INT_MAX / 2) return cudaErrorInvalidValue;
  if (P == 0 || N == 0) return cudaSuccess;
  DeviceProfile dev{};
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&dev.major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&dev.minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return err;
  dev.smem_optin = optin;
  const plan::MmaLaunch l = plan::plan_score_mma(P, N, d, Lq, Lg, dev);
  if (!l.supported) return cudaErrorNotSupported;  // the caller falls back

  auto kernel = kind == ScalarKind::kBFloat16 ? score_mma_kernel<true> : score_mma_kernel<false>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.plan.smem_bytes));
  if (err != cudaSuccess) return err;
  const auto* q16 = static_cast<const uint16_t*>(q);
  const auto* g16 = static_cast<const uint16_t*>(g);
  for (int64_t p0 = 0; p0 < P; p0 += l.max_p) {
    const int64_t np = std::min(l.max_p, P - p0);
    err = launch(kernel, dim3(static_cast<unsigned>(np * l.chunks)), dim3(l.plan.warps * 32), l.plan.smem_bytes,
                 stream, q16 + p0 * Lq * d, g16, weight, bias, out + p0 * N, np, N, l.per_cta, l.plan);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace qaconv
