// CPU binding of qaconv_ext::centroid_score (schema in csrc/ops.cpp): checks the tensors, computes each
// query table's maxima and runs the kernel of centroid_kernel.h over blocks of maps in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cpu/centroid_kernel.h"

namespace qaconv {
namespace {

constexpr int64_t kMapsPerTask = 512;  // codes of one task: 512 * Lg * 2 bytes (128 KiB at Lg = 128)

at::Tensor centroid_score_cpu(const at::Tensor& table, const at::Tensor& codes, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(table.dim() == 3, "centroid_score: table must be [P, K, Lq], got shape ", table.sizes());
  TORCH_CHECK_VALUE(codes.dim() == 2, "centroid_score: codes must be [N, Lg], got shape ", codes.sizes());
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat, "centroid_score: table must be float32, got ",
                   table.scalar_type());
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kUInt16, "centroid_score: codes must be uint16, got ",
                   codes.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "centroid_score: weight must be float32, got ",
                   weight.scalar_type());
  const int64_t P = table.size(0), K = table.size(1), Lq = table.size(2);
  const int64_t N = codes.size(0), Lg = codes.size(1);
  TORCH_CHECK_VALUE(weight.numel() == Lq + Lg, "centroid_score: weight must hold Lq + Lg = ", Lq + Lg,
                    " values, got ", weight.numel());
  float b = 0.0f;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->numel() == 1, "centroid_score: bias must be a scalar, got shape ", bias->sizes());
    b = bias->to(at::kFloat).item<float>();
  }
  const at::Tensor t = table.contiguous(), c = codes.contiguous(), w = weight.reshape({-1}).contiguous();
  at::Tensor out = at::empty({P, N}, table.options());
  if (P == 0 || N == 0) return out;
  TORCH_CHECK_VALUE(K > 0 && Lq > 0 && Lg > 0, "centroid_score: empty table or codes");
  at::Tensor colmax = at::empty({P, K}, table.options());
  const float* tp = t.data_ptr<float>();
  float* cm = colmax.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) cpu::centroid_table_maxima(tp + p * K * Lq, K, Lq, cm + p * K);
  });
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(c.data_ptr());
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<int64_t> bad{0};
  const int64_t tasks = (N + kMapsPerTask - 1) / kMapsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(Lq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kMapsPerTask, n1 = std::min(N, n0 + kMapsPerTask);
      for (int64_t p = 0; p < P; ++p) {
        const cpu::CentroidTable tab{tp + p * K * Lq, cm + p * K, K, Lq};
        bad += cpu::centroid_scores(tab, cp, Lg, n0, n1, wp, wp + Lq, b, op + p * N + n0, scratch.data());
      }
    }
  });
  TORCH_CHECK_VALUE(bad.load() == 0, "centroid_score: codes hold ids >= K = ", K);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qaconv_ext, CPU, m) { m.impl("centroid_score", &centroid_score_cpu); }

}  // namespace qaconv
