// vlmkern._C is a Python extension module only so that `import vlmkern._C`
// loads the shared library; the kernels are registered by the static
// TORCH_LIBRARY_IMPL initialisers of the *_cpu.cpp / *_cuda.cpp files for the
// schemas that vlmkern/ops/<op>.py defines, and reached through torch.ops.vlmkern.
#include <Python.h>

#include "common/outputs.h"

// Whether the compiled kernels currently poison their outputs
// (VLMKERN_DEBUG_POISON_OUTPUTS, read at every call): lets tests check that
// the switch reaches the C++ side.
static PyObject* poison_outputs(PyObject*, PyObject*) {
  return PyBool_FromLong(vlmkern::poison_outputs() ? 1 : 0);
}

static PyMethodDef kMethods[] = {
    {"poison_outputs", poison_outputs, METH_NOARGS,
     "True when VLMKERN_DEBUG_POISON_OUTPUTS makes the compiled kernels NaN-fill their outputs"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                                     "vlmkern compiled ops (see torch.ops.vlmkern)", -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
#ifdef VLMKERN_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "built_with_torch", VLMKERN_BUILT_TORCH);
  PyModule_AddStringConstant(m, "cuda_archs", VLMKERN_CUDA_ARCHS_STR);
  return m;
}
