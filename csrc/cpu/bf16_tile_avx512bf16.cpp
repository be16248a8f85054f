// bfloat16 similarity tiles on AVX512-BF16: `vdpbf16ps` multiplies pairs of bfloat16 values and adds
// both products to float32 accumulators.
//
// This translation unit is compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16 and is entered
// only after a run-time check of the processor (cpu/isa.cpp). It includes no torch or standard-library
// headers with inline functions, and everything here has internal linkage except the entry points
// declared in bf16_tile.h, so no code generated for these instructions is shared with the rest of the
// library.
#include "cpu/bf16_tile.h"

// GCC 12's AVX-512 intrinsic headers initialise their "undefined" vectors from themselves, which -Wall
// reports at every inlined use.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>

namespace qaconv {
namespace bf16 {
namespace {

// Register block of the micro-kernel: kRows query locations x kVectors groups of 16 gallery locations,
// kRows * kVectors float32 accumulators (of 32 zmm registers), plus kVectors column loads and one
// broadcast per channel pair.
constexpr int kRows = 8;
constexpr int kVectors = 3;
constexpr uint16_t kSafeMagnitude = (127 + 48) << 7;  // bfloat16 bits of 2^48

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m512bh as_pairs(__m512i x) { return reinterpret_cast<__m512bh>(x); }

inline __m512i broadcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// acc[i][v] = sum over channel pairs of row i times the 16 locations of group v.
template <int M, int V>
__attribute__((always_inline)) inline void accumulate(const uint16_t* rows, int64_t dp, const uint16_t* groups,
                                                      int64_t group_stride, __m512 (&acc)[M][V]) {
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t pairs = dp / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    __m512bh col[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) col[v] = as_pairs(_mm512_load_si512(groups + v * group_stride + k * 2 * kGroup));
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512bh row = as_pairs(broadcast_pair(rows + i * dp + 2 * k));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], row, col[v]);
    }
  }
}

// M rows x V groups of S, stored.
template <int M, int V>
void store_block(const uint16_t* rows, int64_t dp, const uint16_t* groups, int64_t group_stride, __mmask16,
                 float* S, int64_t ld, float*) {
  __m512 acc[M][V];
  accumulate<M, V>(rows, dp, groups, group_stride, acc);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(S + i * ld + v * kGroup, acc[i][v]);
}

// M rows x V groups of S, max-pooled: row_part[i] (16 lanes per row) takes the lane-wise max over the
// groups, col_max[v * 16 + j] the max over the rows. Lanes of the last group outside `tail` are padding
// locations and take part in neither.
template <int M, int V>
void max_block(const uint16_t* rows, int64_t dp, const uint16_t* groups, int64_t group_stride, __mmask16 tail,
               float* col_max, int64_t, float* row_part) {
  __m512 acc[M][V];
  accumulate<M, V>(rows, dp, groups, group_stride, acc);
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
    __m512 r = V == 1 ? _mm512_mask_mov_ps(neg_inf, tail, acc[i][0]) : acc[i][0];
#pragma GCC unroll 4
    for (int v = 1; v < V; ++v)
      r = v == V - 1 ? _mm512_mask_max_ps(r, tail, r, acc[i][v]) : _mm512_max_ps(r, acc[i][v]);
    _mm512_store_ps(row_part + i * kGroup, _mm512_max_ps(_mm512_load_ps(row_part + i * kGroup), r));
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    __m512 c = acc[0][v];
#pragma GCC unroll 8
    for (int i = 1; i < M; ++i) c = _mm512_max_ps(c, acc[i][v]);
    float* dst = col_max + v * kGroup;
    if (v == V - 1) {
      _mm512_mask_storeu_ps(dst, tail, _mm512_max_ps(_mm512_maskz_loadu_ps(tail, dst), c));
    } else {
      _mm512_storeu_ps(dst, _mm512_max_ps(_mm512_loadu_ps(dst), c));
    }
  }
}

using Block = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, __mmask16, float*, int64_t, float*);

// table[v - 1][m - 1]: the block for m rows and v groups (a tile's remainders take the smaller ones).
#define QACONV_ROWS(KERNEL, V)                                                                          \
  {                                                                                                     \
    &KERNEL<1, V>, &KERNEL<2, V>, &KERNEL<3, V>, &KERNEL<4, V>, &KERNEL<5, V>, &KERNEL<6, V>, &KERNEL<7, V>, \
        &KERNEL<8, V>                                                                                   \
  }
