// Max-pooling of one pair's local similarities (the epilogue shared by the CPU kernels).
#pragma once

#include <cstdint>

namespace qaconv {
namespace cpu {

// Max-pools one pair's block of S (Lq rows of Lg entries, row stride ld) in both directions:
// row_max[s] = max_r S[s, r], col_max[r] = max_s S[s, r], and with row_idx/col_idx (both or neither
// null) the argmax. NaN propagates like torch.max (the first NaN wins); ties take the smallest index.
// Compiled for AVX-512, AVX2 and baseline x86-64, the best chosen when the library is loaded.
void pool(const float* S, int64_t ld, int64_t Lq, int64_t Lg, float* row_max, float* col_max, int64_t* row_idx,
          int64_t* col_idx);
void pool(const double* S, int64_t ld, int64_t Lq, int64_t Lg, double* row_max, double* col_max, int64_t* row_idx,
          int64_t* col_idx);

}  // namespace cpu
}  // namespace qaconv
