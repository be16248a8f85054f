// bfloat16 similarity tiles with float32 accumulation (AVX512-BF16 `vdpbf16ps`).
//
// The implementation lives in its own translation unit, compiled for AVX-512 with the BF16 extension,
// and may only be called after a run-time check that the processor has it. This header is plain C++
// (no torch, no standard-library templates), so no code generated for those instructions can end up
// shared with code that runs elsewhere.
//
// Layouts (bfloat16 values held as raw 16-bit words):
//  * query rows: location-major, one row of `dp` channels per location (dp even; a padding channel is
//    zero); a tile's queries follow each other, Lq rows apiece.
//  * packed gallery image: ceil(Lg / 16) groups of 16 locations; a group holds, for each channel pair
//    k = 0 .. dp/2 - 1, 16 consecutive 32-bit words (channels 2k, 2k + 1 of its 16 locations), so one
//    64-byte load feeds `vdpbf16ps`. A group takes 16 * dp words; locations past Lg are zero.
#pragma once

#include <cstdint>

namespace qaconv {
namespace bf16 {

constexpr int64_t kGroup = 16;  // locations per packed group (one zmm register of float32 results)

// (static: every translation unit keeps its own copy, compiled for its own instruction set)
static inline int64_t groups_of(int64_t locations) { return (locations + kGroup - 1) / kGroup; }

// One gallery image in memory: location r = y * width + x of image n, channel c, is the element
// base[n * image_stride + y * row_stride + x * column_stride + c * channel_stride].
struct ImageLayout {
  const uint16_t* base;
  int64_t image_stride, channel_stride, row_stride, column_stride;
  int64_t channels, height, width;
};

// Packs image n into `packed` (groups_of(height * width) * 16 * dp words). Returns whether every value
// is finite with magnitude below 2^48, which keeps every float32 similarity of such values finite.
bool pack_image(const ImageLayout& src, int64_t n, int64_t dp, uint16_t* packed);

// A tile: `queries` query images (Lq rows each, consecutive in `rows`) x `images` packed gallery
// images (consecutive in `packed`, each groups_of(Lg) * 16 * dp words).
struct Tile {
  const uint16_t* rows;
  const uint16_t* packed;
  int64_t queries, images, Lq, Lg, dp;
};

// Writes the local similarities of the tile: pair (a, b)'s block S_ab[s, r] is at
// S[(a * Lq + s) * ld + b * groups_of(Lg) * 16 + r]; ld >= images * groups_of(Lg) * 16.
void similarities(const Tile& tile, float* S, int64_t ld);

// Max-pools the tile's similarities in registers, never storing them: for pair (a, b) the Lq row maxima
// go to out[a * stride_a + b * stride_b + s] and the Lg column maxima follow them. Plain max: only for
// tiles whose similarities are all finite (see pack_image). `work` holds queries * Lq * 16 floats.
void maxima(const Tile& tile, float* out, int64_t stride_a, int64_t stride_b, float* work);

// sum_k x[k] * w[k], accumulated in double.
double dot(const float* x, const double* w, int64_t n);

}  // namespace bf16
}  // namespace qaconv
