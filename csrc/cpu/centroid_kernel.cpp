// Gather-max kernel of the centroid-coded candidate scores (see centroid_kernel.h). Plain C++ with the
// compilers' vector extension (no intrinsics): a block of 64 query locations stays in registers while a map's
// table rows are max-ed in; target_clones builds AVX-512 and AVX2 variants beside the portable one and picks
// the processor's best at load time.
#include "cpu/centroid_kernel.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace qaconv {
namespace cpu {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QACONV_NO_MULTIVERSION)
#define QACONV_CENTROID_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QACONV_CENTROID_MULTIVERSION
#endif

// Eight floats: one AVX2 register (GCC/Clang vector extension; the portable clone splits it in two).
typedef float vf8 __attribute__((vector_size(32)));
constexpr int64_t kWidth = 8;
// Query locations kept in registers while one map's ids are walked: 8 vectors, 64 floats.
constexpr int64_t kVectors = 8;

// a = max(a, p[0 .. 8)) (vectors are passed by reference only: no vector arguments or results in the ABI).
inline __attribute__((always_inline)) void max_load(vf8& a, const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof v);
  a = a < v ? v : a;
}

// acc[0 .. V*8) = max over the map's ids j of table[ids[j]][i0 + 0 .. V*8).
template <int64_t V>
inline __attribute__((always_inline)) void block_maxima(const float* table, int64_t Lq, int64_t i0,
                                                       const uint16_t* ids, int64_t Lg, float* acc) {
  vf8 a[V];
#pragma GCC unroll 8
  for (int64_t v = 0; v < V; ++v) a[v] = vf8{} - std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < Lg; ++j) {
    const float* row = table + static_cast<int64_t>(ids[j]) * Lq + i0;
#pragma GCC unroll 8
    for (int64_t v = 0; v < V; ++v) max_load(a[v], row + v * kWidth);
  }
#pragma GCC unroll 8
  for (int64_t v = 0; v < V; ++v) std::memcpy(acc + v * kWidth, &a[v], sizeof(vf8));
}

// The same for the last few locations, one at a time.
inline void scalar_maxima(const float* table, int64_t Lq, int64_t i0, int64_t i1, const uint16_t* ids, int64_t Lg,
                          float* acc) {
  for (int64_t i = i0; i < i1; ++i) acc[i - i0] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < Lg; ++j) {
    const float* row = table + static_cast<int64_t>(ids[j]) * Lq;
    for (int64_t i = i0; i < i1; ++i) acc[i - i0] = std::max(acc[i - i0], row[i]);
  }
}

}  // namespace

QACONV_CENTROID_MULTIVERSION
int64_t centroid_scores(const CentroidTable& t, const uint16_t* codes, int64_t Lg, int64_t n0, int64_t n1,
                        const float* w_row, const float* w_col, float bias, float* out, float* scratch) {
  const int64_t Lq = t.Lq, K = t.K;
  int64_t bad = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* ids = codes + n * Lg;
    int64_t over = 0;
    for (int64_t j = 0; j < Lg; ++j) over += ids[j] >= K;
    if (over) {
      bad += over;
      out[n - n0] = 0.0f;
      continue;
    }
    int64_t i0 = 0;
    for (; i0 + kVectors * kWidth <= Lq; i0 += kVectors * kWidth)
      block_maxima<kVectors>(t.table, Lq, i0, ids, Lg, scratch + i0);
    for (; i0 + kWidth <= Lq; i0 += kWidth) block_maxima<1>(t.table, Lq, i0, ids, Lg, scratch + i0);
    if (i0 < Lq) scalar_maxima(t.table, Lq, i0, Lq, ids, Lg, scratch + i0);
    float rows = 0.0f;
    for (int64_t i = 0; i < Lq; ++i) rows += w_row[i] * scratch[i];
    float cols = 0.0f;
    for (int64_t j = 0; j < Lg; ++j) cols += w_col[j] * t.colmax[ids[j]];
    out[n - n0] = (rows + cols) + bias;
  }
  return bad;
}

void centroid_table_maxima(const float* table, int64_t K, int64_t Lq, float* colmax) {
  for (int64_t k = 0; k < K; ++k) {
    const float* row = table + k * Lq;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < Lq; ++i) m = std::max(m, row[i]);
    colmax[k] = m;
  }
}

}  // namespace cpu
}  // namespace qaconv
