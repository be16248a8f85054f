// bfloat16 maps on the AVX512-BF16 kernel: bfloat16 products accumulated in float32, the max/argmax
// epilogue and the folded head on float32 similarities. Call only when cpu::bf16_kernel() holds.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace qaconv {
namespace cpu {

// values: float32 [P, N, Lq + Lg] (contiguous); indices: int64 of the same shape, or null for values only.
void match_bf16(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& dims, float* values,
                int64_t* indices);

// out[p, n] = values(p, n) . weight + bias, float32 [P, N]; weight holds Lq + Lg doubles.
void score_bf16(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& dims, const double* weight,
                double bias, float* out);

}  // namespace cpu
}  // namespace qaconv
