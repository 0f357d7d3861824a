// Module entry of due_ext._C. Importing the module loads this shared library, whose static
// initialisers register the due_ext:: operators (TORCH_LIBRARY_FRAGMENT in each op's source).
// No Python bindings live here: the ops are reached through torch.ops.due_ext, so the module stays
// ABI-stable under Python's limited API.
#include <Python.h>

#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "due_ext compiled kernels; the operators live under torch.ops.due_ext",
      -1,       // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

// Reports at run time which kernel families this binary was compiled with, so due_ext.backends()
// can say why CUDA is unavailable even on a GPU machine.
TORCH_LIBRARY_FRAGMENT(due_ext, m) {
  m.def("compiled_with_cuda() -> bool", []() -> bool {
#ifdef DUE_EXT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("compiled_with_openmp() -> bool", []() -> bool {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}
