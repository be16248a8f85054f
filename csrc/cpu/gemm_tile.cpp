// Instruction-set variants of the tile micro-kernels (gemm_tile_body.h) and the choice among them.
// Plain C++ with intrinsics; no torch headers. Each variant compiles the same body with its own vector
// type; a target region lets a portable build carry the AVX2 and AVX-512 code, picked at run time.
#include "gemm_tile.h"

#include "bf16_pair.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QACONV_NO_MULTIVERSION)
#define QACONV_X86_VARIANTS 1
#include <immintrin.h>
#else
#define QACONV_X86_VARIANTS 0
#endif
// _mm512_dpbf16_ps: GCC 10 and clang 9 on.
#if QACONV_X86_VARIANTS && ((defined(__clang__) && __clang_major__ >= 9) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define QACONV_X86_BF16 1
#else
#define QACONV_X86_BF16 0
#endif

namespace qaconv {
namespace cpu {
namespace {

// W lanes of E in a plain array: the portable variants' registers.
template <typename E, int64_t Width>
struct Lanes {
  E v[Width];
  static inline Lanes load(const E* p) {
    Lanes r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static inline Lanes bcast(const E* p) {
    Lanes r;
    for (int64_t k = 0; k < Width; ++k) r.v[k] = *p;
    return r;
  }
};

// Portable vector of W floats: std::fma per lane (exactly rounded, so these variants give the same bits
// as the FMA instructions of the x86 variants; compilers turn the lane loop into vector FMAs on targets
// that have them, e.g. aarch64).
template <int64_t Width>
struct GenericVec {
  static constexpr int64_t W = Width;
  using T = Lanes<float, Width>;
  static inline T zero() {
    const float z = 0.0f;
    return T::bcast(&z);
  }
  static inline T load(const float* p) { return T::load(p); }
  static inline T bcast(const float* p) { return T::bcast(p); }
  static inline T fma(const T& a, const T& b, const T& c) {
    T r;
    for (int64_t k = 0; k < W; ++k) r.v[k] = std::fma(a.v[k], b.v[k], c.v[k]);
    return r;
  }
  static inline void store(float* p, const T& v) { std::memcpy(p, v.v, sizeof(v.v)); }
};

// Portable channel pairs: W lanes of the VDPBF16PS twin (bf16_pair.h).
template <int64_t Width>
struct GenericPairs {
  using E = uint32_t;
  using T = Lanes<uint32_t, Width>;
  struct Mode {};
  static inline T load(const uint32_t* p) { return T::load(p); }
  static inline T bcast(const uint32_t* p) { return T::bcast(p); }
  static inline Lanes<float, Width> step(const Lanes<float, Width>& acc, const T& a, const T& b) {
    Lanes<float, Width> r;
    for (int64_t k = 0; k < Width; ++k) r.v[k] = dot2_twin(a.v[k], b.v[k], acc.v[k]);
    return r;
  }
};

namespace generic8 {
using Vec = GenericVec<8>;
using Pairs = GenericPairs<8>;
#include "gemm_tile_body.h"
}  // namespace generic8

namespace generic16 {
using Vec = GenericVec<16>;
using Pairs = GenericPairs<16>;
#include "gemm_tile_body.h"
}  // namespace generic16

#if QACONV_X86_VARIANTS
#if defined(__clang__)
#define QACONV_TARGET_BEGIN(ISA) _Pragma("clang attribute push (__attribute__((target(" #ISA "))), apply_to = function)")
#define QACONV_TARGET_END _Pragma("clang attribute pop")
#else
#define QACONV_PRAGMA(X) _Pragma(#X)
#define QACONV_TARGET_BEGIN(ISA) _Pragma("GCC push_options") QACONV_PRAGMA(GCC target(ISA))
#define QACONV_TARGET_END _Pragma("GCC pop_options")
#endif

// The x86 vector types: the same five operations, spelt with each instruction set's intrinsics.
#define QACONV_X86_VEC(WIDTH, TYPE, PFX)                                  \
  struct Vec {                                                            \
    static constexpr int64_t W = WIDTH;                                   \
    using T = TYPE;                                                       \
    static inline T zero() { return PFX##_setzero_ps(); }                 \
    static inline T load(const float* p) { return PFX##_loadu_ps(p); }    \
    static inline T bcast(const float* p) { return PFX##_set1_ps(*p); }   \
    static inline T fma(T a, T b, T c) { return PFX##_fmadd_ps(a, b, c); } \
    static inline void store(float* p, T v) { PFX##_storeu_ps(p, v); }    \
  };

// Channel pairs on the float FMA instructions: each pair split into its odd and even channel's float32
// (a bfloat16 is the high half of a float32), two FMAs in VDPBF16PS's order, with MXCSR's DAZ and FTZ
// set for the kernel's duration (restored after): the instruction's denormal handling, the same
// tininess-after-rounding rule. SFX: the integer intrinsics' suffix of the width; SHL16(v): each 32-bit
// lane of v shifted left by 16 (AVX-512 spelt with a full mask: GCC 12 warns on the unmasked intrinsic).
#define QACONV_X86_PAIRS(TYPE, ITYPE, PFX, SFX, SHL16)                                                    \
  struct Pairs {                                                                                    \
    using E = uint32_t;                                                                             \
    struct T {                                                                                      \
      TYPE hi, lo;                                                                                  \
    };                                                                                              \
    struct Mode {                                                                                   \
      unsigned int saved = _mm_getcsr();                                                            \
      Mode() { _mm_setcsr(saved | 0x8040u); } /* FTZ (bit 15) and DAZ (bit 6) */                    \
      ~Mode() { _mm_setcsr(saved); }                                                                \
      Mode(const Mode&) = delete;                                                                   \
      Mode& operator=(const Mode&) = delete;                                                        \
    };                                                                                              \
    static inline T split(ITYPE v) {                                                                \
      return {PFX##_castsi##SFX##_ps(PFX##_and_si##SFX(v, PFX##_set1_epi32(int(0xffff0000u)))),    \
              PFX##_castsi##SFX##_ps(SHL16(v))};                                                   \
    }                                                                                               \
    static inline T load(const uint32_t* p) { return split(PFX##_loadu_si##SFX(reinterpret_cast<const ITYPE*>(p))); } \
    static inline T bcast(const uint32_t* p) { return split(PFX##_set1_epi32(int(*p))); }           \
    static inline TYPE step(TYPE acc, const T& a, const T& b) {                                     \
      return PFX##_fmadd_ps(a.lo, b.lo, PFX##_fmadd_ps(a.hi, b.hi, acc));                           \
    }                                                                                               \
  };

QACONV_TARGET_BEGIN("avx2,fma")
namespace avx2 {
QACONV_X86_VEC(8, __m256, _mm256)
#define QACONV_SHL16(v) _mm256_slli_epi32(v, 16)
QACONV_X86_PAIRS(__m256, __m256i, _mm256, 256, QACONV_SHL16)
#undef QACONV_SHL16
#include "gemm_tile_body.h"
}  // namespace avx2
QACONV_TARGET_END

QACONV_TARGET_BEGIN("avx512f")
namespace avx512 {
QACONV_X86_VEC(16, __m512, _mm512)
#define QACONV_SHL16(v) _mm512_maskz_slli_epi32(__mmask16(0xffff), v, 16)
QACONV_X86_PAIRS(__m512, __m512i, _mm512, 512, QACONV_SHL16)
#undef QACONV_SHL16
#include "gemm_tile_body.h"
}  // namespace avx512
QACONV_TARGET_END
#undef QACONV_X86_PAIRS

#if QACONV_X86_BF16
// VDPBF16PS itself: 16 lanes of two bfloat16 products each. Its float32 kernel is avx512's.
QACONV_TARGET_BEGIN("avx512f,avx512bf16")
namespace avx512bf16 {
QACONV_X86_VEC(16, __m512, _mm512)
struct Pairs {
  using E = uint32_t;
  using T = __m512i;
  struct Mode {};
  static inline T load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static inline T bcast(const uint32_t* p) { return _mm512_set1_epi32(int(*p)); }
  static inline __m512 step(__m512 acc, T a, T b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};
#define QACONV_PAIRS_ONLY
#include "gemm_tile_body.h"
#undef QACONV_PAIRS_ONLY
}  // namespace avx512bf16
QACONV_TARGET_END
#endif
#undef QACONV_X86_VEC
#endif

const TileKernel kGeneric8{"generic", generic8::kNR, &generic8::run_tile, &generic8::run_tile_bf16};
const TileKernel kGeneric16{"generic16", generic16::kNR, &generic16::run_tile, &generic16::run_tile_bf16};
#if QACONV_X86_VARIANTS
const TileKernel kAvx2{"avx2", avx2::kNR, &avx2::run_tile, &avx2::run_tile_bf16};
const TileKernel kAvx512{"avx512", avx512::kNR, &avx512::run_tile, &avx512::run_tile_bf16};
#endif
#if QACONV_X86_BF16
const TileKernel kAvx512Bf16{"avx512bf16", avx512::kNR, &avx512::run_tile, &avx512bf16::run_tile_bf16};
static_assert(avx512bf16::kNR == avx512::kNR, "one nr per variant");
#endif

bool supported(const TileKernel* k) {
#if QACONV_X86_BF16
  if (k == &kAvx512Bf16) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#endif
#if QACONV_X86_VARIANTS
  if (k == &kAvx512) return __builtin_cpu_supports("avx512f");
  if (k == &kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  (void)k;
  return true;
}

const TileKernel* by_name(const char* name) {
  for (const TileKernel* k : {&kGeneric8, &kGeneric16
#if QACONV_X86_VARIANTS
                              , &kAvx2, &kAvx512
#endif
#if QACONV_X86_BF16
                              , &kAvx512Bf16
#endif
       })
    if (std::strcmp(name, k->name) == 0) return k;
  return nullptr;
}

const TileKernel* pick_best() {
#if QACONV_X86_VARIANTS
  __builtin_cpu_init();
#if QACONV_X86_BF16
  if (supported(&kAvx512Bf16)) return &kAvx512Bf16;
#endif
  if (supported(&kAvx512)) return &kAvx512;
  if (supported(&kAvx2)) return &kAvx2;
#endif
  return &kGeneric8;
}

}  // namespace

const TileKernel& best_tile_kernel() {
  static const TileKernel* best = pick_best();
  return *best;
}

const TileKernel* select_tile_kernel(const char** error) {
  const char* want = std::getenv("QACONV_CPU_KERNEL");
  if (want == nullptr || *want == '\0' || std::strcmp(want, "auto") == 0) return &best_tile_kernel();
  const TileKernel* k = by_name(want);
  if (k == nullptr) {
    *error = "unknown kernel (known: auto, avx512bf16, avx512, avx2, generic, generic16; avx512bf16, avx512 and "
             "avx2 on x86-64 only, avx512bf16 in builds by GCC >= 10 or clang >= 9)";
    return nullptr;
  }
  if (!supported(k)) {
    *error = "this processor lacks the instructions of that kernel";
    return nullptr;
  }
  return k;
}

}  // namespace cpu
}  // namespace qaconv
