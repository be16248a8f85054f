// Packing bfloat16 maps into the channel-pair operands of TileKernel::run_bf16 (gemm_tile.h). Plain C++, no
// torch headers: the maps come as their bfloat16 bit patterns (uint16) with element strides.
#pragma once

#include <cstdint>

#include "bf16_pair.h"
#include "gemm_tile.h"

namespace qaconv {
namespace cpu {

inline int64_t channel_pairs(int64_t d) { return (d + 1) / 2; }

// Gallery columns 0 ... cols-1 (column j at G[c * gsc + offset[j]] for channel c) as strips of nr columns:
// panel[strip][pair][nr], zeros past the last column and in the missing odd channel of an odd d.
inline void pack_panel_bf16(const uint16_t* G, int64_t gsc, const int64_t* offset, int64_t cols, int64_t d,
                            int64_t nr, uint32_t* panel) {
  const int64_t pairs = channel_pairs(d), strips = (cols + nr - 1) / nr;
  for (int64_t st = 0; st < strips; ++st)
    for (int64_t k = 0; k < pairs; ++k) {
      uint32_t* dst = panel + (st * pairs + k) * nr;
      const uint16_t* even = G + 2 * k * gsc;
      const bool has_odd = 2 * k + 1 < d;
      for (int64_t j = 0; j < nr; ++j) {
        const int64_t col = st * nr + j;
        dst[j] = col < cols ? bf16_pair(even[offset[col]], has_odd ? even[gsc + offset[col]] : uint16_t(0)) : 0u;
      }
    }
}

// One query map (location s of channel c at Q[c * qsc + s * qss], Lq locations) as row blocks of kMR
// locations: A[row block][pair][kMR], zeros past the last location and in the missing odd channel.
inline void pack_query_bf16(const uint16_t* Q, int64_t qsc, int64_t qss, int64_t Lq, int64_t d, uint32_t* A) {
  const int64_t pairs = channel_pairs(d), row_blocks = (Lq + kMR - 1) / kMR;
  for (int64_t b = 0; b < row_blocks; ++b)
    for (int64_t k = 0; k < pairs; ++k) {
      uint32_t* dst = A + (b * pairs + k) * kMR;
      const uint16_t* even = Q + 2 * k * qsc + b * kMR * qss;
      const bool has_odd = 2 * k + 1 < d;
      for (int64_t i = 0; i < kMR; ++i)
        dst[i] = b * kMR + i < Lq ? bf16_pair(even[i * qss], has_odd ? even[qsc + i * qss] : uint16_t(0)) : 0u;
    }
}

}  // namespace cpu
}  // namespace qaconv
