// bfloat16 channel pairs: the packing the bfloat16 tile kernels read, and the portable twin of one VDPBF16PS
// lane. Plain C++, no torch headers.
//
// VDPBF16PS (Intel SDM) computes per float32 lane, with round-to-nearest-even, denormal inputs read as zero
// and tiny results flushed to zero (MXCSR neither read nor written):
//   acc += a.hi * b.hi;   acc += a.lo * b.lo        (hi: the odd channel, lo: the even one)
// A product of two bfloat16 numbers (8-bit significands) fits a float32 significand, so each step is one
// float32 fused multiply-add. dot2_twin runs that sequence with std::fma; the one subtlety is the flush:
// x86 detects tininess after rounding, i.e. a result is flushed when, rounded to float's 24 bits with an
// unbounded exponent, it lies below FLT_MIN. The gradual-underflow result of std::fma agrees with that except
// when it rounds up to exactly +-FLT_MIN from an exact value below FLT_MIN * (1 - 2^-25), which is checked
// in double (a bfloat16 product is exact there and, at that magnitude, so is the sum up to far below the
// rounding boundary). tests/test_cpu_kernel.py compares the twin with the instruction lane by lane.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace qaconv {
namespace cpu {

// The pair of channels (2k, 2k+1) of one location: channel 2k's bfloat16 bits low, channel 2k+1's high.
inline uint32_t bf16_pair(uint16_t even, uint16_t odd) { return uint32_t(even) | (uint32_t(odd) << 16); }

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// A bfloat16 (the pair's high or low half) as the float32 the instruction reads: denormals as zeros.
inline float pair_hi(uint32_t pair) {
  const float f = bits_to_float(pair & 0xffff0000u);
  return std::fabs(f) < FLT_MIN ? std::copysign(0.0f, f) : f;
}
inline float pair_lo(uint32_t pair) {
  const float f = bits_to_float(pair << 16);
  return std::fabs(f) < FLT_MIN ? std::copysign(0.0f, f) : f;
}

// fma(a, b, acc) rounded to nearest even, then flushed to a zero of its sign if tiny after rounding.
inline float fma_ftz(float a, float b, float acc) {
  const float r = std::fma(a, b, acc);
  const float m = std::fabs(r);
  if (m < FLT_MIN) return std::copysign(0.0f, r);
  if (m == FLT_MIN) {
    const double exact = double(a) * double(b) + double(acc);
    if (std::fabs(exact) < double(FLT_MIN) * (1.0 - 0x1p-25)) return std::copysign(0.0f, r);
  }
  return r;
}

// One VDPBF16PS lane: acc + a.hi * b.hi + a.lo * b.lo in the instruction's order and rounding (a denormal
// acc is read as zero too; the kernels' accumulators never are one).
inline float dot2_twin(uint32_t a, uint32_t b, float acc) {
  acc = std::fabs(acc) < FLT_MIN ? std::copysign(0.0f, acc) : acc;
  acc = fma_ftz(pair_hi(a), pair_hi(b), acc);
  return fma_ftz(pair_lo(a), pair_lo(b), acc);
}

}  // namespace cpu
}  // namespace qaconv
