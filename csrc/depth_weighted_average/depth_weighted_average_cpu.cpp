// Depth-weighted average on the CPU: OpenMP over fixed chunks of the output, fp32 accumulators
// per chunk so the inner loops over one state are contiguous and vectorise. The chunk loops are
// compiled for several x86 instruction sets (FASTLLM_CPU_CLONES) and picked at load time.
#include <algorithm>
#include <vector>

#include "common/cpu_utils.h"
#include "depth_weighted_average/depth_weighted_average.h"

namespace fastllm {
namespace {

constexpr int64_t kChunk = 2048;

int64_t chunks_of_elements(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Small problems run on one thread: waking a pool costs more than it saves (like torch's grain size).
int threads_for(int64_t numel, int64_t num_states, int num_threads) {
  constexpr int64_t kElementsPerThread = 1 << 18;
  const int64_t work = numel * std::max<int64_t>(num_states, 1);
  return static_cast<int>(std::clamp<int64_t>(work / kElementsPerThread, 1, std::max(num_threads, 1)));
}

// out[begin, begin + n) for n <= kChunk.
template <typename T>
FASTLLM_ALWAYS_INLINE void forward_chunk(const T* states, const float* weights, T* out, int64_t numel,
                                         int64_t num_states, int64_t begin, int64_t n) {
  float acc[kChunk];
  for (int64_t i = 0; i < n; ++i) acc[i] = 0.0f;
  int64_t k = 0;
  // Four states per sweep (still added in order k, k + 1, ...): a quarter of the accumulator traffic.
  for (; k + 4 <= num_states; k += 4) {
    const T* x0 = states + k * numel + begin;
    const T *x1 = x0 + numel, *x2 = x1 + numel, *x3 = x2 + numel;
    const float w0 = weights[k], w1 = weights[k + 1], w2 = weights[k + 2], w3 = weights[k + 3];
    for (int64_t i = 0; i < n; ++i) {
      float a = dwa::accumulate(acc[i], w0, to_float(x0[i]));
      a = dwa::accumulate(a, w1, to_float(x1[i]));
      a = dwa::accumulate(a, w2, to_float(x2[i]));
      acc[i] = dwa::accumulate(a, w3, to_float(x3[i]));
    }
  }
  for (; k < num_states; ++k) {
    const T* x = states + k * numel + begin;
    const float w = weights[k];
    for (int64_t i = 0; i < n; ++i) acc[i] = dwa::accumulate(acc[i], w, to_float(x[i]));
  }
  for (int64_t i = 0; i < n; ++i) out[begin + i] = from_float<T>(acc[i]);
}

// State gradients of [begin, begin + n) and each state's weight-gradient sum over it (partial[k]).
template <typename T>
FASTLLM_ALWAYS_INLINE void backward_chunk(const T* grad_out, const T* states, const float* weights,
                                          T* grad_states, float* partial, int64_t numel, int64_t num_states,
                                          int64_t begin, int64_t n) {
  float g[kChunk];
  for (int64_t i = 0; i < n; ++i) g[i] = to_float(grad_out[begin + i]);
  for (int64_t k = 0; k < num_states; ++k) {
    const T* x = states + k * numel + begin;
    T* dx = grad_states + k * numel + begin;
    const float w = weights[k];
    float dot = 0.0f;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp simd reduction(+ : dot)
#endif
    for (int64_t i = 0; i < n; ++i) {
      dx[i] = from_float<T>(dwa::state_grad(w, g[i]));
      dot = dwa::weight_grad_term(dot, g[i], to_float(x[i]));
    }
    partial[k] = dot;
  }
}

using ForwardChunkFn = void (*)(const void*, const float*, void*, int64_t, int64_t, int64_t, int64_t);
using BackwardChunkFn = void (*)(const void*, const void*, const float*, void*, float*, int64_t, int64_t, int64_t,
                                 int64_t);

#define FASTLLM_DWA_CHUNKS(SUFFIX, T)                                                                           \
  FASTLLM_CPU_CLONES void forward_chunk_##SUFFIX(const void* states, const float* weights, void* out,          \
                                                 int64_t numel, int64_t num_states, int64_t begin, int64_t n) { \
    forward_chunk<T>(static_cast<const T*>(states), weights, static_cast<T*>(out), numel, num_states, begin, n);  \
  }                                                                                                             \
  FASTLLM_CPU_CLONES void backward_chunk_##SUFFIX(const void* grad_out, const void* states, const float* weights, \
                                                  void* grad_states, float* partial, int64_t numel,             \
                                                  int64_t num_states, int64_t begin, int64_t n) {               \
    backward_chunk<T>(static_cast<const T*>(grad_out), static_cast<const T*>(states), weights,                  \
                      static_cast<T*>(grad_states), partial, numel, num_states, begin, n);                      \
  }
FASTLLM_DWA_CHUNKS(f32, float)
FASTLLM_DWA_CHUNKS(bf16, bfloat16)
FASTLLM_DWA_CHUNKS(f16, float16)
#undef FASTLLM_DWA_CHUNKS

}  // namespace

void depth_weighted_average_forward_cpu(const void* states, const float* weights, void* out, int64_t numel,
                                        int64_t num_states, int dtype, int num_threads) {
  ForwardChunkFn chunk_fn = nullptr;
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: chunk_fn = forward_chunk_f32; break;
    case DType::BFloat16: chunk_fn = forward_chunk_bf16; break;
    case DType::Float16: chunk_fn = forward_chunk_f16; break;
  }
  if (chunk_fn == nullptr) unsupported_dtypes("depth_weighted_average", dtype, static_cast<int>(DType::Float32));
  const int64_t chunks = chunks_of_elements(numel);
  const int threads = threads_for(numel, num_states, num_threads);
  (void)threads;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    chunk_fn(states, weights, out, numel, num_states, begin, std::min(kChunk, numel - begin));
  }
}

void depth_weighted_average_backward_cpu(const void* grad_out, const void* states, const float* weights,
                                         void* grad_states, float* grad_weights, int64_t numel,
                                         int64_t num_states, int dtype, int num_threads) {
  BackwardChunkFn chunk_fn = nullptr;
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: chunk_fn = backward_chunk_f32; break;
    case DType::BFloat16: chunk_fn = backward_chunk_bf16; break;
    case DType::Float16: chunk_fn = backward_chunk_f16; break;
  }
  if (chunk_fn == nullptr)
    unsupported_dtypes("depth_weighted_average_backward", dtype, static_cast<int>(DType::Float32));
  const int64_t chunks = chunks_of_elements(numel);
  // partial[chunk * num_states + k]: the weight gradient of state k over one chunk, summed below in a
  // fixed order, so the result does not depend on the thread count.
  std::vector<float> partial(static_cast<size_t>(chunks * num_states));
  const int threads = threads_for(numel, 2 * num_states, num_threads);
  (void)threads;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    chunk_fn(grad_out, states, weights, grad_states, partial.data() + chunk * num_states, numel, num_states, begin,
             std::min(kChunk, numel - begin));
  }
  for (int64_t k = 0; k < num_states; ++k) {
    double sum = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * num_states + k];
    grad_weights[k] = static_cast<float>(sum);
  }
}

}  // namespace fastllm
