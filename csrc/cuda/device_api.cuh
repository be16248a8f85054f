// The device-side vocabulary of the kernel files: CUDA's headers, the PTX wrappers, the dynamic
// shared-memory declaration and the kernel launch. A build with QACONV_CUDA_EMU (the CPU emulator of
// tests/cuda_emu, which puts its own cuda_runtime.h first on the include path) gets the emulated
// twins of the same names instead; the kernel files are compiled unchanged either way.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if !defined(QACONV_CUDA_EMU)
#include "ptx.cuh"

// The CTA's dynamic shared memory (sized at launch), 16-byte aligned for cp.async and ldmatrix.
#define QACONV_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

namespace qaconv {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...), then the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   const Args&... args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace qaconv
#endif
