// xIELU on the CPU: one pass over memory, OpenMP over fixed blocks. The backward's parameter
// gradients are summed per block in double and the blocks added in order, so the result does not
// depend on the thread count.
#include <algorithm>
#include <vector>

#include "xielu/xielu.h"

namespace fastllm {
namespace {

constexpr int64_t kBlock = 4096;

template <typename T>
void forward(const T* x, T* y, int64_t n, const XieluParams& p, int num_threads) {
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
  for (int64_t block = 0; block < (n + kBlock - 1) / kBlock; ++block) {
    const int64_t end = std::min(n, (block + 1) * kBlock);
    for (int64_t i = block * kBlock; i < end; ++i) y[i] = from_float<T>(xielu_forward(to_float(x[i]), p));
  }
}

template <typename T>
std::pair<double, double> backward(const T* grad, const T* x, T* dx, int64_t n, const XieluParams& p,
                                   int num_threads) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> sum_p(blocks), sum_n(blocks);
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t end = std::min(n, (block + 1) * kBlock);
    double acc_p = 0.0, acc_n = 0.0;
    for (int64_t i = block * kBlock; i < end; ++i) {
      float d_alpha_p, d_alpha_n;
      dx[i] = from_float<T>(xielu_backward(to_float(grad[i]), to_float(x[i]), p, d_alpha_p, d_alpha_n));
      acc_p += d_alpha_p;
      acc_n += d_alpha_n;
    }
    sum_p[block] = acc_p;
    sum_n[block] = acc_n;
  }
  double total_p = 0.0, total_n = 0.0;
  for (int64_t block = 0; block < blocks; ++block) {
    total_p += sum_p[block];
    total_n += sum_n[block];
  }
  return {total_p, total_n};
}

}  // namespace

void xielu_forward_cpu(const void* x, void* y, int64_t n, int dtype, const XieluParams& params, int num_threads) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return forward(static_cast<const float*>(x), static_cast<float*>(y), n, params, num_threads);
    case DType::BFloat16:
      return forward(static_cast<const bfloat16*>(x), static_cast<bfloat16*>(y), n, params, num_threads);
    default:
      unsupported_dtypes("xielu_forward_cpu", dtype, dtype);
  }
}

std::pair<double, double> xielu_backward_cpu(const void* grad, const void* x, void* dx, int64_t n, int dtype,
                                             const XieluParams& params, int num_threads) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return backward(static_cast<const float*>(grad), static_cast<const float*>(x), static_cast<float*>(dx), n,
                      params, num_threads);
    case DType::BFloat16:
      return backward(static_cast<const bfloat16*>(grad), static_cast<const bfloat16*>(x),
                      static_cast<bfloat16*>(dx), n, params, num_threads);
    default:
      unsupported_dtypes("xielu_backward_cpu", dtype, dtype);
  }
}

}  // namespace fastllm
