// STUB (to be replaced): float64 integrator coefficient tables.
#include <torch/library.h>
#include <ATen/ATen.h>

namespace fastint {
std::tuple<at::Tensor, at::Tensor> coefficients(const at::Tensor& process, const at::Tensor& knots,
                                                c10::string_view method, c10::string_view grid, int64_t n_steps,
                                                double t_eps, double T, bool denoise, at::ArrayRef<double> options) {
  TORCH_CHECK(false, "fastint::coefficients is not implemented yet");
}
}  // namespace fastint

TORCH_LIBRARY_IMPL(fastint, CompositeExplicitAutograd, m) { m.impl("coefficients", &fastint::coefficients); }
