// CPU kernels of the fused QAConv matching ops.
//
// Work is split into tiles of query images x gallery images. GEMMs write the local similarities of a
// tile, S = Q^T [Lq x d] . G [d x Lg] per pair, into a thread-local scratch sized to stay in L2, and an
// epilogue (cpu/pool.h) max-pools each pair's block in both directions, optionally with argmax,
// optionally folding the linear head. The [P, N, Lq, Lg] tensor is never materialised.
//  * From a few queries on: one GEMM per tile of several queries x several gallery images, on
//    location-major copies (each gallery block is copied once per thread and then matched against every
//    query block); with small maps one GEMM per pair would be dominated by its fixed cost.
//  * Fewer queries: one query x a few gallery images per tile, one GEMM per pair on views of the inputs.
//  * float16 and bfloat16 maps are widened to float32 (exact products) and take the paths above.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/pool.h"

namespace qaconv {
namespace {

using cpu::pool;

constexpr int64_t kScratchBytes = 512 * 1024;  // S tile budget (per thread)
constexpr int64_t kBlockRows = 192;            // tile GEMMs: query locations per GEMM at least
constexpr int64_t kBlockQueries = 4;           // tile GEMMs from this many queries (each copied gallery
                                               // block is then matched against several of them)
constexpr int64_t kBackwardBlock = 4;          // images per backward task (their gradients stay cached)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of gallery images per tile: S of one tile stays within the scratch budget.
int64_t gallery_block(const MatchDims& d, int64_t elem) {
  const int64_t per_pair = std::max<int64_t>(1, d.Lq * d.Lg * elem);
  return std::max<int64_t>(1, std::min<int64_t>(d.N, kScratchBytes / per_pair));
}

at::ScalarType compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// [B, d, h, w] -> [B, d, L] in the compute type, a view whenever the layout allows (contiguous and
// channels_last both do), so large galleries are not copied. Detached: the kernels run below autograd.
at::Tensor channel_rows(const at::Tensor& x, at::ScalarType ct) { return x.detach().to(ct).flatten(2); }

// Large maps: runs `epilogue(p, n, S_pair, ld)` for every pair, tile by tile, in parallel. Each pair's
// block of S is one GEMM S_n = Q_p^T [Lq x d] . G_n [d x Lg] written into the tile's scratch at column n * Lg.
template <typename T, typename Epilogue>
void for_each_tile(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& d, at::ScalarType ct,
                   Epilogue&& epilogue) {
  const at::Tensor q = channel_rows(query, ct), g = channel_rows(gallery, ct);
  const int64_t nb = gallery_block(d, sizeof(T));
  const int64_t blocks = (d.N + nb - 1) / nb;
  at::parallel_for(0, d.P * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({d.Lq, nb * d.Lg}, q.options());
    const T* base = scratch.data_ptr<T>();
    const int64_t ld = scratch.stride(0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / blocks, n0 = (task % blocks) * nb;
      const int64_t cnt = std::min(nb, d.N - n0);
      const at::Tensor qp = q.select(0, p).t();  // [Lq, d]
      for (int64_t j = 0; j < cnt; ++j) {
        at::Tensor S = scratch.narrow(1, j * d.Lg, d.Lg);
        at::mm_out(S, qp, g.select(0, n0 + j));
      }
      for (int64_t j = 0; j < cnt; ++j) epilogue(p, n0 + j, base + j * d.Lg, ld);
    }
  });
}

// Small maps: one GEMM per tile of mb queries x nb gallery images, S_tile = Q_rows [mb Lq x d] .
// G_rows^T [d x nb Lg], pair (a, b)'s block at row a * Lq, column b * Lg. Tiles run gallery block
// outermost, so a thread copies a gallery block to location-major rows once for all query blocks.
template <typename T, typename Epilogue>
void for_each_block(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& d, at::ScalarType ct,
                    Epilogue&& epilogue) {
  int64_t mb = std::clamp<int64_t>(ceil_div(kBlockRows, d.Lq), 1, d.P);
  int64_t nb = std::clamp<int64_t>(kScratchBytes / static_cast<int64_t>(sizeof(T) * mb * d.Lq * d.Lg), 1, d.N);
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());  // tiles enough for every thread
  while (ceil_div(d.P, mb) * ceil_div(d.N, nb) < want && (nb > 1 || mb > 1)) {
    if (nb > 1)
      nb = ceil_div(nb, 2);
    else
      mb = ceil_div(mb, 2);
  }
  const int64_t query_blocks = ceil_div(d.P, mb), gallery_blocks = ceil_div(d.N, nb);
  const at::Tensor q = locations_major(query.detach()).to(ct).reshape({d.P * d.Lq, d.channels});
  const at::Tensor g = gallery.detach().flatten(2).transpose(1, 2);  // [N, Lg, d] view
  at::parallel_for(0, query_blocks * gallery_blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor rows = at::empty({nb * d.Lg, d.channels}, q.options());
    at::Tensor scratch = at::empty({mb * d.Lq, nb * d.Lg}, q.options());
    const T* base = scratch.data_ptr<T>();
    const int64_t ld = scratch.stride(0);
    int64_t copied = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gb = task / query_blocks, qb = task % query_blocks;
      const int64_t n0 = gb * nb, images = std::min(nb, d.N - n0);
      const int64_t p0 = qb * mb, queries = std::min(mb, d.P - p0);
      if (gb != copied) {
        rows.narrow(0, 0, images * d.Lg).view({images, d.Lg, d.channels}).copy_(g.narrow(0, n0, images));
        copied = gb;
      }
      at::Tensor S = scratch.narrow(0, 0, queries * d.Lq).narrow(1, 0, images * d.Lg);
      at::mm_out(S, q.narrow(0, p0 * d.Lq, queries * d.Lq), rows.narrow(0, 0, images * d.Lg).t());
      for (int64_t a = 0; a < queries; ++a)
        for (int64_t b = 0; b < images; ++b) epilogue(p0 + a, n0 + b, base + a * d.Lq * ld + b * d.Lg, ld);
    }
  });
}

