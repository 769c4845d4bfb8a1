// Small CUDA helpers for launchers: error checks that raise Python exceptions, cached device queries.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastllm {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fastllm CUDA error in ") + what + ": " + cudaGetErrorString(status));
}

// The module links its own (static) CUDA runtime, whose current device is independent of torch's:
// every launcher selects the tensors' device explicitly.
inline void set_device(int device) { check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

inline int multiprocessor_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) throw std::invalid_argument("device index out of range");
  if (cached[device] == 0)
    check_cuda(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
  return cached[device];
}

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

}  // namespace fastllm
