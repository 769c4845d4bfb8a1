// The one extension module, fastllm._C. It knows nothing of torch: callers pass data pointers,
// sizes, dtype codes (common/dtypes.h), a device index and a CUDA stream handle.
// Each op binds itself in csrc/<op>/<op>_bind.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/bind.h"
#include "common/cuda_info.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#if defined(FASTLLM_WITH_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(FASTLLM_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_archs"] = std::string(FASTLLM_CUDA_ARCHS_STRING);
  info["cuda_runtime_version"] = fastllm::cuda_runtime_version();
  info["cuda_device_count"] = fastllm::cuda_device_count();
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
  info["cuda_runtime_version"] = 0;
  info["cuda_device_count"] = 0;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastllm compiled kernels (CPU always, CUDA when built with nvcc)";
  m.def("build_info", &build_info, "What this build contains: OpenMP, CUDA and its architectures.");
  fastllm::bind_ademamix(m);
  fastllm::bind_xielu(m);
  fastllm::bind_selective_scan(m);
  fastllm::bind_depth_weighted_average(m);
  fastllm::bind_causal_conv1d(m);
}