// One GEMM per tile beats one per pair at every map size measured (most at small maps, where the fixed
// cost of a GEMM call dominates: 12 x 4 maps, d = 128, one core: 47 -> 78 GFLOP/s; 24 x 8: 70 -> 80),
// once the copy of a gallery block is shared by a few queries; for fewer, GEMMs on views of the inputs.
template <typename T, typename Epilogue>
void for_each_pair(const at::Tensor& query, const at::Tensor& gallery, const MatchDims& d, at::ScalarType ct,
                   Epilogue&& epilogue) {
  if (d.P >= kBlockQueries)
    for_each_block<T>(query, gallery, d, ct, epilogue);
  else
    for_each_tile<T>(query, gallery, d, ct, epilogue);
}

std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& query, const at::Tensor& gallery, bool with_indices) {
  const MatchDims d = check_pair(query, gallery);
  TORCH_CHECK(query.device().is_cpu(), "qaconv: match_cpu called with ", query.device(), " tensors");
  const auto ct = compute_type(query.scalar_type());
  at::Tensor values = at::empty({d.P, d.N, d.L()}, query.options().dtype(ct));
  at::Tensor indices = with_indices ? at::empty({d.P, d.N, d.L()}, query.options().dtype(at::kLong))
                                    : at::empty({0}, query.options().dtype(at::kLong));
  if (d.P > 0 && d.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "qaconv_match_cpu", [&] {
      scalar_t* vals = values.data_ptr<scalar_t>();
      int64_t* idx = with_indices ? indices.data_ptr<int64_t>() : nullptr;
      for_each_pair<scalar_t>(query, gallery, d, ct, [&](int64_t p, int64_t n, const scalar_t* S, int64_t ld) {
        const int64_t off = (p * d.N + n) * d.L();
        pool(S, ld, d.Lq, d.Lg, vals + off, vals + off + d.Lq, idx ? idx + off : nullptr,
             idx ? idx + off + d.Lq : nullptr);
      });
    });
  }
  if (values.scalar_type() != query.scalar_type()) values = values.to(query.scalar_type());
  return {values, indices};
}

at::Tensor score_cpu(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias) {
  const MatchDims d = check_pair(query, gallery);
  check_head(weight, bias, d, query);
  TORCH_CHECK(query.device().is_cpu(), "qaconv: score_cpu called with ", query.device(), " tensors");
  const auto ct = compute_type(query.scalar_type());
  at::Tensor out = at::empty({d.P, d.N}, query.options().dtype(ct));
  if (d.P == 0 || d.N == 0) return out;
  const at::Tensor w = weight.reshape({-1}).to(ct).contiguous();
  const double b = (bias.has_value() && bias->defined()) ? bias->item<double>() : 0.0;
  AT_DISPATCH_FLOATING_TYPES(ct, "qaconv_score_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const double bb = b;
    for_each_pair<scalar_t>(query, gallery, d, ct, [&](int64_t p, int64_t n, const scalar_t* S, int64_t ld) {
      // Small per-call buffers: one pair's maxima, then the folded head as a dot product.
      thread_local std::vector<scalar_t> maxima;
      maxima.resize(d.L());
      pool(S, ld, d.Lq, d.Lg, maxima.data(), maxima.data() + d.Lq, nullptr, nullptr);
      double acc = 0;  // the head's dot product is short: accumulate it in double
      for (int64_t k = 0; k < d.L(); ++k) acc += static_cast<double>(maxima[k]) * static_cast<double>(wp[k]);
      o[p * d.N + n] = static_cast<scalar_t>(acc + bb);
    });
  });
  return out;
}

