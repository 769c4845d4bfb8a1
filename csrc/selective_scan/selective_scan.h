// Mamba-1 selective scan: the per-step math shared by the CPU and CUDA kernels.
//
//   delta'_t = softplus(delta_t + bias)    (both optional)
//   h_t = a_t h_{t-1} + b_t,  a_t = exp(delta'_t A_n),  b_t = delta'_t u_t B_{n,t}
//   y_t = sum_n C_{n,t} h_t + D u_t;   out_t = y_t silu(z_t)
//
// Both kernels walk L in chunks (kScanChunk positions on the CPU, kCudaScanChunk on CUDA), carrying
// h from chunk to chunk. The forward saves h at the end of every chunk; the backward walks the chunks
// in reverse, recomputing each chunk's states from the saved state before it.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtypes.h"

namespace fastllm {

constexpr int kScanChunk = 256;
constexpr int kCudaScanChunk = 64;  // shorter: the CUDA backward recomputes a chunk per thread block

// Branch-free select (GCC keeps `c ? a : b` on floats as a branch, which stops vectorisation).
FASTLLM_HD float ss_select(bool condition, float if_true, float if_false) {
  const uint32_t mask = 0u - uint32_t(condition);
  return bits_as_float((float_as_bits(if_true) & mask) | (float_as_bits(if_false) & ~mask));
}

#if defined(__CUDA_ARCH__)
// 2^x on the special-function unit (2 ulp), one instruction; results below 2^-126 flush to 0, where
// exp2f spends four more instructions on them. In the scan such values only meet sums of O(1) terms.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// exp(x). On the CPU to about 1 ulp: x = k ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial for e^r,
// times 2^k; branch-free so the kernel vectorises it; NaN propagates; below -87.3 it returns ~1e-38,
// not 0. On GPUs fast_exp2, against the polynomial's ~17 instructions on the FMA pipe, the scan's
// busiest; log2(e) in two parts keeps the argument exact.
FASTLLM_HD float ss_exp(float x) {
#if defined(__CUDA_ARCH__)
  return fast_exp2(fmaf(x, 1.44269502162933349609375f, x * 1.925962991126617468e-8f));
#else
  x = ss_select(x > 88.3f, 88.3f, x);
  x = ss_select(x < -87.3f, -87.3f, x);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln2) in the low bits
  const float k = shifted - 12582912.0f;
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ki = int32_t(float_as_bits(shifted) - 0x4b400000u);
  return p * bits_as_float(uint32_t(ki + 127) << 23);
#endif
}

