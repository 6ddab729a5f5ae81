// The Python extension `ltjax.ffi.cpu._ltjax_ffi`: takes its configuration from Python
// (`configure`, before the first handler runs), hands the handlers to Python as PyCapsules (for
// jax.ffi.register_ffi_target) and reports the instruction set chosen at run time.
// Plain CPython API: the module has a few small functions, so it needs no binding library.
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
XLA_FFI_Error* LtjaxInt4Matmul(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt4MatmulT(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt4AsymMatmul(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt4AsymMatmulT(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt4Unpack(XLA_FFI_CallFrame*);
XLA_FFI_Error* LtjaxInt4AsymUnpack(XLA_FFI_CallFrame*);
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
    {"ltjax_int4_matmul", LtjaxInt4Matmul},
    {"ltjax_int4_matmul_t", LtjaxInt4MatmulT},
    {"ltjax_int4_asym_matmul", LtjaxInt4AsymMatmul},
    {"ltjax_int4_asym_matmul_t", LtjaxInt4AsymMatmulT},
    {"ltjax_int4_unpack", LtjaxInt4Unpack},
    {"ltjax_int4_asym_unpack", LtjaxInt4AsymUnpack},
};

// configure(isa, vnni, amx, threads, spin_us): ltjax.ffi.cpu._registry calls it right after import
// with ltjax._config.settings(); refused once a handler or a query has fixed the choices.
PyObject* Configure(PyObject*, PyObject* args) {
  const char* isa;
  int vnni, amx, threads, spin_us;
  if (!PyArg_ParseTuple(args, "sppii", &isa, &vnni, &amx, &threads, &spin_us)) return nullptr;
  const std::string isa_name(isa);
  if (isa_name != "" && isa_name != "avx2" && isa_name != "avx512") {
    PyErr_SetString(PyExc_ValueError, ("ltjax: isa must be '', 'avx2' or 'avx512', got '" + isa_name + "'").c_str());
    return nullptr;
  }
  ltjax::Config& config = ltjax::Configured();
  if (config.used) {
    PyErr_SetString(PyExc_RuntimeError, "ltjax: configure() after the CPU handlers' choices were fixed");
    return nullptr;
  }
  config.avx2_only = isa_name == "avx2";
  config.vnni = vnni;
  config.amx = amx;
  config.threads = threads;
  if (spin_us >= 0) config.spin_us = spin_us;
  Py_RETURN_NONE;
}

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
    {"configure", Configure, METH_VARARGS,
     "configure(isa, vnni, amx, threads, spin_us): the handlers' settings, before their first use "
     "(isa: '' for the best present, 'avx2' or 'avx512'; threads, spin_us: -1 for the default)"},
    {"targets", Targets, METH_NOARGS, "dict: FFI target name -> PyCapsule of its XLA FFI handler"},
    {"isa", IsaName, METH_NOARGS, "instruction set chosen at run time: 'avx512', 'avx2' or 'none'"},
    {"vnni", Vnni, METH_NOARGS, "the M = 1 bitmask_int8 and int4 GEMVs' integer path (x as digits; int4: AVX-512 VNNI only): 'avx512_vnni', 'avx_vnni' or False"},
    {"amx", Amx, METH_NOARGS, "whether the int8 GEMM (2 <= M <= 64) runs on AMX tiles (integer digits of x)"},
    {"num_threads", NumThreads, METH_NOARGS, "threads of the handlers' pool (caller included)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_ltjax_ffi", "ltjax CPU XLA FFI handlers", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__ltjax_ffi(void) { return PyModule_Create(&kModule); }
