#include <algorithm>

#include "ademamix/ademamix.h"
#include "common/multi_tensor.h"

namespace fastllm {
namespace {

template <typename P, typename S>
void run(const std::vector<AdemamixTensor>& tensors, const AdemamixHyper& h, int num_threads) {
  const int n = static_cast<int>(tensors.size());
  const std::vector<int64_t> chunk_start = chunk_prefix(n, [&](int t) { return tensors[t].numel; });
  const int64_t total_chunks = chunk_start[n];
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
  for (int64_t chunk = 0; chunk < total_chunks; ++chunk) {
    const int t = find_tensor_of_chunk(chunk_start.data(), n, chunk);
    const AdemamixTensor& tensor = tensors[t];
    const int64_t begin = (chunk - chunk_start[t]) * kChunkElements;
    const int64_t end = std::min(begin + kChunkElements, tensor.numel);
    for (int64_t i = begin; i < end; ++i) ademamix_element<P, S>(tensor, t, i, h);
  }
}

}  // namespace

void ademamix_step_cpu(const std::vector<AdemamixTensor>& tensors, int param_dtype, int state_dtype,
                       const AdemamixHyper& hyper, int num_threads) {
  const auto p = static_cast<DType>(param_dtype), s = static_cast<DType>(state_dtype);
  if (p == DType::Float32 && s == DType::Float32) return run<float, float>(tensors, hyper, num_threads);
  if (p == DType::Float32 && s == DType::BFloat16) return run<float, bfloat16>(tensors, hyper, num_threads);
  if (p == DType::BFloat16 && s == DType::Float32) return run<bfloat16, float>(tensors, hyper, num_threads);
  if (p == DType::BFloat16 && s == DType::BFloat16) return run<bfloat16, bfloat16>(tensors, hyper, num_threads);
  unsupported_dtypes("ademamix_step", param_dtype, state_dtype);
}

}  // namespace fastllm
