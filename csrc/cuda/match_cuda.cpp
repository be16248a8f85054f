// CUDA kernels of the qaconv_ext ops: validation, layout and allocation in torch, then the launchers of
// match_kernels.cu (which know nothing of torch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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
      TORCH_CHECK(false, "qaconv: the CUDA kernels take float32, float16 or bfloat16 feature maps, got ",
                  x.scalar_type(), " (float64 is supported on the CPU)");
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
                                     with_indices ? indices.data_ptr<int64_t>() : nullptr, d.P, d.N, d.d, d.Lq, d.Lg,
                                     c10::cuda::getCurrentCUDAStream()),
                 "qaconv_match kernel launch");
  }
  return {values, indices};
}

at::Tensor score_cuda(const at::Tensor& query, const at::Tensor& gallery, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias) {
  const MatchDims d = check_pair(query, gallery);
  check_head(weight, bias, d, query);
  const auto kind = check_cuda_inputs(query, d);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty({d.P, d.N}, query.options().dtype(at::kFloat));
  if (d.P == 0 || d.N == 0) return out;
  const at::Tensor q = locations_major(query.detach()), g = locations_major(gallery.detach());
  const at::Tensor w = weight.detach().reshape({-1}).to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->detach().reshape({-1}).to(at::kFloat).contiguous();
  check_launch(cuda::score_forward(kind, q.data_ptr(), g.data_ptr(), w.data_ptr<float>(),
                                   b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(), d.P, d.N, d.d,
                                   d.Lq, d.Lg, c10::cuda::getCurrentCUDAStream()),
               "qaconv_score kernel launch");
  return out;
}

std::tuple<at::Tensor, at::Tensor> match_backward_cuda(const at::Tensor& grad_values, const at::Tensor& indices,
                                                       const at::Tensor& query, const at::Tensor& gallery) {
  const MatchDims d = check_pair(query, gallery);
  check_backward(grad_values, indices, d);
  const auto kind = check_cuda_inputs(query, d);
  TORCH_CHECK(grad_values.device() == query.device(), "qaconv: grad_values on ", grad_values.device(),
              ", features on ", query.device());
  const c10::cuda::CUDAGuard guard(query.device());
  const bool work = d.P > 0 && d.N > 0;
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor gq = work ? at::empty({d.P, d.Lq, d.d}, f32) : at::zeros({d.P, d.Lq, d.d}, f32);
  at::Tensor gg = work ? at::empty({d.N, d.Lg, d.d}, f32) : at::zeros({d.N, d.Lg, d.d}, f32);
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
                                      gq.data_ptr<float>(), gg.data_ptr<float>(), d.P, d.N, d.d, d.Lq, d.Lg,
                                      c10::cuda::getCurrentCUDAStream()),
                 "qaconv match_backward kernel launch");
  }
  at::Tensor grad_query = gq.transpose(1, 2).reshape(query.sizes()).to(query.scalar_type()).contiguous();
  at::Tensor grad_gallery = gg.transpose(1, 2).reshape(gallery.sizes()).to(gallery.scalar_type()).contiguous();
  return {grad_query, grad_gallery};
}

}  // namespace

TORCH_LIBRARY_IMPL(qaconv_ext, CUDA, m) {
  m.impl("match", &match_cuda);
  m.impl("score", &score_cuda);
  m.impl("match_backward", &match_backward_cuda);
}

}  // namespace qaconv
