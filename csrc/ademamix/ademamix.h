// AdEMAMix step (arXiv 2409.03137): the element math shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dtypes.h"

namespace fastllm {

struct AdemamixTensor {
  void* param;
  const void* grad;
  void* exp_avg_fast;  // m1: EMA of g with beta1
  void* exp_avg_slow;  // m2: EMA of g with beta3_t
  void* exp_avg_sq;    // nu: EMA of g^2 with beta2
  int64_t numel;
};

// Per-step scalars; the schedules (alpha_t, beta3_t, bias corrections) are evaluated on the host.
// 1 - beta is rounded from double on the host, as PyTorch rounds (1 - beta) passed as a Python scalar.
struct AdemamixHyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, alpha, eps, weight_decay;
  float bias_correction1, bias_correction2;  // 1 - beta1^t, 1 - beta2^t
  bool stochastic_rounding;
  uint64_t seed;
};

// One element, fp32 arithmetic. Operation order matches fastllm/ops/ademamix_ref.py.
FASTLLM_HD void ademamix_update(float& p, float g, float& m1, float& m2, float& nu, const AdemamixHyper& h) {
  m1 = h.beta1 * m1 + h.one_minus_beta1 * g;
  m2 = h.beta3 * m2 + h.one_minus_beta3 * g;
  nu = h.beta2 * nu + h.one_minus_beta2 * (g * g);
  const float denom = sqrtf(nu / h.bias_correction2) + h.eps;
  const float update = (m1 / h.bias_correction1 + h.alpha * m2) / denom;
  p = p - h.lr * (update + h.weight_decay * p);
}

// Random-bit streams for stochastic rounding: one per (tensor, buffer).
FASTLLM_HD uint64_t rounding_stream(int64_t tensor_id, int buffer) { return uint64_t(tensor_id) * 4 + buffer; }

// Loads element i of every buffer, updates it and stores it back in the buffers' dtypes.
template <typename P, typename S>
FASTLLM_HD void ademamix_element(const AdemamixTensor& t, int64_t tensor_id, int64_t i, const AdemamixHyper& h) {
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  S* m1s = static_cast<S*>(t.exp_avg_fast);
  S* m2s = static_cast<S*>(t.exp_avg_slow);
  S* nus = static_cast<S*>(t.exp_avg_sq);
  float p = to_float(param[i]), m1 = to_float(m1s[i]), m2 = to_float(m2s[i]), nu = to_float(nus[i]);
  ademamix_update(p, to_float(grad[i]), m1, m2, nu, h);
  const bool sr = h.stochastic_rounding;
  param[i] = Store<P>::round(p, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 0), i) : 0u);
  m1s[i] = Store<S>::round(m1, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 1), i) : 0u);
  m2s[i] = Store<S>::round(m2, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 2), i) : 0u);
  nus[i] = Store<S>::round(nu, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 3), i) : 0u);
}

void ademamix_step_cpu(const std::vector<AdemamixTensor>& tensors, int param_dtype, int state_dtype,
                       const AdemamixHyper& hyper, int num_threads);

#if defined(FASTLLM_WITH_CUDA)
void ademamix_step_cuda(const std::vector<AdemamixTensor>& tensors, int param_dtype, int state_dtype,
                        const AdemamixHyper& hyper, int device, uintptr_t stream);
#endif

}  // namespace fastllm
