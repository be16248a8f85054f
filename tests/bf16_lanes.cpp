// Test driver for the bfloat16 tile kernels (built and run by tests/test_cpu_kernel.py with the C++ compiler):
//
//   bf16_lanes LANES SEED
//
// 1. "instruction": LANES random VDPBF16PS lanes (bfloat16 pairs and float32 accumulators drawn over the whole
//    range: denormals, zeros, infinities, NaNs, sums that land next to FLT_MIN) through _mm512_dpbf16_ps and
//    through the portable twin (csrc/cpu/bf16_pair.h); counts lanes whose bits differ (two NaNs count as equal).
//    For scale it also counts the lanes where the products in the other order, the exact sum rounded once, or
//    a flush of the gradual-underflow result (instead of tininess after rounding) would differ. Prints "instruction unavailable: <reason>" where the processor or compiler lacks it.
// 2. "tile": every tile-kernel variant this processor runs, on channel-pair tiles whose sums keep crossing
//    FLT_MIN (denormal inputs, flushed results, several 128-pair passes), against the portable variant.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/bf16_pair.h"
#include "cpu/gemm_tile.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

using qaconv::cpu::bf16_pair;
using qaconv::cpu::bits_to_float;

namespace {

uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || float_bits(a) == float_bits(b); }

struct Draw {
  std::mt19937_64 rng;
  explicit Draw(uint64_t seed) : rng(seed) {}
  uint32_t bits(int n) { return uint32_t(rng() & ((uint64_t(1) << n) - 1)); }
  // A bfloat16 with biased exponent in [lo, hi] (0: zero/denormal, 255: infinity/NaN), random sign and mantissa.
  uint16_t bf16(int lo, int hi) {
    const int e = lo + int(rng() % uint64_t(hi - lo + 1));
    uint16_t m = uint16_t(bits(7));
    if (e == 255 && (rng() % 2)) m = 0;  // as many infinities as NaNs
    return uint16_t((bits(1) << 15) | (e << 7) | m);
  }
  // The mixtures: anything; exponents near the bias (ordinary sums); products next to 2^-126; denormals;
  // products of about 2^-150 added to accumulators at FLT_MIN (sums within half an ulp of FLT_MIN, where
  // tininess after rounding and gradual underflow disagree).
  static constexpr int kKinds = 5;
  uint16_t any_bf16(int kind) {
    switch (kind) {
      case 0: return bf16(0, 255);
      case 1: return bf16(118, 134);
      case 2: return bf16(60, 68);
      case 3: return bf16(0, 2);
      default: return bf16(50, 53);
    }
  }
  float acc(int kind) {
    const uint32_t sign = bits(1) << 31;
    switch (kind) {
      case 0: return bits_to_float(bits(32));
      case 1: return bits_to_float(sign | ((118 + bits(4)) << 23) | bits(23));
      case 2: return bits_to_float(sign | ((1 + bits(1)) << 23) | bits(23));  // just above FLT_MIN
      case 3: return bits_to_float(sign | bits(23));                          // denormal
      default: return bits_to_float(sign | (1u << 23) | bits(2));              // FLT_MIN and the next 3
    }
  }
};

#if HAVE_X86
__attribute__((target("avx512f,avx512bf16"))) void dpbf16(const uint32_t* a, const uint32_t* b, float* acc) {
  const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(b);
  _mm512_storeu_ps(acc, _mm512_dpbf16_ps(_mm512_loadu_ps(acc), (__m512bh)va, (__m512bh)vb));
}
#endif

