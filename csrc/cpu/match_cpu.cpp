// CPU kernels of the fused QAConv matching ops.
//
// Work is split into tasks of a chunk of queries x a block of `nb` gallery images. A task packs its
// gallery block once into a float32 panel [d][nb*Lg] (the images' locations side by side, widened from
// float16 on the way, or into bfloat16 channel pairs for bfloat16 maps: no float32 copy of the gallery is
// made), then for each query of its chunk
// packs the query's [d][Lq] map and runs the micro-kernel of gemm_tile.h, which writes the local
// similarities S = Q_p^T . panel into a thread-local scratch; a vectorisable epilogue max-pools S in both
// directions (optionally with argmax, optionally folding the linear head). The [P, N, Lq, Lg] tensor is
// never materialised. Each S[s, r] is one FMA chain over the channels in order, independent of the
// blocking, so a pair's result does not depend on the batch it comes in (see gemm_tile.h).
// float64 (for gradcheck) computes each pair's S with one aten::mm (out=) instead.
// The torch-facing parts (tensors, allocation, the parallel loop, registration) use the stable ABI only.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cstdlib>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/gemm_tile.h"
#include "cpu/pack_bf16.h"

namespace qaconv {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(QACONV_NO_MULTIVERSION)
#define QACONV_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QACONV_MULTIVERSION
#endif
#define QACONV_ALWAYS_INLINE __attribute__((always_inline))

constexpr int64_t kLanes = 16;                    // partial maxima per row: keeps the row loop vectorisable
constexpr int64_t kScratchBytes = 512 * 1024;     // S tile budget of the float64 path (per thread)
constexpr int64_t kPanelBytes = 256 * 1024;       // packed gallery panel budget (per thread)
constexpr int64_t kTileBytes = 64 * 1024;
constexpr int64_t kGroupBytes = 1024 * 1024;      // the panels of one task's gallery group (per thread)         // S budget of one query against the panel (per thread)
constexpr int64_t kTasksPerThread = 4;            // query chunks are cut so that threads get several tasks
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
  T check[kLanes], check1[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) check[k] = check1[k] = T(0);
  // A row's maximum from its lanes' partial maxima, then its tail (columns past the last full group of lanes).
  auto finish_row = [&](const T* row, const T* part, T* chk) {
    T best = neg_inf;
    if (body > 0)
      for (int64_t k = 0; k < kLanes; ++k) best = std::max(best, part[k]);
    for (int64_t r = body; r < Lg; ++r) {
      const T v = row[r];
      chk[0] += v * T(0);
      best = std::max(best, v);
      col_max[r] = std::max(col_max[r], v);
    }
    return best;
  };
  int64_t s = 0;
  // Two rows at a time (independent maxima chains, one pass over col_max); every row's and every column's
  // maxima are taken in the same order as one row at a time.
  for (; s + 1 < Lq; s += 2) {
    const T* row0 = S + s * ld;
    const T* row1 = row0 + ld;
    T part0[kLanes], part1[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) part0[k] = part1[k] = neg_inf;
    for (int64_t r0 = 0; r0 < body; r0 += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) {
        const T v0 = row0[r0 + k], v1 = row1[r0 + k];
        check[k] += v0 * T(0);
        check1[k] += v1 * T(0);
        part0[k] = std::max(part0[k], v0);
        part1[k] = std::max(part1[k], v1);
        col_max[r0 + k] = std::max(std::max(col_max[r0 + k], v0), v1);
      }
    }
    row_max[s] = finish_row(row0, part0, check);
    row_max[s + 1] = finish_row(row1, part1, check1);
  }
  for (; s < Lq; ++s) {
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
    row_max[s] = finish_row(row, part, check);
  }
  T sum = T(0);
  for (int64_t k = 0; k < kLanes; ++k) sum += check[k] + check1[k];
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

