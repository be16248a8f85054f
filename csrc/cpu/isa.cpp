// Run-time choice of the CPU kernels' instruction set, and the `cpu_isa` op that reports it.
#include "cpu/isa.h"

#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace qaconv {
namespace cpu {
namespace {

constexpr const char* kEnv = "QACONV_EXT_CPU_ISA";
constexpr Isa kLevels[] = {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512bf16};

Isa detected_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#if defined(QACONV_WITH_AVX512BF16)
  if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::avx512bf16;
#endif
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2")) return Isa::avx2;
#endif
  return Isa::generic;
}

Isa choose_isa() {
  const Isa detected = detected_isa();
  const char* env = std::getenv(kEnv);
  const std::string cap = env == nullptr ? "" : env;
  if (cap.empty() || cap == "auto") return detected;
  for (Isa level : kLevels)
    if (cap == isa_name(level)) return level < detected ? level : detected;
  TORCH_CHECK(false, "qaconv: ", kEnv, "=", cap, " is not one of auto, generic, avx2, avx512, avx512bf16");
}

std::string cpu_isa_op() { return isa_name(active_isa()); }

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

}  // namespace cpu
}  // namespace qaconv

// torch.ops.qaconv_ext.cpu_isa(): the instruction-set level the CPU kernels use in this process.
TORCH_LIBRARY_FRAGMENT(qaconv_ext, m) { m.def("cpu_isa() -> str", &qaconv::cpu::cpu_isa_op); }
