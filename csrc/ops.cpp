// Operator schemas of the qaconv_ext library and the Python module (fake kernels, autograd and the fallback are
// added in qaconv_ext/ops/_library.py). Kernels register themselves per device in csrc/cpu and csrc/cuda.
#include <Python.h>

#include <cstdlib>
#include <torch/library.h>

#include "cpu/gemm_tile.h"

TORCH_LIBRARY(qaconv_ext, m) {
  m.def("match(Tensor query, Tensor gallery, bool with_indices) -> (Tensor, Tensor)");
  m.def("score(Tensor query, Tensor gallery, Tensor weight, Tensor? bias) -> Tensor");
  // output_mask: which of (grad_query, grad_gallery) to compute; a gradient left out is returned as an
  // empty [0] tensor (the class memory of training is a gallery that needs none).
  m.def("match_backward(Tensor grad_values, Tensor indices, Tensor query, Tensor gallery, "
        "bool[2] output_mask=[True, True]) -> (Tensor, Tensor)");
  m.def("centroid_score(Tensor table, Tensor codes, Tensor weight, Tensor? bias) -> Tensor");
}

#ifndef QACONV_WITH_CUDA
#define QACONV_WITH_CUDA 0
#endif

// cpu_kernel() -> the name of the CPU micro-kernel variant the ops use now (the processor's best, or the one
// QACONV_CPU_KERNEL names); ValueError when that variable names an unknown or unsupported variant.
static PyObject* cpu_kernel(PyObject*, PyObject*) {
  const char* error = nullptr;
  const qaconv::cpu::TileKernel* k = qaconv::cpu::select_tile_kernel(&error);
  if (k == nullptr) {
    PyErr_Format(PyExc_ValueError, "QACONV_CPU_KERNEL=%s: %s", std::getenv("QACONV_CPU_KERNEL"), error);
    return nullptr;
  }
  return PyUnicode_FromString(k->name);
}

static PyMethodDef qaconv_methods[] = {
    {"cpu_kernel", cpu_kernel, METH_NOARGS,
     "Name of the CPU micro-kernel variant in use (avx512, avx2, generic, generic16)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef qaconv_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "Compiled kernels of qaconv_ext (registered as torch.ops.qaconv_ext).",
                                           -1, qaconv_methods};

// Importing the module loads the library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&qaconv_module);
  if (module != nullptr) PyModule_AddIntConstant(module, "with_cuda", QACONV_WITH_CUDA);
  return module;
}
