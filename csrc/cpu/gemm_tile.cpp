// Instruction-set variants of the tile micro-kernel (gemm_tile_body.h) and the choice among them.
// Plain C++ with intrinsics; no torch headers. Each variant compiles the same body with its own vector
// type; a target region lets a portable build carry the AVX2 and AVX-512 code, picked at run time.
#include "gemm_tile.h"

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

namespace qaconv {
namespace cpu {
namespace {

// Portable vector of W floats: std::fma per lane (exactly rounded, so these variants give the same bits
// as the FMA instructions of the x86 variants; compilers turn the lane loop into vector FMAs on targets
// that have them, e.g. aarch64).
template <int64_t Width>
struct GenericVec {
  static constexpr int64_t W = Width;
  struct T {
    float v[Width];
  };
  static inline T zero() {
    T r;
    for (int64_t k = 0; k < W; ++k) r.v[k] = 0.0f;
    return r;
  }
  static inline T load(const float* p) {
    T r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static inline T bcast(const float* p) {
    T r;
    for (int64_t k = 0; k < W; ++k) r.v[k] = *p;
    return r;
  }
  static inline T fma(const T& a, const T& b, const T& c) {
    T r;
    for (int64_t k = 0; k < W; ++k) r.v[k] = std::fma(a.v[k], b.v[k], c.v[k]);
    return r;
  }
  static inline void store(float* p, const T& v) { std::memcpy(p, v.v, sizeof(v.v)); }
};

namespace generic8 {
using Vec = GenericVec<8>;
#include "gemm_tile_body.h"
}  // namespace generic8

namespace generic16 {
using Vec = GenericVec<16>;
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

QACONV_TARGET_BEGIN("avx2,fma")
namespace avx2 {
QACONV_X86_VEC(8, __m256, _mm256)
#include "gemm_tile_body.h"
}  // namespace avx2
QACONV_TARGET_END

QACONV_TARGET_BEGIN("avx512f")
namespace avx512 {
QACONV_X86_VEC(16, __m512, _mm512)
#include "gemm_tile_body.h"
}  // namespace avx512
QACONV_TARGET_END
#undef QACONV_X86_VEC
#endif

const TileKernel kGeneric8{"generic", generic8::kNR, &generic8::run_tile};
const TileKernel kGeneric16{"generic16", generic16::kNR, &generic16::run_tile};
#if QACONV_X86_VARIANTS
const TileKernel kAvx2{"avx2", avx2::kNR, &avx2::run_tile};
const TileKernel kAvx512{"avx512", avx512::kNR, &avx512::run_tile};
#endif

bool supported(const TileKernel* k) {
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
       })
    if (std::strcmp(name, k->name) == 0) return k;
  return nullptr;
}

const TileKernel* pick_best() {
#if QACONV_X86_VARIANTS
  __builtin_cpu_init();
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
    *error = "unknown kernel (known: auto, avx512, avx2, generic, generic16; avx512 and avx2 on x86-64 only)";
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
