// One Mamba decoding step, CUDA device code (the launcher is in state_update_cuda.cu; tests/cuda_emulator
// also runs it on the CPU): a warp per (batch, channel), lane l updating states l, l + 32, ...
// (consecutive lanes touch consecutive state entries), then a warp sum of C h.
#pragma once

#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace state_update_cuda {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) state_update_kernel(const StateUpdateArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.batch * a.dim) return;  // whole warps: no shuffle below misses a lane
  const int64_t b = row / a.dim, d = row % a.dim;
  const float x = load_float(static_cast<const T*>(a.x), row);
  const float delta = ss_delta(load_float(static_cast<const T*>(a.dt), row), a.dt_bias ? a.dt_bias[d] : 0.0f,
                               a.softplus);
  const int64_t bc = (b * a.groups + d / (a.dim / a.groups)) * a.nstate;
  float y = update_states<32>(a.state + row * a.nstate, a.A + d * a.nstate, static_cast<const T*>(a.B) + bc,
                              static_cast<const T*>(a.C) + bc, lane, a.nstate, delta, delta * x);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) y += __shfl_xor_sync(0xffffffffu, y, offset);
  if (lane == 0) {
    const float z = a.z ? load_float(static_cast<const T*>(a.z), row) : 0.0f;
    store_float(static_cast<T*>(a.out), row, ss_output(y, x, a.D ? a.D[d] : 0.0f, a.z != nullptr, z));
  }
}

// Calls launch(kernel, blocks) with the kernel for the dtype code; nothing for an empty batch.
template <typename Launch>
void with_state_update_kernel(const StateUpdateArgs& a, int dtype, Launch&& launch) {
  const int64_t blocks = (a.batch * a.dim + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks == 0) return;
  if (blocks > 0x7fffffff) throw std::invalid_argument("selective_state_update (CUDA): batch * dim too large");
  const dim3 grid{static_cast<unsigned>(blocks), 1, 1};
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return launch(state_update_kernel<float>, grid);
    case DType::BFloat16: return launch(state_update_kernel<bfloat16>, grid);
    case DType::Float16: return launch(state_update_kernel<float16>, grid);
  }
  unsupported_dtypes("selective_state_update", dtype, dtype);
}

}  // namespace state_update_cuda
}  // namespace fastllm
