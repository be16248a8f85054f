// CPU kernels of the fused QAConv matching ops.
//
// Work is split into tiles of one query image x `nb` gallery images. For a tile, one GEMM writes the
// local similarities S = Q_p^T [Lq x d] . G_block [d x nb*Lg] into a thread-local scratch sized to stay
// in L2, and a vectorisable epilogue max-pools S in both directions (optionally with argmax, optionally
// folding the linear head). The [P, N, Lq, Lg] tensor is never materialised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"

namespace qaconv {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QACONV_NO_MULTIVERSION)
#define QACONV_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QACONV_MULTIVERSION
#endif
#define QACONV_ALWAYS_INLINE __attribute__((always_inline))

constexpr int64_t kLanes = 16;                    // partial maxima per row: keeps the row loop vectorisable
constexpr int64_t kScratchBytes = 512 * 1024;     // S tile budget (per thread)
constexpr int64_t kBackwardBlock = 4;             // images per backward task (their gradients stay cached)

// NaN-propagating "is v a new maximum": NaN beats numbers, the first NaN stays (torch.max semantics).
template <typename T>
inline bool takes_over(T v, T best) {
  return (v > best) | ((v != v) & (best == best));
}

// Tie/NaN-aware merge of two (value, index) candidates: the larger value, the smaller index on ties,
// the first NaN over anything.
template <typename T>
inline void merge(T& best, int64_t& best_i, T v, int64_t vi) {
  const bool best_nan = best != best, v_nan = v != v;
  if (best_nan) {
    if (v_nan && vi < best_i) { best = v; best_i = vi; }
  } else if (v_nan || v > best || (v == best && vi < best_i)) {
    best = v;
    best_i = vi;
  }
}

// Max-pool one pair's block of S (Lq rows of Lg entries, row stride ld) in both directions.
// row_max[s] = max_r S[s, r]; col_max[r] = max_s S[s, r]; with indices when row_idx/col_idx are given.
template <typename T, bool kIndices>
QACONV_ALWAYS_INLINE inline void pool_pair(const T* S, int64_t ld, int64_t Lq, int64_t Lg, T* row_max, T* col_max,
                                           int64_t* row_idx, int64_t* col_idx) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < Lg; ++r) col_max[r] = neg_inf;
  if (kIndices)
    for (int64_t r = 0; r < Lg; ++r) col_idx[r] = 0;
  const int64_t body = Lg - Lg % kLanes;
  for (int64_t s = 0; s < Lq; ++s) {
    const T* row = S + s * ld;
    T part[kLanes];
    int64_t part_i[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) {
      part[k] = neg_inf;
      part_i[k] = k;
    }
    for (int64_t r0 = 0; r0 < body; r0 += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const T v = row[r0 + k];
        if (kIndices) {  // branch-free selects, so the loop vectorises
          const bool row_new = takes_over(v, part[k]);
          part[k] = row_new ? v : part[k];
          part_i[k] = row_new ? r0 + k : part_i[k];
          const bool col_new = takes_over(v, col_max[r0 + k]);
          col_max[r0 + k] = col_new ? v : col_max[r0 + k];
          col_idx[r0 + k] = col_new ? s : col_idx[r0 + k];
        } else {
          part[k] = (v > part[k] || v != v) ? v : part[k];
          col_max[r0 + k] = (v > col_max[r0 + k] || v != v) ? v : col_max[r0 + k];
        }
      }
    }
    T best = neg_inf;
    int64_t best_i = 0;
    for (int64_t k = 0; k < kLanes && k < Lg; ++k) merge(best, best_i, part[k], part_i[k]);
    for (int64_t r = body; r < Lg; ++r) {
      const T v = row[r];
      merge(best, best_i, v, r);
      if (takes_over(v, col_max[r])) {
        col_max[r] = v;
        if (kIndices) col_idx[r] = s;
      }
    }
    row_max[s] = best;
    if (kIndices) row_idx[s] = best_i;
  }
}

// Values-only pooling for a block of finite values: max instructions, no NaN bookkeeping. Alongside,
// every value is folded into `check` as v * 0, which stays 0 for finite values and becomes NaN for a
// NaN or an infinity. Returns false when the block holds one; the caller then runs pool_pair, whose
// NaN and infinity semantics are exact.
template <typename T>
QACONV_ALWAYS_INLINE inline bool pool_pair_finite(const T* S, int64_t ld, int64_t Lq, int64_t Lg, T* row_max,
                                                  T* col_max) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < Lg; ++r) col_max[r] = neg_inf;
  const int64_t body = Lg - Lg % kLanes;
  T check[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) check[k] = T(0);
  for (int64_t s = 0; s < Lq; ++s) {
    const T* row = S + s * ld;
    T part[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) part[k] = neg_inf;
    for (int64_t r0 = 0; r0 < body; r0 += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const T v = row[r0 + k];
        check[k] += v * T(0);
        part[k] = std::max(part[k], v);
        col_max[r0 + k] = std::max(col_max[r0 + k], v);
      }
    }
    T best = neg_inf;
    if (body > 0)
      for (int64_t k = 0; k < kLanes; ++k) best = std::max(best, part[k]);
    for (int64_t r = body; r < Lg; ++r) {
      const T v = row[r];
      check[0] += v * T(0);
      best = std::max(best, v);
      col_max[r] = std::max(col_max[r], v);
    }
    row_max[s] = best;
  }
  T sum = T(0);
  for (int64_t k = 0; k < kLanes; ++k) sum += check[k];
  return sum == sum;
}

