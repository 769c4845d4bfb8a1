// Launcher of the CUDA decoding step; the kernel is in state_update_kernels.cuh.
#include "common/cuda_utils.h"
#include "selective_scan/state_update_kernels.cuh"

namespace fastllm {

void selective_state_update_cuda(const StateUpdateArgs& args, int dtype, int device, uintptr_t stream_handle) {
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  state_update_cuda::with_state_update_kernel(args, dtype, [&](auto kernel, dim3 grid) {
    kernel<<<grid, state_update_cuda::kThreads, 0, stream>>>(args);
    check_cuda(cudaGetLastError(), "selective_state_update launch");
  });
}

}  // namespace fastllm
