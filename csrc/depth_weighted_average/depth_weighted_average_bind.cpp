// Python bindings of the depth-weighted average kernels: data pointers and sizes in, outputs written
// into buffers the caller allocated.
#include <pybind11/pybind11.h>

#include "common/bind.h"
#include "depth_weighted_average/depth_weighted_average.h"

namespace py = pybind11;

namespace fastllm {
namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

void bind_depth_weighted_average(py::module_& m) {
  m.def(
      "depth_weighted_average_forward_cpu",
      [](uintptr_t states, uintptr_t weights, uintptr_t out, int64_t numel, int64_t num_states, int dtype,
         int num_threads) {
        py::gil_scoped_release release;
        depth_weighted_average_forward_cpu(ptr<const void>(states), ptr<const float>(weights), ptr<void>(out), numel,
                                           num_states, dtype, num_threads);
      },
      "out = sum_k weights[k] * states[k] over contiguous rows of numel elements.");
  m.def(
      "depth_weighted_average_backward_cpu",
      [](uintptr_t grad_out, uintptr_t states, uintptr_t weights, uintptr_t grad_states, uintptr_t grad_weights,
         int64_t numel, int64_t num_states, int dtype, int num_threads) {
        py::gil_scoped_release release;
        depth_weighted_average_backward_cpu(ptr<const void>(grad_out), ptr<const void>(states),
                                            ptr<const float>(weights), ptr<void>(grad_states),
                                            ptr<float>(grad_weights), numel, num_states, dtype, num_threads);
      },
      "State and weight gradients of the depth-weighted average in one pass.");

#if defined(FASTLLM_WITH_CUDA)
  m.def(
      "depth_weighted_average_forward_cuda",
      [](uintptr_t states, uintptr_t weights, uintptr_t out, int64_t numel, int64_t num_states, int dtype, int device,
         uintptr_t stream) {
        py::gil_scoped_release release;
        depth_weighted_average_forward_cuda(ptr<const void>(states), ptr<const float>(weights), ptr<void>(out),
                                            numel, num_states, dtype, device, stream);
      },
      "Depth-weighted average on one CUDA device and stream.");
  m.def("depth_weighted_average_cuda_workspace", &depth_weighted_average_cuda_workspace,
        "fp32 elements of workspace the CUDA backward needs for (numel, num_states, dtype).");
  m.def(
      "depth_weighted_average_backward_cuda",
      [](uintptr_t grad_out, uintptr_t states, uintptr_t weights, uintptr_t grad_states, uintptr_t grad_weights,
         uintptr_t workspace, int64_t numel, int64_t num_states, int dtype, int device, uintptr_t stream) {
        py::gil_scoped_release release;
        depth_weighted_average_backward_cuda(ptr<const void>(grad_out), ptr<const void>(states),
                                             ptr<const float>(weights), ptr<void>(grad_states),
                                             ptr<float>(grad_weights), ptr<float>(workspace), numel, num_states,
                                             dtype, device, stream);
      },
      "Deterministic single-pass backward of the depth-weighted average on one CUDA device and stream.");
#endif
}

}  // namespace fastllm