// Owner-computes backward: grad_q[p] is written only by the task owning p, grad_g[n] by the task owning n.
std::tuple<at::Tensor, at::Tensor> match_backward_cpu(const at::Tensor& grad_values, const at::Tensor& indices,
                                                      const at::Tensor& query, const at::Tensor& gallery,
                                                      std::array<bool, 2> output_mask) {
  const MatchDims d = check_pair(query, gallery);
  check_backward(grad_values, indices, d);
  const auto ct = compute_type(query.scalar_type());
  const bool need_q = output_mask[0], need_g = output_mask[1];
  at::Tensor gq = at::zeros({need_q ? d.P : 0, d.Lq, d.channels}, query.options().dtype(ct));
  at::Tensor gg = at::zeros({need_g ? d.N : 0, d.Lg, d.channels}, query.options().dtype(ct));
  if (d.P > 0 && d.N > 0 && (need_q || need_g)) {
    const at::Tensor q = locations_major(query.detach()).to(ct), g = locations_major(gallery.detach()).to(ct);
    const at::Tensor gv = grad_values.detach().to(ct).contiguous();
    const at::Tensor ix = indices.contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "qaconv_match_backward_cpu", [&] {
      const scalar_t* Q = q.data_ptr<scalar_t>();
      const scalar_t* G = g.data_ptr<scalar_t>();
      const scalar_t* GV = gv.data_ptr<scalar_t>();
      const int64_t* IX = ix.data_ptr<int64_t>();
      scalar_t* GQ = gq.data_ptr<scalar_t>();
      scalar_t* GG = gg.data_ptr<scalar_t>();
      const int64_t D = d.channels, L = d.L();
      auto axpy = [D](scalar_t* dst, scalar_t a, const scalar_t* src) {
        for (int64_t c = 0; c < D; ++c) dst[c] += a * src[c];
      };
      auto check_index = [](int64_t i, int64_t bound) {
        TORCH_CHECK(i >= 0 && i < bound, "qaconv: match index ", i, " out of range [0, ", bound, ")");
      };
      // Queries in blocks of kBackwardBlock, gallery images outer within a block: each gallery map is
      // read once per block while the block's gradient rows stay in cache.
      const int64_t q_blocks = need_q ? (d.P + kBackwardBlock - 1) / kBackwardBlock : 0;
      at::parallel_for(0, q_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk)
          for (int64_t n = 0; n < d.N; ++n)
            for (int64_t p = blk * kBackwardBlock; p < std::min(d.P, (blk + 1) * kBackwardBlock); ++p) {
            const scalar_t* gvp = GV + (p * d.N + n) * L;
            const int64_t* ixp = IX + (p * d.N + n) * L;
            for (int64_t s = 0; s < d.Lq; ++s) {  // query location s matched gallery location ixp[s]
              if (gvp[s] == scalar_t(0)) continue;
              check_index(ixp[s], d.Lg);
              axpy(GQ + (p * d.Lq + s) * D, gvp[s], G + (n * d.Lg + ixp[s]) * D);
            }
            for (int64_t r = 0; r < d.Lg; ++r) {  // gallery location r matched query location ixp[Lq + r]
              const scalar_t a = gvp[d.Lq + r];
              if (a == scalar_t(0)) continue;
              check_index(ixp[d.Lq + r], d.Lq);
              axpy(GQ + (p * d.Lq + ixp[d.Lq + r]) * D, a, G + (n * d.Lg + r) * D);
            }
          }
      });
      const int64_t g_blocks = need_g ? (d.N + kBackwardBlock - 1) / kBackwardBlock : 0;
      at::parallel_for(0, g_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk)
          for (int64_t p = 0; p < d.P; ++p)
            for (int64_t n = blk * kBackwardBlock; n < std::min(d.N, (blk + 1) * kBackwardBlock); ++n) {
            const scalar_t* gvp = GV + (p * d.N + n) * L;
            const int64_t* ixp = IX + (p * d.N + n) * L;
            for (int64_t s = 0; s < d.Lq; ++s) {
              if (gvp[s] == scalar_t(0)) continue;
              check_index(ixp[s], d.Lg);
              axpy(GG + (n * d.Lg + ixp[s]) * D, gvp[s], Q + (p * d.Lq + s) * D);
            }
            for (int64_t r = 0; r < d.Lg; ++r) {
              const scalar_t a = gvp[d.Lq + r];
              if (a == scalar_t(0)) continue;
              check_index(ixp[d.Lq + r], d.Lq);
              axpy(GG + (n * d.Lg + r) * D, a, Q + (p * d.Lq + ixp[d.Lq + r]) * D);
            }
          }
      });
    });
  }
  return {need_q ? channels_first(gq, query) : query.new_empty({0}),
          need_g ? channels_first(gg, gallery) : gallery.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(qaconv_ext, CPU, m) {
  m.impl("match", &match_cpu);
  m.impl("score", &score_cpu);
  m.impl("match_backward", &match_backward_cpu);
}

}  // namespace qaconv