// Values-only pooling of `cnt` pairs side by side (pair j in columns j*Lg ... of S), for small gallery maps
// (Lg < kLanes), where pool_pair_finite would run its scalar tail: the column maxima of the whole tile
// row at once (contiguous, vectorised), the row maxima per pair. Same order of comparisons as
// pool_pair_finite, hence the same results. rm[j*Lq + s], cm[j*Lg + r]; chk[j*Lg + r] is NaN where
// that column holds a NaN or an infinity (the caller then pools the pair with pool_pair).
template <typename T>
QACONV_ALWAYS_INLINE inline void pool_tile_finite(const T* S, int64_t ld, int64_t Lq, int64_t Lg, int64_t cnt,
                                                  T* rm, T* cm, T* chk) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t cols = cnt * Lg;
  for (int64_t col = 0; col < cols; ++col) {
    cm[col] = neg_inf;
    chk[col] = T(0);
  }
  for (int64_t s = 0; s < Lq; ++s) {
    const T* row = S + s * ld;
    for (int64_t col = 0; col < cols; ++col) {
      const T v = row[col];
      chk[col] += v * T(0);
      cm[col] = std::max(cm[col], v);
    }
    for (int64_t j = 0; j < cnt; ++j) {
      T best = neg_inf;
      for (int64_t r = 0; r < Lg; ++r) best = std::max(best, row[j * Lg + r]);
      rm[j * Lq + s] = best;
    }
  }
}
QACONV_MULTIVERSION void pool_tile_f32(const float* S, int64_t ld, int64_t Lq, int64_t Lg, int64_t cnt, float* rm,
                                       float* cm, float* chk) {
  pool_tile_finite<float>(S, ld, Lq, Lg, cnt, rm, cm, chk);
}
QACONV_MULTIVERSION void pool_tile_f64(const double* S, int64_t ld, int64_t Lq, int64_t Lg, int64_t cnt,
                                       double* rm, double* cm, double* chk) {
  pool_tile_finite<double>(S, ld, Lq, Lg, cnt, rm, cm, chk);
}
inline void pool_tile(const float* S, int64_t ld, int64_t Lq, int64_t Lg, int64_t cnt, float* rm, float* cm,
                      float* chk) {
  pool_tile_f32(S, ld, Lq, Lg, cnt, rm, cm, chk);
}
inline void pool_tile(const double* S, int64_t ld, int64_t Lq, int64_t Lg, int64_t cnt, double* rm, double* cm,
                      double* chk) {
  pool_tile_f64(S, ld, Lq, Lg, cnt, rm, cm, chk);
}

// Values-only maxima of the `cnt` pairs of a tile: max_out(j) gives pair j's [Lq + Lg] destination.
template <typename T, typename Out>
void pool_values(const T* S, int64_t ld, int64_t Lq, int64_t Lg, int64_t cnt, Out&& max_out) {
  if (Lg >= kLanes) {
    for (int64_t j = 0; j < cnt; ++j) {
      T* m = max_out(j);
      pool(S + j * Lg, ld, Lq, Lg, m, m + Lq, nullptr, nullptr);
    }
    return;
  }
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < cnt * (Lq + 2 * Lg)) buf.resize(cnt * (Lq + 2 * Lg));
  T* rm = buf.data();
  T* cm = rm + cnt * Lq;
  T* chk = cm + cnt * Lg;
  pool_tile(S, ld, Lq, Lg, cnt, rm, cm, chk);
  for (int64_t j = 0; j < cnt; ++j) {
    T* m = max_out(j);
    T flag = T(0);
    for (int64_t r = 0; r < Lg; ++r) flag += chk[j * Lg + r];
    if (flag != flag) {  // a NaN or an infinity: the exact semantics
      pool_pair<T, false>(S + j * Lg, ld, Lq, Lg, m, m + Lq, nullptr, nullptr);
      continue;
    }
    std::copy(rm + j * Lq, rm + (j + 1) * Lq, m);
    std::copy(cm + j * Lg, cm + (j + 1) * Lg, m + Lq);
  }
}

// float64 path: number of gallery images per tile, so that S of one tile stays within the scratch budget.
int64_t gallery_block(const MatchDims& d, int64_t elem) {
  const int64_t per_pair = std::max<int64_t>(1, d.Lq * d.Lg * elem);
  return std::max<int64_t>(1, std::min<int64_t>(d.N, kScratchBytes / per_pair));
}