// The epilogue is compiled for several instruction sets and picked at load time, so a portable build
// still runs it with AVX-512 or AVX2 where the processor has them. Values only: the finite fast path
// first (1.2x the op's throughput); with indices the exact version is as fast (its selects vectorise).
#define QACONV_POOL_VARIANT(NAME, T, IDX)                                                                  \
  QACONV_MULTIVERSION void NAME(const T* S, int64_t ld, int64_t Lq, int64_t Lg, T* row_max, T* col_max,    \
                                int64_t* row_idx, int64_t* col_idx) {                                      \
    if (IDX || !pool_pair_finite<T>(S, ld, Lq, Lg, row_max, col_max))                                   \
      pool_pair<T, IDX>(S, ld, Lq, Lg, row_max, col_max, row_idx, col_idx);                               \
  }
QACONV_POOL_VARIANT(pool_f32, float, false)
QACONV_POOL_VARIANT(pool_f32_idx, float, true)
QACONV_POOL_VARIANT(pool_f64, double, false)
QACONV_POOL_VARIANT(pool_f64_idx, double, true)
#undef QACONV_POOL_VARIANT

inline void pool(const float* S, int64_t ld, int64_t Lq, int64_t Lg, float* rm, float* cm, int64_t* ri, int64_t* ci) {
  if (ri != nullptr) pool_f32_idx(S, ld, Lq, Lg, rm, cm, ri, ci); else pool_f32(S, ld, Lq, Lg, rm, cm, ri, ci);
}
inline void pool(const double* S, int64_t ld, int64_t Lq, int64_t Lg, double* rm, double* cm, int64_t* ri,
                 int64_t* ci) {
  if (ri != nullptr) pool_f64_idx(S, ld, Lq, Lg, rm, cm, ri, ci); else pool_f64(S, ld, Lq, Lg, rm, cm, ri, ci);
}

// Number of gallery images per tile: S of one tile stays within the scratch budget.
int64_t gallery_block(const MatchDims& d, int64_t elem) {
  const int64_t per_pair = std::max<int64_t>(1, d.Lq * d.Lg * elem);
  return std::max<int64_t>(1, std::min<int64_t>(d.N, kScratchBytes / per_pair));
}

at::ScalarType compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// [B, d, h, w] -> [B, d, L] in the compute type, a view whenever the layout allows (contiguous and
// channels_last both do), so large galleries are not copied. Detached: the kernels run below autograd.
at::Tensor channel_rows(const at::Tensor& x, at::ScalarType ct) { return x.detach().to(ct).flatten(2); }

// Runs `epilogue(p, n, S_pair, ld)` for every pair, tile by tile, in parallel. Each pair's block of S is
// one GEMM S_n = Q_p^T [Lq x d] . G_n [d x Lg] written into the tile's scratch at column n * Lg.
template <typename T, typename Epilogue>
void for_each_tile(const at::Tensor& q, const at::Tensor& g, const MatchDims& d, Epilogue&& epilogue) {
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

std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& query, const at::Tensor& gallery, bool with_indices) {
  const MatchDims d = check_pair(query, gallery);
  TORCH_CHECK(query.device().is_cpu(), "qaconv: match_cpu called with ", query.device(), " tensors");
  const auto ct = compute_type(query.scalar_type());
  at::Tensor values = at::empty({d.P, d.N, d.L()}, query.options().dtype(ct));
  at::Tensor indices = with_indices ? at::empty({d.P, d.N, d.L()}, query.options().dtype(at::kLong))
                                    : at::empty({0}, query.options().dtype(at::kLong));
  if (d.P > 0 && d.N > 0) {
    const at::Tensor q = channel_rows(query, ct), g = channel_rows(gallery, ct);
    AT_DISPATCH_FLOATING_TYPES(ct, "qaconv_match_cpu", [&] {
      scalar_t* vals = values.data_ptr<scalar_t>();
      int64_t* idx = with_indices ? indices.data_ptr<int64_t>() : nullptr;
      for_each_tile<scalar_t>(q, g, d, [&](int64_t p, int64_t n, const scalar_t* S, int64_t ld) {
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
  const at::Tensor q = channel_rows(query, ct), g = channel_rows(gallery, ct);
  const at::Tensor w = weight.reshape({-1}).to(ct).contiguous();
  const double b = (bias.has_value() && bias->defined()) ? bias->item<double>() : 0.0;
  AT_DISPATCH_FLOATING_TYPES(ct, "qaconv_score_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const double bb = b;
    for_each_tile<scalar_t>(q, g, d, [&](int64_t p, int64_t n, const scalar_t* S, int64_t ld) {
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
