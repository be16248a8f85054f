// Tiling of the bfloat16 CPU kernel. Work is split into tiles of `mb` query images x `nb` gallery
// images, gallery block outermost: each thread packs a gallery block once (into the layout of
// bf16_tile.h, straight from the input's strides) and matches every query block against it. The query
// maps are copied once into location-major rows. A tile whose inputs are all finite and moderate (so
// that every similarity is finite) is max-pooled in registers; with indices, or for other inputs, its
// similarities are written to a per-thread scratch and pooled by the exact NaN-aware epilogue.
#include "cpu/match_bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/bf16_tile.h"
#include "cpu/pool.h"

namespace qaconv {
namespace cpu {

#if defined(QACONV_WITH_AVX512BF16)

namespace {

constexpr int64_t kPackedBytes = 256 * 1024;   // packed gallery block per thread (stays in L2)
constexpr int64_t kScratchBytes = 512 * 1024;  // a tile's similarities, when they are written
constexpr int64_t kTileRows = 64;              // query locations per tile at least (several small maps)
constexpr float kSafeMagnitude = 281474976710656.0f;  // 2^48: |q|, |g| below it keep every S finite

struct Plan {
  int64_t dp, width, image_words;  // padded channels; packed locations and words per gallery image
  int64_t mb, nb, query_blocks, gallery_blocks;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Plan make_plan(const MatchDims& d) {
  Plan p{};
  p.dp = d.channels + (d.channels & 1);
  p.width = bf16::groups_of(d.Lg) * bf16::kGroup;
  p.image_words = p.width * p.dp;
  p.mb = std::clamp<int64_t>(ceil_div(kTileRows, d.Lq), 1, d.P);
  p.nb = std::clamp<int64_t>(kPackedBytes / (2 * p.image_words), 1, d.N);
  p.nb = std::max<int64_t>(1, std::min(p.nb, kScratchBytes / (4 * p.mb * d.Lq * p.width)));
  // Enough tiles to keep every thread busy on small problems.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (ceil_div(d.P, p.mb) * ceil_div(d.N, p.nb) < want && (p.nb > 1 || p.mb > 1)) {
    if (p.nb > 1)
      p.nb = ceil_div(p.nb, 2);
    else
      p.mb = ceil_div(p.mb, 2);
  }
  p.query_blocks = ceil_div(d.P, p.mb);
  p.gallery_blocks = ceil_div(d.N, p.nb);
  return p;
}

const uint16_t* words(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Query maps as location-major rows [P * Lq, dp] (a zero channel pads an odd count).
at::Tensor query_rows(const at::Tensor& query, const Plan& plan) {
  at::Tensor rows = locations_major(query.detach());
  if (plan.dp != rows.size(2)) rows = at::constant_pad_nd(rows, {0, plan.dp - rows.size(2)});
  return rows.contiguous();
}

bool moderate(const at::Tensor& rows) {
  return rows.numel() == 0 || rows.abs().max().item<float>() < kSafeMagnitude;
}

bf16::ImageLayout gallery_layout(const at::Tensor& gallery) {
  return bf16::ImageLayout{words(gallery), gallery.stride(0), gallery.stride(1), gallery.stride(2),
                           gallery.stride(3), gallery.size(1), gallery.size(2), gallery.size(3)};
}

// Per-thread buffers of the tiling: the packed gallery block, the row-maxima scratch of the in-register
// pooling, and (allocated on first use) the similarities of a tile.
struct Buffers {
  at::Tensor packed, row_part, S;
  int64_t ld = 0;

  explicit Buffers(const Plan& plan, const MatchDims& d)
      : packed(at::empty({plan.nb * plan.image_words}, at::kShort)),
        row_part(at::empty({plan.mb * d.Lq * bf16::kGroup}, at::kFloat)) {}

  float* similarities(const Plan& plan, const MatchDims& d) {
    if (!S.defined()) {
      S = at::empty({plan.mb * d.Lq, plan.nb * plan.width}, at::kFloat);
      ld = S.stride(0);
    }
    return S.data_ptr<float>();
  }
};

// Runs body(tile, p0, n0, finite, buffers) for every tile, in parallel over tiles.
template <typename Body>
void for_each_tile(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& d, Body&& body) {
  const Plan plan = make_plan(d);
  const at::Tensor rows = query_rows(query, plan);
  const bool query_moderate = moderate(rows);
  const at::Tensor g = gallery.detach();
  const bf16::ImageLayout layout = gallery_layout(g);
  const uint16_t* row_words = words(rows);
  at::parallel_for(0, plan.query_blocks * plan.gallery_blocks, 1, [&](int64_t begin, int64_t end) {
    Buffers buffers(plan, d);
    uint16_t* packed = reinterpret_cast<uint16_t*>(buffers.packed.data_ptr<int16_t>());
    int64_t packed_block = -1;
    bool gallery_moderate = false;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gb = task / plan.query_blocks, qb = task % plan.query_blocks;
      const int64_t n0 = gb * plan.nb, images = std::min(plan.nb, d.N - n0);
      const int64_t p0 = qb * plan.mb, queries = std::min(plan.mb, d.P - p0);
      if (gb != packed_block) {
        gallery_moderate = true;
        for (int64_t j = 0; j < images; ++j)
          gallery_moderate &= bf16::pack_image(layout, n0 + j, plan.dp, packed + j * plan.image_words);
        packed_block = gb;
      }
      const bf16::Tile tile{row_words + p0 * d.Lq * plan.dp, packed, queries, images, d.Lq, d.Lg, plan.dp};
      body(plan, tile, p0, n0, query_moderate && gallery_moderate, buffers);
    }
  });
}

// The tile's similarities written and pooled pair by pair with the exact epilogue; pair (a, b)'s
// maxima go to out + a * stride_a + b * stride_b (and its indices likewise, when asked).
void pool_tile(const Plan& plan, const MatchDims& d, const bf16::Tile& tile, Buffers& buffers, float* out,
               int64_t* idx, int64_t stride_a, int64_t stride_b) {
  float* S = buffers.similarities(plan, d);
  bf16::similarities(tile, S, buffers.ld);
  for (int64_t a = 0; a < tile.queries; ++a)
    for (int64_t b = 0; b < tile.images; ++b) {
      const int64_t off = a * stride_a + b * stride_b;
      pool(S + a * d.Lq * buffers.ld + b * plan.width, buffers.ld, d.Lq, d.Lg, out + off, out + off + d.Lq,
           idx ? idx + off : nullptr, idx ? idx + off + d.Lq : nullptr);
    }
}

}  // namespace

void match_bf16(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& d, float* values,
                int64_t* indices) {
  const int64_t L = d.L();
  for_each_tile(query, gallery, d, [&](const Plan& plan, const bf16::Tile& tile, int64_t p0, int64_t n0,
                                       bool finite, Buffers& buffers) {
    const int64_t off = (p0 * d.N + n0) * L;
    if (indices == nullptr && finite)
      bf16::maxima(tile, values + off, d.N * L, L, buffers.row_part.data_ptr<float>());
    else
      pool_tile(plan, d, tile, buffers, values + off, indices ? indices + off : nullptr, d.N * L, L);
  });
}

void score_bf16(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& d, const double* weight,
                double bias, float* out) {
  const int64_t L = d.L();
  for_each_tile(query, gallery, d, [&](const Plan& plan, const bf16::Tile& tile, int64_t p0, int64_t n0,
                                       bool finite, Buffers& buffers) {
    // One tile's maxima, then the folded head pair by pair.
    thread_local std::vector<float> maxima;
    maxima.resize(plan.mb * plan.nb * L);
    if (finite)
      bf16::maxima(tile, maxima.data(), plan.nb * L, L, buffers.row_part.data_ptr<float>());
    else
      pool_tile(plan, d, tile, buffers, maxima.data(), nullptr, plan.nb * L, L);
    for (int64_t a = 0; a < tile.queries; ++a)
      for (int64_t b = 0; b < tile.images; ++b)
        out[(p0 + a) * d.N + n0 + b] =
            static_cast<float>(bf16::dot(maxima.data() + (a * plan.nb + b) * L, weight, L) + bias);
  });
}

#else  // built without the AVX512-BF16 unit: cpu::bf16_kernel() is always false

void match_bf16(const at::Tensor&, const at::Tensor&, const MatchDims&, float*, int64_t*) {
  TORCH_CHECK(false, "qaconv: this build has no AVX512-BF16 kernel");
}

void score_bf16(const at::Tensor&, const at::Tensor&, const MatchDims&, const double*, double, float*) {
  TORCH_CHECK(false, "qaconv: this build has no AVX512-BF16 kernel");
}

#endif

}  // namespace cpu
}  // namespace qaconv
