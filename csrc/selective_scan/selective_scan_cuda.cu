// Selective scan on CUDA: one warp per (batch row, channel), kWarps channels per block.
// A chunk of kScanChunk positions is spread over the warp, kItems consecutive positions per lane.
// For each state n, every lane folds its positions into one affine map h -> a h + b, a warp scan
// (shuffles) composes the maps, and each lane replays its positions from its entry state; the state
// leaving the chunk is carried (in shared memory) to the next chunk. The forward saves it per chunk;
// the backward walks chunks in reverse with the mirrored scan for dL/dh and recomputes the states of
// the chunk from the saved state before it. Per-position math comes from selective_scan.h.
#include "common/cuda_utils.h"
#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace {

constexpr int kItems = kScanChunk / 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kThreads == kScanChunk, "the backward's dB/dC reduction maps one thread to one position");

// Inclusive scan of affine maps over the lanes, earlier lanes applied first.
__device__ __forceinline__ void scan_maps_forward(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float prev_a = __shfl_up_sync(kFullMask, a, offset);
    const float prev_b = __shfl_up_sync(kFullMask, b, offset);
    if (lane >= offset) {
      b = a * prev_b + b;
      a = a * prev_a;
    }
  }
}

// The same, later lanes applied first (for the reverse-time recurrence of the backward).
__device__ __forceinline__ void scan_maps_reverse(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const float next_a = __shfl_down_sync(kFullMask, a, offset);
    const float next_b = __shfl_down_sync(kFullMask, b, offset);
    if (lane + offset < 32) {
      b = a * next_b + b;
      a = a * next_a;
    }
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Per-position inputs of one lane's kItems positions; positions past L are a no-op (delta = 0).
template <typename T>
struct LaneInputs {
  float delta[kItems], delta_u[kItems], u[kItems];

  __device__ void load(const ScanArgs& a, int64_t row, int64_t first, float bias) {
    const T* u_in = static_cast<const T*>(a.u);
    const T* delta_in = static_cast<const T*>(a.delta);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = first + k;
      const bool valid = t < a.length;
      delta[k] = valid ? ss_delta(load_float(delta_in, row + t), bias, a.softplus) : 0.0f;
      u[k] = valid ? load_float(u_in, row + t) : 0.0f;
      delta_u[k] = delta[k] * u[k];
    }
  }
};

// State n over one lane's positions: the decays and drives, and the lane's composed map.
struct LaneMaps {
  float decay[kItems], drive[kItems];
  float a, b;  // h_out = a h_in + b
};

template <typename T>
__device__ __forceinline__ void lane_maps(const LaneInputs<T>& in, float a_n, const T* b_row, int64_t first,
                                          int64_t length, LaneMaps& m) {
  m.a = 1.0f;
  m.b = 0.0f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const float bt = first + k < length ? load_float(b_row, first + k) : 0.0f;
    m.decay[k] = ss_exp(in.delta[k] * a_n);
    m.drive[k] = in.delta_u[k] * bt;
    m.a = m.decay[k] * m.a;
    m.b = m.decay[k] * m.b + m.drive[k];
  }
}

// The state entering each lane's first position, given the state entering the chunk.
__device__ __forceinline__ float lane_entry_state(LaneMaps m, float chunk_entry, int lane) {
  scan_maps_forward(m.a, m.b, lane);
  float a = __shfl_up_sync(kFullMask, m.a, 1), b = __shfl_up_sync(kFullMask, m.b, 1);
  if (lane == 0) a = 1.0f, b = 0.0f;
  return a * chunk_entry + b;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scan_forward_kernel(const ScanArgs a, const ScanForwardOut o) {
  extern __shared__ float shared[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y, d = int64_t(blockIdx.x) * kWarps + warp;
  if (d >= a.dim) return;  // no block-wide synchronisation below
  const int64_t N = a.nstate, L = a.length, chunks = a.num_chunks();
  const int64_t g = d / (a.dim / a.groups);
  const int64_t row = (b * a.dim + d) * L, bc_base = (b * a.groups + g) * N * L;
  const float bias = a.delta_bias ? a.delta_bias[d] : 0.0f, dd = a.D ? a.D[d] : 0.0f;
  const T* z = static_cast<const T*>(a.z);
  float* carry = shared + warp * N;  // every lane writes the same value and reads back its own write
  for (int64_t n = 0; n < N; ++n) carry[n] = a.initial_state ? a.initial_state[(b * a.dim + d) * N + n] : 0.0f;

  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = c * kScanChunk + lane * kItems;
    LaneInputs<T> in;
    in.load(a, row, first, bias);
    float y[kItems] = {};
    for (int64_t n = 0; n < N; ++n) {
      LaneMaps m;
      lane_maps(in, a.A[d * N + n], static_cast<const T*>(a.B) + bc_base + n * L, first, L, m);
      float h = lane_entry_state(m, carry[n], lane);
      const T* c_row = static_cast<const T*>(a.C) + bc_base + n * L;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        h = m.decay[k] * h + m.drive[k];
        if (first + k < L) y[k] += load_float(c_row, first + k) * h;
      }
      const float leaving = __shfl_sync(kFullMask, h, 31);
      carry[n] = leaving;
      if (lane == 0) o.chunk_states[((b * a.dim + d) * chunks + c) * N + n] = leaving;
    }
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = first + k;
      if (t < L)
        store_float(static_cast<T*>(o.out), row + t,
                    ss_output(y[k], in.u[k], dd, z != nullptr, z ? load_float(z, row + t) : 0.0f));
    }
  }
}

