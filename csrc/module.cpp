// The Python module condlora_kernels._C. Importing it loads this library, whose static initialisers register the
// torch.ops.condlora_C ops (TORCH_LIBRARY in condlora.cpp); the module itself only records how it was built, so
// that condlora_kernels/kernels/cpp.py can refuse a library built against another torch.
#include <Python.h>

#include <torch/version.h>

#ifndef CONDLORA_WITH_CUDA
#define CONDLORA_WITH_CUDA 0
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "CondLoRA C++/CUDA kernels; the ops live in torch.ops.condlora_C (see condlora_kernels/kernels/cpp.py)", -1,
      nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", CONDLORA_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
