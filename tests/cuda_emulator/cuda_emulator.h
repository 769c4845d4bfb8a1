// Runs CUDA device code on the CPU, for tests on machines without a GPU: every thread of a block is an
// OS thread, __syncthreads is a barrier of the block, a warp shuffle is an exchange through a slot
// array between two barriers of the warp. Blocks run one after another. Strict where CUDA is: a
// barrier or shuffle that not all threads reach deadlocks here too, and shared memory starts as NaN.
// Included (with -include) before the kernels, in place of the CUDA headers; compiled with g++.
#pragma once

#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace cuda_emulator {

struct Block {
  explicit Block(unsigned threads, size_t shared_bytes)
      : barrier(threads), shared((shared_bytes + sizeof(float4) - 1) / sizeof(float4)) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (float4& v : shared) v = {nan, nan, nan, nan};
  }
  struct Warp {
    std::barrier<> barrier{32};
    float slots[32];
  };
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<float4> shared;
};

inline Block* current_block = nullptr;

}  // namespace cuda_emulator

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { cuda_emulator::current_block->barrier.arrive_and_wait(); }

inline float* dynamic_shared_floats() { return reinterpret_cast<float*>(cuda_emulator::current_block->shared.data()); }

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  auto& warp = *cuda_emulator::current_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  warp.slots[lane] = value;
  warp.barrier.arrive_and_wait();
  const float other = warp.slots[lane ^ static_cast<unsigned>(lane_mask)];
  warp.barrier.arrive_and_wait();
  return other;
}

inline void __syncwarp() { cuda_emulator::current_block->warps[threadIdx.x / 32]->barrier.arrive_and_wait(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline float fast_exp2(float x) { return std::exp2(x); }

namespace cuda_emulator {

// kernel<<<grid, block, shared_bytes>>>(args...), blocks in turn; block must be a multiple of 32.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, const Args&... args) {
  if (block.x % 32 != 0 || block.y != 1 || block.z != 1)
    throw std::invalid_argument("emulator: 1-D blocks of whole warps");
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block state(block.x, shared_bytes);
      current_block = &state;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
          threadIdx = {t, 0, 0};
          blockIdx = {bx, by, 0};
          kernel(args...);
        });
      for (auto& thread : threads) thread.join();
      current_block = nullptr;
    }
}

}  // namespace cuda_emulator
