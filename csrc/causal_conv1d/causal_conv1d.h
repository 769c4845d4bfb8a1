// Causal depthwise conv1d of Mamba blocks on the CPU:
//   out[b, d, t] = act(bias[d] + sum_k weight[d, k] x[b, d, t - (width - 1) + k]), x = 0 before t = 0.
// x and dout come with any strides (elements); weight (dim, width), bias (dim,) are contiguous fp32;
// out and dx are contiguous (batch, dim, length). Arithmetic is fp32.
#pragma once

#include <cstdint>

namespace fastllm {

struct ConvShape {
  int64_t batch, dim, length, width;
};

struct Strides3 {
  int64_t b, d, l;
};

void causal_conv1d_forward_cpu(const void* x, Strides3 x_strides, const float* weight, const float* bias, void* out,
                               ConvShape shape, bool silu, int dtype, int num_threads);

// Writes dx and the fp32 weight and bias gradients (each channel summed in double over batch and
// time by one thread, so the result does not depend on the thread count).
void causal_conv1d_backward_cpu(const void* dout, Strides3 dout_strides, const void* x, Strides3 x_strides,
                                const float* weight, const float* bias, void* dx, float* dweight, float* dbias,
                                ConvShape shape, bool silu, int dtype, int num_threads);

}  // namespace fastllm
