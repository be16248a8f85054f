"""The mutation table: bugs injected into patched copies of csrc/cuda, each of which the emulated tests
must catch. ``find`` must occur exactly once in the file (the table follows the sources); ``caught_by``
is how: a check of the emulator (a regular expression its error must match) or "wrong result" (the
launch runs, the numbers differ from the float64 reference). Equivalent mutants (the change preserves
behaviour) are listed with caught_by None: they must pass, proving the checks raise no false alarm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MMA, MATCH, PLAN = "score_mma.cu", "match_kernels.cu", "launch_plan.h"
WRONG = "wrong result"


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    bug: str
    find: str
    replace: str
    caught_by: Optional[str]
    default: bool = False  # in the default test run (the others: QACONV_EMU_MUTANTS=all)


MUTANTS = [
    Mutant("mma-b-fragment", MMA, "wrong fragment offset: ldmatrix B matrices in the order (n, k), (n + 8, k), ...",
           "((lane >> 4) << 3)) * s.row_stride + ((lane >> 3) & 1) * 8",
           "(((lane >> 3) & 1) << 3)) * s.row_stride + (lane >> 4) * 8", WRONG, True),
    Mutant("mma-no-cp-async-wait", MMA, "missing cp.async wait (the pipelined gallery load)",
           "        ptx::cp_async_commit();\n        ptx::cp_async_wait<1>();",
           "        ptx::cp_async_commit();", "before its cp.async completed", True),
    Mutant("mma-no-sync-partials", MMA, "removed __syncthreads between the partial maxima and the epilogue",
           "    __syncthreads();  // every partial maximum is written; the gallery buffer may be refilled\n", "",
           "shared-memory race", True),
    Mutant("mma-no-sync-zero-fill", MMA, "removed __syncthreads after zeroing the tiles",
           "    for (int i = tid; i < L; i += blockDim.x) wts[i] = weight[i];\n  }\n  __syncthreads();",
           "    for (int i = tid; i < L; i += blockDim.x) wts[i] = weight[i];\n  }", "shared-memory race"),
    Mutant("mma-shuffle-lane", MMA, "wrong shuffle lane in the row maxima (xor 4 instead of 2)",
           "m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 2));",
           "m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 4));", WRONG),
    Mutant("mma-shuffle-divergent", MMA, "lane-divergent shuffle (only row groups 0-3 take part)",
           "      m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 1));",
           "      if (group < 4) m = ptx::max_nan(m, __shfl_xor_sync(kFullMask, m, 1));",
           "divergent warp collective|deadlock", True),
    Mutant("mma-row-pad", PLAN, "misaligned row pad (4 elements: rows no longer 16-byte aligned)",
           "constexpr int kRowPad = 8; ", "constexpr int kRowPad = 4; ", "not 16-byte aligned|unaligned address"),
    Mutant("mma-gallery-oob", MMA, "out-of-bounds gallery load (whole warp tiles of rows)",
           "load_tile(gs, g + n0 * g_step, s.Lg, s);", "load_tile(gs, g + n0 * g_step, s.rows_g, s);",
           "global memory out of bounds"),
    Mutant("mma-weight-index", MMA, "epilogue: wrong weight index (reversed)",
           "partial = fmaf(m, wts[i], partial);", "partial = fmaf(m, wts[L - 1 - i], partial);", WRONG),
    Mutant("mma-bias", MMA, "epilogue: wrong bias (dropped)",
           "out[p * N + n0 + it] = total + (bias != nullptr ? *bias : 0.f);", "out[p * N + n0 + it] = total;", WRONG),
    Mutant("match-no-sync-fill", MATCH, "removed __syncthreads after staging a channel chunk",
           ": 0.f;\n          }\n          __syncthreads();", ": 0.f;\n          }", "shared-memory race", True),
    Mutant("match-no-sync-reuse", MATCH, "removed __syncthreads before the chunk buffers are refilled",
           "acc[i][j] = fmaf(a[i], b[j], acc[i][j]);\n          }\n          __syncthreads();",
           "acc[i][j] = fmaf(a[i], b[j], acc[i][j]);\n          }", "shared-memory race"),
    Mutant("match-gallery-oob", MATCH, "out-of-bounds gallery load (location guard dropped)",
           "b_s[k][loc] = (c0 + loc < Lg && ch < d)", "b_s[k][loc] = (ch < d)", "global memory out of bounds", True),
    Mutant("match-tie-break", MATCH, "changed tie-break (last index instead of first)",
           "candidate > current", "candidate >= current", WRONG, True),
    Mutant("match-weight-index", MATCH, "epilogue (fallback score): wrong weight index (halves swapped)",
           "partial = fmaf(m, weight[i], partial);", "partial = fmaf(m, weight[i < Lq ? i + Lg : i - Lq], partial);",
           WRONG),
    Mutant("match-bias", MATCH, "epilogue (fallback score): wrong bias (subtracted)",
           "out[pair] = total + (bias != nullptr ? *bias : 0.f);",
           "out[pair] = total - (bias != nullptr ? *bias : 0.f);", WRONG),
    Mutant("backward-shuffle-lane", MATCH, "backward: wrong shuffle lane for a hit's gradient",
           "__shfl_sync(kFullMask, ar, b)", "__shfl_sync(kFullMask, ar, (b + 1) & 31)", WRONG),
    Mutant("match-sync-next-pair", MATCH, "equivalent: the barrier before the next pair is redundant (the "
           "running maxima are rewritten only after the next pair's chunk barriers)",
           "    __syncthreads();  // the running maxima are reused by the next pair\n", "", None),
]
