// One Mamba decoding step on CUDA: a warp per (batch, channel), lane l updating states l, l + 32, ...
// (consecutive lanes touch consecutive state entries), then a warp sum of C h.
#include "common/cuda_utils.h"
#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) state_update_kernel(const StateUpdateArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= a.batch * a.dim) return;
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

template <typename T>
void launch(const StateUpdateArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.batch * a.dim + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks == 0) return;
  if (blocks > 0x7fffffff) throw std::invalid_argument("selective_state_update (CUDA): batch * dim too large");
  state_update_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "selective_state_update launch");
}

}  // namespace

void selective_state_update_cuda(const StateUpdateArgs& args, int dtype, int device, uintptr_t stream_handle) {
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return launch<float>(args, stream);
    case DType::BFloat16: return launch<bfloat16>(args, stream);
    case DType::Float16: return launch<float16>(args, stream);
  }
  unsupported_dtypes("selective_state_update", dtype, dtype);
}

}  // namespace fastllm