// Shared memory of the backward: per warp the dL/dh carry and dA for every state (dynamic), and the
// per-position dB, dC of every warp for the block's reduction.
struct BackwardShared {
  float dB[kWarps][kScanChunk];
  float dC[kWarps][kScanChunk];
};

template <typename T>
__global__ void __launch_bounds__(kThreads) scan_backward_kernel(const ScanArgs a, const ScanBackwardArgs gr) {
  extern __shared__ float shared[];
  __shared__ BackwardShared red;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y, d0 = int64_t(blockIdx.x) * kWarps, d = d0 + warp;
  const bool active = d < a.dim;  // inactive warps still take part in the block's reductions
  const int64_t N = a.nstate, L = a.length, chunks = a.num_chunks();
  const int64_t per_group = a.dim / a.groups, g = (active ? d : d0) / per_group;
  const int64_t row = (b * a.dim + d) * L, bc_base = (b * a.groups + g) * N * L;
  const float bias = active && a.delta_bias ? a.delta_bias[d] : 0.0f;
  const float dd = active && a.D ? a.D[d] : 0.0f;
  const T* z = static_cast<const T*>(a.z);
  const T* dout = static_cast<const T*>(gr.dout);
  const T* delta_raw = static_cast<const T*>(a.delta);
  float* dh_carry = shared + warp * N;
  float* dA_sum = shared + (kWarps + warp) * N;
  for (int64_t n = 0; n < N; ++n) {
    dh_carry[n] = active && gr.dlast_state ? gr.dlast_state[(b * a.dim + d) * N + n] : 0.0f;
    dA_sum[n] = 0.0f;
  }
  float dD_lane = 0.0f, dbias_lane = 0.0f;

  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t first = c * kScanChunk + lane * kItems;
    LaneInputs<T> in;
    float dy[kItems], du[kItems], ddelta[kItems], y[kItems] = {};
    if (active) in.load(a, row, first, bias);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t t = first + k;
      const bool valid = active && t < L;
      if (!active) in.delta[k] = in.delta_u[k] = in.u[k] = 0.0f;
      float g_z;
      ss_output_grad(valid ? load_float(dout, row + t) : 0.0f, 0.0f, in.u[k], dd, z != nullptr,
                     valid && z ? load_float(z, row + t) : 0.0f, dy[k], g_z);
      du[k] = dy[k] * dd;
      ddelta[k] = 0.0f;
    }
    for (int64_t n = 0; n < N; ++n) {
      const float a_n = active ? a.A[d * N + n] : 0.0f;
      const T* b_row = static_cast<const T*>(a.B) + bc_base + n * L;
      const T* c_row = static_cast<const T*>(a.C) + bc_base + n * L;
      float bt[kItems], ct[kItems], h[kItems];
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const bool valid = first + k < L;
        bt[k] = valid ? load_float(b_row, first + k) : 0.0f;
        ct[k] = valid ? load_float(c_row, first + k) : 0.0f;
      }
      // Forward: the states of the chunk, from the state saved before it.
      LaneMaps m;
      lane_maps(in, a_n, b_row, first, L, m);
      float chunk_entry = 0.0f;
      if (active)
        chunk_entry = c > 0 ? gr.chunk_states[((b * a.dim + d) * chunks + c - 1) * N + n]
                            : (a.initial_state ? a.initial_state[(b * a.dim + d) * N + n] : 0.0f);
      const float entry = lane_entry_state(m, chunk_entry, lane);
      float state = entry;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        state = m.decay[k] * state + m.drive[k];
        h[k] = state;
        y[k] += ct[k] * state;
      }
      // Reverse: q_t = dL/dh_{t-1} = a_t (C_t dy_t + q_{t+1}), composed per lane then over the warp.
      float qa = 1.0f, qb = 0.0f;
#pragma unroll
      for (int k = kItems - 1; k >= 0; --k) {
        qb = m.decay[k] * (ct[k] * dy[k] + qb);
        qa = m.decay[k] * qa;
      }
      scan_maps_reverse(qa, qb, lane);
      float next_a = __shfl_down_sync(kFullMask, qa, 1), next_b = __shfl_down_sync(kFullMask, qb, 1);
      if (lane == 31) next_a = 1.0f, next_b = 0.0f;
      float q = next_a * dh_carry[n] + next_b;
      float dA_lane = 0.0f;
