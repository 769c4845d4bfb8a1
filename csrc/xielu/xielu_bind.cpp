// Python bindings of the xIELU CPU kernels: data pointers and sizes in; the raw parameters a_p, a_n
// as floats (the caller reads them from CPU tensors).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/bind.h"
#include "xielu/xielu.h"

namespace py = pybind11;

namespace fastllm {

void bind_xielu(py::module_& m) {
  m.def(
      "xielu_forward_cpu",
      [](uintptr_t x, uintptr_t y, int64_t n, int dtype, double raw_alpha_p, double raw_alpha_n, double beta,
         double eps, int num_threads) {
        const XieluParams params = xielu_params(float(raw_alpha_p), float(raw_alpha_n), float(beta), float(eps));
        py::gil_scoped_release release;
        xielu_forward_cpu(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y), n, dtype, params,
                          num_threads);
      },
      "y = xielu(x) over n contiguous float32/bfloat16 elements.");
  m.def(
      "xielu_backward_cpu",
      [](uintptr_t grad, uintptr_t x, uintptr_t dx, int64_t n, int dtype, double raw_alpha_p, double raw_alpha_n,
         double beta, double eps, int num_threads) {
        const XieluParams params = xielu_params(float(raw_alpha_p), float(raw_alpha_n), float(beta), float(eps));
        py::gil_scoped_release release;
        return xielu_backward_cpu(reinterpret_cast<const void*>(grad), reinterpret_cast<const void*>(x),
                                  reinterpret_cast<void*>(dx), n, dtype, params, num_threads);
      },
      "Writes dx; returns (sum g * dy/d alpha_p, sum g * dy/d alpha_n) before the softplus chain factor.");
}

}  // namespace fastllm
