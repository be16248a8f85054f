// Small kernels that exercise the emulator itself: the PTX fragment layouts against layouts given by
// the caller (the tests pass CUTLASS CuTe's), and kernels with deliberate faults that the emulator must
// stop (a race, divergent shuffles, a thread leaving before a barrier, a launch above the limits).
// Compiled like the kernel files (instrumented), through the same launch helper.
#include <cstdint>

#include "cuda_emu.h"

namespace {

using qaconv::cuda::launch;
namespace ptx = qaconv::cuda::ptx;

// One warp: lane l loads its A, B, C fragment values from the given element indices (a_idx[l][8]: two
// 16-bit values per register, low half first; b_idx[l][4]; c_idx[l][4]), runs one mma, stores D at c_idx.
void mma_probe_kernel(const uint16_t* A, const uint16_t* B, const float* C, const int* a_idx, const int* b_idx,
                      const int* c_idx, float* D, bool bf16) {
  const int l = threadIdx.x;
  uint32_t a[4], b[2];
  float d[4];
  for (int i = 0; i < 4; ++i) a[i] = A[a_idx[8 * l + 2 * i]] | (uint32_t{A[a_idx[8 * l + 2 * i + 1]]} << 16);
  for (int i = 0; i < 2; ++i) b[i] = B[b_idx[4 * l + 2 * i]] | (uint32_t{B[b_idx[4 * l + 2 * i + 1]]} << 16);
  for (int i = 0; i < 4; ++i) d[i] = C[c_idx[4 * l + i]];
  if (bf16)
    ptx::mma_16816<true>(d, a, b[0], b[1]);
  else
    ptx::mma_16816<false>(d, a, b[0], b[1]);
  for (int i = 0; i < 4; ++i) D[c_idx[4 * l + i]] = d[i];
}

// One warp: 32 rows of 16 bytes go to shared memory; lane l gives the address of row row_of[l]; out[l][j]
// is what ldmatrix.x4 hands lane l in register j.
void ldmatrix_probe_kernel(const uint32_t* rows, const int* row_of, uint32_t* out) {
  QACONV_DYNAMIC_SMEM(smem);
  auto* s = reinterpret_cast<uint32_t*>(smem);
  const int l = threadIdx.x;
  for (int i = 0; i < 4; ++i) s[4 * l + i] = rows[4 * l + i];
  __syncthreads();
  uint32_t r[4];
  ptx::ldmatrix_x4(r, smem + 16 * row_of[l]);
  for (int j = 0; j < 4; ++j) out[4 * l + j] = r[j];
}

// Faults: 0 a shared-memory race (warp 1 reads what warp 0 wrote, no barrier), 1 divergent shuffles,
// 2 a thread leaves before __syncthreads, 3 a read of shared memory beyond the dynamic allocation,
// 4 a global read past the end of a buffer, 5 none (the same kernel, correctly synchronised), 6 a global
// write past the end of a buffer, 7 a write to a read-only input.
void fault_kernel(int fault, const float* in, float* out) {
  QACONV_DYNAMIC_SMEM(smem);
  auto* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x, lane = t % 32;
  s[t] = in[t];
  if (fault == 5) __syncthreads();
  if (fault == 0 || fault == 5) out[t] = s[(t + 32) % 64];
  if (fault == 1) {
    float v = s[t];
    if (lane < 16)
      v += __shfl_xor_sync(0xffffffffu, v, 1);
    else
      v -= __shfl_xor_sync(0xffffffffu, v, 1);
    out[t] = v;
  }
  if (fault == 2) {
    if (t == 5) return;
    __syncthreads();
    out[t] = s[t];
  }
  if (fault == 3) out[t] = s[t + 64];
  if (fault == 4) out[t] = in[t + 64];
  if (fault == 6) out[t + 64] = 0.f;
  if (fault == 7) const_cast<float*>(in)[t] = 0.f;
}

}  // namespace

extern "C" {

int emu_probe_mma(const uint16_t* A, const uint16_t* B, const float* C, const int* a_idx, const int* b_idx,
                  const int* c_idx, float* D, int bf16) {
  return launch(mma_probe_kernel, dim3(1), dim3(32), 0, nullptr, A, B, C, a_idx, b_idx, c_idx, D, bf16 != 0);
}

int emu_probe_ldmatrix(const uint32_t* rows, const int* row_of, uint32_t* out) {
  return launch(ldmatrix_probe_kernel, dim3(1), dim3(32), 512, nullptr, rows, row_of, out);
}

// 64 threads, 64 floats of dynamic shared memory (smem_bytes may be changed to test the launch checks).
int emu_probe_fault(int fault, const float* in, float* out, int smem_bytes) {
  return launch(fault_kernel, dim3(1), dim3(64), static_cast<size_t>(smem_bytes), nullptr, fault, in, out);
}

}  // extern "C"
