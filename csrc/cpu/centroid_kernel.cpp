// Gather-max kernels of the centroid-coded candidate scores (see centroid_kernel.h). Plain C++ with the
// compilers' vector extension (no intrinsics): a block of query locations stays in registers while a map's
// table rows are max-ed in (64 float32 or up to 256 uint8 locations); target_clones builds AVX-512 and AVX2
// variants beside the portable one and picks the processor's best at load time.
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QACONV_NO_MULTIVERSION)
#define QACONV_CENTROID_U8_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define QACONV_CENTROID_U8_MULTIVERSION
#endif

// Eight floats: one AVX2 register (GCC/Clang vector extension; the portable clone splits it in two).
typedef float vf8 __attribute__((vector_size(32)));
// 64 bytes: one AVX-512 register (two AVX2 ones, four SSE2 ones), and 8 bytes to widen to eight floats.
typedef uint8_t vu64 __attribute__((vector_size(64)));
typedef uint8_t vu8 __attribute__((vector_size(8)));
constexpr int64_t kBytes = 64;
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

// The uint8 twin of block_maxima: acc[0 .. V*64) = max over j of table[ids[j]][i0 + 0 .. V*64).
template <int64_t V>
inline __attribute__((always_inline)) void block_maxima_u8(const uint8_t* table, int64_t Lq, int64_t i0,
                                                          const uint16_t* ids, int64_t Lg, uint8_t* acc) {
  vu64 a[V];
#pragma GCC unroll 4
  for (int64_t v = 0; v < V; ++v) a[v] = vu64{};  // 0 is the smallest level
  for (int64_t j = 0; j < Lg; ++j) {
    const uint8_t* row = table + static_cast<int64_t>(ids[j]) * Lq + i0;
#pragma GCC unroll 4
    for (int64_t v = 0; v < V; ++v) {
      vu64 x;
      std::memcpy(&x, row + v * kBytes, sizeof x);
      a[v] = a[v] < x ? x : a[v];
    }
  }
#pragma GCC unroll 4
  for (int64_t v = 0; v < V; ++v) std::memcpy(acc + v * kBytes, &a[v], sizeof(vu64));
}

