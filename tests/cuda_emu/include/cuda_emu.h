// CUDA on the CPU: the names the kernels of csrc/cuda use, for a g++ build of the unmodified .cu
// files (C++17, no CUDA toolkit). Every CUDA thread is a fiber; a CTA's fibers run cooperatively on
// one OS thread (runtime.cpp). __syncthreads and the warp collectives (__shfl*_sync, __ballot_sync,
// ldmatrix, mma.sync) are barriers: all participating threads must arrive at the same call, otherwise
// the launch fails naming the sites. Shared memory (static and dynamic) is poisoned with 0xFF at the
// start of every CTA and checked by a race detector; global buffers carry red zones.
//
// The emulated PTX wrappers (namespace qaconv::cuda::ptx below) follow the PTX ISA; their fragment
// layouts are checked against CUTLASS CuTe's SM80 16x8x16 layouts in self_test.cpp.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>

// ---- qualifiers ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared arrays: one copy each (the emulator runs one CTA at a time). A kernel file's .bss holds
// nothing else; the build renames it to the section qaconv_emu_shared, so the runtime knows their
// address range (__start_/__stop_ of the section) for poisoning and race checks.
#define __shared__ __attribute__((aligned(16))) static
#define QACONV_DYNAMIC_SMEM(name) unsigned char* const name = ::qaconv_emu::dynamic_smem()

// ---- runtime types -------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace qaconv_emu {

// The state of the running CUDA thread (fiber); runtime.cpp sets it before switching to a fiber.
struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int tid;  // linear thread index in the CTA
};
extern ThreadState* g_current;
unsigned char* dynamic_smem();

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t smem, std::function<void()> body);

// Barriers and warp collectives; file and line name the call in error messages.
void syncthreads(const char* file, int line);
// Exchanges one 32-bit value per lane and returns the value of this lane's source: src_lane >= 0 for
// __shfl_sync (a lane of this lane's width-segment), -1 - lane_mask for __shfl_xor_sync. kind names the
// collective in divergence reports.
uint32_t shfl(const char* kind, const char* file, int line, unsigned mask, uint32_t value, int src_lane, int width);
uint32_t ballot(const char* file, int line, unsigned mask, bool predicate);
[[noreturn]] void fail(const char* fmt, ...);

// Emulated PTX (runtime.cpp): warp-collective ldmatrix and mma, per-thread cp.async groups.
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, const char* file, int line);
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16, const char* file,
               int line);
void cp_async_16(void* smem, const void* gmem);
void cp_async_commit();
void cp_async_wait(int pending);

template <typename To, typename From>
inline To bit_cast(From f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast sizes");
  To t;
  memcpy(&t, &f, sizeof t);
  return t;
}

}  // namespace qaconv_emu

template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return ::qaconv_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#define threadIdx (::qaconv_emu::g_current->thread_idx)
#define blockIdx (::qaconv_emu::g_current->block_idx)
#define blockDim (::qaconv_emu::g_current->block_dim)
#define gridDim (::qaconv_emu::g_current->grid_dim)

#define __syncthreads() ::qaconv_emu::syncthreads(__FILE__, __LINE__)

// ---- warp collectives ----------------------------------------------------------------------------
namespace qaconv_emu {
template <typename T>
inline T shfl_value(const char* kind, const char* file, int line, unsigned mask, T v, int src, int width) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  return bit_cast<T>(shfl(kind, file, line, mask, bit_cast<uint32_t>(v), src, width));
}
}  // namespace qaconv_emu
// src for __shfl_xor_sync is encoded as -1 - lane_mask (the runtime computes lane ^ lane_mask).
#define __shfl_sync(mask, v, src, ...)                                                   \
  ::qaconv_emu::shfl_value("__shfl_sync", __FILE__, __LINE__, (mask), (v), (src), \
                           ::qaconv_emu::width_or_32(__VA_ARGS__))
#define __shfl_xor_sync(mask, v, lane_mask, ...)                                             \
  ::qaconv_emu::shfl_value("__shfl_xor_sync", __FILE__, __LINE__, (mask), (v), -1 - (lane_mask), \
                           ::qaconv_emu::width_or_32(__VA_ARGS__))
#define __ballot_sync(mask, pred) ::qaconv_emu::ballot(__FILE__, __LINE__, (mask), (pred))
namespace qaconv_emu {
inline int width_or_32() { return 32; }
inline int width_or_32(int w) { return w; }
}  // namespace qaconv_emu

// ---- math ----------------------------------------------------------------------------------------
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline float __int_as_float(int x) { return ::qaconv_emu::bit_cast<float>(x); }
inline int __float_as_int(float x) { return ::qaconv_emu::bit_cast<int>(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
using std::isnan;

// ---- 16-bit floats (only the conversions: torch builds with __CUDA_NO_HALF_OPERATORS__) ------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
namespace qaconv_emu {
float half_bits_to_float(uint16_t h);
uint16_t float_to_half_bits(float f);  // round to nearest even
float bf16_bits_to_float(uint16_t h);
uint16_t float_to_bf16_bits(float f);  // round to nearest even
}  // namespace qaconv_emu
inline float __half2float(__half h) { return ::qaconv_emu::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{::qaconv_emu::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return ::qaconv_emu::bf16_bits_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::qaconv_emu::float_to_bf16_bits(f)}; }

// ---- the twins of csrc/cuda/ptx.cuh and the launch helper of device_api.cuh -----------------------
namespace qaconv {
namespace cuda {
namespace ptx {
inline void cp_async_16(void* smem, const void* gmem) { ::qaconv_emu::cp_async_16(smem, gmem); }
inline void cp_async_commit() { ::qaconv_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::qaconv_emu::cp_async_wait(N);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ::qaconv_emu::ldmatrix_x4(r, smem, file, line);
}
template <bool kBF16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::qaconv_emu::mma_16816(d, a, b0, b1, kBF16, file, line);
}
// max.NaN.f32: NaN if either operand is NaN; +0 is taken as larger than -0.
inline float max_nan(float a, float b) {
  if (a != a || b != b) return __int_as_float(0x7fffffff);
  if (a == 0.f && b == 0.f) return std::signbit(a) ? b : a;
  return a > b ? a : b;
}
}  // namespace ptx

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   const Args&... args) {
  return ::qaconv_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
                              [=] { kernel(static_cast<Params>(args)...); });
}
}  // namespace cuda
}  // namespace qaconv