#pragma unroll
      for (int k = kItems - 1; k >= 0; --k) {
        const float grad_h = ct[k] * dy[k] + q;
        const float h_prev = k > 0 ? h[k - 1] : entry;
        const float grad_log_decay = grad_h * m.decay[k] * h_prev;  // d/d(delta A)
        red.dB[warp][lane * kItems + k] = grad_h * in.delta_u[k];
        red.dC[warp][lane * kItems + k] = dy[k] * h[k];
        du[k] += grad_h * in.delta[k] * bt[k];
        ddelta[k] += grad_h * in.u[k] * bt[k] + grad_log_decay * a_n;
        dA_lane += grad_log_decay * in.delta[k];
        q = m.decay[k] * grad_h;
      }
      dh_carry[n] = __shfl_sync(kFullMask, q, 0);
      const float dA_warp = warp_sum(dA_lane);
      if (lane == 0) dA_sum[n] += dA_warp;
      // dB, dC: sum the block's warps per group, then one atomic add per group and position.
      __syncthreads();
      const int64_t t = c * kScanChunk + threadIdx.x;
      if (t < L) {
        float sum_b = 0.0f, sum_c = 0.0f;
        for (int w = 0; w < kWarps && d0 + w < a.dim; ++w) {
          sum_b += red.dB[w][threadIdx.x];
          sum_c += red.dC[w][threadIdx.x];
          const int64_t group = (d0 + w) / per_group;
          if (w + 1 == kWarps || d0 + w + 1 >= a.dim || (d0 + w + 1) / per_group != group) {
            const int64_t at = ((b * a.groups + group) * N + n) * L + t;
            atomicAdd(gr.dB + at, sum_b);
            atomicAdd(gr.dC + at, sum_c);
            sum_b = sum_c = 0.0f;
          }
        }
      }
      __syncthreads();
    }
    if (active) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int64_t t = first + k;
        if (t >= L) continue;
        if (z) {
          float g_y, g_z;
          ss_output_grad(load_float(dout, row + t), y[k], in.u[k], dd, true, load_float(z, row + t), g_y, g_z);
          store_float(static_cast<T*>(gr.dz), row + t, g_z);
        }
        const float g_delta = ddelta[k] * ss_delta_grad(load_float(delta_raw, row + t), bias, a.softplus);
        store_float(static_cast<T*>(gr.du), row + t, du[k]);
        store_float(static_cast<T*>(gr.ddelta), row + t, g_delta);
        dD_lane += dy[k] * in.u[k];
        dbias_lane += g_delta;
      }
    }
  }
  const float dD_warp = warp_sum(dD_lane), dbias_warp = warp_sum(dbias_lane);
  if (!active) return;
  const int64_t bd = b * a.dim + d;
  for (int64_t n = lane; n < N; n += 32) {
    gr.dA_partial[bd * N + n] = dA_sum[n];
    gr.dinitial_state[bd * N + n] = dh_carry[n];
  }
  if (lane == 0) {
    gr.dD_partial[bd] = dD_warp;
    gr.ddelta_bias_partial[bd] = dbias_warp;
  }
}

dim3 grid_of(const ScanArgs& a) {
  if (a.batch > 65535) throw std::invalid_argument("selective_scan (CUDA): batch must be at most 65535");
  return dim3(static_cast<unsigned>((a.dim + kWarps - 1) / kWarps), static_cast<unsigned>(a.batch));
}

template <typename T>
void launch_forward(const ScanArgs& a, const ScanForwardOut& o, cudaStream_t stream) {
  const size_t shared = size_t(kWarps) * a.nstate * sizeof(float);
  scan_forward_kernel<T><<<grid_of(a), kThreads, shared, stream>>>(a, o);
  check_cuda(cudaGetLastError(), "selective_scan forward launch");
}

template <typename T>
void launch_backward(const ScanArgs& a, const ScanBackwardArgs& g, cudaStream_t stream) {
  const size_t shared = size_t(2 * kWarps) * a.nstate * sizeof(float);
  scan_backward_kernel<T><<<grid_of(a), kThreads, shared, stream>>>(a, g);
  check_cuda(cudaGetLastError(), "selective_scan backward launch");
}

}  // namespace

void selective_scan_fwd_cuda(const ScanArgs& args, const ScanForwardOut& out, int dtype, int device,
                             uintptr_t stream_handle) {
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return launch_forward<float>(args, out, stream);
    case DType::BFloat16: return launch_forward<bfloat16>(args, out, stream);
    case DType::Float16: return launch_forward<float16>(args, out, stream);
  }
  unsupported_dtypes("selective_scan", dtype, dtype);
}

void selective_scan_bwd_cuda(const ScanArgs& args, const ScanBackwardArgs& grads, int dtype, int device,
                             uintptr_t stream_handle) {
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return launch_backward<float>(args, grads, stream);
    case DType::BFloat16: return launch_backward<bfloat16>(args, grads, stream);
    case DType::Float16: return launch_backward<float16>(args, grads, stream);
  }
  unsupported_dtypes("selective_scan", dtype, dtype);
}

}  // namespace fastllm