// Eight partial sums folded pairwise: ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
inline __attribute__((always_inline)) float fold(const vf8& s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// sum_i w[i] * x[i]: partial sums over i mod 8, folded, then the last n mod 8 terms in order.
template <typename T>
inline __attribute__((always_inline)) float weighted_sum(const float* w, const T* x, int64_t n) {
  vf8 acc{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vf8 wv, xv;
    std::memcpy(&wv, w + i, sizeof wv);
    if constexpr (sizeof(T) == 1) {
      vu8 b;
      std::memcpy(&b, x + i, sizeof b);
      xv = __builtin_convertvector(b, vf8);
    } else {
      std::memcpy(&xv, x + i, sizeof xv);
    }
    acc += wv * xv;
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += w[i] * static_cast<float>(x[i]);
  return fold(acc) + tail;
}

// sum_j w_col[j] * colmax[ids[j]], in the order of weighted_sum.
inline __attribute__((always_inline)) float column_term(const float* w_col, const float* colmax, const uint16_t* ids,
                                                        int64_t Lg) {
  vf8 acc{};
  int64_t j = 0;
  for (; j + 8 <= Lg; j += 8) {
    vf8 wv;
    std::memcpy(&wv, w_col + j, sizeof wv);
    const vf8 g = {colmax[ids[j]],     colmax[ids[j + 1]], colmax[ids[j + 2]], colmax[ids[j + 3]],
                   colmax[ids[j + 4]], colmax[ids[j + 5]], colmax[ids[j + 6]], colmax[ids[j + 7]]};
    acc += wv * g;
  }
  float tail = 0.0f;
  for (; j < Lg; ++j) tail += w_col[j] * colmax[ids[j]];
  return fold(acc) + tail;
}

inline int64_t ids_out_of_range(const uint16_t* ids, int64_t Lg, int64_t K) {
  int64_t over = 0;
  for (int64_t j = 0; j < Lg; ++j) over += ids[j] >= K;
  return over;
}

// sum_i w_row[i] * max_j table[ids[j]][i] from a float32 table (base unused).
inline __attribute__((always_inline)) float row_term(const CentroidTable& t, const uint16_t* ids, int64_t Lg,
                                                     const float* w_row, float* scratch, float /*base*/) {
  const int64_t Lq = t.Lq;
  int64_t i0 = 0;
  for (; i0 + kVectors * kWidth <= Lq; i0 += kVectors * kWidth)
    block_maxima<kVectors>(t.table, Lq, i0, ids, Lg, scratch + i0);
  for (; i0 + kWidth <= Lq; i0 += kWidth) block_maxima<1>(t.table, Lq, i0, ids, Lg, scratch + i0);
  if (i0 < Lq) scalar_maxima(t.table, Lq, i0, Lq, ids, Lg, scratch + i0);
  return weighted_sum(w_row, scratch, Lq);
}

// The same from a uint8 table: base + step * sum_i w_row[i] * max_j q[ids[j]][i], base = offset * sum_i w_row[i].
inline __attribute__((always_inline)) float row_term(const CentroidTableU8& t, const uint16_t* ids, int64_t Lg,
                                                     const float* w_row, uint8_t* scratch, float base) {
  const int64_t Lq = t.Lq;
  int64_t i0 = 0;
  for (; i0 + 4 * kBytes <= Lq; i0 += 4 * kBytes) block_maxima_u8<4>(t.table, Lq, i0, ids, Lg, scratch + i0);
  if (i0 + 2 * kBytes <= Lq) {
    block_maxima_u8<2>(t.table, Lq, i0, ids, Lg, scratch + i0);
    i0 += 2 * kBytes;
  }
  if (i0 + kBytes <= Lq) {
    block_maxima_u8<1>(t.table, Lq, i0, ids, Lg, scratch + i0);
    i0 += kBytes;
  }
  if (i0 < Lq) {
    for (int64_t i = i0; i < Lq; ++i) scratch[i] = 0;
    for (int64_t j = 0; j < Lg; ++j) {
      const uint8_t* row = t.table + static_cast<int64_t>(ids[j]) * Lq;
      for (int64_t i = i0; i < Lq; ++i) scratch[i] = std::max(scratch[i], row[i]);
    }
  }
  return base + t.step * weighted_sum(w_row, scratch, Lq);
}

// The loop both kernels share (inlined into each processor variant): every map's row term, column term and
// bias; a map with ids >= K scores 0 and its bad ids are counted.
template <typename Table, typename Scratch>
inline __attribute__((always_inline)) int64_t score_maps(const Table& t, const uint16_t* codes, int64_t Lg,
                                                        int64_t n0, int64_t n1, const float* w_row,
                                                        const float* w_col, float bias, float* out,
                                                        Scratch* scratch, float base) {
  int64_t bad = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* ids = codes + n * Lg;
    if (const int64_t over = ids_out_of_range(ids, Lg, t.K)) {
      bad += over;
      out[n - n0] = 0.0f;
      continue;
    }
    const float rows = row_term(t, ids, Lg, w_row, scratch, base);
    const float cols = column_term(w_col, t.colmax, ids, Lg);
    out[n - n0] = (rows + cols) + bias;
  }
  return bad;
}

}  // namespace

QACONV_CENTROID_MULTIVERSION
int64_t centroid_scores(const CentroidTable& t, const uint16_t* codes, int64_t Lg, int64_t n0, int64_t n1,
                        const float* w_row, const float* w_col, float bias, float* out, float* scratch) {
  return score_maps(t, codes, Lg, n0, n1, w_row, w_col, bias, out, scratch, 0.0f);
}

QACONV_CENTROID_U8_MULTIVERSION
int64_t centroid_scores_u8(const CentroidTableU8& t, const uint16_t* codes, int64_t Lg, int64_t n0, int64_t n1,
                           const float* w_row, const float* w_col, float bias, float* out, uint8_t* scratch) {
  float w_row_sum = 0.0f;
  for (int64_t i = 0; i < t.Lq; ++i) w_row_sum += w_row[i];
  return score_maps(t, codes, Lg, n0, n1, w_row, w_col, bias, out, scratch, t.offset * w_row_sum);
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
