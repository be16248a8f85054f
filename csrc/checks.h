// Input validation shared by the CPU and CUDA bindings of the qaconv_ext ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace qaconv {

// Sizes of one query/gallery matching problem.
struct MatchDims {
  int64_t P, N, channels, Lq, Lg;
  int64_t L() const { return Lq + Lg; }
};

// Dtype names as Python prints them ("torch.float32"), so that a message reads the same from every kernel.
inline std::string dtype_name(at::ScalarType t) {
  return std::string("torch.") + std::string(c10::getDtypeNames(t).first);
}

// The checks below are the contract of the ops; the fake kernels and the pure-PyTorch fallback
// (qaconv_ext/ops/checks.py) raise the same errors with the same messages. TORCH_CHECK_VALUE and
// TORCH_CHECK_TYPE reach Python as ValueError and TypeError.
inline MatchDims check_pair(const at::Tensor& query, const at::Tensor& gallery) {
  TORCH_CHECK_VALUE(query.dim() == 4,
                    "qaconv: query must be a 4-D feature map [batch, channels, height, width], got shape ",
                    query.sizes());
  TORCH_CHECK_VALUE(gallery.dim() == 4,
                    "qaconv: gallery must be a 4-D feature map [batch, channels, height, width], got shape ",
                    gallery.sizes());
  TORCH_CHECK_TYPE(query.scalar_type() == gallery.scalar_type(), "qaconv: query and gallery dtypes differ (",
                   dtype_name(query.scalar_type()), " vs ", dtype_name(gallery.scalar_type()), ")");
  const auto st = query.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   "qaconv: unsupported dtype ", dtype_name(st),
                   "; use float32, float16, bfloat16 (or float64 on the CPU)");
  TORCH_CHECK_VALUE(query.device() == gallery.device(), "qaconv: query and gallery are on different devices (",
                    query.device(), " vs ", gallery.device(), ")");
  TORCH_CHECK_TYPE(!(st == at::kDouble && query.is_cuda()),
                   "qaconv: float64 is supported on the CPU only; use float32, float16 or bfloat16 on CUDA");
  TORCH_CHECK_VALUE(query.size(1) == gallery.size(1), "qaconv: channel mismatch: query has ", query.size(1),
                    " channels, gallery has ", gallery.size(1));
  TORCH_CHECK_VALUE(query.size(1) > 0, "qaconv: feature maps have 0 channels");
  TORCH_CHECK_VALUE(query.size(2) > 0 && query.size(3) > 0, "qaconv: query has an empty spatial size ",
                    query.sizes().slice(2));
  TORCH_CHECK_VALUE(gallery.size(2) > 0 && gallery.size(3) > 0, "qaconv: gallery has an empty spatial size ",
                    gallery.sizes().slice(2));
  return MatchDims{query.size(0), gallery.size(0), query.size(1), query.size(2) * query.size(3),
                   gallery.size(2) * gallery.size(3)};
}

// The folded head: a weight of Lq + Lg values, shaped [L] or [1, L], and an optional one-value bias.
inline void check_head(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const MatchDims& dims,
                       const at::Tensor& query) {
  const int64_t L = dims.L();
  TORCH_CHECK_TYPE(weight.is_floating_point(), "qaconv_score: weight must be floating point, got ",
                   dtype_name(weight.scalar_type()));
  const bool vector = weight.dim() == 1 || (weight.dim() == 2 && weight.size(0) == 1);
  TORCH_CHECK_VALUE(vector && weight.numel() == L, "qaconv_score: weight must be a vector of Lq + Lg = ", L,
                    " values (shape [", L, "] or [1, ", L, "]), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == query.device(), "qaconv_score: weight is on ", weight.device(),
                    ", features on ", query.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->numel() == 1, "qaconv_score: bias must hold one value, got shape ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == query.device(), "qaconv_score: bias is on ", bias->device(),
                      ", features on ", query.device());
  }
}

inline void check_backward(const at::Tensor& grad_values, const at::Tensor& indices, const MatchDims& dims) {
  TORCH_CHECK_VALUE(grad_values.dim() == 3 && grad_values.size(0) == dims.P && grad_values.size(1) == dims.N &&
                        grad_values.size(2) == dims.L(),
                    "qaconv: grad_values must be [P, N, Lq + Lg] = [", dims.P, ", ", dims.N, ", ", dims.L(),
                    "], got shape ", grad_values.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == grad_values.sizes(), "qaconv: indices must have the shape of grad_values ",
                    grad_values.sizes(), ", got shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "qaconv: indices must be int64, got ",
                   dtype_name(indices.scalar_type()));
  TORCH_CHECK_VALUE(grad_values.device() == indices.device(),
                    "qaconv: grad_values and indices are on different devices (", grad_values.device(), " vs ",
                    indices.device(), ")");
}

// [B, d, h, w] (any memory format) -> [B, L, d] contiguous: channels-innermost, as the kernels read it.
inline at::Tensor locations_major(const at::Tensor& x) {
  return x.flatten(2).transpose(1, 2).contiguous();
}

// [B, L, d] location-major gradient -> a contiguous tensor shaped and typed like `like` ([B, d, h, w]).
inline at::Tensor channels_first(const at::Tensor& x, const at::Tensor& like) {
  return x.transpose(1, 2).reshape(like.sizes()).to(like.scalar_type()).contiguous();
}

}  // namespace qaconv