static_assert(kRows == 8 && kVectors == 3, "the tables below list 8 row counts and 3 group counts");
const Block store_blocks[kVectors][kRows] = {QACONV_ROWS(store_block, 1), QACONV_ROWS(store_block, 2),
                                             QACONV_ROWS(store_block, 3)};
const Block max_blocks[kVectors][kRows] = {QACONV_ROWS(max_block, 1), QACONV_ROWS(max_block, 2),
                                           QACONV_ROWS(max_block, 3)};
#undef QACONV_ROWS

}  // namespace

namespace {

// The magnitude bits of two bfloat16 values per 32-bit word.
inline __m512i magnitudes(__m512i words) { return _mm512_and_si512(words, _mm512_set1_epi32(0x7fff7fff)); }

// Channel-major images whose locations sit at unit stride (contiguous [N, d, h, w]): a group's word k
// interleaves 16 consecutive values of channel 2k with those of channel 2k + 1.
bool pack_unit_locations(const ImageLayout& src, const uint16_t* image, int64_t dp, uint16_t* packed) {
  const int64_t L = src.height * src.width, groups = groups_of(L), pairs = dp / 2;
  __m512i largest = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t* out = reinterpret_cast<uint32_t*>(packed) + g * pairs * kGroup;
    const __mmask16 live = static_cast<__mmask16>((1u << min64(kGroup, L - g * kGroup)) - 1u);
    const uint16_t* first = image + g * kGroup;
    for (int64_t k = 0; k < pairs; ++k) {
      const int64_t c0 = 2 * k, c1 = 2 * k + 1;
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, first + c0 * src.channel_stride));
      const __m512i hi = c1 < src.channels
                             ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, first + c1 * src.channel_stride))
                             : _mm512_setzero_si512();
      const __m512i word = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      largest = _mm512_max_epu16(largest, magnitudes(word));
      _mm512_store_si512(out + k * kGroup, word);
    }
  }
  return _mm512_cmpge_epu16_mask(largest, _mm512_set1_epi16(static_cast<short>(kSafeMagnitude))) == 0;
}

// Location-major images (channels innermost, e.g. channels_last) with an even channel count: word k of
// a location is the 32-bit pair at its channel 2k, so a group's word k is one 16-lane gather.
bool pack_unit_channels(const ImageLayout& src, const uint16_t* image, int64_t dp, uint16_t* packed) {
  const int64_t L = src.height * src.width, groups = groups_of(L), pairs = dp / 2;
  __m512i largest = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t* out = reinterpret_cast<uint32_t*>(packed) + g * pairs * kGroup;
    const int64_t count = min64(kGroup, L - g * kGroup);
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1u);
    alignas(64) int32_t offset[kGroup] = {};
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = g * kGroup + i;
      offset[i] = static_cast<int32_t>(2 * ((r / src.width) * src.row_stride + (r % src.width) * src.column_stride));
    }
    const __m512i index = _mm512_load_si512(offset);
    for (int64_t k = 0; k < pairs; ++k) {
      const __m512i word = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, index, image + 2 * k, 1);
      largest = _mm512_max_epu16(largest, magnitudes(word));
      _mm512_store_si512(out + k * kGroup, word);
    }
  }
  return _mm512_cmpge_epu16_mask(largest, _mm512_set1_epi16(static_cast<short>(kSafeMagnitude))) == 0;
}

// Any strides: one value at a time.
bool pack_any(const ImageLayout& src, const uint16_t* image, int64_t dp, uint16_t* packed) {
  const int64_t L = src.height * src.width, groups = groups_of(L), pairs = dp / 2;
  uint16_t largest = 0;
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t* out = reinterpret_cast<uint32_t*>(packed) + g * pairs * kGroup;
    const int64_t count = min64(kGroup, L - g * kGroup);
    const uint16_t* loc[kGroup];
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = g * kGroup + i;
      loc[i] = image + (r / src.width) * src.row_stride + (r % src.width) * src.column_stride;
    }
    for (int64_t k = 0; k < pairs; ++k) {
      const int64_t c0 = 2 * k, c1 = 2 * k + 1;
      for (int64_t i = 0; i < kGroup; ++i) {
        uint32_t word = 0;
        if (i < count) {
          const uint16_t lo = loc[i][c0 * src.channel_stride];
          const uint16_t hi = c1 < src.channels ? loc[i][c1 * src.channel_stride] : 0;
          const uint16_t mag_lo = lo & 0x7fff, mag_hi = hi & 0x7fff;
          largest = mag_lo > largest ? mag_lo : largest;
          largest = mag_hi > largest ? mag_hi : largest;
          word = uint32_t(lo) | (uint32_t(hi) << 16);
        }
        out[k * kGroup + i] = word;
      }
    }
  }
  return largest < kSafeMagnitude;
}

}  // namespace

