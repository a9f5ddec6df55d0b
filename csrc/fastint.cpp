// fastint._C: op schemas (torch.ops.fastint.*) and the Python module stub.
//
// Implementations live next to each concept:
//   coefficients.cpp  float64 integrator tables (catch-all kernel, CPU tensors out)
//   step_cpu.cpp      fused step, CPU kernel     (the CUDA kernel is Triton: fastint/ops/step_triton.py)
#include <Python.h>
#include <torch/library.h>

#ifndef FASTINT_SRC_HASH
#define FASTINT_SRC_HASH "unknown"
#endif
#ifndef FASTINT_TORCH_VERSION
#define FASTINT_TORCH_VERSION "unknown"
#endif

namespace fastint {
std::string build_info() { return std::string(FASTINT_SRC_HASH) + " " + FASTINT_TORCH_VERSION; }
std::string methods();  // coefficients.cpp
}  // namespace fastint

TORCH_LIBRARY(fastint, m) {
  m.def("build_info() -> str", &fastint::build_info);
  // Per-step affine table of an integrator (docs/design.md, "Tables"). See coefficients.cpp.
  // Tables are built on an explicit decreasing sequence of times (docs/design.md, "Times").
  m.def(
      "coefficients(Tensor process, Tensor knots, float T, str method, Tensor times, bool denoise, "
      "float[] options) -> (Tensor, Tensor)");
  // The method list of coefficients.cpp, for the Python registry's load-time check.
  m.def("methods() -> str", &fastint::methods);
  // One fused step z' = P z + sum_j Q_j eps_j + S xi (docs/design.md, "The op"). See step_cpu.cpp.
  // Philox key: seed_tensor (int64 [1] on z's device, read by the kernel, so a captured graph
  // draws fresh noise when the tensor changes) or the int seed (baked into traces).
  m.def(
      "step(Tensor z, Tensor[] eps, Tensor coef, int step, int dim, Tensor? noise=None, "
      "int? seed=None, int offset=0, Tensor? seed_tensor=None) -> Tensor");
  // The same step written into `out` (z's shape and dtype, any strides, sharing no memory with an
  // input): the sampling loop's buffers, so no allocation per step.
  m.def(
      "step_out(Tensor z, Tensor[] eps, Tensor coef, int step, int dim, Tensor(a!) out, Tensor? noise=None, "
      "int? seed=None, int offset=0, Tensor? seed_tensor=None) -> ()");
}

// `import fastint._C` only needs a module object: the ops register on load.
static struct PyModuleDef fastint_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastint_module); }
