// The micro-kernel body, included once per instruction-set variant by gemm_tile.cpp inside that variant's
// namespace (and target region), after a vector type `Vec` with W lanes and the operations
//   zero(), load(const float*), bcast(const float*), fma(a, b, acc) = a*b + acc rounded once, store(float*, v)
// was defined there. No include guard: it is meant to be included several times.

constexpr int64_t kNV = 3;              // vectors per row of the register block
constexpr int64_t kNR = kNV * Vec::W;   // columns per strip
constexpr int64_t kKC = 128;            // channels per pass: a strip's slice ([kKC][kNR]) stays in L1

// One kMR x kNR block of S: acc[i][v] = sum over c of A[c][i] * B[c][v*W ...], one FMA chain per element.
// With `resume`, the chain continues from the partial sums in S (stored as the floats the registers held,
// so splitting the channels into passes does not change a bit).
inline void micro_tile(const float* __restrict A, const float* __restrict B, int64_t d, float* __restrict S,
                       int64_t ldS, bool resume) {
  typename Vec::T acc[kMR][kNV];
#pragma GCC unroll 4
  for (int64_t i = 0; i < kMR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNV; ++v) acc[i][v] = resume ? Vec::load(S + i * ldS + v * Vec::W) : Vec::zero();
  for (int64_t c = 0; c < d; ++c) {
    typename Vec::T b[kNV];
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNV; ++v) b[v] = Vec::load(B + c * kNR + v * Vec::W);
#pragma GCC unroll 4
    for (int64_t i = 0; i < kMR; ++i) {
      const typename Vec::T a = Vec::bcast(A + c * kMR + i);
#pragma GCC unroll 3
      for (int64_t v = 0; v < kNV; ++v) acc[i][v] = Vec::fma(a, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 4
  for (int64_t i = 0; i < kMR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNV; ++v) Vec::store(S + i * ldS + v * Vec::W, acc[i][v]);
}

// The whole tile: every strip of B against every row block of A, in passes of kKC channels (in order).
// A strip's slice ([kKC][kNR]) stays in L1 while the row blocks of A stream past it.
void run_tile(const float* A, int64_t row_blocks, const float* B, int64_t strips, int64_t d, float* S,
              int64_t ldS) {
  for (int64_t c0 = 0; c0 < d; c0 += kKC) {
    const int64_t kc = d - c0 < kKC ? d - c0 : kKC;
    for (int64_t t = 0; t < strips; ++t)
      for (int64_t b = 0; b < row_blocks; ++b)
        micro_tile(A + (b * d + c0) * kMR, B + (t * d + c0) * kNR, kc, S + b * kMR * ldS + t * kNR, ldS, c0 > 0);
  }
}