// a / b for 1 <= b: on GPUs the special-function unit's reciprocal and a product (2 ulp; 0 once b
// passes 2^126), not IEEE division's dozen instructions and slow-path branch.
FASTLLM_HD float ss_divide(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

// log(1 + x) for 0 <= x <= 1 as 2 atanh(s), s = x / (2 + x) <= 1/3: an odd series to s^15.
FASTLLM_HD float ss_log1p_unit(float x) {
  const float s = ss_divide(x, 2.0f + x), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  return 2.0f * s + 2.0f * s * (s2 * p);
}

FASTLLM_HD float ss_sigmoid(float x) { return ss_divide(1.0f, 1.0f + ss_exp(-x)); }

// torch.nn.functional.softplus (threshold 20) as max(x, 0) + log(1 + exp(-|x|)).
FASTLLM_HD float ss_softplus(float x) {
  const float e = ss_exp(-bits_as_float(float_as_bits(x) & 0x7fffffffu));
  return ss_select(x > 20.0f, x, ss_select(x > 0.0f, x, 0.0f) + ss_log1p_unit(e));
}

FASTLLM_HD float ss_delta(float raw, float bias, bool softplus) {
  const float x = raw + bias;
  return softplus ? ss_softplus(x) : x;
}

// d delta' / d (delta + bias); sigmoid(x) rounds to 1 above the softplus threshold anyway.
FASTLLM_HD float ss_delta_grad(float raw, float bias, bool softplus) {
  return softplus ? ss_sigmoid(raw + bias) : 1.0f;
}

// One position of one state, h <- exp(delta A_n) h + (delta u) B_n; returns the new h.
FASTLLM_HD float ss_step(float h, float delta, float a_n, float delta_u, float b_n) {
  return ss_exp(delta * a_n) * h + delta_u * b_n;
}

// The output gate silu(z) = z sigmoid(z), and its derivative s (1 + z (1 - s)), s = sigmoid(z).
FASTLLM_HD float ss_silu(float z) { return z * ss_sigmoid(z); }
FASTLLM_HD float ss_silu_grad(float z) {
  const float s = ss_sigmoid(z);
  return s * (1.0f + z * (1.0f - s));
}

// The output from y_ssm = sum_n C h: (y_ssm + D u) silu(z).
FASTLLM_HD float ss_output(float y_ssm, float u, float d, bool has_z, float z) {
  const float y = y_ssm + d * u;
  return has_z ? y * ss_silu(z) : y;
}

// Backward of ss_output: from d out, the gradient of y (= of y_ssm) and of z.
FASTLLM_HD void ss_output_grad(float dout, float y_ssm, float u, float d, bool has_z, float z, float& dy,
                               float& dz) {
  if (!has_z) {
    dy = dout;
    dz = 0.0f;
    return;
  }
  dy = dout * ss_silu(z);
  dz = dout * (y_ssm + d * u) * ss_silu_grad(z);
}

// Shapes and pointers of one call. B and C are (batch, groups, N, L); group g serves channels
// [g * dim / groups, (g + 1) * dim / groups). u, delta, z, B, C share the element type; A, D, bias,
// states are float32. Optional pointers are null.
struct ScanArgs {
  int64_t batch, dim, length, nstate, groups;
  const void* u;
  const void* delta;
  const float* A;
  const void* B;
  const void* C;
  const float* D;
  const void* z;
  const float* delta_bias;
  const float* initial_state;  // (batch, dim, N)
  bool softplus;
  int64_t cpu_chunks() const { return (length + kScanChunk - 1) / kScanChunk; }
  FASTLLM_HD int64_t cuda_chunks() const { return (length + kCudaScanChunk - 1) / kCudaScanChunk; }
};

struct ScanForwardOut {
  void* out;             // (batch, dim, L)
  float* chunk_states;   // (batch, dim, chunks, N): h at the end of every chunk
};

// Gradients. dB / dC hold one fp32 slice per channel tile, (batch, groups, tiles per group, N, L),
// that the caller sums; dA, dD, ddelta_bias hold one slice per batch row, summed by the caller.
struct ScanBackwardArgs {
  const void* dout;
  const float* dlast_state;  // (batch, dim, N) or null
  const float* chunk_states;
  void* du;
  void* ddelta;
  void* dz;                  // null without z
  float* dA_partial;         // (batch, dim, N)
  float* dD_partial;         // (batch, dim)
  float* ddelta_bias_partial;  // (batch, dim)
  float* dinitial_state;     // (batch, dim, N)
  float* dB;
  float* dC;
};

// CPU: channels are processed kCpuLanes at a time (SIMD lanes), in tiles that never cross a group.
constexpr int kCpuLanes = 8;
FASTLLM_HD int64_t cpu_tiles_per_group(int64_t dim, int64_t groups) {
  return (dim / groups + kCpuLanes - 1) / kCpuLanes;
}

void selective_scan_fwd_cpu(const ScanArgs& args, const ScanForwardOut& out, int dtype, int num_threads);
// dB, dC: cpu_tiles_per_group tiles.
void selective_scan_bwd_cpu(const ScanArgs& args, const ScanBackwardArgs& grads, int dtype, int num_threads);

// One decoding step (selective_state_update): state (batch, dim, N) float32 updated in place;
// x, dt, z, out: (batch, dim); B, C: (batch, groups, N); the per-state math is ss_step, as in the scan.
struct StateUpdateArgs {
  int64_t batch, dim, nstate, groups;
  float* state;
  const void* x;
  const void* dt;
  const float* A;
  const void* B;
  const void* C;
  const float* D;
  const void* z;
  const float* dt_bias;
  bool softplus;
  void* out;
};

// The step of one channel's states n = first, first + kStride, ... (h, A: the channel's N entries;
// B, C: its group's); returns their share of C h, summed in n order. The update loop carries no
// reduction, so the CPU (kStride 1) vectorises it, exp included; the CUDA kernel passes its lanes per row.
template <int kStride, typename T>
FASTLLM_HD float update_states(float* __restrict h, const float* __restrict A, const T* __restrict B,
                               const T* __restrict C, int64_t first, int64_t nstate, float delta, float delta_x) {
  for (int64_t n = first; n < nstate; n += kStride) h[n] = ss_step(h[n], delta, A[n], delta_x, load_float(B, n));
  float y = 0.0f;
  for (int64_t n = first; n < nstate; n += kStride) y += load_float(C, n) * h[n];
  return y;
}

void selective_state_update_cpu(const StateUpdateArgs& args, int dtype, int num_threads);

#if defined(FASTLLM_WITH_CUDA)
void selective_state_update_cuda(const StateUpdateArgs& args, int dtype, int device, uintptr_t stream);
void selective_scan_fwd_cuda(const ScanArgs& args, const ScanForwardOut& out, int dtype, int device,
                             uintptr_t stream);
// Channel tiles per group of the CUDA backward's dB, dC partial sums (one per thread block).
int64_t selective_scan_cuda_tiles(int64_t per_group, int64_t nstate);
void selective_scan_bwd_cuda(const ScanArgs& args, const ScanBackwardArgs& grads, int dtype, int device,
                             uintptr_t stream);
#endif

}  // namespace fastllm
