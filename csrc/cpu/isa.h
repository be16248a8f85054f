// Which instruction sets the CPU kernels may use, decided once per process.
#pragma once

namespace qaconv {
namespace cpu {

// Ordered levels: each includes the ones before it.
enum class Isa { generic = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

const char* isa_name(Isa isa);

// The level the processor (and this build) offers, capped by the environment variable
// QACONV_EXT_CPU_ISA (generic, avx2, avx512, avx512bf16; unset or "auto": no cap), read on first use.
// It selects the bfloat16 kernel; the float32 epilogue picks its own AVX-512/AVX2 version at load time.
Isa active_isa();

// Whether bfloat16 maps go through the AVX512-BF16 kernel (otherwise they are widened to float32).
inline bool bf16_kernel() { return active_isa() == Isa::avx512bf16; }

}  // namespace cpu
}  // namespace qaconv
