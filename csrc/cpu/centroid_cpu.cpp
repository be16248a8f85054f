// CPU bindings of qaconv_ext::centroid_score and centroid_score_u8 (schemas in csrc/ops.cpp), on the stable
// ABI like the other bindings: check the tensors, then run the kernels of centroid_kernel.h over blocks of
// maps in parallel (centroid_score also computes each query table's row maxima; centroid_score_u8 is
// given them, with the table quantised by qaconv_ext.ops.quantize_centroid_table).
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

#include "binding.h"
#include "cpu/centroid_kernel.h"

namespace qaconv {
namespace {

constexpr int64_t kMapsPerTask = 512;  // codes of one task: 512 * Lg * 2 bytes (128 KiB at Lg = 128)

// The checks both ops share (codes, weight, bias); returns the bias as a float.
float check_codes_and_head(const char* op, const Tensor& codes, const Tensor& weight,
                           const std::optional<Tensor>& bias, int64_t Lq) {
  QACONV_CHECK_VALUE(codes.dim() == 2, op, ": codes must be [N, Lg], got shape ", shape(codes));
  QACONV_CHECK_VALUE(codes.scalar_type() == ScalarType::UInt16, op, ": codes must be uint16, got ",
                     dtype_name(codes.scalar_type()));
  QACONV_CHECK_VALUE(weight.scalar_type() == ScalarType::Float, op, ": weight must be float32, got ",
                     dtype_name(weight.scalar_type()));
  QACONV_CHECK(codes.is_cpu() && weight.is_cpu(), op, ": the CPU kernel got tensors on another device");
  const int64_t Lg = codes.size(1);
  QACONV_CHECK_VALUE(weight.numel() == Lq + Lg, op, ": weight must hold Lq + Lg = ", Lq + Lg, " values, got ",
                     weight.numel());
  if (bias.has_value() && bias->defined()) {
    QACONV_CHECK_VALUE(bias->numel() == 1, op, ": bias must be a scalar, got shape ", shape(*bias));
    return static_cast<float>(scalar_value<double>(to_dtype(*bias, ScalarType::Double)));
  }
  return 0.0f;
}

// out[p, n] = score(p, n) for blocks of kMapsPerTask maps in parallel; score(p, n0, n1, out, scratch) scores
// maps [n0, n1) for query p and returns the number of ids >= K met.
template <typename Scratch, typename ScoreFn>
void score_in_parallel(const char* op, int64_t P, int64_t N, int64_t K, int64_t Lq, ScoreFn score) {
  std::atomic<int64_t> bad{0};
  const int64_t tasks = (N + kMapsPerTask - 1) / kMapsPerTask;
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Scratch> scratch(Lq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kMapsPerTask, n1 = std::min(N, n0 + kMapsPerTask);
      for (int64_t p = 0; p < P; ++p) bad += score(p, n0, n1, scratch.data());
    }
  });
  QACONV_CHECK_VALUE(bad.load() == 0, op, ": codes hold ids >= K = ", K);
}

Tensor centroid_score_cpu(const Tensor& table, const Tensor& codes, const Tensor& weight,
                          const std::optional<Tensor>& bias) {
  QACONV_CHECK_VALUE(table.dim() == 3, "centroid_score: table must be [P, K, Lq], got shape ", shape(table));
  QACONV_CHECK_VALUE(table.scalar_type() == ScalarType::Float, "centroid_score: table must be float32, got ",
                     dtype_name(table.scalar_type()));
  QACONV_CHECK(table.is_cpu(), "centroid_score: the CPU kernel got tensors on another device");
  const int64_t P = table.size(0), K = table.size(1), Lq = table.size(2);
  const float b = check_codes_and_head("centroid_score", codes, weight, bias, Lq);
  const int64_t N = codes.size(0), Lg = codes.size(1);
  const Tensor t = torch::stable::contiguous(table), c = torch::stable::contiguous(codes);
  const Tensor w = torch::stable::contiguous(torch::stable::reshape(weight, {-1}));
  Tensor out = empty_like_device(table, {P, N}, ScalarType::Float);
  if (P == 0 || N == 0) return out;
  QACONV_CHECK_VALUE(K > 0 && Lq > 0 && Lg > 0, "centroid_score: empty table or codes");
  Tensor colmax = empty_like_device(table, {P, K}, ScalarType::Float);
  const float* tp = t.const_data_ptr<float>();
  float* cm = colmax.mutable_data_ptr<float>();
  parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) cpu::centroid_table_maxima(tp + p * K * Lq, K, Lq, cm + p * K);
  });
  const uint16_t* cp = static_cast<const uint16_t*>(c.const_data_ptr());
  const float* wp = w.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  score_in_parallel<float>("centroid_score", P, N, K, Lq, [&](int64_t p, int64_t n0, int64_t n1, float* scratch) {
    const cpu::CentroidTable tab{tp + p * K * Lq, cm + p * K, K, Lq};
    return cpu::centroid_scores(tab, cp, Lg, n0, n1, wp, wp + Lq, b, op + p * N + n0, scratch);
  });
  return out;
}

