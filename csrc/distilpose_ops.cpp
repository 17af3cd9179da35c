// Python module `distilpose_kernels._C`.
//
// Importing it runs the static TORCH_LIBRARY_IMPL registrations of the CPU (and, in CUDA
// builds, CUDA) kernels. The operator schemas themselves (distilpose::soft_argmax_fwd,
// distilpose::soft_argmax_bwd, distilpose::decode_heatmaps, distilpose::simhm_loss_ext*, distilpose::simhm_targets_ext) are defined once, from Python,
// in distilpose_kernels/decode.py, heatmap.py and targets.py, so they (and their fake kernels and autograd) exist
// whether or not this library was built; the dispatcher accepts kernels registered before
// the schema and checks the C++ signatures against it when it is defined.
#include <Python.h>

#ifndef DISTILPOSE_WITH_CUDA
#define DISTILPOSE_WITH_CUDA 0
#endif

#define DP_STR2(x) #x
#define DP_STR(x) DP_STR2(x)

static struct PyModuleDef distilpose_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled kernels of distilpose_kernels (registered with the PyTorch dispatcher on import).", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&distilpose_c_module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "cuda_built", DISTILPOSE_WITH_CUDA);
#ifdef DISTILPOSE_TORCH_VERSION
  PyModule_AddStringConstant(m, "torch_version", DP_STR(DISTILPOSE_TORCH_VERSION));
#endif
#ifdef DISTILPOSE_CUDA_ARCHS
  PyModule_AddStringConstant(m, "cuda_archs", DP_STR(DISTILPOSE_CUDA_ARCHS));
#endif
  PyModule_AddStringConstant(m, "ops", "soft_argmax_fwd,soft_argmax_bwd,decode_heatmaps,simhm_loss_ext_fwd,simhm_loss_ext_bwd,simhm_loss_ext,simhm_targets_ext");
  return m;
}
