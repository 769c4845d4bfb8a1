// Python bindings of the causal conv1d CPU kernels: data pointers, (batch, dim, length) strides in
// elements, the shape and a dtype code.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "causal_conv1d/causal_conv1d.h"
#include "common/bind.h"

namespace py = pybind11;

namespace fastllm {
namespace {

Strides3 strides3(const std::array<int64_t, 3>& s) { return {s[0], s[1], s[2]}; }

}  // namespace

void bind_causal_conv1d(py::module_& m) {
  m.def(
      "causal_conv1d_forward_cpu",
      [](uintptr_t x, std::array<int64_t, 3> x_strides, uintptr_t weight, uintptr_t bias, uintptr_t out,
         std::array<int64_t, 4> shape, bool silu, int dtype, int num_threads) {
        py::gil_scoped_release release;
        causal_conv1d_forward_cpu(reinterpret_cast<const void*>(x), strides3(x_strides),
                                  reinterpret_cast<const float*>(weight), reinterpret_cast<const float*>(bias),
                                  reinterpret_cast<void*>(out), {shape[0], shape[1], shape[2], shape[3]}, silu, dtype,
                                  num_threads);
      },
      "out (batch, dim, length), contiguous, from x with any strides; weight (dim, width) and bias (dim,) "
      "contiguous float32, bias 0 for none; shape (batch, dim, length, width).");
  m.def(
      "causal_conv1d_backward_cpu",
      [](uintptr_t dout, std::array<int64_t, 3> dout_strides, uintptr_t x, std::array<int64_t, 3> x_strides,
         uintptr_t weight, uintptr_t bias, uintptr_t dx, uintptr_t dweight, uintptr_t dbias,
         std::array<int64_t, 4> shape, bool silu, int dtype, int num_threads) {
        py::gil_scoped_release release;
        causal_conv1d_backward_cpu(reinterpret_cast<const void*>(dout), strides3(dout_strides),
                                   reinterpret_cast<const void*>(x), strides3(x_strides),
                                   reinterpret_cast<const float*>(weight), reinterpret_cast<const float*>(bias),
                                   reinterpret_cast<void*>(dx), reinterpret_cast<float*>(dweight),
                                   reinterpret_cast<float*>(dbias), {shape[0], shape[1], shape[2], shape[3]}, silu,
                                   dtype, num_threads);
      },
      "dx (batch, dim, length) contiguous, dweight (dim, width) and dbias (dim,) float32.");
}

}  // namespace fastllm
