// Multi-tensor AdEMAMix step: one launch updates up to kTensorsPerLaunch tensors.
// Memory bound (36 bytes per fp32 parameter), so the kernel is about full-width loads and enough
// bytes in flight: 4 elements per thread per buffer, a persistent grid striding over chunks.
#include <algorithm>

#include "ademamix/ademamix.h"
#include "common/cuda_utils.h"
#include "common/multi_tensor.h"

namespace fastllm {
namespace {

// Kernel parameters must stay under 4 KiB: 64 * 48 + 65 * 8 + 8 bytes.
constexpr int kTensorsPerLaunch = 64;
constexpr int kThreads = 256;

struct AdemamixBatch {
  AdemamixTensor tensors[kTensorsPerLaunch];
  int64_t chunk_start[kTensorsPerLaunch + 1];
  int count;
  int first_tensor_id;
};

template <typename P, typename S, bool kVectorized>
__global__ void __launch_bounds__(kThreads) ademamix_kernel(const AdemamixBatch batch, const AdemamixHyper h) {
  const int64_t total_chunks = batch.chunk_start[batch.count];
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int t = find_tensor_of_chunk(batch.chunk_start, batch.count, chunk);
    const AdemamixTensor& tensor = batch.tensors[t];
    const int64_t tensor_id = batch.first_tensor_id + t;
    const int64_t begin = (chunk - batch.chunk_start[t]) * kChunkElements;
    const int64_t end = min(begin + kChunkElements, tensor.numel);
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kThreads) {
      if (kVectorized && i + 4 <= end) {
        P* param = static_cast<P*>(tensor.param) + i;
        S* m1s = static_cast<S*>(tensor.exp_avg_fast) + i;
        S* m2s = static_cast<S*>(tensor.exp_avg_slow) + i;
        S* nus = static_cast<S*>(tensor.exp_avg_sq) + i;
        const Vec4<P> g = load_streaming(static_cast<const P*>(tensor.grad) + i);
        Vec4<P> p = load_streaming(param);
        Vec4<S> m1 = load_streaming(m1s), m2 = load_streaming(m2s), nu = load_streaming(nus);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float pf = to_float(p.v[j]), m1f = to_float(m1.v[j]), m2f = to_float(m2.v[j]), nuf = to_float(nu.v[j]);
          ademamix_update(pf, to_float(g.v[j]), m1f, m2f, nuf, h);
          const bool sr = h.stochastic_rounding;
          const int64_t e = i + j;
          p.v[j] = Store<P>::round(pf, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 0), e) : 0u);
          m1.v[j] = Store<S>::round(m1f, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 1), e) : 0u);
          m2.v[j] = Store<S>::round(m2f, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 2), e) : 0u);
          nu.v[j] = Store<S>::round(nuf, sr, sr ? hash_bits(h.seed, rounding_stream(tensor_id, 3), e) : 0u);
        }
        // Parameters are re-read by the next forward pass; only the states stream past L2.
        *reinterpret_cast<Vec4<P>*>(param) = p;
        store_streaming(m1s, m1);
        store_streaming(m2s, m2);
        store_streaming(nus, nu);
      } else {
        for (int64_t e = i; e < min(i + 4, end); ++e) ademamix_element<P, S>(tensor, tensor_id, e, h);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename P, typename S>
void launch_all(const std::vector<AdemamixTensor>& tensors, const AdemamixHyper& h, int device,
                cudaStream_t stream) {
  const int max_blocks = multiprocessor_count(device) * (2048 / kThreads);
  for (size_t first = 0; first < tensors.size(); first += kTensorsPerLaunch) {
    AdemamixBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(kTensorsPerLaunch, tensors.size() - first));
    batch.first_tensor_id = static_cast<int>(first);
    bool vectorized = true;
    for (int t = 0; t < batch.count; ++t) {
      const AdemamixTensor& x = tensors[first + t];
      batch.tensors[t] = x;
      batch.chunk_start[t + 1] = batch.chunk_start[t] + chunks_of(x.numel);
      vectorized = vectorized && aligned16(x.param) && aligned16(x.grad) && aligned16(x.exp_avg_fast) &&
                   aligned16(x.exp_avg_slow) && aligned16(x.exp_avg_sq);
    }
    const int64_t total_chunks = batch.chunk_start[batch.count];
    if (total_chunks == 0) continue;
    const int blocks = static_cast<int>(std::min<int64_t>(total_chunks, max_blocks));
    if (vectorized)
      ademamix_kernel<P, S, true><<<blocks, kThreads, 0, stream>>>(batch, h);
    else
      ademamix_kernel<P, S, false><<<blocks, kThreads, 0, stream>>>(batch, h);
    check_cuda(cudaGetLastError(), "ademamix_kernel launch");
  }
}

}  // namespace

void ademamix_step_cuda(const std::vector<AdemamixTensor>& tensors, int param_dtype, int state_dtype,
                        const AdemamixHyper& hyper, int device, uintptr_t stream_handle) {
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const auto p = static_cast<DType>(param_dtype), s = static_cast<DType>(state_dtype);
  if (p == DType::Float32 && s == DType::Float32) return launch_all<float, float>(tensors, hyper, device, stream);
  if (p == DType::Float32 && s == DType::BFloat16) return launch_all<float, bfloat16>(tensors, hyper, device, stream);
  if (p == DType::BFloat16 && s == DType::Float32) return launch_all<bfloat16, float>(tensors, hyper, device, stream);
  if (p == DType::BFloat16 && s == DType::BFloat16)
    return launch_all<bfloat16, bfloat16>(tensors, hyper, device, stream);
  unsupported_dtypes("ademamix_step", param_dtype, state_dtype);
}

}  // namespace fastllm
