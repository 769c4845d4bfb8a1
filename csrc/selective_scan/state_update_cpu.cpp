// One Mamba decoding step on the CPU: OpenMP over (batch, channel), the states of a channel in order,
// with the scan's per-position math, so stepping through a sequence reproduces the CPU scan.
#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace {

constexpr int64_t kParallelStates = int64_t(1) << 18;

template <typename T>
void run(const StateUpdateArgs& a, int num_threads) {
  const int64_t rows = a.batch * a.dim;
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
  // A decoding step is microseconds of work: waking a thread team would cost more than it saves.
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * a.nstate >= kParallelStates)
#endif
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / a.dim, d = row % a.dim;
    const float x = load_float(static_cast<const T*>(a.x), row);
    const float delta = ss_delta(load_float(static_cast<const T*>(a.dt), row), a.dt_bias ? a.dt_bias[d] : 0.0f,
                                 a.softplus);
    const float y = state_update_partial<T>(a, b, d, 0, 1, delta, delta * x);
    const float z = a.z ? load_float(static_cast<const T*>(a.z), row) : 0.0f;
    store_float(static_cast<T*>(a.out), row, ss_output(y, x, a.D ? a.D[d] : 0.0f, a.z != nullptr, z));
  }
}

}  // namespace

void selective_state_update_cpu(const StateUpdateArgs& args, int dtype, int num_threads) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return run<float>(args, num_threads);
    case DType::BFloat16: return run<bfloat16>(args, num_threads);
    case DType::Float16: return run<float16>(args, num_threads);
  }
  unsupported_dtypes("selective_state_update", dtype, dtype);
}

}  // namespace fastllm
