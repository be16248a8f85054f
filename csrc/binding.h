// The torch-facing layer shared by the CPU and CUDA bindings of the qaconv_ext ops, on PyTorch's stable
// ABI only (torch/csrc/stable, torch/headeronly): errors, names as Python prints them, tensor steps and a
// parallel loop. A library built on it loads into every torch from TORCH_TARGET_VERSION on.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

namespace qaconv {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The message of an error: the arguments streamed one after the other.
template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// Errors of the ops. A std::invalid_argument reaches Python as ValueError, a std::runtime_error as
// RuntimeError. The stable ABI carries no TypeError: the dtype rules (a TypeError from the Python
// entry points and the fake kernels, qaconv_ext/ops/checks.py) are ValueErrors from the compiled kernels.
#define QACONV_CHECK_VALUE(cond, ...) \
  if (!(cond)) throw std::invalid_argument(::qaconv::message(__VA_ARGS__))
#define QACONV_CHECK(cond, ...) \
  if (!(cond)) throw std::runtime_error(::qaconv::message(__VA_ARGS__))

// Sizes as Python prints a shape: [2, 8, 3].
struct Shape {
  torch::headeronly::IntHeaderOnlyArrayRef sizes;
  size_t from = 0;
};
inline std::ostream& operator<<(std::ostream& out, const Shape& s) {
  out << "[";
  for (size_t i = s.from; i < s.sizes.size(); ++i) out << (i > s.from ? ", " : "") << s.sizes[i];
  return out << "]";
}
inline Shape shape(const Tensor& t, size_t from = 0) { return Shape{t.sizes(), from}; }

// Dtype names as Python prints them ("torch.float32"), so that a message reads the same from every kernel.
inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Short: return "torch.int16";
    case ScalarType::Char: return "torch.int8";
    case ScalarType::Byte: return "torch.uint8";
    case ScalarType::Bool: return "torch.bool";
    default: return torch::headeronly::toString(t);
  }
}

// Devices as Python prints them: cpu, cuda:0, meta.
inline std::string device_name(const torch::stable::Device& d) {
  using torch::headeronly::DeviceType;
  const DeviceType type = d.type();
  std::string name = type == DeviceType::CPU    ? "cpu"
                     : type == DeviceType::CUDA ? "cuda"
                     : type == DeviceType::Meta ? "meta"
                                                : message("device type ", static_cast<int>(type));
  return d.has_index() && type != DeviceType::CPU ? message(name, ":", static_cast<int>(d.index())) : name;
}

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// --- Tensor steps the bindings share (stable ops, or ATen ops called through the stable dispatcher) ---

// An empty tensor of `sizes` with the device of `like` and dtype `dtype`.
inline Tensor empty_like_device(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
}

// A zero-filled one.
inline Tensor zeros_like_device(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_zeros(like, torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype);
}

inline Tensor to_dtype(const Tensor& x, ScalarType dtype) {
  return x.scalar_type() == dtype ? x : torch::stable::to(x, dtype);
}

// [B, d, h, w] (any memory format) -> [B, d, L]: a view whenever the layout allows.
inline Tensor flatten_locations(const Tensor& x) { return torch::stable::flatten(x, 2); }

// [B, d, h, w] (any memory format) -> [B, L, d] contiguous: channels-innermost, as the kernels read it.
inline Tensor locations_major(const Tensor& x) {
  return torch::stable::contiguous(torch::stable::transpose(flatten_locations(x), 1, 2));
}

// [B, L, d] location-major gradient -> a contiguous tensor shaped and typed like `like` ([B, d, h, w]).
inline Tensor channels_first(const Tensor& x, const Tensor& like) {
  const Tensor t = torch::stable::reshape(torch::stable::transpose(x, 1, 2), like.sizes());
  return torch::stable::contiguous(to_dtype(t, like.scalar_type()));
}

// The [0] tensor that stands for a gradient left out of output_mask.
inline Tensor empty_gradient(const Tensor& like) { return empty_like_device(like, {0}, like.scalar_type()); }

// Calls an ATen operator through the stable dispatcher (for the few the stable API does not wrap) and
// returns its first result.
template <typename... Args>
Tensor call_aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, (sizeof...(Args) > 0 ? sizeof...(Args) : 1)> stack{torch::stable::detail::from(args)...};
  // (torch's own message of a failure reaches an extension only from the 2.13 stable API on)
  QACONV_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION) == TORCH_SUCCESS, "qaconv: ",
               name, *overload != '\0' ? "." : "", overload, " failed");
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// The tensor without its autograd history (for ATen calls on torch's worker threads, which run above
// autograd: an out= call on a tensor that requires grad is refused there).
inline Tensor detach(const Tensor& x) { return call_aten("aten::detach", "", x); }

// A CPU copy of a one-value tensor, read as T (the tensor's own dtype must be T).
template <typename T>
T scalar_value(const Tensor& x) {
  const Tensor cpu = x.is_cpu() ? x : torch::stable::to(x, torch::stable::Device(torch::headeronly::DeviceType::CPU));
  return *torch::stable::contiguous(cpu).const_data_ptr<T>();
}

// torch's parallel loop (at::parallel_for through the stable ABI). An exception of `f` is caught on its
// thread and rethrown here with its type and message (across the C boundary only an error code would pass).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  std::exception_ptr error;
  std::mutex mutex;
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    try {
      f(b, e);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

inline int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

}  // namespace qaconv
