// xIELU activation (arXiv 2411.13010): the element math shared by the CPU kernel and any GPU kernel.
// The parameters arrive raw (a_p, a_n); alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n).
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "common/dtypes.h"

namespace fastllm {

struct XieluParams {
  float alpha_p, alpha_n, beta, eps;
};

// log(1 + e^a), linear above 20 like torch.nn.functional.softplus.
FASTLLM_HD float xielu_softplus(float a) { return a > 20.0f ? a : log1pf(expf(a)); }

FASTLLM_HD XieluParams xielu_params(float raw_alpha_p, float raw_alpha_n, float beta, float eps) {
  return {xielu_softplus(raw_alpha_p), beta + xielu_softplus(raw_alpha_n), beta, eps};
}

FASTLLM_HD float xielu_forward(float x, const XieluParams& p) {
  if (x > 0.0f) return p.alpha_p * x * x + p.beta * x;
  return p.alpha_n * (expm1f(fminf(x, p.eps)) - x) + p.beta * x;
}

// dx for upstream gradient g, and this element's contributions to d alpha_p and d alpha_n
// (before the softplus' chain factor). d min(x, eps)/dx is 1 where x <= eps.
FASTLLM_HD float xielu_backward(float g, float x, const XieluParams& p, float& d_alpha_p, float& d_alpha_n) {
  if (x > 0.0f) {
    d_alpha_p = g * x * x;
    d_alpha_n = 0.0f;
    return g * (2.0f * p.alpha_p * x + p.beta);
  }
  const float clamped = fminf(x, p.eps);
  d_alpha_p = 0.0f;
  d_alpha_n = g * (expm1f(clamped) - x);
  return g * (p.alpha_n * ((x <= p.eps ? expf(x) : 0.0f) - 1.0f) + p.beta);
}

void xielu_forward_cpu(const void* x, void* y, int64_t n, int dtype, const XieluParams& params, int num_threads);

// Writes dx and returns the sums over all elements of the d alpha_p and d alpha_n contributions.
std::pair<double, double> xielu_backward_cpu(const void* grad, const void* x, void* dx, int64_t n, int dtype,
                                             const XieluParams& params, int num_threads);

}  // namespace fastllm
