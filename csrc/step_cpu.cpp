// STUB (to be replaced): fused step, CPU kernel.
#include <torch/library.h>
#include <ATen/ATen.h>

namespace fastint {
at::Tensor step_cpu(const at::Tensor& z, at::TensorList eps, const at::Tensor& coef, int64_t step, int64_t dim,
                    const std::optional<at::Tensor>& noise, std::optional<int64_t> seed, int64_t offset) {
  TORCH_CHECK(false, "fastint::step (CPU) is not implemented yet");
}
}  // namespace fastint

TORCH_LIBRARY_IMPL(fastint, CPU, m) { m.impl("step", &fastint::step_cpu); }
