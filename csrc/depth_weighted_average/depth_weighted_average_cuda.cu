// Depth-weighted average on CUDA: the launchers of depth_weighted_average_kernels.cuh.
#include "common/cuda_utils.h"
#include "depth_weighted_average/depth_weighted_average_kernels.cuh"

namespace fastllm {
namespace {

// launch(kernel, blocks, shared bytes, args...) on a stream, with the launch checked.
struct StreamLaunch {
  cudaStream_t stream;
  const char* what;
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int64_t blocks, size_t shared, const Args&... args) const {
    kernel<<<static_cast<unsigned>(blocks), dwa_cuda::kThreads, shared, stream>>>(args...);
    check_cuda(cudaGetLastError(), what);
  }
};

}  // namespace

void depth_weighted_average_forward_cuda(const void* states, const float* weights, void* out, int64_t numel,
                                         int64_t num_states, int dtype, int device, uintptr_t stream_handle) {
  if (numel == 0) return;
  set_device(device);
  const StreamLaunch launch{reinterpret_cast<cudaStream_t>(stream_handle), "depth_weighted_average forward"};
  dwa_cuda::launch_forward(states, weights, out, numel, num_states, dtype, multiprocessor_count(device), launch);
}

int64_t depth_weighted_average_cuda_workspace(int64_t numel, int64_t num_states, int dtype) {
  return dwa_cuda::backward_blocks(numel, dtype) * num_states;
}

void depth_weighted_average_backward_cuda(const void* grad_out, const void* states, const float* weights,
                                          void* grad_states, float* grad_weights, float* workspace,
                                          int64_t numel, int64_t num_states, int dtype, int device,
                                          uintptr_t stream_handle) {
  if (num_states == 0) return;
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (numel == 0) {
    check_cuda(cudaMemsetAsync(grad_weights, 0, size_t(num_states) * sizeof(float), stream), "cudaMemsetAsync");
    return;
  }
  dwa_cuda::launch_backward(grad_out, states, weights, grad_states, grad_weights, workspace, numel, num_states, dtype,
                            StreamLaunch{stream, "depth_weighted_average backward"});
}

}  // namespace fastllm
