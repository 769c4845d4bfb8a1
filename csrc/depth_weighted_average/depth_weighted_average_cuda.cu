// Depth-weighted average on CUDA. Memory bound: the forward reads K states and writes one output,
// the backward reads the output gradient once and every state once and writes every state gradient.
// Each thread moves 16 bytes per access (8 bf16/fp16 or 4 fp32 elements) when the rows are aligned.
#include <algorithm>

#include "common/cuda_utils.h"
#include "depth_weighted_average/depth_weighted_average.h"

namespace fastllm {
namespace {

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

template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

template <typename T>
constexpr int kVector = 16 / static_cast<int>(sizeof(T));

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& x) {
  *reinterpret_cast<Pack<T, V>*>(p) = x;
}

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
        for (int j = 0; j < V; ++j) acc[j] = dwa::accumulate(acc[j], w, dwa::Elem<T>::load(p[u].v[j]));
      }
    }
    for (; k < num_states; ++k) {
      const Pack<T, V> p = load_pack<T, V>(x + k * numel);
      const float w = __ldg(weights + k);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = dwa::accumulate(acc[j], w, dwa::Elem<T>::load(p.v[j]));
    }
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = dwa::Elem<T>::store(acc[j]);
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
  extern __shared__ float warp_sums[];  // [k_count][kWarps]
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
      for (int j = 0; j < V; ++j) g[j] = dwa::Elem<T>::load(gp.v[j]);
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
          dx.v[j] = dwa::Elem<T>::store(dwa::state_grad(w, g[j]));
          dot = dwa::weight_grad_term(dot, g[j], dwa::Elem<T>::load(x.v[j]));
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

// One block per state: per-thread strided sums, then a fixed tree, all in double.
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const float* __restrict__ partials, float* __restrict__ grad_weights, int64_t blocks,
                           int64_t num_states) {
  __shared__ double sums[kThreads];
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

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int element_size(int dtype) { return static_cast<DType>(dtype) == DType::Float32 ? 4 : 2; }

int64_t backward_blocks(int64_t numel, int dtype) {
  const int64_t per_block = int64_t(kThreads) * (16 / element_size(dtype));
  return std::clamp<int64_t>((numel + per_block - 1) / per_block, 1, kBackwardBlocks);
}

template <typename T>
void launch_forward(const T* states, const float* weights, T* out, int64_t numel, int64_t num_states, int device,
                    cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const bool vectorized = numel % V == 0 && aligned16(states) && aligned16(out);
  const int64_t items = vectorized ? numel / V : numel;
  const int64_t max_blocks = int64_t(multiprocessor_count(device)) * kBlocksPerSm;
  const int blocks = static_cast<int>(std::min<int64_t>((items + kThreads - 1) / kThreads, max_blocks));
  if (vectorized)
    forward_kernel<T, V><<<blocks, kThreads, 0, stream>>>(states, weights, out, numel, num_states);
  else
    forward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(states, weights, out, numel, num_states);
  check_cuda(cudaGetLastError(), "depth_weighted_average forward_kernel launch");
}

template <typename T>
void launch_backward(const T* grad_out, const T* states, const float* weights, T* grad_states, float* grad_weights,
                     float* partials, int64_t numel, int64_t num_states, int dtype, cudaStream_t stream) {
  constexpr int V = kVector<T>;
  const bool vectorized =
      numel % V == 0 && aligned16(grad_out) && aligned16(states) && aligned16(grad_states);
  const int64_t blocks = backward_blocks(numel, dtype);
  // Wider than one launch's shared memory: the next states re-read grad_out (rare: K > 1024).
  for (int64_t k_begin = 0; k_begin < num_states; k_begin += kStatesPerLaunch) {
    const int k_count = static_cast<int>(std::min(kStatesPerLaunch, num_states - k_begin));
    const size_t shared = size_t(k_count) * kWarps * sizeof(float);
    if (vectorized)
      backward_kernel<T, V><<<blocks, kThreads, shared, stream>>>(grad_out, states, weights, grad_states, partials,
                                                                   numel, num_states, k_begin, k_count);
    else
      backward_kernel<T, 1><<<blocks, kThreads, shared, stream>>>(grad_out, states, weights, grad_states, partials,
                                                                   numel, num_states, k_begin, k_count);
    check_cuda(cudaGetLastError(), "depth_weighted_average backward_kernel launch");
  }
  reduce_partials_kernel<<<static_cast<unsigned>(num_states), kThreads, 0, stream>>>(partials, grad_weights, blocks,
                                                                                     num_states);
  check_cuda(cudaGetLastError(), "depth_weighted_average reduce_partials_kernel launch");
}

}  // namespace

void depth_weighted_average_forward_cuda(const void* states, const float* weights, void* out, int64_t numel,
                                         int64_t num_states, int dtype, int device, uintptr_t stream_handle) {
  if (numel == 0) return;
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return launch_forward(static_cast<const float*>(states), weights, static_cast<float*>(out), numel, num_states,
                            device, stream);
    case DType::BFloat16:
      return launch_forward(static_cast<const bfloat16*>(states), weights, static_cast<bfloat16*>(out), numel,
                            num_states, device, stream);
    case DType::Float16:
      return launch_forward(static_cast<const dwa::float16*>(states), weights, static_cast<dwa::float16*>(out),
                            numel, num_states, device, stream);
  }
  unsupported_dtypes("depth_weighted_average", dtype, static_cast<int>(DType::Float32));
}

int64_t depth_weighted_average_cuda_workspace(int64_t numel, int64_t num_states, int dtype) {
  return backward_blocks(numel, dtype) * num_states;
}

void depth_weighted_average_backward_cuda(const void* grad_out, const void* states, const float* weights,
                                          void* grad_states, float* grad_weights, float* workspace,
                                          int64_t numel, int64_t num_states, int dtype, int device,
                                          uintptr_t stream_handle) {
  if (num_states == 0) return;
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (numel == 0) {
    check_cuda(cudaMemsetAsync(grad_weights, 0, size_t(num_states) * sizeof(float), stream), "cudaMemsetAsync");
    return;
  }
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return launch_backward(static_cast<const float*>(grad_out), static_cast<const float*>(states), weights,
                             static_cast<float*>(grad_states), grad_weights, workspace, numel, num_states, dtype,
                             stream);
    case DType::BFloat16:
      return launch_backward(static_cast<const bfloat16*>(grad_out), static_cast<const bfloat16*>(states), weights,
                             static_cast<bfloat16*>(grad_states), grad_weights, workspace, numel, num_states, dtype,
                             stream);
    case DType::Float16:
      return launch_backward(static_cast<const dwa::float16*>(grad_out), static_cast<const dwa::float16*>(states),
                             weights, static_cast<dwa::float16*>(grad_states), grad_weights, workspace, numel,
                             num_states, dtype, stream);
  }
  unsupported_dtypes("depth_weighted_average_backward", dtype, static_cast<int>(DType::Float32));
}

}  // namespace fastllm
