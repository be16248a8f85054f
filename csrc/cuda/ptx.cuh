// Thin wrappers of the PTX instructions the tensor-core kernels use (sm_80+): cp.async, ldmatrix,
// mma.sync m16n8k16 with float32 accumulators, and a NaN-propagating max. CUDA headers only.
//
// A build may list older architectures too (TORCH_CUDA_ARCH_LIST): there the wrappers compile to a
// trap, and the host code never launches the tensor-core kernels on a device below compute 8.0.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define QACONV_PTX_SM80(...) __trap()
#else
#define QACONV_PTX_SM80(...) __VA_ARGS__
#endif

namespace qaconv {
namespace cuda {
namespace ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1 (the data is read once per CTA from shared memory).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  QACONV_PTX_SM80(asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)),
                               "l"(__cvta_generic_to_global(gmem))
                               : "memory"));
}

__device__ __forceinline__ void cp_async_commit() {
  QACONV_PTX_SM80(asm volatile("cp.async.commit_group;\n" ::: "memory"));
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  QACONV_PTX_SM80(asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"));
}

// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, and every lane receives
// from matrix j the two elements (row lane / 4, columns 2 (lane % 4), +1) in r[j].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  QACONV_PTX_SM80(asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                               : "r"(smem_addr(smem))
                               : "memory"));
}

// d += a * b for a 16x16 (row-major) times 16x8 (column-major) tile, float32 accumulators.
// Accumulator layout: d[0], d[1] at (row lane / 4, columns 2 (lane % 4), +1); d[2], d[3] at row + 8.
template <bool kBF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  if constexpr (kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// max(a, b) that returns NaN when either is NaN (torch.max semantics), one instruction on sm_80+.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#else
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
#endif
}

}  // namespace ptx
}  // namespace cuda
}  // namespace qaconv
