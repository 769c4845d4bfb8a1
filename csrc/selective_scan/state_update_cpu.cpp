// One Mamba decoding step on the CPU: OpenMP over (batch, channel), the states of a channel in order,
// with the scan's per-position math, so stepping through a sequence reproduces the CPU scan.
#include <algorithm>

#include "common/cpu_utils.h"
#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace {

constexpr int64_t kParallelStates = int64_t(1) << 16;
constexpr int64_t kChannels = 64;

template <typename T>
FASTLLM_ALWAYS_INLINE void run(const StateUpdateArgs& a, int num_threads) {
  const int64_t per_group = a.dim / a.groups;
  const int64_t blocks_per_group = (per_group + kChannels - 1) / kChannels;
  const T* x_in = static_cast<const T*>(a.x);
  const T* dt_in = static_cast<const T*>(a.dt);
  const T* z_in = static_cast<const T*>(a.z);
  T* out = static_cast<T*>(a.out);
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
  // A small decoding step is microseconds of work: waking a thread team would cost more than it saves.
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads) \
    if (a.batch * a.dim * a.nstate >= kParallelStates)
#endif
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t block = 0; block < a.groups * blocks_per_group; ++block) {
      // A block of channels of one group. Per-channel math (softplus, the output's gate) is a long
      // dependent chain, so it runs over the block's channels as vectors, before and after the
      // per-channel state updates.
      const int64_t g = block / blocks_per_group;
      const int64_t d0 = g * per_group + (block % blocks_per_group) * kChannels;
      const int64_t count = std::min<int64_t>(kChannels, (g + 1) * per_group - d0), row0 = b * a.dim + d0;
      const int64_t bc = (b * a.groups + g) * a.nstate;
      // The optional inputs become plain arrays, so these loops have no branches and vectorise.
      float x[kChannels], dt[kChannels], bias[kChannels], delta[kChannels], y[kChannels], d[kChannels];
      float z[kChannels];
      for (int64_t i = 0; i < count; ++i) {
        x[i] = load_float(x_in, row0 + i);
        dt[i] = load_float(dt_in, row0 + i);
        bias[i] = a.dt_bias ? a.dt_bias[d0 + i] : 0.0f;
        d[i] = a.D ? a.D[d0 + i] : 0.0f;
        z[i] = z_in ? load_float(z_in, row0 + i) : 0.0f;
      }
      if (a.softplus) {
        for (int64_t i = 0; i < count; ++i) delta[i] = ss_delta(dt[i], bias[i], true);
      } else {
        for (int64_t i = 0; i < count; ++i) delta[i] = ss_delta(dt[i], bias[i], false);
      }
      for (int64_t i = 0; i < count; ++i)
        y[i] = update_states<1>(a.state + (row0 + i) * a.nstate, a.A + (d0 + i) * a.nstate,
                                static_cast<const T*>(a.B) + bc, static_cast<const T*>(a.C) + bc, 0, a.nstate, delta[i],
                                delta[i] * x[i]);
      if (z_in) {
        for (int64_t i = 0; i < count; ++i) y[i] = ss_output(y[i], x[i], d[i], true, z[i]);
      } else {
        for (int64_t i = 0; i < count; ++i) y[i] = ss_output(y[i], x[i], d[i], false, 0.0f);
      }
      for (int64_t i = 0; i < count; ++i) store_float(out, row0 + i, y[i]);
    }
  }
}

// One clone set per dtype (AVX-512, AVX2, baseline), chosen at load time.
FASTLLM_CPU_CLONES void run_f32(const StateUpdateArgs& a, int threads) { run<float>(a, threads); }
FASTLLM_CPU_CLONES void run_bf16(const StateUpdateArgs& a, int threads) { run<bfloat16>(a, threads); }
FASTLLM_CPU_CLONES void run_f16(const StateUpdateArgs& a, int threads) { run<float16>(a, threads); }

}  // namespace

void selective_state_update_cpu(const StateUpdateArgs& args, int dtype, int num_threads) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return run_f32(args, num_threads);
    case DType::BFloat16: return run_bf16(args, num_threads);
    case DType::Float16: return run_f16(args, num_threads);
  }
  unsupported_dtypes("selective_state_update", dtype, dtype);
}

}  // namespace fastllm