int instruction_lanes(long lanes, uint64_t seed) {
#if !HAVE_X86
  std::printf("instruction unavailable: not an x86-64 build\n");
  return 0;
#else
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("instruction unavailable: this processor lacks avx512_bf16\n");
    return 0;
  }
  Draw draw(seed);
  long n = 0, nan = 0, mismatch = 0, other_order = 0, one_rounding = 0, flushed = 0, gradual_flush = 0;
  // the flush by gradual underflow's result (|r| < FLT_MIN), which misses the results that round up to FLT_MIN
  auto flush_gradual = [](float a, float b, float c) {
    const float r = std::fma(a, b, c);
    return std::fabs(r) < FLT_MIN ? std::copysign(0.0f, r) : r;
  };
  using qaconv::cpu::fma_ftz;
  using qaconv::cpu::pair_hi;
  using qaconv::cpu::pair_lo;
  while (n < lanes) {
    uint32_t a[16], b[16];
    float acc[16], in[16];
    const int kind = int(draw.rng() % Draw::kKinds);
    for (int i = 0; i < 16; ++i) {
      a[i] = bf16_pair(draw.any_bf16(kind), draw.any_bf16(kind));
      b[i] = bf16_pair(draw.any_bf16(kind), draw.any_bf16(kind));
      in[i] = acc[i] = draw.acc(kind);
    }
    dpbf16(a, b, acc);
    for (int i = 0; i < 16; ++i, ++n) {
      const float twin = qaconv::cpu::dot2_twin(a[i], b[i], in[i]);
      nan += std::isnan(acc[i]);
      mismatch += !same(acc[i], twin);
      if (mismatch == 1 && !same(acc[i], twin))
        std::printf("first mismatch: a %08x b %08x acc %a: instruction %a twin %a\n", a[i], b[i], double(in[i]),
                    double(acc[i]), double(twin));
      const float a0 = std::fabs(in[i]) < FLT_MIN ? 0.0f * in[i] : in[i];
      const float even_first = fma_ftz(pair_hi(a[i]), pair_hi(b[i]), fma_ftz(pair_lo(a[i]), pair_lo(b[i]), a0));
      other_order += !same(acc[i], even_first);
      const double exact = double(pair_hi(a[i])) * double(pair_hi(b[i])) +
                           double(pair_lo(a[i])) * double(pair_lo(b[i])) + double(a0);
      one_rounding += !same(acc[i], float(exact));
      flushed += acc[i] == 0.0f && exact != 0.0;
      gradual_flush += !same(acc[i], flush_gradual(pair_lo(a[i]), pair_lo(b[i]),
                                                   flush_gradual(pair_hi(a[i]), pair_hi(b[i]), a0)));
    }
  }
  std::printf("instruction lanes %ld nan %ld mismatches %ld other_order_differs %ld one_rounding_differs %ld "
              "flushed %ld gradual_flush_differs %ld\n", n, nan, mismatch, other_order, one_rounding, flushed,
              gradual_flush);
  return 0;
#endif
}

const qaconv::cpu::TileKernel* variant(const char* name) {
  setenv("QACONV_CPU_KERNEL", name, 1);
  const char* error = nullptr;
  return qaconv::cpu::select_tile_kernel(&error);
}

int tiles(uint64_t seed) {
  using qaconv::cpu::kMR;
  Draw draw(seed ^ 0x5eed);
  const int64_t row_blocks = 3, pairs = 300;
  const char* names[] = {"generic", "generic16", "avx2", "avx512", "avx512bf16"};
  const int64_t cols = 96;  // a multiple of every variant's nr (24, 48)
  std::vector<uint32_t> A(row_blocks * pairs * kMR), B(cols * pairs);
  for (auto& x : A) x = bf16_pair(draw.bf16(draw.rng() % 8 ? 60 : 0, 66), draw.bf16(draw.rng() % 8 ? 60 : 0, 66));
  for (auto& x : B) x = bf16_pair(draw.bf16(draw.rng() % 8 ? 60 : 0, 66), draw.bf16(draw.rng() % 8 ? 60 : 0, 66));
  // a variant's tile: B ([column][pair]) packed into strips of its nr columns
  auto run = [&](const qaconv::cpu::TileKernel* k, std::vector<float>& S) {
    std::vector<uint32_t> panel(cols * pairs);
    for (int64_t st = 0; st < cols / k->nr; ++st)
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t j = 0; j < k->nr; ++j) panel[(st * pairs + p) * k->nr + j] = B[(st * k->nr + j) * pairs + p];
    S.assign(row_blocks * kMR * cols, 0.0f);
    k->run_bf16(A.data(), row_blocks, panel.data(), cols / k->nr, pairs, S.data(), cols);
  };
  // the reference: the twin's chain, element by element
  std::vector<float> want(row_blocks * kMR * cols);
  long unflushed_differs = 0;  // elements a chain with gradual underflow would get wrong: the flush matters
  for (int64_t s = 0; s < row_blocks * kMR; ++s)
    for (int64_t c = 0; c < cols; ++c) {
      float acc = 0.0f, gradual = 0.0f;
      for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t a = A[((s / kMR) * pairs + p) * kMR + s % kMR], b = B[c * pairs + p];
        acc = qaconv::cpu::dot2_twin(a, b, acc);
        gradual = std::fma(bits_to_float(a << 16), bits_to_float(b << 16),
                           std::fma(bits_to_float(a & 0xffff0000u), bits_to_float(b & 0xffff0000u), gradual));
      }
      want[s * cols + c] = acc;
      unflushed_differs += !same(acc, gradual);
    }
  std::printf("tile elements %ld unflushed_differs %ld\n", long(want.size()), unflushed_differs);
  for (const char* name : names) {
    const qaconv::cpu::TileKernel* k = variant(name);
    if (k == nullptr) {
      std::printf("tile %s unavailable\n", name);
      continue;
    }
    std::vector<float> S;
    run(k, S);
    long mismatch = 0;
    for (size_t i = 0; i < S.size(); ++i) mismatch += !same(S[i], want[i]);
    std::printf("tile %s mismatches %ld\n", name, mismatch);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const long lanes = argc > 1 ? std::atol(argv[1]) : 3200000;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  return instruction_lanes(lanes, seed) | tiles(seed);
}
