// Input validation shared by the CPU and CUDA bindings of the qaconv_ext ops.
#pragma once

#include <cstdint>
#include <optional>

#include "binding.h"

namespace qaconv {

// Sizes of one query/gallery matching problem.
struct MatchDims {
  int64_t P, N, channels, Lq, Lg;
  int64_t L() const { return Lq + Lg; }
};

// The checks below are the contract of the ops; the fake kernels and the pure-PyTorch fallback
// (qaconv_ext/ops/checks.py) raise the same errors with the same messages.
inline MatchDims check_pair(const Tensor& query, const Tensor& gallery) {
  QACONV_CHECK_VALUE(query.dim() == 4,
                     "qaconv: query must be a 4-D feature map [batch, channels, height, width], got shape ",
                     shape(query));
  QACONV_CHECK_VALUE(gallery.dim() == 4,
                     "qaconv: gallery must be a 4-D feature map [batch, channels, height, width], got shape ",
                     shape(gallery));
  QACONV_CHECK_VALUE(query.scalar_type() == gallery.scalar_type(), "qaconv: query and gallery dtypes differ (",
                     dtype_name(query.scalar_type()), " vs ", dtype_name(gallery.scalar_type()), ")");
  const ScalarType st = query.scalar_type();
  QACONV_CHECK_VALUE(is_floating(st), "qaconv: unsupported dtype ", dtype_name(st),
                     "; use float32, float16, bfloat16 (or float64 on the CPU)");
  QACONV_CHECK_VALUE(query.device() == gallery.device(), "qaconv: query and gallery are on different devices (",
                     device_name(query.device()), " vs ", device_name(gallery.device()), ")");
  QACONV_CHECK_VALUE(!(st == ScalarType::Double && query.is_cuda()),
                     "qaconv: float64 is supported on the CPU only; use float32, float16 or bfloat16 on CUDA");
  QACONV_CHECK_VALUE(query.size(1) == gallery.size(1), "qaconv: channel mismatch: query has ", query.size(1),
                     " channels, gallery has ", gallery.size(1));
  QACONV_CHECK_VALUE(query.size(1) > 0, "qaconv: feature maps have 0 channels");
  QACONV_CHECK_VALUE(query.size(2) > 0 && query.size(3) > 0, "qaconv: query has an empty spatial size ",
                     shape(query, 2));
  QACONV_CHECK_VALUE(gallery.size(2) > 0 && gallery.size(3) > 0, "qaconv: gallery has an empty spatial size ",
                     shape(gallery, 2));
  return MatchDims{query.size(0), gallery.size(0), query.size(1), query.size(2) * query.size(3),
                   gallery.size(2) * gallery.size(3)};
}

// The folded head: a weight of Lq + Lg values, shaped [L] or [1, L], and an optional one-value bias.
inline void check_head(const Tensor& weight, const std::optional<Tensor>& bias, const MatchDims& dims,
                       const Tensor& query) {
  const int64_t L = dims.L();
  QACONV_CHECK_VALUE(is_floating(weight.scalar_type()), "qaconv_score: weight must be floating point, got ",
                     dtype_name(weight.scalar_type()));
  const bool vector = weight.dim() == 1 || (weight.dim() == 2 && weight.size(0) == 1);
  QACONV_CHECK_VALUE(vector && weight.numel() == L, "qaconv_score: weight must be a vector of Lq + Lg = ", L,
                     " values (shape [", L, "] or [1, ", L, "]), got shape ", shape(weight));
  QACONV_CHECK_VALUE(weight.device() == query.device(), "qaconv_score: weight is on ", device_name(weight.device()),
                     ", features on ", device_name(query.device()));
  if (bias.has_value() && bias->defined()) {
    QACONV_CHECK_VALUE(bias->numel() == 1, "qaconv_score: bias must hold one value, got shape ", shape(*bias));
    QACONV_CHECK_VALUE(bias->device() == query.device(), "qaconv_score: bias is on ", device_name(bias->device()),
                       ", features on ", device_name(query.device()));
  }
}

inline void check_backward(const Tensor& grad_values, const Tensor& indices, const MatchDims& dims) {
  QACONV_CHECK_VALUE(grad_values.dim() == 3 && grad_values.size(0) == dims.P && grad_values.size(1) == dims.N &&
                         grad_values.size(2) == dims.L(),
                     "qaconv: grad_values must be [P, N, Lq + Lg] = [", dims.P, ", ", dims.N, ", ", dims.L(),
                     "], got shape ", shape(grad_values));
  QACONV_CHECK_VALUE(indices.sizes().equals(grad_values.sizes()),
                     "qaconv: indices must have the shape of grad_values ", shape(grad_values), ", got shape ",
                     shape(indices));
  QACONV_CHECK_VALUE(indices.scalar_type() == ScalarType::Long, "qaconv: indices must be int64, got ",
                     dtype_name(indices.scalar_type()));
  QACONV_CHECK_VALUE(grad_values.device() == indices.device(),
                     "qaconv: grad_values and indices are on different devices (", device_name(grad_values.device()),
                     " vs ", device_name(indices.device()), ")");
}

}  // namespace qaconv
