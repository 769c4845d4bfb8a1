// Depth-weighted average (DenseFormer, arXiv 2402.02622): out = sum_k weights[k] * states[k].
// The element math shared by the CPU and CUDA kernels (the element types are in common/dtypes.h).
//
// states is K contiguous rows of `numel` elements each (a stacked tensor or the prefix of a
// preallocated buffer); weights are K fp32 values; every sum is accumulated in fp32 in the order
// k = 0, 1, ..., K - 1, so CPU and CUDA results differ only by fused multiply-adds.
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace fastllm {
namespace dwa {

// Forward term: acc += w * x.
FASTLLM_HD float accumulate(float acc, float weight, float state) { return acc + weight * state; }

// Backward, per element and state k: d states[k] = w[k] * d out;  d w[k] += d out * states[k].
FASTLLM_HD float state_grad(float weight, float grad_out) { return weight * grad_out; }
FASTLLM_HD float weight_grad_term(float acc, float grad_out, float state) { return acc + grad_out * state; }

}  // namespace dwa

// out (numel) = sum_k weights[k] * states[k * numel : (k + 1) * numel].
void depth_weighted_average_forward_cpu(const void* states, const float* weights, void* out, int64_t numel,
                                        int64_t num_states, int dtype, int num_threads);

// grad_states (num_states * numel) and grad_weights (num_states, fp32) in one pass over grad_out and states.
// The weight gradient is summed per fixed chunk, then over chunks in double in a fixed order:
// the result does not depend on the thread count.
void depth_weighted_average_backward_cpu(const void* grad_out, const void* states, const float* weights,
                                         void* grad_states, float* grad_weights, int64_t numel,
                                         int64_t num_states, int dtype, int num_threads);

#if defined(FASTLLM_WITH_CUDA)
void depth_weighted_average_forward_cuda(const void* states, const float* weights, void* out, int64_t numel,
                                         int64_t num_states, int dtype, int device, uintptr_t stream);

// fp32 floats of workspace the CUDA backward needs for (numel, num_states, dtype).
int64_t depth_weighted_average_cuda_workspace(int64_t numel, int64_t num_states, int dtype);

// Each block writes its partial weight gradients to the workspace (no atomics); a second small
// kernel sums them per state in a fixed order, so the result is bitwise reproducible.
void depth_weighted_average_backward_cuda(const void* grad_out, const void* states, const float* weights,
                                          void* grad_states, float* grad_weights, float* workspace,
                                          int64_t numel, int64_t num_states, int dtype, int device,
                                          uintptr_t stream);
#endif

}  // namespace fastllm
