// The bfloat16 micro-kernel body, included once per instruction-set variant by gemm_tile.cpp inside that
// variant's namespace (and target region), after a float vector type `Vec` (zero, load, store; W lanes) and
// a channel-pair type `Pairs` with
//   T, load(const uint32_t*) (W pairs), bcast(const uint32_t*) (one pair in every lane),
//   dot2(acc, a, b) = one VDPBF16PS lane per lane (gemm_tile.h, bf16_pair.h),
//   Mode: an object whose lifetime brackets the arithmetic (sets and restores what the FMAs need).
// No include guard: it is meant to be included several times.

constexpr int64_t kNVPairs = 3;                       // vectors per row of the register block
constexpr int64_t kNRPairs = kNVPairs * Vec::W;       // columns per strip (the float kernel's nr)
constexpr int64_t kKCPairs = 128;                     // channel pairs per pass: a strip's slice stays in L1

// One kMR x kNRPairs block of S: one dot2 chain over the pairs per element, resumed from S with `resume`.
inline void micro_tile_bf16(const uint32_t* __restrict A, const uint32_t* __restrict B, int64_t pairs,
                            float* __restrict S, int64_t ldS, bool resume) {
  typename Vec::T acc[kMR][kNVPairs];
#pragma GCC unroll 4
  for (int64_t i = 0; i < kMR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNVPairs; ++v)
      acc[i][v] = resume ? Vec::load(S + i * ldS + v * Vec::W) : Vec::zero();
  for (int64_t k = 0; k < pairs; ++k) {
    typename Pairs::T b[kNVPairs];
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNVPairs; ++v) b[v] = Pairs::load(B + k * kNRPairs + v * Vec::W);
#pragma GCC unroll 4
    for (int64_t i = 0; i < kMR; ++i) {
      const typename Pairs::T a = Pairs::bcast(A + k * kMR + i);
#pragma GCC unroll 3
      for (int64_t v = 0; v < kNVPairs; ++v) acc[i][v] = Pairs::dot2(acc[i][v], a, b[v]);
    }
  }
#pragma GCC unroll 4
  for (int64_t i = 0; i < kMR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < kNVPairs; ++v) Vec::store(S + i * ldS + v * Vec::W, acc[i][v]);
}

// The passes over the pairs, strips and row blocks; not inlined into run_tile_bf16, so that no arithmetic
// moves across the Mode object's set-up or restore.
__attribute__((noinline)) void tile_passes_bf16(const uint32_t* A, int64_t row_blocks, const uint32_t* B,
                                                int64_t strips, int64_t pairs, float* S, int64_t ldS) {
  for (int64_t k0 = 0; k0 < pairs; k0 += kKCPairs) {
    const int64_t kc = pairs - k0 < kKCPairs ? pairs - k0 : kKCPairs;
    for (int64_t t = 0; t < strips; ++t)
      for (int64_t b = 0; b < row_blocks; ++b)
        micro_tile_bf16(A + (b * pairs + k0) * kMR, B + (t * pairs + k0) * kNRPairs, kc,
                        S + b * kMR * ldS + t * kNRPairs, ldS, k0 > 0);
  }
}

void run_tile_bf16(const uint32_t* A, int64_t row_blocks, const uint32_t* B, int64_t strips, int64_t pairs,
                   float* S, int64_t ldS) {
  [[maybe_unused]] typename Pairs::Mode mode;
  tile_passes_bf16(A, row_blocks, B, strips, pairs, S, ldS);
}
