// CUDA kernels of the qaconv_ext ops: validation, layout and allocation in torch, then the launchers of
// match_kernels.cu (which know nothing of torch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "cuda/match_kernels.h"

namespace qaconv {
namespace {

cuda::ScalarKind kind_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return cuda::ScalarKind::kFloat32;
    case at::kHalf:
      return cuda::ScalarKind::kFloat16;
    case at::kBFloat16:
      return cuda::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "qaconv: the CUDA kernels take float32, float16 or bfloat16 feature maps, got ",
                       dtype_name(x.scalar_type()));  // check_pair refuses the others first
  }
  return cuda::ScalarKind::kFloat32;  // not reached
}

cuda::ScalarKind check_cuda_inputs(const at::Tensor& query, const MatchDims& d) {
  TORCH_CHECK(query.is_cuda(), "qaconv: CUDA kernel called with ", query.device(), " tensors");
  const int64_t limit = cuda::max_locations();
  TORCH_CHECK(d.Lq <= limit && d.Lg <= limit, "qaconv: the CUDA kernels accept feature maps of at most ", limit,
              " locations (height * width); got query ", d.Lq, ", gallery ", d.Lg);
  return kind_of(query);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "qaconv: ", what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> match_cuda(const at::Tensor& query, const at::Tensor& gallery, bool with_indices) {
  const MatchDims d = check_pair(query, gallery);
  const auto kind = check_cuda_inputs(query, d);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor values = at::empty({d.P, d.N, d.L()}, query.options());
  at::Tensor indices = with_indices ? at::empty({d.P, d.N, d.L()}, query.options().dtype(at::kLong))
                                    : at::empty({0}, query.options().dtype(at::kLong));
  if (d.P > 0 && d.N > 0) {
    const at::Tensor q = locations_major(query.detach()), g = locations_major(gallery.detach());
    check_launch(cuda::match_forward(kind, q.data_ptr(), g.data_ptr(), values.data_ptr(),
                                     with_indices ? indices.data_ptr<int64_t>() : nullptr, d.P, d.N, d.channels, d.Lq,
                                     d.Lg, c10::cuda::getCurrentCUDAStream()),
                 "qaconv_match kernel launch");
  }
  return {values, indices};
}

// QACONV_EXT_CUDA_KERNEL=simple keeps qaconv_score on the CUDA-core kernel (for comparisons and tests).
bool simple_kernel_requested() {
  const char* v = std::getenv("QACONV_EXT_CUDA_KERNEL");
  return v != nullptr && std::strcmp(v, "simple") == 0;
}

cuda::ScalarKind kind_of_type(at::ScalarType t) {
  return t == at::kHalf ? cuda::ScalarKind::kFloat16 : cuda::ScalarKind::kBFloat16;
}

// float32 maps on tensor cores are staged in float16 (11-bit significand, as TF32) when every value
// fits its range, in bfloat16 (float32's range) otherwise. One reduction and a sync: small next to
// the scoring of a gallery.
at::ScalarType staging_type(const at::Tensor& q, const at::Tensor& g, at::Float32MatmulPrecision precision) {
  if (precision != at::Float32MatmulPrecision::HIGH) return at::kBFloat16;
  const auto [q_min, q_max] = at::aminmax(q);
  const auto [g_min, g_max] = at::aminmax(g);
  const at::Tensor range = at::stack({q_min, q_max, g_min, g_max}).abs().max();
  return cuda::plan::staging_kind(true, range.item<float>()) == cuda::ScalarKind::kFloat16 ? at::kHalf
                                                                                          : at::kBFloat16;
}

// Which kernel scores: tensor cores for float16/bfloat16 maps, and for float32 maps unless
// torch.get_float32_matmul_precision() is "highest" ("high" stages them in float16 -- bfloat16 when a
// value exceeds float16's range --, "medium" in bfloat16); the exact float32 CUDA-core kernel otherwise,
// and wherever the tensor-core kernel does not fit the device or the problem.
at::Tensor score_cuda(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias) {
  const MatchDims d = check_pair(query, gallery);
  check_head(weight, bias, d, query);
  const auto kind = check_cuda_inputs(query, d);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty({d.P, d.N}, query.options().dtype(at::kFloat));
  if (d.P == 0 || d.N == 0) return out;
  const at::Tensor q_in = locations_major(query.detach()), g_in = locations_major(gallery.detach());
  const at::Tensor w = weight.detach().reshape({-1}).to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->detach().reshape({-1}).to(at::kFloat).contiguous();
  const float* bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const auto precision = at::globalContext().float32MatmulPrecision();
  if (cuda::plan::score_tries_tensor_cores(kind, precision == at::Float32MatmulPrecision::HIGHEST,
                                           simple_kernel_requested())) {
    at::Tensor q = q_in, g = g_in;
    auto tc_kind = kind;
    if (kind == cuda::ScalarKind::kFloat32) {
      const auto staged = staging_type(q_in, g_in, precision);
      q = q.to(staged);
      g = g.to(staged);
      tc_kind = kind_of_type(staged);
    }
    // The kernel copies 16-byte chunks: pad the channels to a multiple of 8 with zeros, align the bases.
    const int64_t channels = cuda::plan::mma_channels(d.channels);
    if (channels != d.channels) {
      q = at::constant_pad_nd(q, {0, channels - d.channels});
      g = at::constant_pad_nd(g, {0, channels - d.channels});
    }
    if (reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 != 0) q = q.clone();
    if (reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 != 0) g = g.clone();
    const cudaError_t err = cuda::score_forward_mma(tc_kind, q.data_ptr(), g.data_ptr(), w.data_ptr<float>(),
                                                    bias_ptr, out.data_ptr<float>(), d.P, d.N, channels, d.Lq, d.Lg,
                                                    stream);
    if (err != cudaErrorNotSupported) {
      check_launch(err, "qaconv_score tensor-core kernel launch");
      return out;
    }
  }
  // The CUDA-core kernel reads the maps as given (no staging, no padding).
  check_launch(cuda::score_forward(kind, q_in.data_ptr(), g_in.data_ptr(), w.data_ptr<float>(), bias_ptr,
                                   out.data_ptr<float>(), d.P, d.N, d.channels, d.Lq, d.Lg, stream),
               "qaconv_score kernel launch");
  return out;
}

std::tuple<at::Tensor, at::Tensor> match_backward_cuda(const at::Tensor& grad_values, const at::Tensor& indices,
                                                       const at::Tensor& query, const at::Tensor& gallery,
                                                       std::array<bool, 2> output_mask) {
  const MatchDims d = check_pair(query, gallery);
  check_backward(grad_values, indices, d);
  TORCH_CHECK_VALUE(grad_values.device() == query.device(), "qaconv: grad_values is on ", grad_values.device(),
                    ", features on ", query.device());
  const auto kind = check_cuda_inputs(query, d);
  const c10::cuda::CUDAGuard guard(query.device());
  const bool need_q = output_mask[0], need_g = output_mask[1];
  const bool work = d.P > 0 && d.N > 0 && (need_q || need_g);
  const auto f32 = query.options().dtype(at::kFloat);
  const int64_t rows_q = need_q ? d.P : 0, rows_g = need_g ? d.N : 0;
  at::Tensor gq = work ? at::empty({rows_q, d.Lq, d.channels}, f32) : at::zeros({rows_q, d.Lq, d.channels}, f32);
  at::Tensor gg = work ? at::empty({rows_g, d.Lg, d.channels}, f32) : at::zeros({rows_g, d.Lg, d.channels}, f32);
  if (work) {
    const at::Tensor ix = indices.contiguous();
    // The kernels trust the indices; an index out of range would read outside the features.
    const at::Tensor to_gallery = ix.narrow(2, 0, d.Lq), to_query = ix.narrow(2, d.Lq, d.Lg);
    const bool bad = at::logical_or(at::logical_or(to_gallery < 0, to_gallery >= d.Lg).any(),
                                    at::logical_or(to_query < 0, to_query >= d.Lq).any())
                         .item<bool>();
    TORCH_CHECK(!bad, "qaconv: match index out of range (query entries must index [0, ", d.Lg,
                "), gallery entries [0, ", d.Lq, "))");
    const at::Tensor gv = grad_values.detach().to(at::kFloat).contiguous();
    const at::Tensor q = locations_major(query.detach()), g = locations_major(gallery.detach());
    check_launch(cuda::match_backward(kind, gv.data_ptr<float>(), ix.data_ptr<int64_t>(), q.data_ptr(), g.data_ptr(),
                                      need_q ? gq.data_ptr<float>() : nullptr,
                                      need_g ? gg.data_ptr<float>() : nullptr, d.P, d.N, d.channels, d.Lq, d.Lg,
                                      c10::cuda::getCurrentCUDAStream()),
                 "qaconv match_backward kernel launch");
  }
  return {need_q ? channels_first(gq, query) : query.new_empty({0}),
          need_g ? channels_first(gg, gallery) : gallery.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(qaconv_ext, CUDA, m) {
  m.impl("match", &match_cuda);
  m.impl("score", &score_cuda);
  m.impl("match_backward", &match_backward_cuda);
}

}  // namespace qaconv
