// Launch planning of the CUDA kernels in plain C++ (no CUDA or torch headers): which kernel scores,
// the tensor-core kernel's tiles, pipeline stages, shared memory and grid on a given device, and when
// it falls back to the CUDA-core kernel. Used by the launchers (score_mma.cu), the torch binding
// (match_cuda.cpp) and the CPU emulator's tests, which plan for several device profiles.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>

namespace qaconv {
namespace cuda {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What the planning needs to know of a device.
struct DeviceProfile {
  int major, minor;        // compute capability
  int sms;                 // multiprocessors
  int64_t smem_optin;      // dynamic shared memory per block after cudaFuncSetAttribute, bytes
};

namespace plan {

constexpr int64_t kMaxLocations = 1024;  // largest Lq, Lg (h * w) any CUDA kernel accepts

// The tensor-core score kernel (score_mma.cu).
constexpr int kMmaM = 3;               // m16 tiles per warp tile
constexpr int kMmaN = 8;               // n8 tiles per warp tile
constexpr int kWarpRows = 16 * kMmaM;  // query locations per warp tile
constexpr int kWarpCols = 8 * kMmaN;   // gallery locations per warp tile
constexpr int kMaxWarps = 12;          // 384 threads: 170 registers per thread at one CTA per SM
constexpr int kRowPad = 8;             // elements appended to every shared-memory row
constexpr int kMaxGalleryPerCta = 64;

// Sizes of one problem as the tensor-core kernel lays it out; computed once on the host.
struct MmaPlan {
  int d;           // channels (a multiple of 8)
  int d_pad;       // channels rounded up to the mma K of 16
  int row_stride;  // shared-memory row length in elements (d_pad + kRowPad)
  int Lq, Lg;
  int tiles_m, tiles_n;  // warp tiles along query and gallery locations
  int rows_q, rows_g;    // rows held in shared memory (whole warp tiles)
  int warps;
  int stages;  // gallery buffers (2: the next image loads during the current one)
  size_t smem_bytes;
};

inline MmaPlan make_mma_plan(int64_t d, int64_t Lq, int64_t Lg, int stages) {
  MmaPlan s{};
  s.d = static_cast<int>(d);
  s.d_pad = static_cast<int>((d + 15) / 16 * 16);
  s.row_stride = s.d_pad + kRowPad;
  s.Lq = static_cast<int>(Lq);
  s.Lg = static_cast<int>(Lg);
  s.tiles_m = static_cast<int>((Lq + kWarpRows - 1) / kWarpRows);
  s.tiles_n = static_cast<int>((Lg + kWarpCols - 1) / kWarpCols);
  s.rows_q = s.tiles_m * kWarpRows;
  s.rows_g = s.tiles_n * kWarpCols;
  s.warps = std::min(s.tiles_m * s.tiles_n, kMaxWarps);
  s.stages = stages;
  const size_t tiles = static_cast<size_t>(s.rows_q + stages * s.rows_g) * s.row_stride * sizeof(uint16_t);
  const size_t floats = static_cast<size_t>(s.Lq + s.Lg) + static_cast<size_t>(s.tiles_n) * s.rows_q +
                        static_cast<size_t>(s.tiles_m) * s.rows_g + kMaxWarps;
  s.smem_bytes = tiles + floats * sizeof(float);
  return s;
}

// One launch of the tensor-core score kernel: `supported` false means the device or the problem does
// not suit it (compute capability below 8.0, maps beyond kMaxLocations, or the tiles exceed the
// shared memory even with one gallery stage) and the caller scores with the CUDA-core kernel.
struct MmaLaunch {
  bool supported;
  MmaPlan plan;
  int64_t per_cta;  // consecutive gallery images per CTA
  int64_t chunks;   // CTAs per query image
  int64_t max_p;    // query images per launch (the grid is one-dimensional)
};

// d must be a multiple of 8 (see mma_channels); P, N > 0.
inline MmaLaunch plan_score_mma(int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg, const DeviceProfile& dev) {
  MmaLaunch l{};
  if (dev.major < 8 || Lq > kMaxLocations || Lg > kMaxLocations) return l;
  l.plan = make_mma_plan(d, Lq, Lg, 2);
  if (l.plan.smem_bytes > static_cast<size_t>(dev.smem_optin)) l.plan = make_mma_plan(d, Lq, Lg, 1);
  if (l.plan.smem_bytes > static_cast<size_t>(dev.smem_optin)) return l;
  l.supported = true;
  // Enough CTAs to fill the device a few times over, at most kMaxGalleryPerCta gallery images each.
  const int64_t want = 4 * static_cast<int64_t>(std::max(dev.sms, 1));
  l.chunks = std::min<int64_t>(N, std::max<int64_t>(1, (want + P - 1) / P));
  l.per_cta = std::min<int64_t>((N + l.chunks - 1) / l.chunks, kMaxGalleryPerCta);
  l.chunks = (N + l.per_cta - 1) / l.per_cta;
  l.max_p = std::max<int64_t>(1, static_cast<int64_t>(INT_MAX) / l.chunks);
  return l;
}

// Channels as the tensor-core kernel takes them: the binding zero-pads d to a multiple of 8 (its
// copies move 16 bytes).
inline int64_t mma_channels(int64_t d) { return (d + 7) / 8 * 8; }

// Whether qaconv_score tries the tensor-core kernel: float16/bfloat16 maps always, float32 maps unless
// torch's float32 matmul precision is "highest"; never when the CUDA-core kernel is requested.
inline bool score_tries_tensor_cores(ScalarKind kind, bool float32_highest, bool simple_requested) {
  return !simple_requested && !(kind == ScalarKind::kFloat32 && float32_highest);
}

// The 16-bit type float32 maps are staged in for the tensor cores: float16 (an 11-bit significand, as
// TF32) under precision "high" when every |value| is below float16's largest (65504), bfloat16 otherwise.
inline ScalarKind staging_kind(bool float32_high, double max_abs) {
  return float32_high && max_abs < 65504.0 ? ScalarKind::kFloat16 : ScalarKind::kBFloat16;
}

}  // namespace plan
}  // namespace cuda
}  // namespace qaconv
