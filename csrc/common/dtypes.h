// Element types, conversions and stochastic rounding shared by the CPU and CUDA kernels.
// The compiled module never sees torch: dtypes cross the boundary as the small integer codes below.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FASTLLM_HD __host__ __device__ __forceinline__
#else
#define FASTLLM_HD inline
#endif

namespace fastllm {

// Codes shared with fastllm/ops/_backend.py (DTYPE_CODES).
enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

struct bfloat16 {
  uint16_t bits;
};

FASTLLM_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FASTLLM_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FASTLLM_HD float to_float(float x) { return x; }
FASTLLM_HD float to_float(bfloat16 x) { return bits_as_float(uint32_t(x.bits) << 16); }

// Round to nearest even, NaN kept quiet: the same rounding as torch's float -> bfloat16 cast.
FASTLLM_HD bfloat16 bf16_round_nearest(float f) {
  uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16{uint16_t(u >> 16)};
}

// Stochastic rounding: adds 16 random bits below the kept mantissa, then truncates, so the rounded
// value is unbiased in expectation. Small updates to bf16 states then survive on average.
FASTLLM_HD bfloat16 bf16_round_stochastic(float f, uint32_t random_bits) {
  uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16{uint16_t((u >> 16) | 0x40u)};
  u += random_bits & 0xffffu;
  return bfloat16{uint16_t(u >> 16)};
}

// Counter-based hash (splitmix64 finaliser): the random bits depend only on (seed, stream, index),
// so CPU and CUDA kernels round identically and a step can be replayed.
FASTLLM_HD uint32_t hash_bits(uint64_t seed, uint64_t stream, uint64_t index) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (index + 1) + 0xbf58476d1ce4e5b9ull * (stream + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return uint32_t(z >> 32);
}

template <typename T>
struct Store;

template <>
struct Store<float> {
  FASTLLM_HD static float round(float x, bool /*stochastic*/, uint32_t /*bits*/) { return x; }
};

template <>
struct Store<bfloat16> {
  FASTLLM_HD static bfloat16 round(float x, bool stochastic, uint32_t bits) {
    return stochastic ? bf16_round_stochastic(x, bits) : bf16_round_nearest(x);
  }
};

inline const char* dtype_name(int code) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: return "float32";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
  }
  return "unknown";
}

[[noreturn]] inline void unsupported_dtypes(const char* op, int a, int b) {
  throw std::invalid_argument(std::string(op) + ": unsupported dtype combination (" + dtype_name(a) +
                              ", " + dtype_name(b) + ")");
}

}  // namespace fastllm