ScalarType compute_type(ScalarType st) { return st == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// Calls f.template operator()<scalar_t>() with the C++ type of a compute dtype (float32 or float64).
template <typename F>
void dispatch_compute(ScalarType ct, F&& f) {
  if (ct == ScalarType::Double)
    f.template operator()<double>();
  else
    f.template operator()<float>();
}

// float64 path: runs `epilogue(p, n0, cnt, S, ld)` for every tile, in parallel. Each pair's
// block of S is one GEMM S_n = Q_p^T [Lq x d] . G_n [d x Lg] written into the tile's scratch at column n * Lg.
template <typename Epilogue>
void for_each_tile_f64(const Tensor& q, const Tensor& g, const MatchDims& d, Epilogue&& epilogue) {
  const int64_t nb = gallery_block(d, sizeof(double));
  const int64_t blocks = (d.N + nb - 1) / nb;
  parallel_for(0, d.P * blocks, 1, [&](int64_t begin, int64_t end) {
    Tensor scratch = empty_like_device(q, {d.Lq, nb * d.Lg}, ScalarType::Double);
    const double* base = scratch.mutable_data_ptr<double>();
    const int64_t ld = scratch.stride(0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / blocks, n0 = (task % blocks) * nb;
      const int64_t cnt = std::min(nb, d.N - n0);
      const Tensor qp = torch::stable::transpose(torch::stable::select(q, 0, p), 0, 1);  // [Lq, d]
      for (int64_t j = 0; j < cnt; ++j) {
        const Tensor S = torch::stable::narrow(scratch, 1, j * d.Lg, d.Lg);
        call_aten("aten::mm", "out", qp, torch::stable::select(g, 0, n0 + j), S);
      }
      epilogue(p, n0, cnt, base, ld);
    }
  });
}

inline float widen(float v) { return v; }
inline float widen(torch::headeronly::Half v) { return static_cast<float>(v); }      // exact
inline float widen(torch::headeronly::BFloat16 v) { return static_cast<float>(v); }  // exact

// The micro-kernel variant of this call (the processor's best, or QACONV_CPU_KERNEL's).
const cpu::TileKernel& tile_kernel() {
  const char* error = nullptr;
  const cpu::TileKernel* k = cpu::select_tile_kernel(&error);
  const char* name = std::getenv("QACONV_CPU_KERNEL");
  QACONV_CHECK(k != nullptr, "qaconv: QACONV_CPU_KERNEL=", name != nullptr ? name : "", ": ", error);
  return *k;
}

// Blocking of one call. Only the amount of work per task depends on it, never a pair's arithmetic.
// A task is a chunk of queries x a group of `sub` gallery blocks of `nb` images: the group's panels are
// packed once, each query once per task, and each query runs against every panel of the group.
struct TilePlan {
  int64_t nb, sub, groups, qchunk, qchunks, row_blocks, strips, ldS;
};

TilePlan tile_plan(const MatchDims& d, const cpu::TileKernel& k) {
  TilePlan t{};
  t.row_blocks = (d.Lq + cpu::kMR - 1) / cpu::kMR;
  const int64_t panel_per_image = d.channels * d.Lg * int64_t(sizeof(float));
  const int64_t s_per_image = t.row_blocks * cpu::kMR * d.Lg * int64_t(sizeof(float));
  t.nb = std::max<int64_t>(1, std::min({d.N, kPanelBytes / panel_per_image, kTileBytes / s_per_image}));
  t.strips = (t.nb * d.Lg + k.nr - 1) / k.nr;
  t.ldS = t.strips * k.nr;
  const int64_t blocks = (d.N + t.nb - 1) / t.nb;
  const int64_t panel_bytes = t.strips * k.nr * d.channels * int64_t(sizeof(float));
  t.sub = std::max<int64_t>(1, std::min(blocks, kGroupBytes / panel_bytes));
  const int64_t want = kTasksPerThread * num_threads();
  t.sub = std::max<int64_t>(1, std::min(t.sub, blocks / want));  // enough groups for the threads, if N allows
  t.groups = (blocks + t.sub - 1) / t.sub;
  t.qchunks = std::max<int64_t>(1, std::min<int64_t>(d.P, (want + t.groups - 1) / t.groups));
  t.qchunk = (d.P + t.qchunks - 1) / t.qchunks;
  t.qchunks = (d.P + t.qchunk - 1) / t.qchunk;
  return t;
}

// 64-byte aligned float buffer of a thread.
struct Buffer {
  float* data = nullptr;
  explicit Buffer(int64_t n) {
    data = static_cast<float*>(std::aligned_alloc(64, std::max<int64_t>(64, (n * 4 + 63) / 64 * 64)));
    QACONV_CHECK(data != nullptr, "qaconv: out of memory for a ", n * 4, "-byte scratch buffer");
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// float32/float16/bfloat16 path: runs `epilogue(p, n0, cnt, S, ld)` for every query p against every gallery
// block (images n0 ... n0 + cnt - 1; pair n0 + j in columns j*Lg ... of S), task by task, in parallel. q [P, d, Lq] and g [N, d, Lg] are views of the inputs in their own dtype and strides.
template <typename src_t, typename Epilogue>
void for_each_tile(const Tensor& q, const Tensor& g, const MatchDims& d, Epilogue&& epilogue) {
  // bfloat16 maps: channel pairs (uint32) in the float buffers, bit patterns read as uint16 (gemm_tile.h)
  constexpr bool kPairs = std::is_same_v<src_t, torch::headeronly::BFloat16>;
  auto pairs = [](float* p) { return reinterpret_cast<uint32_t*>(p); };
  auto bits = [](const src_t* p) { return reinterpret_cast<const uint16_t*>(p); };
  const cpu::TileKernel& k = tile_kernel();
  const TilePlan t = tile_plan(d, k);
  const int64_t D = d.channels, NR = k.nr, MR = cpu::kMR;
  const src_t* Q = q.const_data_ptr<src_t>();
  const src_t* G = g.const_data_ptr<src_t>();
  const int64_t qsp = q.stride(0), qsc = q.stride(1), qss = q.stride(2);
  const int64_t gsn = g.stride(0), gsc = g.stride(1), gsr = g.stride(2);
  const int64_t panel_size = t.strips * NR * D;
  parallel_for(0, t.groups * t.qchunks, 1, [&](int64_t begin, int64_t end) {
    Buffer panel(t.sub * panel_size), A(t.row_blocks * MR * D), S(t.row_blocks * MR * t.ldS);
    std::vector<int64_t> offset(t.strips * NR);
    int64_t packed_group = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / t.qchunks, qc = task % t.qchunks;
      const int64_t first = grp * t.sub * t.nb;  // first gallery image of the group
      const int64_t nblk = std::min(t.sub, (d.N - first + t.nb - 1) / t.nb);
      if (grp != packed_group) {  // pack the group's blocks: panel[strip][c][NR], zeros past the last column
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t n0 = first + blk * t.nb, cols = std::min(t.nb, d.N - n0) * d.Lg;
          const int64_t strips = (cols + NR - 1) / NR;
          for (int64_t col = 0; col < cols; ++col) offset[col] = (n0 + col / d.Lg) * gsn + (col % d.Lg) * gsr;
          if constexpr (kPairs) {
            cpu::pack_panel_bf16(bits(G), gsc, offset.data(), cols, D, NR, pairs(panel.data + blk * panel_size));
            continue;
          }
          for (int64_t st = 0; st < strips; ++st)
            for (int64_t c = 0; c < D; ++c) {
              float* dst = panel.data + blk * panel_size + (st * D + c) * NR;
              const src_t* src = G + c * gsc;
              for (int64_t j = 0; j < NR; ++j) {
                const int64_t col = st * NR + j;
                dst[j] = col < cols ? widen(src[offset[col]]) : 0.0f;
              }
            }
        }
        packed_group = grp;
      }
      const int64_t p_end = std::min(d.P, (qc + 1) * t.qchunk);
      for (int64_t p = qc * t.qchunk; p < p_end; ++p) {
        // pack the query: A[row block][c][MR], zeros past the last location
        if constexpr (kPairs)
          cpu::pack_query_bf16(bits(Q + p * qsp), qsc, qss, d.Lq, D, pairs(A.data));
        else
        for (int64_t b = 0; b < t.row_blocks; ++b) {
          const bool full = (b + 1) * MR <= d.Lq;
          for (int64_t c = 0; c < D; ++c) {
            float* dst = A.data + (b * D + c) * MR;
            const src_t* src = Q + p * qsp + c * qsc + b * MR * qss;
            if (full && qss == 1) {
              for (int64_t i = 0; i < MR; ++i) dst[i] = widen(src[i]);
            } else {
              for (int64_t i = 0; i < MR; ++i) dst[i] = b * MR + i < d.Lq ? widen(src[i * qss]) : 0.0f;
            }
          }
        }
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t n0 = first + blk * t.nb, cnt = std::min(t.nb, d.N - n0);
          const int64_t strips = (cnt * d.Lg + NR - 1) / NR;
          if constexpr (kPairs)
            k.run_bf16(pairs(A.data), t.row_blocks, pairs(panel.data + blk * panel_size), strips,
                       cpu::channel_pairs(D), S.data, t.ldS);
          else
            k.run(A.data, t.row_blocks, panel.data + blk * panel_size, strips, D, S.data, t.ldS);
          epilogue(p, n0, cnt, static_cast<const float*>(S.data), t.ldS);
        }
      }
    }
  });
}

