// Causal depthwise conv1d on the CPU. Work goes in tiles of kChannels channels by kChunk positions:
// a tile of x (with its causal halo) is read once into an fp32 buffer, along whichever axis x is
// contiguous (time for (B, D, L) tensors, channels for a Mamba block's channel-contiguous view), and
// every output row is then a few vectorised multiply-adds over that buffer.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "causal_conv1d/causal_conv1d.h"
#include "common/cpu_utils.h"
#include "common/dtypes.h"
#include "selective_scan/selective_scan.h"  // ss_sigmoid: the scan's branch-free, vectorisable exp

namespace fastllm {
namespace {

constexpr int64_t kChannels = 16;  // 32 bytes of a bf16 channel-contiguous x per position
constexpr int64_t kChunk = 128;  // with kChannels, the backward's tiles of x and dout fit a 32 KiB L1

// Sums in kLanes independent lanes: a vector add per step, where one running float sum would be a
// chain of dependent scalar adds (the compiler may not reorder float sums).
constexpr int64_t kLanes = 16;

FASTLLM_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  float sum = 0.0f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

FASTLLM_ALWAYS_INLINE float sum(const float* a, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l];
  float total = 0.0f;
  for (; i < n; ++i) total += a[i];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// out[i] = start + sum_k w[k] * in[i + k] for i < n.
FASTLLM_ALWAYS_INLINE void correlate(const float* in, const float* w, int64_t width, float start, float* out,
                                     int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = start;
  for (int64_t k = 0; k < width; ++k)
    for (int64_t i = 0; i < n; ++i) out[i] += w[k] * in[i + k];
}

// buf[c * ld + j] = x[d0 + c, start + j] for c < channels, j < count; zero outside 0 <= t < length.
template <typename T>
void load_tile(const T* x, Strides3 s, int64_t d0, int64_t channels, int64_t start, int64_t count, int64_t length,
               float* buf, int64_t ld) {
  const int64_t lo = std::clamp<int64_t>(-start, 0, count), hi = std::clamp<int64_t>(length - start, lo, count);
  for (int64_t c = 0; c < channels; ++c) {
    std::fill(buf + c * ld, buf + c * ld + lo, 0.0f);
    std::fill(buf + c * ld + hi, buf + c * ld + count, 0.0f);
  }
  const T* first = x + d0 * s.d + (start + lo) * s.l;  // position start + lo >= 0: inside x
  if (std::abs(s.l) <= std::abs(s.d)) {
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t j = lo; j < hi; ++j) buf[c * ld + j] = to_float(first[c * s.d + (j - lo) * s.l]);
  } else {
    for (int64_t j = lo; j < hi; ++j)
      for (int64_t c = 0; c < channels; ++c) buf[c * ld + j] = to_float(first[c * s.d + (j - lo) * s.l]);
  }
}

struct ConvArgs {
  const void* x;
  Strides3 xs;
  const void* dout;  // backward only
  Strides3 gs;
  const float* weight;
  const float* bias;  // null for none
  void* out;          // the output, or dx
  ConvShape shape;
  bool silu;
};

// Scratch floats per thread: a tile of x with both halos and one of dout, and four rows.
int64_t scratch_size(int64_t width) { return 2 * kChannels * (kChunk + 2 * (width - 1)) + 4 * (kChunk + width); }

// Positions t0 .. t0 + kChunk of channels d0 .. d0 + kChannels of batch row b.
template <typename T>
FASTLLM_ALWAYS_INLINE void forward_tile(const ConvArgs& a, int64_t b, int64_t d0, int64_t t0, float* scratch) {
  const ConvShape& s = a.shape;
  const int64_t halo = s.width - 1, ld = kChunk + halo;
  const int64_t channels = std::min(kChannels, s.dim - d0), count = std::min(kChunk, s.length - t0);
  float* tile = scratch;
  float* acc = scratch + kChannels * ld;
  load_tile(static_cast<const T*>(a.x) + b * a.xs.b, a.xs, d0, channels, t0 - halo, count + halo, s.length, tile, ld);
  for (int64_t c = 0; c < channels; ++c) {
    correlate(tile + c * ld, a.weight + (d0 + c) * s.width, s.width, a.bias ? a.bias[d0 + c] : 0.0f, acc, count);
    if (a.silu)
      for (int64_t i = 0; i < count; ++i) acc[i] *= ss_sigmoid(acc[i]);
    T* o = static_cast<T*>(a.out) + ((b * s.dim + d0 + c) * s.length + t0);
    for (int64_t i = 0; i < count; ++i) o[i] = from_float<T>(acc[i]);
  }
}

// Channels d0 .. d0 + kChannels over every batch row and position: dx, and the weight and bias
// gradients summed per tile in fp32 and across tiles in double, in a fixed order.
template <typename T>
FASTLLM_ALWAYS_INLINE void backward_block(const ConvArgs& a, int64_t d0, float* dweight, float* dbias,
                                          float* scratch, double* sums) {
  const ConvShape& s = a.shape;
  const int64_t width = s.width, halo = width - 1, channels = std::min(kChannels, s.dim - d0);
  const int64_t x_ld = kChunk + 2 * halo, g_ld = kChunk + halo;
  float* x_tile = scratch;
  float* g_tile = x_tile + kChannels * x_ld;
  float* pre = g_tile + kChannels * x_ld;
  float* grad_pre = pre + kChunk + width;
  float* dx_row = grad_pre + kChunk + width;
  float* flipped = dx_row + kChunk + width;
  double* sum_w = sums;                         // [channel][tap]
  double* sum_b = sums + kChannels * width;     // [channel]
  std::fill(sums, sums + kChannels * (width + 1), 0.0);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t t0 = 0; t0 < s.length; t0 += kChunk) {
      const int64_t count = std::min(kChunk, s.length - t0);
      // x at t0 - halo .. t0 + count + halo: the gradient at t0 + count - 1 reaches forward to there.
      load_tile(static_cast<const T*>(a.x) + b * a.xs.b, a.xs, d0, channels, t0 - halo, count + 2 * halo, s.length,
                x_tile, x_ld);
      load_tile(static_cast<const T*>(a.dout) + b * a.gs.b, a.gs, d0, channels, t0, count + halo, s.length, g_tile,
                g_ld);
      for (int64_t c = 0; c < channels; ++c) {
        const float* xr = x_tile + c * x_ld;
        const float* gr = g_tile + c * g_ld;
        const float* w = a.weight + (d0 + c) * width;
        // grad_pre[j]: the gradient at the preactivation of position t0 + j (zero past the end, where
        // dout was loaded as zero).
        if (a.silu) {
          correlate(xr, w, width, a.bias ? a.bias[d0 + c] : 0.0f, pre, count + halo);
          for (int64_t j = 0; j < count + halo; ++j) {
            const float sg = ss_sigmoid(pre[j]);
            grad_pre[j] = gr[j] * (sg * (1.0f + pre[j] * (1.0f - sg)));
          }
        } else {
          std::copy(gr, gr + count + halo, grad_pre);
        }
        // dx[t0 + i] = sum_k w[k] grad_pre[i + halo - k]: a correlation with the taps reversed.
        std::reverse_copy(w, w + width, flipped);
        correlate(grad_pre, flipped, width, 0.0f, dx_row, count);
        T* dxr = static_cast<T*>(a.out) + ((b * s.dim + d0 + c) * s.length + t0);
        for (int64_t i = 0; i < count; ++i) dxr[i] = from_float<T>(dx_row[i]);
        for (int64_t k = 0; k < width; ++k) sum_w[c * width + k] += dot(grad_pre, xr + k, count);
        sum_b[c] += sum(grad_pre, count);
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t k = 0; k < width; ++k) dweight[(d0 + c) * width + k] = static_cast<float>(sum_w[c * width + k]);
    dbias[d0 + c] = static_cast<float>(sum_b[c]);
  }
}