bool pack_image(const ImageLayout& src, int64_t n, int64_t dp, uint16_t* packed) {
  const uint16_t* image = src.base + n * src.image_stride;
  const int64_t L = src.height * src.width;
  if (src.column_stride == 1 && src.row_stride == src.width) return pack_unit_locations(src, image, dp, packed);
  const int64_t last = (src.height - 1) * src.row_stride + (src.width - 1) * src.column_stride;
  if (src.channel_stride == 1 && src.channels % 2 == 0 && L > 0 && 2 * last < (int64_t(1) << 31))
    return pack_unit_channels(src, image, dp, packed);
  return pack_any(src, image, dp, packed);
}

namespace {

// Runs `table`'s blocks over gallery image b of the tile: column panels of up to kVectors groups outer
// (a panel stays in L1 while the rows stream past), row blocks of up to kRows locations inner. With
// `per_query`, row blocks stay within one query's Lq rows (its column maxima are its own) and block
// (a, s0, g0) gets output target(a, s0, g0) and row-maxima scratch work + (a * Lq + s0) * 16; otherwise
// row blocks run over all the tile's rows, row r0 getting target(0, r0, g0).
template <typename Target>
inline void run_image(const Tile& t, int64_t b, const Block (&table)[kVectors][kRows], int64_t ld, bool per_query,
                      Target&& target, float* work) {
  const int64_t groups = groups_of(t.Lg), group_stride = kGroup * t.dp;
  const __mmask16 full = 0xffff;
  const __mmask16 tail = static_cast<__mmask16>((1u << (t.Lg - (groups - 1) * kGroup)) - 1u);
  const uint16_t* image = t.packed + b * groups * group_stride;
  for (int64_t g0 = 0; g0 < groups; g0 += kVectors) {
    const int64_t v = min64(kVectors, groups - g0);
    const __mmask16 mask = g0 + v == groups ? tail : full;
    const uint16_t* panel = image + g0 * group_stride;
    const int64_t blocks = per_query ? t.queries : 1, rows = per_query ? t.Lq : t.queries * t.Lq;
    for (int64_t a = 0; a < blocks; ++a)
      for (int64_t s0 = 0; s0 < rows; s0 += kRows) {
        const int64_t m = min64(kRows, rows - s0), row = a * rows + s0;
        table[v - 1][m - 1](t.rows + row * t.dp, t.dp, panel, group_stride, mask, target(a, s0, g0), ld,
                            per_query ? work + row * kGroup : nullptr);
      }
  }
}

}  // namespace

void similarities(const Tile& t, float* S, int64_t ld) {
  const int64_t width = groups_of(t.Lg) * kGroup;
  for (int64_t b = 0; b < t.images; ++b)
    run_image(t, b, store_blocks, ld, false,
              [&](int64_t, int64_t row, int64_t g0) { return S + row * ld + b * width + g0 * kGroup; }, nullptr);
}

void maxima(const Tile& t, float* out, int64_t stride_a, int64_t stride_b, float* work) {
  const float neg_inf = -__builtin_inff();
  const int64_t rows = t.queries * t.Lq;
  for (int64_t b = 0; b < t.images; ++b) {
    for (int64_t i = 0; i < rows * kGroup; ++i) work[i] = neg_inf;
    for (int64_t a = 0; a < t.queries; ++a) {
      float* col = out + a * stride_a + b * stride_b + t.Lq;
      for (int64_t r = 0; r < t.Lg; ++r) col[r] = neg_inf;
    }
    run_image(t, b, max_blocks, 0, true,
              [&](int64_t a, int64_t, int64_t g0) { return out + a * stride_a + b * stride_b + t.Lq + g0 * kGroup; },
              work);
    for (int64_t a = 0; a < t.queries; ++a)
      for (int64_t s = 0; s < t.Lq; ++s)
        out[a * stride_a + b * stride_b + s] = _mm512_reduce_max_ps(_mm512_load_ps(work + (a * t.Lq + s) * kGroup));
  }
}

double dot(const float* x, const double* w, int64_t n) {
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + k)), _mm512_loadu_pd(w + k), acc0);
    acc1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + k + 8)), _mm512_loadu_pd(w + k + 8), acc1);
  }
  for (; k < n; k += 8) {
    const __mmask8 m = static_cast<__mmask8>((1u << min64(8, n - k)) - 1u);
    acc0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + k)), _mm512_maskz_loadu_pd(m, w + k), acc0);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
}

}  // namespace bf16
}  // namespace qaconv
