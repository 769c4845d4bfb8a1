#include <algorithm>

#include "ademamix/ademamix.h"
#include "common/cpu_utils.h"
#include "common/multi_tensor.h"

namespace fastllm {
namespace {

// One contiguous span of one tensor. Typed restrict pointers and scalars copied to locals let the
// compiler vectorise the loop (stores through float* could otherwise alias the hyper-parameters).
template <typename P, typename S, bool kStochastic>
FASTLLM_ALWAYS_INLINE void update_span(const AdemamixTensor& t, int64_t tensor_id, int64_t begin, int64_t end,
                                       const AdemamixHyper& hyper) {
  P* __restrict__ param = static_cast<P*>(t.param);
  const P* __restrict__ grad = static_cast<const P*>(t.grad);
  S* __restrict__ m1s = static_cast<S*>(t.exp_avg_fast);
  S* __restrict__ m2s = static_cast<S*>(t.exp_avg_slow);
  S* __restrict__ nus = static_cast<S*>(t.exp_avg_sq);
  const AdemamixHyper h = hyper;
  for (int64_t i = begin; i < end; ++i) {
    float p = to_float(param[i]), m1 = to_float(m1s[i]), m2 = to_float(m2s[i]), nu = to_float(nus[i]);
    ademamix_update(p, to_float(grad[i]), m1, m2, nu, h);
    if constexpr (kStochastic) {
      param[i] = Store<P>::round(p, true, hash_bits(h.seed, rounding_stream(tensor_id, 0), i));
      m1s[i] = Store<S>::round(m1, true, hash_bits(h.seed, rounding_stream(tensor_id, 1), i));
      m2s[i] = Store<S>::round(m2, true, hash_bits(h.seed, rounding_stream(tensor_id, 2), i));
      nus[i] = Store<S>::round(nu, true, hash_bits(h.seed, rounding_stream(tensor_id, 3), i));
    } else {
      param[i] = from_float<P>(p);
      m1s[i] = from_float<S>(m1);
      m2s[i] = from_float<S>(m2);
      nus[i] = from_float<S>(nu);
    }
  }
}

using SpanFn = void (*)(const AdemamixTensor&, int64_t, int64_t, int64_t, const AdemamixHyper&);

#define FASTLLM_ADEMAMIX_SPAN(NAME, P, S, SR)                                                     \
  FASTLLM_CPU_CLONES void NAME(const AdemamixTensor& t, int64_t id, int64_t b, int64_t e,          \
                               const AdemamixHyper& h) {                                           \
    update_span<P, S, SR>(t, id, b, e, h);                                                         \
  }
FASTLLM_ADEMAMIX_SPAN(span_f32_f32, float, float, false)
FASTLLM_ADEMAMIX_SPAN(span_f32_bf16, float, bfloat16, false)
FASTLLM_ADEMAMIX_SPAN(span_bf16_f32, bfloat16, float, false)
FASTLLM_ADEMAMIX_SPAN(span_bf16_bf16, bfloat16, bfloat16, false)
FASTLLM_ADEMAMIX_SPAN(span_f32_bf16_sr, float, bfloat16, true)
FASTLLM_ADEMAMIX_SPAN(span_bf16_f32_sr, bfloat16, float, true)
FASTLLM_ADEMAMIX_SPAN(span_bf16_bf16_sr, bfloat16, bfloat16, true)
#undef FASTLLM_ADEMAMIX_SPAN

SpanFn pick_span(DType p, DType s, bool stochastic) {
  // Stochastic rounding only changes bfloat16 stores; fp32/fp32 has none.
  if (p == DType::Float32 && s == DType::Float32) return span_f32_f32;
  if (p == DType::Float32 && s == DType::BFloat16) return stochastic ? span_f32_bf16_sr : span_f32_bf16;
  if (p == DType::BFloat16 && s == DType::Float32) return stochastic ? span_bf16_f32_sr : span_bf16_f32;
  if (p == DType::BFloat16 && s == DType::BFloat16) return stochastic ? span_bf16_bf16_sr : span_bf16_bf16;
  return nullptr;
}

}  // namespace

void ademamix_step_cpu(const std::vector<AdemamixTensor>& tensors, int param_dtype, int state_dtype,
                       const AdemamixHyper& hyper, int num_threads) {
  const SpanFn span =
      pick_span(static_cast<DType>(param_dtype), static_cast<DType>(state_dtype), hyper.stochastic_rounding);
  if (span == nullptr) unsupported_dtypes("ademamix_step", param_dtype, state_dtype);
  const int n = static_cast<int>(tensors.size());
  const std::vector<int64_t> chunk_start = chunk_prefix(n, [&](int t) { return tensors[t].numel; });
  const int64_t total_chunks = chunk_start[n];
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
  for (int64_t chunk = 0; chunk < total_chunks; ++chunk) {
    const int t = find_tensor_of_chunk(chunk_start.data(), n, chunk);
    const int64_t begin = (chunk - chunk_start[t]) * kChunkElements;
    span(tensors[t], t, begin, std::min(begin + kChunkElements, tensors[t].numel), hyper);
  }
}

}  // namespace fastllm