// The tile functions are compiled per instruction set; OpenMP's outlined loop bodies would not be.
FASTLLM_CPU_CLONES void forward_tile_f32(const ConvArgs& a, int64_t b, int64_t d0, int64_t t0, float* scratch) {
  forward_tile<float>(a, b, d0, t0, scratch);
}
FASTLLM_CPU_CLONES void forward_tile_bf16(const ConvArgs& a, int64_t b, int64_t d0, int64_t t0, float* scratch) {
  forward_tile<bfloat16>(a, b, d0, t0, scratch);
}
FASTLLM_CPU_CLONES void backward_block_f32(const ConvArgs& a, int64_t d0, float* dweight, float* dbias,
                                           float* scratch, double* sums) {
  backward_block<float>(a, d0, dweight, dbias, scratch, sums);
}
FASTLLM_CPU_CLONES void backward_block_bf16(const ConvArgs& a, int64_t d0, float* dweight, float* dbias,
                                            float* scratch, double* sums) {
  backward_block<bfloat16>(a, d0, dweight, dbias, scratch, sums);
}

bool is_bf16(int dtype) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return false;
    case DType::BFloat16: return true;
    default: unsupported_dtypes("causal_conv1d_cpu", dtype, dtype);
  }
}

void check_width(int64_t width) {
  if (width < 1) throw std::invalid_argument("causal_conv1d_cpu: width must be >= 1, got " + std::to_string(width));
}

}  // namespace

void causal_conv1d_forward_cpu(const void* x, Strides3 x_strides, const float* weight, const float* bias, void* out,
                               ConvShape shape, bool silu, int dtype, int num_threads) {
  check_width(shape.width);
  const bool bf16 = is_bf16(dtype);
  const ConvArgs args{x, x_strides, nullptr, {}, weight, bias, out, shape, silu};
  const int64_t channel_blocks = (shape.dim + kChannels - 1) / kChannels;
  const int64_t chunks = (shape.length + kChunk - 1) / kChunk;
  const int64_t tasks = shape.batch * channel_blocks * chunks;
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel num_threads(num_threads)
#endif
  {
    std::vector<float> scratch(scratch_size(shape.width));
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t t0 = task % chunks * kChunk, d0 = task / chunks % channel_blocks * kChannels;
      const int64_t b = task / chunks / channel_blocks;
      (bf16 ? forward_tile_bf16 : forward_tile_f32)(args, b, d0, t0, scratch.data());
    }
  }
}

void causal_conv1d_backward_cpu(const void* dout, Strides3 dout_strides, const void* x, Strides3 x_strides,
                                const float* weight, const float* bias, void* dx, float* dweight, float* dbias,
                                ConvShape shape, bool silu, int dtype, int num_threads) {
  check_width(shape.width);
  const bool bf16 = is_bf16(dtype);
  const ConvArgs args{x, x_strides, dout, dout_strides, weight, bias, dx, shape, silu};
  const int64_t channel_blocks = (shape.dim + kChannels - 1) / kChannels;
  (void)num_threads;
  // Threads own channel blocks, so each channel's weight and bias gradients have one summation order
  // whatever the thread count.
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp parallel num_threads(num_threads)
#endif
  {
    std::vector<float> scratch(scratch_size(shape.width));
    std::vector<double> sums(kChannels * (shape.width + 1));
#if defined(FASTLLM_WITH_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t block = 0; block < channel_blocks; ++block)
      (bf16 ? backward_block_bf16 : backward_block_f32)(args, block * kChannels, dweight, dbias, scratch.data(),
                                                        sums.data());
  }
}

}  // namespace fastllm
