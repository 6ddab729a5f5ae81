// The Python extension `ltjax.ffi._ltjax_ffi`: hands the handlers to Python as PyCapsules
// (for jax.ffi.register_ffi_target) and reports the instruction set chosen at run time.
// Plain CPython API: the module has two functions, so it needs no binding library.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "amx.h"

extern "C" {
XLA_FFI_Error* LtjaxInt8Matmul(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt8MatmulT(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskInt8Matmul(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskInt8MatmulT(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskMatmul(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskMatmulT(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskUnpack(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskInt8Unpack(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskInt8GemvEmulated(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt8GemvEmulated(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt8MmaEmulated(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxBitmaskInt8MmaEmulated(XLA_FFI_CallFrame*);
}

namespace {

using Handler = XLA_FFI_Error* (*)(XLA_FFI_CallFrame*);
struct Target {
  const char* name;
  Handler fn;
};
const Target kTargets[] = {
    {"ltjax_int8_matmul", LtjaxInt8Matmul},
    {"ltjax_int8_matmul_t", LtjaxInt8MatmulT},
    {"ltjax_bitmask_int8_matmul", LtjaxBitmaskInt8Matmul},
    {"ltjax_bitmask_int8_matmul_t", LtjaxBitmaskInt8MatmulT},
    {"ltjax_bitmask_matmul", LtjaxBitmaskMatmul},
    {"ltjax_bitmask_matmul_t", LtjaxBitmaskMatmulT},
    {"ltjax_bitmask_unpack", LtjaxBitmaskUnpack},
    {"ltjax_bitmask_int8_unpack", LtjaxBitmaskInt8Unpack},
    // The CUDA GEMVs' decode, emulated lane by lane (tests; ltjax/ffi/gemv.py).
    {"ltjax_bitmask_int8_gemv", LtjaxBitmaskInt8GemvEmulated},
    {"ltjax_int8_gemv", LtjaxInt8GemvEmulated},
    {"ltjax_int8_mma", LtjaxInt8MmaEmulated},
    {"ltjax_bitmask_int8_mma", LtjaxBitmaskInt8MmaEmulated},
};

PyObject* Targets(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  for (const Target& t : kTargets) {
    PyObject* cap = PyCapsule_New(reinterpret_cast<void*>(t.fn), nullptr, nullptr);
    if (!cap || PyDict_SetItemString(d, t.name, cap) < 0) {
      Py_XDECREF(cap);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(cap);
  }
  return d;
}

PyObject* IsaName(PyObject*, PyObject*) {
  switch (ltjax::CurrentIsa()) {
    case ltjax::Isa::kAvx512: return PyUnicode_FromString("avx512");
    case ltjax::Isa::kAvx2: return PyUnicode_FromString("avx2");
    default: return PyUnicode_FromString("none");
  }
}

PyObject* Vnni(PyObject*, PyObject*) {
  switch (ltjax::CurrentVnni()) {
    case ltjax::Vnni::kAvx512: return PyUnicode_FromString("avx512_vnni");
    case ltjax::Vnni::kAvx: return PyUnicode_FromString("avx_vnni");
    default: Py_RETURN_FALSE;
  }
}

PyObject* Amx(PyObject*, PyObject*) { return PyBool_FromLong(ltjax::HasAmx()); }

PyObject* NumThreads(PyObject*, PyObject*) { return PyLong_FromLong(ltjax::Pool::Get().size()); }

PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "dict: FFI target name -> PyCapsule of its XLA FFI handler"},
    {"isa", IsaName, METH_NOARGS, "instruction set chosen at run time: 'avx512', 'avx2' or 'none'"},
    {"vnni", Vnni, METH_NOARGS, "the M = 1 bitmask_int8 GEMV's integer path (x as digits): 'avx512_vnni', 'avx_vnni' or False"},
    {"amx", Amx, METH_NOARGS, "whether the int8 GEMM (2 <= M <= 64) runs on AMX tiles (integer digits of x)"},
    {"num_threads", NumThreads, METH_NOARGS, "threads of the handlers' pool (caller included)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_ltjax_ffi", "ltjax CPU XLA FFI handlers", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__ltjax_ffi(void) { return PyModule_Create(&kModule); }
