// Depth-weighted average CUDA kernels and their launch configuration, shared by the launchers
// (depth_weighted_average_cuda.cu) and tests/cuda_emulator, which runs them on the CPU.
//
// Memory bound: the forward reads K states and writes one output, the backward reads the output
// gradient once and every state once and writes every state gradient. Each thread moves 16 bytes per
// access (8 bf16/fp16 or 4 fp32 elements) when the rows are aligned.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/pack.h"
#include "depth_weighted_average/depth_weighted_average.h"

namespace fastllm {
namespace dwa_cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 64 registers per thread (no spills); 4 blocks x 256 threads x 4 loads of 16 bytes in flight per SM
// are enough to cover HBM latency.
constexpr int kBlocksPerSm = 4;
// The backward grid is fixed by the problem size alone (never by the GPU), so the order in which
// the weight gradient is summed, and with it every bit of the result, is the same on any device.
constexpr int64_t kBackwardBlocks = 1024;
// Per-warp weight-gradient sums live in shared memory: kStatesPerLaunch * kWarps floats = 32 KiB.
constexpr int64_t kStatesPerLaunch = 1024;

#if defined(__CUDACC__)
__device__ __forceinline__ float* dynamic_shared_floats() {
  extern __shared__ float4 dynamic_shared[];
  return reinterpret_cast<float*>(dynamic_shared);
}
#endif

template <typename T>
constexpr int kVector = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// V elements per thread and step; numel % V == 0 (the launcher picks V = 1 otherwise).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    forward_kernel(const T* __restrict__ states, const float* __restrict__ weights, T* __restrict__ out,
                   int64_t numel, int64_t num_states) {
  const int64_t items = numel / V;
  for (int64_t item = blockIdx.x * int64_t(kThreads) + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * kThreads) {
    const T* x = states + item * V;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.0f;
    int64_t k = 0;
    // Four states per step: four independent 16-byte loads in flight per thread.
    for (; k + 4 <= num_states; k += 4) {
      Pack<T, V> p[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) p[u] = load_pack<T, V>(x + (k + u) * numel);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float w = __ldg(weights + k + u);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = dwa::accumulate(acc[j], w, to_float(p[u].v[j]));
      }
    }
    for (; k < num_states; ++k) {
      const Pack<T, V> p = load_pack<T, V>(x + k * numel);
      const float w = __ldg(weights + k);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = dwa::accumulate(acc[j], w, to_float(p.v[j]));
    }
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_float<T>(acc[j]);
    store_pack<T, V>(out + item * V, o);
  }
}

// States k_begin .. k_begin + k_count - 1. Each warp keeps one running weight-gradient sum per state
// in shared memory (its own slots, so no atomics); the block writes its sums to
// partials[blockIdx.x * num_states + k], which reduce_partials_kernel adds up.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ states, const float* __restrict__ weights,
                    T* __restrict__ grad_states, float* __restrict__ partials, int64_t numel, int64_t num_states,
                    int64_t k_begin, int k_count) {
  float* warp_sums = dynamic_shared_floats();  // [k_count][kWarps]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int kk = lane; kk < k_count; kk += 32) warp_sums[kk * kWarps + warp] = 0.0f;
  __syncwarp();
  const int64_t items = numel / V;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  // The loop runs over each warp's first item, so all 32 lanes stay together for the shuffles.
  for (int64_t first = blockIdx.x * int64_t(kThreads) + warp * 32; first < items; first += stride) {
    const int64_t item = first + lane;
    const bool active = item < items;
    float g[V];
    if (active) {
      const Pack<T, V> gp = load_pack<T, V>(grad_out + item * V);
#pragma unroll
      for (int j = 0; j < V; ++j) g[j] = to_float(gp.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) g[j] = 0.0f;
    }
#pragma unroll 4
    for (int kk = 0; kk < k_count; ++kk) {
      const int64_t offset = (k_begin + kk) * numel + item * V;
      float dot = 0.0f;
      if (active) {
        const Pack<T, V> x = load_pack<T, V>(states + offset);
        const float w = __ldg(weights + k_begin + kk);
        Pack<T, V> dx;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          dx.v[j] = from_float<T>(dwa::state_grad(w, g[j]));
          dot = dwa::weight_grad_term(dot, g[j], to_float(x.v[j]));
        }
        store_pack<T, V>(grad_states + offset, dx);
      }
      dot = warp_sum(dot);
      if (lane == 0) warp_sums[kk * kWarps + warp] += dot;
    }
  }
  __syncthreads();
  for (int kk = threadIdx.x; kk < k_count; kk += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[kk * kWarps + w];
    partials[blockIdx.x * num_states + k_begin + kk] = sum;
  }
}