// Calls f.template operator()<src_t>() with the C++ type of a float32/float16/bfloat16 input.
template <typename F>
void dispatch_reduced(ScalarType st, F&& f) {
  switch (st) {
    case ScalarType::Float: f.template operator()<float>(); break;
    case ScalarType::Half: f.template operator()<torch::headeronly::Half>(); break;
    case ScalarType::BFloat16: f.template operator()<torch::headeronly::BFloat16>(); break;
    default: QACONV_CHECK(false, "qaconv: no CPU kernel for ", dtype_name(st));
  }
}

// Runs `epilogue(p, n0, cnt, S, ld)` for every tile of pairs: S is float for float32/float16/bfloat16 inputs
// (read in their own dtype, widened while packing), double for float64. Detached: below autograd.
template <typename scalar_t, typename Epilogue>
void for_each_pair(const Tensor& query, const Tensor& gallery, const MatchDims& d, Epilogue&& epilogue) {
  // [B, d, h, w] -> [B, d, L]: a view whenever the layout allows (contiguous and channels_last both do)
  const Tensor q = flatten_locations(detach(query)), g = flatten_locations(detach(gallery));
  if constexpr (std::is_same_v<scalar_t, double>)
    for_each_tile_f64(q, g, d, epilogue);
  else
    dispatch_reduced(query.scalar_type(), [&]<typename src_t>() { for_each_tile<src_t>(q, g, d, epilogue); });
}

