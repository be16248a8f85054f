// Input validation shared by the CPU and CUDA bindings of the qaconv_ext ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace qaconv {

// Sizes of one query/gallery matching problem.
struct MatchDims {
  int64_t P, N, channels, Lq, Lg;
  int64_t L() const { return Lq + Lg; }
};

inline MatchDims check_pair(const at::Tensor& query, const at::Tensor& gallery) {
  TORCH_CHECK(query.dim() == 4, "qaconv: query must be a 4-D feature map [batch, channels, height, width], got ",
              query.dim(), " dims");
  TORCH_CHECK(gallery.dim() == 4, "qaconv: gallery must be a 4-D feature map [batch, channels, height, width], got ",
              gallery.dim(), " dims");
  TORCH_CHECK(query.scalar_type() == gallery.scalar_type(), "qaconv: query and gallery dtypes differ (",
              query.scalar_type(), " vs ", gallery.scalar_type(), ")");
  const auto st = query.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "qaconv: unsupported dtype ", st, "; use float32, float16, bfloat16 (or float64 on the CPU)");
  TORCH_CHECK(query.device() == gallery.device(), "qaconv: query and gallery are on different devices (",
              query.device(), " vs ", gallery.device(), ")");
  TORCH_CHECK(query.size(1) == gallery.size(1), "qaconv: channel mismatch: query has ", query.size(1),
              " channels, gallery has ", gallery.size(1));
  TORCH_CHECK(query.size(1) > 0, "qaconv: feature maps have 0 channels");
  TORCH_CHECK(query.size(2) > 0 && query.size(3) > 0, "qaconv: query has an empty spatial size");
  TORCH_CHECK(gallery.size(2) > 0 && gallery.size(3) > 0, "qaconv: gallery has an empty spatial size");
  return MatchDims{query.size(0), gallery.size(0), query.size(1), query.size(2) * query.size(3),
                   gallery.size(2) * gallery.size(3)};
}

inline void check_head(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const MatchDims& dims,
                       const at::Tensor& query) {
  TORCH_CHECK(weight.is_floating_point(), "qaconv_score: weight must be floating point, got ", weight.scalar_type());
  TORCH_CHECK(weight.numel() == dims.L(), "qaconv_score: weight must hold Lq + Lg = ", dims.L(), " values, got ",
              weight.numel());
  TORCH_CHECK(weight.device() == query.device(), "qaconv_score: weight is on ", weight.device(), ", features on ",
              query.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == 1, "qaconv_score: bias must hold one value, got ", bias->numel());
    TORCH_CHECK(bias->device() == query.device(), "qaconv_score: bias is on ", bias->device(), ", features on ",
                query.device());
  }
}

inline void check_backward(const at::Tensor& grad_values, const at::Tensor& indices, const MatchDims& dims) {
  TORCH_CHECK(grad_values.dim() == 3 && grad_values.size(0) == dims.P && grad_values.size(1) == dims.N &&
                  grad_values.size(2) == dims.L(),
              "qaconv: grad_values must be [P, N, Lq + Lg] = [", dims.P, ", ", dims.N, ", ", dims.L(), "]");
  TORCH_CHECK(indices.sizes() == grad_values.sizes(), "qaconv: indices must have the shape of grad_values");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "qaconv: indices must be int64");
  TORCH_CHECK(grad_values.device() == indices.device(), "qaconv: grad_values and indices on different devices");
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
