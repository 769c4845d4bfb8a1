// Element types, conversions and stochastic rounding shared by the CPU and CUDA kernels.
// The compiled module never sees torch: dtypes cross the boundary as the small integer codes below.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

struct float16 {  // IEEE half
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

// Conversions with round to nearest even, as torch's casts. On GPUs one conversion instruction each;
// on the host in software.
FASTLLM_HD float to_float(float x) { return x; }
FASTLLM_HD float to_float(bfloat16 x) { return bits_as_float(uint32_t(x.bits) << 16); }

FASTLLM_HD float to_float(float16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_as_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float f = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

// NaN stays a quiet NaN.
FASTLLM_HD bfloat16 bf16_round_nearest(float f) {
#if defined(__CUDA_ARCH__)
  return bfloat16{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bfloat16{uint16_t(u >> 16)};
#endif
}

FASTLLM_HD float16 fp16_round_nearest(float f) {
#if defined(__CUDA_ARCH__)
  return float16{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return float16{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return float16{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {  // normal: rebase the exponent, round at bit 13
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return float16{uint16_t(sign | ((r - 0x38000000u) >> 13))};
  }
  // Subnormal: count units of 2^-24, rounded to nearest even by the 1.5 * 2^23 trick.
  const float units = bits_as_float(a) * 16777216.0f + 12582912.0f;
  return float16{uint16_t(sign | (float_as_bits(units) - 0x4b400000u))};
#endif
}

// x in T, rounded to nearest even.
template <typename T>
FASTLLM_HD T from_float(float x);
template <>
FASTLLM_HD float from_float<float>(float x) { return x; }
template <>
FASTLLM_HD bfloat16 from_float<bfloat16>(float x) { return bf16_round_nearest(x); }
template <>
FASTLLM_HD float16 from_float<float16>(float x) { return fp16_round_nearest(x); }

// p[i] as float, and x stored to p[i].
template <typename T>
FASTLLM_HD float load_float(const T* p, int64_t i) { return to_float(p[i]); }
template <typename T>
FASTLLM_HD void store_float(T* p, int64_t i, float x) { p[i] = from_float<T>(x); }

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

// AdEMAMix's stores: to nearest, or stochastically in bf16.
template <>
struct Store<float> {
  FASTLLM_HD static float round(float x, bool /*stochastic*/, uint32_t /*bits*/) { return x; }
};

template <>
struct Store<bfloat16> {
  FASTLLM_HD static bfloat16 round(float x, bool stochastic, uint32_t bits) {
    return stochastic ? bf16_round_stochastic(x, bits) : from_float<bfloat16>(x);
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