std::tuple<Tensor, Tensor> match_cpu(const Tensor& query, const Tensor& gallery, bool with_indices) {
  const MatchDims d = check_pair(query, gallery);
  QACONV_CHECK(query.is_cpu(), "qaconv: match_cpu called with ", device_name(query.device()), " tensors");
  const auto ct = compute_type(query.scalar_type());
  Tensor values = empty_like_device(query, {d.P, d.N, d.L()}, ct);
  Tensor indices = with_indices ? empty_like_device(query, {d.P, d.N, d.L()}, ScalarType::Long)
                                : empty_like_device(query, {0}, ScalarType::Long);
  if (d.P > 0 && d.N > 0) {
    dispatch_compute(ct, [&]<typename scalar_t>() {
      scalar_t* vals = values.mutable_data_ptr<scalar_t>();
      int64_t* idx = with_indices ? indices.mutable_data_ptr<int64_t>() : nullptr;
      for_each_pair<scalar_t>(query, gallery, d, [&](int64_t p, int64_t n0, int64_t cnt, const scalar_t* S,
                                                      int64_t ld) {
        scalar_t* out = vals + (p * d.N + n0) * d.L();
        if (idx == nullptr) {
          pool_values(S, ld, d.Lq, d.Lg, cnt, [&](int64_t j) { return out + j * d.L(); });
          return;
        }
        for (int64_t j = 0; j < cnt; ++j) {
          const int64_t off = (p * d.N + n0 + j) * d.L();
          pool(S + j * d.Lg, ld, d.Lq, d.Lg, vals + off, vals + off + d.Lq, idx + off, idx + off + d.Lq);
        }
      });
    });
  }
  return {to_dtype(values, query.scalar_type()), indices};
}