Tensor centroid_score_u8_cpu(const Tensor& table, const Tensor& scale, const Tensor& colmax, const Tensor& codes,
                             const Tensor& weight, const std::optional<Tensor>& bias) {
  const char* op_name = "centroid_score_u8";
  QACONV_CHECK_VALUE(table.dim() == 3, op_name, ": table must be [P, K, Lq], got shape ", shape(table));
  QACONV_CHECK_VALUE(table.scalar_type() == ScalarType::Byte, op_name, ": table must be uint8, got ",
                     dtype_name(table.scalar_type()));
  const int64_t P = table.size(0), K = table.size(1), Lq = table.size(2);
  QACONV_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == P && scale.size(1) == 2, op_name,
                     ": scale must be [P, 2] (offset, step), got shape ", shape(scale));
  QACONV_CHECK_VALUE(colmax.dim() == 2 && colmax.size(0) == P && colmax.size(1) == K, op_name,
                     ": colmax must be [P, K], got shape ", shape(colmax));
  QACONV_CHECK_VALUE(scale.scalar_type() == ScalarType::Float && colmax.scalar_type() == ScalarType::Float, op_name,
                     ": scale and colmax must be float32, got ", dtype_name(scale.scalar_type()), " and ",
                     dtype_name(colmax.scalar_type()));
  QACONV_CHECK(table.is_cpu() && scale.is_cpu() && colmax.is_cpu(), op_name,
               ": the CPU kernel got tensors on another device");
  const float b = check_codes_and_head(op_name, codes, weight, bias, Lq);
  const int64_t N = codes.size(0), Lg = codes.size(1);
  const Tensor t = torch::stable::contiguous(table), c = torch::stable::contiguous(codes);
  const Tensor s = torch::stable::contiguous(scale), cm = torch::stable::contiguous(colmax);
  const Tensor w = torch::stable::contiguous(torch::stable::reshape(weight, {-1}));
  Tensor out = empty_like_device(colmax, {P, N}, ScalarType::Float);
  if (P == 0 || N == 0) return out;
  QACONV_CHECK_VALUE(K > 0 && Lq > 0 && Lg > 0, op_name, ": empty table or codes");
  const uint8_t* tp = static_cast<const uint8_t*>(t.const_data_ptr());
  const float* sp = s.const_data_ptr<float>();
  const float* cmp = cm.const_data_ptr<float>();
  const uint16_t* cp = static_cast<const uint16_t*>(c.const_data_ptr());
  const float* wp = w.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  score_in_parallel<uint8_t>(op_name, P, N, K, Lq, [&](int64_t p, int64_t n0, int64_t n1, uint8_t* scratch) {
    const cpu::CentroidTableU8 tab{tp + p * K * Lq, cmp + p * K, sp[2 * p], sp[2 * p + 1], K, Lq};
    return cpu::centroid_scores_u8(tab, cp, Lg, n0, n1, wp, wp + Lq, b, op + p * N + n0, scratch);
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(qaconv_ext, CPU, m) {
  m.impl("centroid_score", TORCH_BOX(&centroid_score_cpu));
  m.impl("centroid_score_u8", TORCH_BOX(&centroid_score_u8_cpu));
}

}  // namespace qaconv
