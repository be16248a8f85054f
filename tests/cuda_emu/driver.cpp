// The C interface the tests load with ctypes: configure the emulated device, allocate buffers, call the
// launchers of csrc/cuda (compiled for the emulator) and read back what went wrong.
#include "cuda_emu.h"
#include "emu_control.h"
#include "match_kernels.h"

using qaconv::cuda::ScalarKind;

extern "C" {

void emu_configure(int major, int minor, int sms, int smem_optin, int policy, uint64_t seed) {
  qaconv_emu::configure({major, minor, sms, smem_optin}, policy, seed);
}

const char* emu_last_error() { return qaconv_emu::last_error(); }

// launches, CTAs, fiber switches, __syncthreads, warp collectives since the library was loaded.
void emu_stats(uint64_t* out) {
  const qaconv_emu::Stats s = qaconv_emu::stats();
  out[0] = s.launches;
  out[1] = s.ctas;
  out[2] = s.switches;
  out[3] = s.barriers;
  out[4] = s.collectives;
}

void* emu_alloc(size_t bytes, int readonly) { return qaconv_emu::device_alloc(bytes, readonly != 0); }
void emu_free(void* p) { qaconv_emu::device_free(p); }

int emu_match_forward(int kind, const void* q, const void* g, void* values, int64_t* indices, int64_t P, int64_t N,
                      int64_t d, int64_t Lq, int64_t Lg) {
  return qaconv::cuda::match_forward(static_cast<ScalarKind>(kind), q, g, values, indices, P, N, d, Lq, Lg, nullptr);
}

int emu_score_forward(int kind, const void* q, const void* g, const float* weight, const float* bias, float* out,
                      int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg) {
  return qaconv::cuda::score_forward(static_cast<ScalarKind>(kind), q, g, weight, bias, out, P, N, d, Lq, Lg,
                                     nullptr);
}

int emu_score_forward_mma(int kind, const void* q, const void* g, const float* weight, const float* bias, float* out,
                          int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg) {
  return qaconv::cuda::score_forward_mma(static_cast<ScalarKind>(kind), q, g, weight, bias, out, P, N, d, Lq, Lg,
                                         nullptr);
}

int emu_match_backward(int kind, const float* grad_values, const int64_t* indices, const void* q, const void* g,
                       float* grad_q, float* grad_g, int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg) {
  return qaconv::cuda::match_backward(static_cast<ScalarKind>(kind), grad_values, indices, q, g, grad_q, grad_g, P,
                                      N, d, Lq, Lg, nullptr);
}

// The tensor-core launch plan for a device: out = supported, stages, smem_bytes, warps, per_cta, chunks,
// max_p, row_stride.
void emu_plan_score_mma(int major, int minor, int sms, int64_t smem_optin, int64_t P, int64_t N, int64_t d,
                        int64_t Lq, int64_t Lg, int64_t* out) {
  const auto l = qaconv::cuda::plan::plan_score_mma(P, N, d, Lq, Lg, {major, minor, sms, smem_optin});
  const int64_t v[8] = {l.supported, l.plan.stages, static_cast<int64_t>(l.plan.smem_bytes), l.plan.warps,
                        l.per_cta, l.chunks, l.max_p, l.plan.row_stride};
  for (int i = 0; i < 8; ++i) out[i] = v[i];
}

int emu_score_tries_tensor_cores(int kind, int float32_highest, int simple_requested) {
  return qaconv::cuda::plan::score_tries_tensor_cores(static_cast<ScalarKind>(kind), float32_highest != 0,
                                                      simple_requested != 0);
}
int emu_staging_kind(int float32_high, double max_abs) {
  return static_cast<int>(qaconv::cuda::plan::staging_kind(float32_high != 0, max_abs));
}
int64_t emu_mma_channels(int64_t d) { return qaconv::cuda::plan::mma_channels(d); }

// Round trips through the emulator's 16-bit conversions (checked against numpy / torch).
void emu_convert(int kind, const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = kind == 1 ? __half2float(__float2half_rn(in[i])) : __bfloat162float(__float2bfloat16_rn(in[i]));
}

}  // extern "C"