Tensor score_cpu(const Tensor& query, const Tensor& gallery, const Tensor& weight, const std::optional<Tensor>& bias) {
  const MatchDims d = check_pair(query, gallery);
  check_head(weight, bias, d, query);
  QACONV_CHECK(query.is_cpu(), "qaconv: score_cpu called with ", device_name(query.device()), " tensors");
  const auto ct = compute_type(query.scalar_type());
  Tensor out = empty_like_device(query, {d.P, d.N}, ct);
  if (d.P == 0 || d.N == 0) return out;
  const Tensor w = torch::stable::contiguous(to_dtype(torch::stable::reshape(weight, {-1}), ct));
  const double b = (bias.has_value() && bias->defined()) ? scalar_value<double>(to_dtype(*bias, ScalarType::Double))
                                                         : 0.0;
  dispatch_compute(ct, [&]<typename scalar_t>() {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const double bb = b;
    for_each_pair<scalar_t>(query, gallery, d, [&](int64_t p, int64_t n0, int64_t cnt, const scalar_t* S,
                                                    int64_t ld) {
      // A per-thread buffer for the tile's maxima, then the folded head as one dot product per pair.
      thread_local std::vector<scalar_t> maxima;
      if (int64_t(maxima.size()) < cnt * d.L()) maxima.resize(cnt * d.L());
      scalar_t* m = maxima.data();
      pool_values(S, ld, d.Lq, d.Lg, cnt, [&](int64_t j) { return m + j * d.L(); });
      for (int64_t j = 0; j < cnt; ++j) {
        const scalar_t* mj = m + j * d.L();
        double acc = 0;  // the head's dot product is short: accumulate it in double
        for (int64_t k = 0; k < d.L(); ++k) acc += static_cast<double>(mj[k]) * static_cast<double>(wp[k]);
        o[p * d.N + n0 + j] = static_cast<scalar_t>(acc + bb);
      }
    });
  });
  return out;
}

// Owner-computes backward: grad_q[p] is written only by the task owning p, grad_g[n] by the task owning n.
std::tuple<Tensor, Tensor> match_backward_cpu(const Tensor& grad_values, const Tensor& indices, const Tensor& query,
                                              const Tensor& gallery, std::vector<bool> output_mask) {
  const MatchDims d = check_pair(query, gallery);
  check_backward(grad_values, indices, d);
  const auto ct = compute_type(query.scalar_type());
  const bool need_q = output_mask.at(0), need_g = output_mask.at(1);
  Tensor gq = zeros_like_device(query, {need_q ? d.P : 0, d.Lq, d.channels}, ct);
  Tensor gg = zeros_like_device(query, {need_g ? d.N : 0, d.Lg, d.channels}, ct);
  if (d.P > 0 && d.N > 0 && (need_q || need_g)) {
    const Tensor q = to_dtype(locations_major(query), ct), g = to_dtype(locations_major(gallery), ct);
    const Tensor gv = torch::stable::contiguous(to_dtype(grad_values, ct));
    const Tensor ix = torch::stable::contiguous(indices);
    dispatch_compute(ct, [&]<typename scalar_t>() {
      const scalar_t* Q = q.const_data_ptr<scalar_t>();
      const scalar_t* G = g.const_data_ptr<scalar_t>();
      const scalar_t* GV = gv.const_data_ptr<scalar_t>();
      const int64_t* IX = ix.const_data_ptr<int64_t>();
      scalar_t* GQ = gq.mutable_data_ptr<scalar_t>();
      scalar_t* GG = gg.mutable_data_ptr<scalar_t>();
      const int64_t D = d.channels, L = d.L();
      auto axpy = [D](scalar_t* dst, scalar_t a, const scalar_t* src) {
        for (int64_t c = 0; c < D; ++c) dst[c] += a * src[c];
      };
      auto check_index = [](int64_t i, int64_t bound) {
        QACONV_CHECK(i >= 0 && i < bound, "qaconv: match index ", i, " out of range [0, ", bound, ")");
      };
      // Queries in blocks of kBackwardBlock, gallery images outer within a block: each gallery map is
      // read once per block while the block's gradient rows stay in cache.
      const int64_t q_blocks = need_q ? (d.P + kBackwardBlock - 1) / kBackwardBlock : 0;
      parallel_for(0, q_blocks, 1, [&](int64_t begin, int64_t end) {
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
      parallel_for(0, g_blocks, 1, [&](int64_t begin, int64_t end) {
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
  return {need_q ? channels_first(gq, query) : empty_gradient(query),
          need_g ? channels_first(gg, gallery) : empty_gradient(gallery)};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(qaconv_ext, CPU, m) {
  m.impl("match", TORCH_BOX(&match_cpu));
  m.impl("score", TORCH_BOX(&score_cpu));
  m.impl("match_backward", TORCH_BOX(&match_backward_cpu));
}

}  // namespace qaconv
