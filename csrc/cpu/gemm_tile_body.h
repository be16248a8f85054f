// The micro-kernel body, included once per instruction-set variant by gemm_tile.cpp inside that variant's
// namespace (and target region), after
//   * a float vector type `Vec` with W lanes and the operations zero(), load(const float*),
//     bcast(const float*), fma(a, b, acc) = a*b + acc rounded once, store(float*, v);
//   * a channel-pair type `Pairs` (the bfloat16 kernel's operands, gemm_tile.h) with T,
//     load(const uint32_t*) (W pairs), bcast(const uint32_t*) (one pair in every lane),
//     step(acc, a, b) = one VDPBF16PS lane per lane (bf16_pair.h), and Mode: an object whose lifetime
//     brackets the arithmetic (sets and restores what the FMAs need).
// With QACONV_PAIRS_ONLY defined, only the bfloat16 kernel is compiled. No include guard: it is meant to be
// included several times.

constexpr int64_t kNV = 3;              // vectors per row of the register block
constexpr int64_t kNR = kNV * Vec::W;   // columns per strip
constexpr int64_t kKC = 128;            // steps (channels, or channel pairs) per pass: a strip's slice stays in L1

// The float32 kernel's operands: one channel per step, one FMA.
struct Floats {
  using E = float;
  using T = typename Vec::T;
  struct Mode {};
  static inline T load(const float* p) { return Vec::load(p); }
  static inline T bcast(const float* p) { return Vec::bcast(p); }
  static inline T step(T acc, T a, T b) { return Vec::fma(a, b, acc); }
};

// One kMR x kNR block of S: acc[i][v] = the chain of Op::step over the steps (channels or channel pairs) of
// A[.][i] and B[.][v*W ...], one chain per element. With `resume`, the chain continues from the partial sums
// in S (stored as the floats the registers held, so splitting the steps into passes does not change a bit).
template <typename Op>
inline void micro_tile(const typename Op::E* __restrict A, const typename Op::E* __restrict B, int64_t steps,
                       float* __restrict S, int64_t ldS, bool resume) {
  typename Vec::T acc[kMR][kNV];
#pragma GCC unroll 4
  for (int64_t i = 0; i < kMR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNV; ++v) acc[i][v] = resume ? Vec::load(S + i * ldS + v * Vec::W) : Vec::zero();
  for (int64_t c = 0; c < steps; ++c) {
    typename Op::T b[kNV];
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNV; ++v) b[v] = Op::load(B + c * kNR + v * Vec::W);
#pragma GCC unroll 4
    for (int64_t i = 0; i < kMR; ++i) {
      const typename Op::T a = Op::bcast(A + c * kMR + i);
#pragma GCC unroll 3
      for (int64_t v = 0; v < kNV; ++v) acc[i][v] = Op::step(acc[i][v], a, b[v]);
    }
  }
#pragma GCC unroll 4
  for (int64_t i = 0; i < kMR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNV; ++v) Vec::store(S + i * ldS + v * Vec::W, acc[i][v]);
}

// The whole tile: every strip of B against every row block of A, in passes of kKC steps (in order).
// A strip's slice ([kKC][kNR]) stays in L1 while the row blocks of A stream past it. Not inlined into
// run_with, so that no arithmetic moves across the Mode object's set-up or restore.
template <typename Op>
__attribute__((noinline)) void tile_passes(const typename Op::E* A, int64_t row_blocks, const typename Op::E* B,
                                           int64_t strips, int64_t steps, float* S, int64_t ldS) {
  for (int64_t c0 = 0; c0 < steps; c0 += kKC) {
    const int64_t kc = steps - c0 < kKC ? steps - c0 : kKC;
    for (int64_t t = 0; t < strips; ++t)
      for (int64_t b = 0; b < row_blocks; ++b)
        micro_tile<Op>(A + (b * steps + c0) * kMR, B + (t * steps + c0) * kNR, kc, S + b * kMR * ldS + t * kNR,
                       ldS, c0 > 0);
  }
}

template <typename Op>
inline void run_with(const typename Op::E* A, int64_t row_blocks, const typename Op::E* B, int64_t strips,
                     int64_t steps, float* S, int64_t ldS) {
  [[maybe_unused]] typename Op::Mode mode;
  tile_passes<Op>(A, row_blocks, B, strips, steps, S, ldS);
}

#ifndef QACONV_PAIRS_ONLY
void run_tile(const float* A, int64_t row_blocks, const float* B, int64_t strips, int64_t d, float* S, int64_t ldS) {
  run_with<Floats>(A, row_blocks, B, strips, d, S, ldS);
}
#endif

void run_tile_bf16(const uint32_t* A, int64_t row_blocks, const uint32_t* B, int64_t strips, int64_t pairs, float* S,
                   int64_t ldS) {
  run_with<Pairs>(A, row_blocks, B, strips, pairs, S, ldS);
}
