// Small CUDA helpers for launchers: error checks that raise Python exceptions, cached device queries.
#pragma once

#include <cuda_runtime.h>

#include <cstring>

#include <stdexcept>
#include <string>

namespace fastllm {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fastllm CUDA error in ") + what + ": " + cudaGetErrorString(status));
}

// The module links its own (static) CUDA runtime, whose current device is independent of torch's:
// every launcher selects the tensors' device explicitly (only when it changes: launches stay cheap,
// also inside CUDA graph capture).
inline void set_device(int device) {
  int current = -1;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

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

// Streaming (evict-first) 4-element loads and stores for data touched once per kernel, such as
// optimizer states: they keep L2 for the data that is reused. 16 bytes for fp32, 8 for 16-bit types.
template <typename T>
__device__ __forceinline__ Vec4<T> load_streaming(const T* ptr) {
  static_assert(sizeof(Vec4<T>) == 16 || sizeof(Vec4<T>) == 8, "4 x 32-bit or 4 x 16-bit elements");
  Vec4<T> out;
  if constexpr (sizeof(Vec4<T>) == 16) {
    const float4 raw = __ldcs(reinterpret_cast<const float4*>(ptr));
    memcpy(&out, &raw, sizeof(out));
  } else {
    const uint2 raw = __ldcs(reinterpret_cast<const uint2*>(ptr));
    memcpy(&out, &raw, sizeof(out));
  }
  return out;
}

template <typename T>
__device__ __forceinline__ void store_streaming(T* ptr, const Vec4<T>& value) {
  if constexpr (sizeof(Vec4<T>) == 16) {
    float4 raw;
    memcpy(&raw, &value, sizeof(raw));
    __stcs(reinterpret_cast<float4*>(ptr), raw);
  } else {
    uint2 raw;
    memcpy(&raw, &value, sizeof(raw));
    __stcs(reinterpret_cast<uint2*>(ptr), raw);
  }
}

}  // namespace fastllm
