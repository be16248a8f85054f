// CPU binding of qaconv_ext::centroid_score (schema in csrc/ops.cpp), on the stable ABI like the other
// bindings: checks the tensors, computes each query table's column maxima and runs the kernel of
// centroid_kernel.h over blocks of maps in parallel.
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

Tensor centroid_score_cpu(const Tensor& table, const Tensor& codes, const Tensor& weight,
                          const std::optional<Tensor>& bias) {
  QACONV_CHECK_VALUE(table.dim() == 3, "centroid_score: table must be [P, K, Lq], got shape ", shape(table));
  QACONV_CHECK_VALUE(codes.dim() == 2, "centroid_score: codes must be [N, Lg], got shape ", shape(codes));
  QACONV_CHECK_VALUE(table.scalar_type() == ScalarType::Float, "centroid_score: table must be float32, got ",
                     dtype_name(table.scalar_type()));
  QACONV_CHECK_VALUE(codes.scalar_type() == ScalarType::UInt16, "centroid_score: codes must be uint16, got ",
                     dtype_name(codes.scalar_type()));
  QACONV_CHECK_VALUE(weight.scalar_type() == ScalarType::Float, "centroid_score: weight must be float32, got ",
                     dtype_name(weight.scalar_type()));
  QACONV_CHECK(table.is_cpu() && codes.is_cpu() && weight.is_cpu(),
               "centroid_score: the CPU kernel got tensors on another device");
  const int64_t P = table.size(0), K = table.size(1), Lq = table.size(2);
  const int64_t N = codes.size(0), Lg = codes.size(1);
  QACONV_CHECK_VALUE(weight.numel() == Lq + Lg, "centroid_score: weight must hold Lq + Lg = ", Lq + Lg,
                     " values, got ", weight.numel());
  float b = 0.0f;
  if (bias.has_value() && bias->defined()) {
    QACONV_CHECK_VALUE(bias->numel() == 1, "centroid_score: bias must be a scalar, got shape ", shape(*bias));
    b = static_cast<float>(scalar_value<double>(to_dtype(*bias, ScalarType::Double)));
  }
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
  std::atomic<int64_t> bad{0};
  const int64_t tasks = (N + kMapsPerTask - 1) / kMapsPerTask;
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(Lq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kMapsPerTask, n1 = std::min(N, n0 + kMapsPerTask);
      for (int64_t p = 0; p < P; ++p) {
        const cpu::CentroidTable tab{tp + p * K * Lq, cm + p * K, K, Lq};
        bad += cpu::centroid_scores(tab, cp, Lg, n0, n1, wp, wp + Lq, b, op + p * N + n0, scratch.data());
      }
    }
  });
  QACONV_CHECK_VALUE(bad.load() == 0, "centroid_score: codes hold ids >= K = ", K);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(qaconv_ext, CPU, m) { m.impl("centroid_score", TORCH_BOX(&centroid_score_cpu)); }

}  // namespace qaconv
