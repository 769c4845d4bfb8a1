// Multi-tensor traversal shared by the CPU and CUDA kernels.
// Each tensor is cut into fixed-size chunks; chunks are numbered across all tensors of a call and
// chunk_start[t] is the number of the first chunk of tensor t, so one launch (or one OpenMP loop)
// covers every tensor and each worker finds its tensor by binary search.
#pragma once

#include <cstdint>
#include <vector>

#include "common/dtypes.h"

namespace fastllm {

constexpr int64_t kChunkElements = 4096;

FASTLLM_HD int64_t chunks_of(int64_t numel) { return (numel + kChunkElements - 1) / kChunkElements; }

// The tensor t with chunk_start[t] <= chunk < chunk_start[t + 1]; chunk_start has n + 1 entries.
FASTLLM_HD int find_tensor_of_chunk(const int64_t* chunk_start, int n, int64_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename NumelFn>
std::vector<int64_t> chunk_prefix(int n, NumelFn numel_of) {
  std::vector<int64_t> start(n + 1, 0);
  for (int t = 0; t < n; ++t) start[t + 1] = start[t] + chunks_of(numel_of(t));
  return start;
}

}  // namespace fastllm
