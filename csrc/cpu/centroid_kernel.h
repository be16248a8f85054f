// Approximate QAConv scores of centroid-coded gallery maps: plain C++ (no torch headers).
//
// A gallery map is stored as Lg centroid ids c_j (uint16) into a codebook C [K, d]. For one query map Q
// [d, Lq] the caller passes the table T = C Q ([K][Lq], row k = the similarities of centroid k with every
// query location) and its row maxima colmax[k] = max_i T[k][i]. The score of a coded map is
//
//   sum_i w_row[i] * max_j T[c_j][i]  +  sum_j w_col[j] * colmax[c_j]  +  bias,
//
// i.e. QAConv's score with every gallery location replaced by its centroid: Lq * Lg table look-ups instead
// of Lq * Lg * d multiply-adds. The first term reads whole table rows (Lq contiguous floats per id), so the
// maxima over j are vector max operations on a register block of query locations; the table stays in L1/L2
// while a block of maps is scored.
//
// Rounding: each row maximum is exact (max of table entries); the sums run in float32 in a fixed order
// (eight interleaved partial sums over i, then over j, each folded pairwise; then the bias), independent of
// the batch or thread. NaN in the table is not supported (the maxima follow std::max, which may drop it).
//
// The uint8 table (centroid_scores_u8) holds the same similarities quantised per query to 256 levels,
// T ~ offset + step * q, q in 0..255: a quarter of the bytes (a 4096-centroid table of 128-location queries
// is 512 KiB and stays in L2) and byte-wide maxima. As the decoding is increasing, max_j decode(q) =
// decode(max_j q), so the row term is offset * sum_i w_row[i] + step * sum_i w_row[i] * max_j q[c_j][i]; the
// column term reads float32 maxima of the unquantised table.
#pragma once

#include <cstdint>

namespace qaconv {
namespace cpu {

struct CentroidTable {
  const float* table;   // [K][Lq]
  const float* colmax;  // [K]
  int64_t K;
  int64_t Lq;
};

// Scores of the coded maps codes[n * Lg ... n * Lg + Lg - 1] for n in [n0, n1), written to out[n - n0].
// w_row: [Lq], w_col: [Lg]. scratch: at least Lq floats. Returns the number of ids >= K met (their maps'
// scores are left unspecified; the caller reports the error).
int64_t centroid_scores(const CentroidTable& t, const uint16_t* codes, int64_t Lg, int64_t n0, int64_t n1,
                        const float* w_row, const float* w_col, float bias, float* out, float* scratch);

struct CentroidTableU8 {
  const uint8_t* table;  // [K][Lq], similarity ~ offset + step * value
  const float* colmax;   // [K], maxima of the float table's rows
  float offset;
  float step;
  int64_t K;
  int64_t Lq;
};

// As centroid_scores, from a uint8 table. scratch: at least Lq bytes.
int64_t centroid_scores_u8(const CentroidTableU8& t, const uint16_t* codes, int64_t Lg, int64_t n0, int64_t n1,
                           const float* w_row, const float* w_col, float bias, float* out, uint8_t* scratch);

// colmax[k] = max_i table[k][i] for a table [K][Lq].
void centroid_table_maxima(const float* table, int64_t K, int64_t Lq, float* colmax);

}  // namespace cpu
}  // namespace qaconv
