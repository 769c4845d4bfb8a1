// The CUDA depth-weighted average kernels, run by the CPU emulator (cuda_emulator.h) behind a C
// interface with the same arguments as the module's depth_weighted_average_{forward,backward}_cuda
// (no device or stream; the forward takes the multiprocessor count that sizes its grid).
#include <cstdint>

#include "depth_weighted_average/depth_weighted_average_kernels.cuh"

namespace {

struct EmulatedLaunch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int64_t blocks, size_t shared, const Args&... args) const {
    cuda_emulator::launch(dim3{static_cast<unsigned>(blocks), 1, 1}, dim3{fastllm::dwa_cuda::kThreads, 1, 1}, shared,
                          kernel, args...);
  }
};

}  // namespace

extern "C" {

int64_t emulated_dwa_workspace(int64_t numel, int64_t num_states, int dtype) {
  return fastllm::dwa_cuda::backward_blocks(numel, dtype) * num_states;
}

void emulated_dwa_forward(const void* states, const float* weights, void* out, int64_t numel, int64_t num_states,
                          int dtype, int multiprocessors) {
  if (numel > 0)
    fastllm::dwa_cuda::launch_forward(states, weights, out, numel, num_states, dtype, multiprocessors,
                                      EmulatedLaunch{});
}

void emulated_dwa_backward(const void* grad_out, const void* states, const float* weights, void* grad_states,
                           float* grad_weights, float* workspace, int64_t numel, int64_t num_states, int dtype) {
  if (numel > 0 && num_states > 0)
    fastllm::dwa_cuda::launch_backward(grad_out, states, weights, grad_states, grad_weights, workspace, numel,
                                       num_states, dtype, EmulatedLaunch{});
}

}  // extern "C"
