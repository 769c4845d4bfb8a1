// N consecutive elements as one aligned value, so that a load or store of it is a single vector
// access (up to 16 bytes) in the CUDA kernels; plain host code for tests/cuda_emulator.
#pragma once

#include "common/dtypes.h"

namespace fastllm {

template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

// p must be aligned to N elements.
template <typename T, int N>
FASTLLM_HD Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
FASTLLM_HD void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

}  // namespace fastllm
