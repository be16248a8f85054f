// Launchers of the fused QAConv CUDA kernels. Plain C++ and CUDA runtime types only: no torch headers,
// so this header and the .cu files compile with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "launch_plan.h"

namespace qaconv {
namespace cuda {

// Layouts: q is [P, Lq, d] and g is [N, Lg, d], channels innermost (what a channels_last
// [B, d, h, w] tensor already is). All sizes are element counts; all pointers are device pointers.
// Products are accumulated in float32 (float16/bfloat16 inputs are widened, float32 is multiplied exactly).

// values [P, N, Lq + Lg] (input element type): per query location the max over gallery locations,
// then per gallery location the max over query locations. indices (nullable) int64, same shape:
// the argmax location in the other image, ties -> smallest index, NaN propagates like torch.max.
cudaError_t match_forward(ScalarKind kind, const void* q, const void* g, void* values, int64_t* indices,
                          int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg, cudaStream_t stream);

// out [P, N] float32 = values . weight + (bias ? *bias : 0); weight is float32 [Lq + Lg] (query-location
// maxima first), bias a float32 device scalar or nullptr. Only the score is written.
cudaError_t score_forward(ScalarKind kind, const void* q, const void* g, const float* weight, const float* bias,
                          float* out, int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg, cudaStream_t stream);

// The same score on tensor cores (sm_80+, score_mma.cu): float16 or bfloat16 inputs with d a multiple
// of 8 and 16-byte aligned pointers, float32 accumulation. Returns cudaErrorNotSupported (launching
// nothing) when the device or the problem size does not suit the kernel: the caller then uses score_forward.
cudaError_t score_forward_mma(ScalarKind kind, const void* q, const void* g, const float* weight, const float* bias,
                              float* out, int64_t P, int64_t N, int64_t d, int64_t Lq, int64_t Lg,
                              cudaStream_t stream);

// Sparse backward through the argmax. grad_values float32 [P, N, Lq + Lg], indices int64 (same shape, in
// range: the caller checks). grad_q [P, Lq, d] and grad_g [N, Lg, d] float32 are fully written (not
// accumulated into), each element by exactly one thread in a fixed order: deterministic, no float atomics.
// A null grad_q or grad_g skips that gradient.
cudaError_t match_backward(ScalarKind kind, const float* grad_values, const int64_t* indices, const void* q,
                           const void* g, float* grad_q, float* grad_g, int64_t P, int64_t N, int64_t d,
                           int64_t Lq, int64_t Lg, cudaStream_t stream);

// Largest Lq and Lg (locations per image, h * w) the kernels accept; the binding reports a clear error beyond.
int64_t max_locations();

}  // namespace cuda
}  // namespace qaconv
