// The CPU matching kernels' own GEMM micro-kernel: plain C++ (no torch headers).
//
// One call computes a tile of local similarities S[s, j] = sum_c A[c, s] * B[c, j] for one query map
// (A, its Lq locations) against a panel of gallery columns (B, the locations of several gallery images
// side by side, so small maps still give long rows). Both operands come packed in float32:
//
//   A: row blocks of kMR query locations, each [d][kMR]            (block b holds rows b*kMR ...)
//   B: strips of `nr` gallery columns, each [d][nr]                (strip t holds columns t*nr ...)
//   S: rows of ldS floats; the tile writes row_blocks*kMR rows and strips*nr columns
//
// (padding rows/columns are zeros in A/B and their S entries are ignored by the caller).
//
// Accumulation order, the property the search and sharded evaluation rely on: every S[s, j] is one
// fused multiply-add chain over c = 0, 1, ..., d-1 starting from +0 (acc = fma(A[c, s], B[c, j], acc)),
// whatever the tile sizes, the position of the element in its tile, the variant or the thread. So a
// pair's similarities, hence its maxima and score, are bit-identical whatever batch it is scored in,
// and on every variant below (the portable ones use std::fma, which rounds exactly like the hardware FMA;
// without FMA hardware it is a library call: correct but slow).
//
// bfloat16 maps have a kernel of their own (run_bf16), fed with channel pairs: one uint32 per (pair k,
// location) holding channel 2k's bfloat16 bits in the low half and channel 2k+1's in the high half (the
// operand layout of VDPBF16PS; an odd d gets a zero channel d). Its accumulation order, on every variant:
// per pair k = 0, 1, ..., acc = fma(A[2k+1], B[2k+1], acc) then acc = fma(A[2k], B[2k], acc), from +0, with
// denormal inputs read as zero and every FMA result that is tiny (below FLT_MIN after rounding to float's
// precision with an unbounded exponent) flushed to a zero of its sign. That is exactly what VDPBF16PS does
// (its two products are exact in float32), so the AVX512-BF16 variant and the others (FMA instructions with
// MXCSR.DAZ/FTZ set, or the portable twin of gemm_tile_bf16.h) give the same bits, and a bfloat16 pair's
// score is as independent of batch, blocking, thread and variant as a float32 one.
#pragma once

#include <cstdint>

namespace qaconv {
namespace cpu {

constexpr int64_t kMR = 4;  // query locations per micro-tile (rows of the register block)

struct TileKernel {
  const char* name;
  int64_t nr;  // gallery columns per strip: 3 vectors of the variant's width
  void (*run)(const float* A, int64_t row_blocks, const float* B, int64_t strips, int64_t d, float* S,
              int64_t ldS);
  // The same tile for bfloat16 maps packed in channel pairs (A: [row block][pair][kMR], B: [strip][pair][nr]).
  void (*run_bf16)(const uint32_t* A, int64_t row_blocks, const uint32_t* B, int64_t strips, int64_t pairs,
                   float* S, int64_t ldS);
};

// The fastest variant this processor runs (AVX512-BF16, then AVX-512F, then AVX2+FMA, then the portable
// one), or the one named by the environment variable QACONV_CPU_KERNEL when set. Names: "avx512bf16"
// (VDPBF16PS for bfloat16 maps, the avx512 kernel for float32), "avx512", "avx2", "generic" (portable,
// 24 columns, the AVX2 layout) and "generic16" (portable, 48 columns, the AVX-512 layout).
// Returns nullptr, with *error set, for an unknown name or a variant this processor cannot run.
const TileKernel* select_tile_kernel(const char** error);

// The variant picked with no override (what the processor supports best).
const TileKernel& best_tile_kernel();

}  // namespace cpu
}  // namespace qaconv
