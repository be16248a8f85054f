// Operator schemas of the qaconv_ext library and the Python module (fake kernels, autograd and the fallback are
// added in qaconv_ext/ops/_library.py). Kernels register themselves per device in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(qaconv_ext, m) {
  m.def("match(Tensor query, Tensor gallery, bool with_indices) -> (Tensor, Tensor)");
  m.def("score(Tensor query, Tensor gallery, Tensor weight, Tensor? bias) -> Tensor");
  // output_mask: which of (grad_query, grad_gallery) to compute; a gradient left out is returned as an
  // empty [0] tensor (the class memory of training is a gallery that needs none).
  m.def("match_backward(Tensor grad_values, Tensor indices, Tensor query, Tensor gallery, "
        "bool[2] output_mask=[True, True]) -> (Tensor, Tensor)");
}

#ifndef QACONV_WITH_CUDA
#define QACONV_WITH_CUDA 0
#endif

static struct PyModuleDef qaconv_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "Compiled kernels of qaconv_ext (registered as torch.ops.qaconv_ext).",
                                           -1, nullptr};

// Importing the module loads the library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&qaconv_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "with_cuda", QACONV_WITH_CUDA);
  return module;
}
