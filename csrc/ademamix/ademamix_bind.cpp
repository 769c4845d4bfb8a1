// Python bindings of the AdEMAMix kernels: pointer lists in, nothing out (updates in place).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "ademamix/ademamix.h"
#include "common/bind.h"

namespace py = pybind11;

namespace fastllm {
namespace {

std::vector<AdemamixTensor> ademamix_tensors(const Pointers& params, const Pointers& grads, const Pointers& m1,
                                             const Pointers& m2, const Pointers& nu,
                                             const std::vector<int64_t>& numels) {
  const size_t n = params.size();
  if (grads.size() != n || m1.size() != n || m2.size() != n || nu.size() != n || numels.size() != n)
    throw std::invalid_argument("ademamix_step: pointer lists differ in length");
  std::vector<AdemamixTensor> out(n);
  for (size_t i = 0; i < n; ++i)
    out[i] = {reinterpret_cast<void*>(params[i]), reinterpret_cast<const void*>(grads[i]),
              reinterpret_cast<void*>(m1[i]),     reinterpret_cast<void*>(m2[i]),
              reinterpret_cast<void*>(nu[i]),     numels[i]};
  return out;
}

// Scalars arrive as Python floats (double); 1 - beta is rounded from double like PyTorch does.
AdemamixHyper ademamix_hyper(double lr, double beta1, double beta2, double beta3, double alpha, double eps,
                             double weight_decay, double bias_correction1, double bias_correction2,
                             bool stochastic_rounding, uint64_t seed) {
  auto f = [](double x) { return static_cast<float>(x); };
  return {f(lr),    f(beta1),       f(1.0 - beta1),     f(beta2),          f(1.0 - beta2),
          f(beta3), f(1.0 - beta3), f(alpha),           f(eps),            f(weight_decay),
          f(bias_correction1), f(bias_correction2), stochastic_rounding, seed};
}

}  // namespace

void bind_ademamix(py::module_& m) {
  m.def(
      "ademamix_step_cpu",
      [](const Pointers& params, const Pointers& grads, const Pointers& m1, const Pointers& m2, const Pointers& nu,
         const std::vector<int64_t>& numels, int param_dtype, int state_dtype, double lr, double beta1,
         double beta2, double beta3, double alpha, double eps, double weight_decay, double bias_correction1,
         double bias_correction2, bool stochastic_rounding, uint64_t seed, int num_threads) {
        auto tensors = ademamix_tensors(params, grads, m1, m2, nu, numels);
        auto hyper = ademamix_hyper(lr, beta1, beta2, beta3, alpha, eps, weight_decay, bias_correction1,
                                    bias_correction2, stochastic_rounding, seed);
        py::gil_scoped_release release;
        ademamix_step_cpu(tensors, param_dtype, state_dtype, hyper, num_threads);
      },
      "Fused AdEMAMix step over many contiguous tensors of one (param, state) dtype pair.");

#if defined(FASTLLM_WITH_CUDA)
  m.def(
      "ademamix_step_cuda",
      [](const Pointers& params, const Pointers& grads, const Pointers& m1, const Pointers& m2, const Pointers& nu,
         const std::vector<int64_t>& numels, int param_dtype, int state_dtype, double lr, double beta1,
         double beta2, double beta3, double alpha, double eps, double weight_decay, double bias_correction1,
         double bias_correction2, bool stochastic_rounding, uint64_t seed, int device, uintptr_t stream) {
        auto tensors = ademamix_tensors(params, grads, m1, m2, nu, numels);
        auto hyper = ademamix_hyper(lr, beta1, beta2, beta3, alpha, eps, weight_decay, bias_correction1,
                                    bias_correction2, stochastic_rounding, seed);
        py::gil_scoped_release release;
        ademamix_step_cuda(tensors, param_dtype, state_dtype, hyper, device, stream);
      },
      "Fused multi-tensor AdEMAMix step on one CUDA device and stream.");
#endif
}

}  // namespace fastllm