// One block per state: per-thread strided sums, then a fixed tree, all in double (in kThreads
// doubles of dynamic shared memory).
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const float* __restrict__ partials, float* __restrict__ grad_weights, int64_t blocks,
                           int64_t num_states) {
  double* sums = reinterpret_cast<double*>(dynamic_shared_floats());
  const int64_t k = blockIdx.x;
  double sum = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) sum += partials[b * num_states + k];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_weights[k] = static_cast<float>(sums[0]);
}

// ---- launch configuration, shared by the launchers and tests/cuda_emulator ------------------------

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int element_size(int dtype) { return static_cast<DType>(dtype) == DType::Float32 ? 4 : 2; }

inline int64_t backward_blocks(int64_t numel, int dtype) {
  const int64_t per_block = int64_t(kThreads) * (16 / element_size(dtype));
  return std::clamp<int64_t>((numel + per_block - 1) / per_block, 1, kBackwardBlocks);
}

// Calls pick(element) with a value of the element type for the dtype code.
template <typename Pick>
void with_element(int dtype, const char* op, Pick&& pick) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return pick(float{});
    case DType::BFloat16: return pick(bfloat16{});
    case DType::Float16: return pick(float16{});
  }
  unsupported_dtypes(op, dtype, static_cast<int>(DType::Float32));
}

// Calls launch(kernel, blocks, shared bytes, args...) for the forward on numel > 0 elements.
template <typename Launch>
void launch_forward(const void* states, const float* weights, void* out, int64_t numel, int64_t num_states,
                    int dtype, int multiprocessors, Launch&& launch) {
  with_element(dtype, "depth_weighted_average", [&](auto element) {
    using T = decltype(element);
    constexpr int V = kVector<T>;
    const T* s = static_cast<const T*>(states);
    T* o = static_cast<T*>(out);
    const bool vectorized = numel % V == 0 && aligned16(s) && aligned16(o);
    const int64_t items = vectorized ? numel / V : numel;
    const int64_t max_blocks = int64_t(multiprocessors) * kBlocksPerSm;
    const int64_t blocks = std::min<int64_t>((items + kThreads - 1) / kThreads, max_blocks);
    if (vectorized)
      launch(forward_kernel<T, V>, blocks, size_t(0), s, weights, o, numel, num_states);
    else
      launch(forward_kernel<T, 1>, blocks, size_t(0), s, weights, o, numel, num_states);
  });
}

// The same for the backward on numel > 0 elements and num_states > 0 states: the state gradients and
// the per-block partial weight sums (workspace: backward_blocks(numel, dtype) * num_states floats),
// then the weight gradient.
template <typename Launch>
void launch_backward(const void* grad_out, const void* states, const float* weights, void* grad_states,
                     float* grad_weights, float* partials, int64_t numel, int64_t num_states, int dtype,
                     Launch&& launch) {
  with_element(dtype, "depth_weighted_average_backward", [&](auto element) {
    using T = decltype(element);
    constexpr int V = kVector<T>;
    const T* g = static_cast<const T*>(grad_out);
    const T* s = static_cast<const T*>(states);
    T* gs = static_cast<T*>(grad_states);
    const bool vectorized = numel % V == 0 && aligned16(g) && aligned16(s) && aligned16(gs);
    const int64_t blocks = backward_blocks(numel, dtype);
    // Wider than one launch's shared memory: the next states re-read grad_out (rare: K > 1024).
    for (int64_t k_begin = 0; k_begin < num_states; k_begin += kStatesPerLaunch) {
      const int k_count = static_cast<int>(std::min(kStatesPerLaunch, num_states - k_begin));
      const size_t shared = size_t(k_count) * kWarps * sizeof(float);
      if (vectorized)
        launch(backward_kernel<T, V>, blocks, shared, g, s, weights, gs, partials, numel, num_states, k_begin,
               k_count);
      else
        launch(backward_kernel<T, 1>, blocks, shared, g, s, weights, gs, partials, numel, num_states, k_begin,
               k_count);
    }
    launch(reduce_partials_kernel, num_states, size_t(kThreads) * sizeof(double), static_cast<const float*>(partials),
           grad_weights, blocks, num_states);
  });
}

}  // namespace dwa_cuda
}  // namespace fastllm
