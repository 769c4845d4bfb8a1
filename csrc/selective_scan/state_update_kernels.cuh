// One Mamba decoding step, CUDA device code (the launcher is in state_update_cuda.cu; tests/cuda_emulator
// also runs it on the CPU). LANES consecutive lanes share a (batch, channel) row, enough for about 4
// states each: lane l of the row updates states l, l + LANES, ... (consecutive lanes touch consecutive
// entries), then the row's lanes add up their shares of C h. A warp per row left half of it idle at
// N = 16 and spent a warp instruction per row on every step of the row's scalar work (softplus, gate,
// output), where now 8 rows share one.
#pragma once

#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace state_update_cuda {

constexpr int kThreads = 128;

// Lanes per row: the smallest power of two that leaves at most 4 states per lane, at most a warp.
constexpr int lanes_per_row(int64_t nstate) {
  int lanes = 1;
  while (lanes < 32 && lanes * 4 < nstate) lanes *= 2;
  return lanes;
}

template <typename T, int LANES>
__global__ void __launch_bounds__(kThreads) state_update_kernel(const StateUpdateArgs a) {
  const int sub = threadIdx.x % LANES;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / LANES) + threadIdx.x / LANES;
  // Lanes past the last row skip the work but not the shuffles, which take the whole warp.
  const bool active = row < a.batch * a.dim;
  const int64_t b = row / a.dim, d = row % a.dim;
  float y = 0.0f, x = 0.0f;
  if (active) {
    x = load_float(static_cast<const T*>(a.x), row);
    const float delta = ss_delta(load_float(static_cast<const T*>(a.dt), row), a.dt_bias ? a.dt_bias[d] : 0.0f,
                                 a.softplus);
    const int64_t bc = (b * a.groups + d / (a.dim / a.groups)) * a.nstate;
    y = update_states<LANES>(a.state + row * a.nstate, a.A + d * a.nstate, static_cast<const T*>(a.B) + bc,
                             static_cast<const T*>(a.C) + bc, sub, a.nstate, delta, delta * x);
  }
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset >>= 1) y += __shfl_xor_sync(0xffffffffu, y, offset);
  if (active && sub == 0) {
    const float z = a.z ? load_float(static_cast<const T*>(a.z), row) : 0.0f;
    store_float(static_cast<T*>(a.out), row, ss_output(y, x, a.D ? a.D[d] : 0.0f, a.z != nullptr, z));
  }
}

// Calls launch(kernel, blocks) with the kernel for the dtype code and N; nothing for an empty batch.
template <typename Launch>
void with_state_update_kernel(const StateUpdateArgs& a, int dtype, Launch&& launch) {
  auto by_lanes = [&](auto element) {
    using T = decltype(element);
    auto go = [&](auto kernel, int lanes) {
      const int64_t rows_per_block = kThreads / lanes;
      const int64_t blocks = (a.batch * a.dim + rows_per_block - 1) / rows_per_block;
      if (blocks == 0) return;
      if (blocks > 0x7fffffff) throw std::invalid_argument("selective_state_update (CUDA): batch * dim too large");
      launch(kernel, dim3{static_cast<unsigned>(blocks), 1, 1});
    };
    switch (lanes_per_row(a.nstate)) {
      case 1: return go(state_update_kernel<T, 1>, 1);
      case 2: return go(state_update_kernel<T, 2>, 2);
      case 4: return go(state_update_kernel<T, 4>, 4);
      case 8: return go(state_update_kernel<T, 8>, 8);
      case 16: return go(state_update_kernel<T, 16>, 16);
    }
    go(state_update_kernel<T, 32>, 32);
  };
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return by_lanes(float{});
    case DType::BFloat16: return by_lanes(bfloat16{});
    case DType::Float16: return by_lanes(float16{});
  }
  unsupported_dtypes("selective_state_update", dtype, dtype);
}

}  // namespace state_update_cuda
}  // namespace fastllm
