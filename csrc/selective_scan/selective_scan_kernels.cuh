// Selective scan, CUDA device code (the launchers are in selective_scan_cuda.cu). Plain CUDA C++
// without launch syntax, so tests/cuda_emulator also runs it on the CPU.
//
// Lanes own states, not positions. A channel's N states are spread over `lanes` consecutive lanes,
// K each, and every lane walks L in order with its states in registers: no scan across lanes and
// one exp per (position, state). A block of kThreads lanes covers `channels` channels of one group;
// per tile of positions it stages delta', u and its group's B, C in shared memory, so global loads
// and stores run along L. Sums over a channel's states (y, and the backward's per-position terms)
// leave each lane as a share in shared memory, added up by the thread that writes the position.
//
// The forward saves the state at the end of every chunk of kCudaScanChunk positions. The backward
// walks the chunks in reverse: pass 1 recomputes, from the saved state, the state entering each tile
// of the chunk; pass 2 takes the tiles in reverse, recomputes their states in registers and runs the
// reverse recurrence. dB and dC are summed over the block's channels in shared memory and written as
// one partial per block (deterministic; the caller sums the partials).
#pragma once

#include <type_traits>

#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace scan_cuda {

constexpr int kThreads = 128;
// log2(e) in two parts: A log2(e) is kept as hi + lo, so delta A log2(e) rounds once.
constexpr float kLog2eHi = 1.44269502162933349609375f;
constexpr float kLog2eLo = 1.925962991126617468e-8f;

#if defined(__CUDACC__)
__device__ __forceinline__ float* dynamic_shared_floats() {
  extern __shared__ float4 dynamic_shared[];
  return reinterpret_cast<float*>(dynamic_shared);
}

// 2^x on the special-function unit; results below 2^-126 flush to 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

FASTLLM_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// States per lane: 4 up to N = 128 (so lanes <= 32), 8 above.
FASTLLM_HD int states_per_lane(int64_t nstate) { return nstate <= 32 * 4 ? 4 : 8; }

// How a block's lanes cover channels and states, for K states per lane.
template <int K>
struct Layout {
  // Positions per tile. The backward keeps the states of a whole tile in registers (kBackwardTile x K).
  static constexpr int kForwardTile = 64 / K;
  static constexpr int kBackwardTile = 32 / K;
  static_assert(kCudaScanChunk % kBackwardTile == 0 && kCudaScanChunk % kForwardTile == 0, "tiles split chunks");
  static constexpr int kTilesPerChunk = kCudaScanChunk / kBackwardTile;

  int lanes;     // per channel, a power of two <= 32
  int channels;  // per block
  int padded;    // lanes * K >= N: the states one channel's lanes hold

  FASTLLM_HD explicit Layout(int64_t nstate) : lanes(1) {
    while (lanes * K < nstate) lanes *= 2;
    channels = kThreads / lanes;
    padded = lanes * K;
  }
  FASTLLM_HD int64_t blocks_per_group(int64_t per_group) const { return (per_group + channels - 1) / channels; }
};

// The channels of block `block` of batch row `batch` (blocks never cross a group).
struct BlockChannels {
  int64_t batch, group, index_in_group, first;
  int count;
  int64_t first_row;  // offset of channel `first`'s row in (batch, dim, L) tensors
  int64_t bc_base;    // offset of the group's rows in (batch, groups, N, L) B and C

  template <int K>
  FASTLLM_HD BlockChannels(const ScanArgs& a, const Layout<K>& lay, int64_t block, int64_t batch) : batch(batch) {
    const int64_t per_group = a.dim / a.groups, blocks = lay.blocks_per_group(per_group);
    group = block / blocks;
    index_in_group = block % blocks;
    first = group * per_group + index_in_group * lay.channels;
    count = static_cast<int>(min64(lay.channels, per_group - index_in_group * lay.channels));
    first_row = (batch * a.dim + first) * a.length;
    bc_base = (batch * a.groups + group) * a.nstate * a.length;
  }
};

// The per-lane view: which channel and states this lane owns.
template <int K>
struct LaneStates {
  int channel;  // within the block
  int sub;      // which K states of the channel
  bool active;  // the channel exists (lanes of missing channels still take part in barriers and shuffles)
  int64_t d;    // global channel (clamped to the block's first for inactive lanes)

  __device__ LaneStates(const Layout<K>& lay, const BlockChannels& blk)
      : channel(threadIdx.x / lay.lanes), sub(threadIdx.x % lay.lanes) {
    active = channel < blk.count;
    d = blk.first + (active ? channel : 0);
  }
  __device__ int64_t state(int k) const { return int64_t(sub) * K + k; }
  __device__ bool owns(int k, int64_t nstate) const { return active && state(k) < nstate; }
};

// K consecutive floats from shared memory (16-byte aligned).
template <int K>
__device__ __forceinline__ void load_states(const float* p, float (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; k += 4) {
    const float4 x = *reinterpret_cast<const float4*>(p + k);
    v[k] = x.x, v[k + 1] = x.y, v[k + 2] = x.z, v[k + 3] = x.w;
  }
}

template <int K>
__device__ __forceinline__ void store_states(float* p, const float (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; k += 4) *reinterpret_cast<float4*>(p + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
}

// Calls f(channel, position) for every element of a channels x tile block of positions, consecutive
// lanes on consecutive positions.
template <typename F>
__device__ __forceinline__ void for_each_in_tile(int channels, int tile, F f) {
  for (int i = threadIdx.x; i < channels * tile; i += kThreads) f(i / tile, i % tile);
}

// B and C of positions [t0, t0 + len) into [position][padded] tiles, zero past N and len.
template <typename T, int K>
__device__ void stage_bc(const Layout<K>& lay, int tile, const T* b_rows, const T* c_rows, int64_t nstate,
                         int64_t length, int64_t t0, int len, float* sb, float* sc) {
  for (int i = threadIdx.x; i < lay.padded * tile; i += kThreads) {
    const int n = i / tile, t = i % tile;
    const bool in = n < nstate && t < len;
    sb[t * lay.padded + n] = in ? load_float(b_rows, n * length + t0 + t) : 0.0f;
    if (c_rows) sc[t * lay.padded + n] = in ? load_float(c_rows, n * length + t0 + t) : 0.0f;
  }
}

// A log2(e) as hi + lo per owned state (A = 0 for states past N: a no-op scan).
template <int K>
struct DecayRates {
  float hi[K], lo[K], a[K];

  __device__ DecayRates(const ScanArgs& args, const LaneStates<K>& lane) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      a[k] = lane.owns(k, args.nstate) ? args.A[lane.d * args.nstate + lane.state(k)] : 0.0f;
      hi[k] = a[k] * kLog2eHi;
      lo[k] = fmaf(a[k], kLog2eHi, -hi[k]) + a[k] * kLog2eLo;
    }
  }
  __device__ float decay(int k, float delta) const { return fast_exp2(fmaf(delta, hi[k], delta * lo[k])); }
};

// Shared memory of the forward, in floats, carved from the dynamic buffer.
template <int K>
struct ForwardShared {
  static constexpr int kTile = Layout<K>::kForwardTile, kPitch = kTile + 1;  // odd pitch: 8 channels, 8 banks
  float *delta, *u;  // per channel: delta', u
  float *y_part;     // [position][lane]: each lane's share of y, summed over a channel's lanes on output
  float *b, *c;      // [position][padded]

  FASTLLM_HD static int64_t floats(const Layout<K>& lay) {
    return 2 * lay.channels * kPitch + kTile * kThreads + 2 * kTile * lay.padded;
  }
  FASTLLM_HD ForwardShared(float* base, const Layout<K>& lay) {
    const int rows = lay.channels * kPitch;
    delta = base, u = delta + rows, y_part = u + rows;
    b = y_part + kTile * kThreads, c = b + kTile * lay.padded;
  }
};

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) scan_forward_kernel(const ScanArgs a, const ScanForwardOut o) {
  using Lay = Layout<K>;
  using Shared = ForwardShared<K>;
  constexpr int kTile = Shared::kTile, kPitch = Shared::kPitch;
  const Lay lay(a.nstate);
  const BlockChannels blk(a, lay, blockIdx.x, blockIdx.y);
  const LaneStates<K> lane(lay, blk);
  const DecayRates<K> rates(a, lane);
  const Shared sm(dynamic_shared_floats(), lay);
  const int64_t b = blk.batch, N = a.nstate, L = a.length, chunks = a.cuda_chunks();

  float h[K];
#pragma unroll
  for (int k = 0; k < K; ++k)
    h[k] = lane.owns(k, N) && a.initial_state ? a.initial_state[(b * a.dim + lane.d) * N + lane.state(k)] : 0.0f;

  for (int64_t t0 = 0; t0 < L; t0 += kTile) {
    const int len = static_cast<int>(min64(kTile, L - t0));
    __syncthreads();  // the previous tile's values are consumed
    for_each_in_tile(lay.channels, kTile, [&](int c, int t) {
      const bool in = c < blk.count && t < len;
      const int64_t at = blk.first_row + c * L + t0 + t;
      const float bias = in && a.delta_bias ? a.delta_bias[blk.first + c] : 0.0f;
      sm.delta[c * kPitch + t] = in ? ss_delta(load_float(static_cast<const T*>(a.delta), at), bias, a.softplus) : 0.0f;
      sm.u[c * kPitch + t] = in ? load_float(static_cast<const T*>(a.u), at) : 0.0f;
    });
    stage_bc<T, K>(lay, kTile, static_cast<const T*>(a.B) + blk.bc_base, static_cast<const T*>(a.C) + blk.bc_base, N, L,
                   t0, len, sm.b, sm.c);
    __syncthreads();

    for (int t = 0; t < len; ++t) {
      const float delta = sm.delta[lane.channel * kPitch + t], delta_u = delta * sm.u[lane.channel * kPitch + t];
      float bt[K], ct[K];
      load_states<K>(sm.b + t * lay.padded + lane.sub * K, bt);
      load_states<K>(sm.c + t * lay.padded + lane.sub * K, ct);
      float y = 0.0f;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        h[k] = fmaf(rates.decay(k, delta), h[k], delta_u * bt[k]);
        y = fmaf(ct[k], h[k], y);
      }
      sm.y_part[t * kThreads + threadIdx.x] = y;
    }
    const int64_t end = t0 + len;
    if (end % kCudaScanChunk == 0 || end == L) {
      float* saved = o.chunk_states + ((b * a.dim + lane.d) * chunks + (end - 1) / kCudaScanChunk) * N;
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (lane.owns(k, N)) saved[lane.state(k)] = h[k];
    }
    __syncthreads();
    const T* z = static_cast<const T*>(a.z);
    for_each_in_tile(blk.count, kTile, [&](int c, int t) {
      if (t >= len) return;
      const int64_t at = blk.first_row + c * L + t0 + t;
      const float d_skip = a.D ? a.D[blk.first + c] : 0.0f;
      const float zt = z ? load_float(z, at) : 0.0f;
      float y = 0.0f;
      for (int sub = 0; sub < lay.lanes; ++sub) y += sm.y_part[t * kThreads + c * lay.lanes + sub];
      store_float(static_cast<T*>(o.out), at, ss_output(y, sm.u[c * kPitch + t], d_skip, z, zt));
    });
  }
}

// Shared memory of the backward, in floats, carved from the dynamic buffer.
template <int K>
struct BackwardShared {
  static constexpr int kTile = Layout<K>::kBackwardTile, kPitch = kTile + 1;
  static constexpr int kReducePitch = kThreads * K + 4;  // + 4: the 8 positions of a warp's reads hit 8 bank groups
  float *delta, *u, *dy, *dsoftplus;  // staged per channel: delta', u, dL/dy, d delta' / d delta
  // [position][lane]: each lane's share of sum_n g B, sum_n g exp(delta A) h_{t-1} A and sum_n C h,
  // summed over a channel's lanes on output.
  float *grad_bu, *grad_delta_a, *y;
  float *d_skip_sum, *bias_sum;       // [channel][position in tile]: running sums of dL/dD, dL/d delta_bias
  float *b, *c;                       // [position][padded]
  float *reduce;                      // [position][kReducePitch]: each lane's dB or dC terms, at lane * K
  float *entry;                       // [tile of the chunk][kThreads * K]: the state entering each tile

  FASTLLM_HD static int64_t floats(const Layout<K>& lay) {
    return 4 * lay.channels * kPitch + 3 * kTile * kThreads + 2 * lay.channels * kTile + 2 * kTile * lay.padded +
           kTile * kReducePitch + Layout<K>::kTilesPerChunk * kThreads * K;
  }
  FASTLLM_HD BackwardShared(float* base, const Layout<K>& lay) {
    const int rows = lay.channels * kPitch, parts = kTile * kThreads, sums = lay.channels * kTile;
    delta = base, u = delta + rows, dy = u + rows, dsoftplus = dy + rows;
    grad_bu = dsoftplus + rows, grad_delta_a = grad_bu + parts, y = grad_delta_a + parts;
    d_skip_sum = y + parts, bias_sum = d_skip_sum + sums;
    b = bias_sum + sums, c = b + kTile * lay.padded;
    reduce = c + kTile * lay.padded, entry = reduce + kTile * kReducePitch;
  }
};

// Sum the lanes' terms in `reduce` over the block's channels, for states < N and positions < len, into
// this block's partial slice (already offset to position t0).
template <int K>
__device__ void sum_over_channels(const BackwardShared<K>& sm, const Layout<K>& lay, int count, int64_t nstate,
                                  int64_t length, int len, float* partial) {
  constexpr int kTile = BackwardShared<K>::kTile;
  for (int i = threadIdx.x; i < nstate * kTile; i += kThreads) {
    const int n = i / kTile, t = i % kTile;
    if (t >= len) continue;
    const float* row = sm.reduce + t * BackwardShared<K>::kReducePitch + n;
    float sum = 0.0f;
    for (int c = 0; c < count; ++c) sum += row[c * lay.padded];
    partial[n * length + t] = sum;
  }
}

// 4 blocks per SM: at most 128 registers, as many blocks as the shared memory (~53 KiB each) allows.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, 4) scan_backward_kernel(const ScanArgs a, const ScanBackwardArgs gr) {
  using Lay = Layout<K>;
  using Shared = BackwardShared<K>;
  constexpr int kTile = Lay::kBackwardTile, kPitch = Shared::kPitch;
  const Lay lay(a.nstate);
  const BlockChannels blk(a, lay, blockIdx.x, blockIdx.y);
  const LaneStates<K> lane(lay, blk);
  const DecayRates<K> rates(a, lane);
  const Shared sm(dynamic_shared_floats(), lay);
  const int64_t b = blk.batch, N = a.nstate, L = a.length, chunks = a.cuda_chunks(), bd = b * a.dim + lane.d;
  const T* b_rows = static_cast<const T*>(a.B) + blk.bc_base;
  const T* c_rows = static_cast<const T*>(a.C) + blk.bc_base;
  const T* z = static_cast<const T*>(a.z);
  const T* dout = static_cast<const T*>(gr.dout);
  // This block's slice of the (batch, groups, blocks per group, N, L) partial sums of dB and dC.
  const int64_t partial_base = (((b * a.groups + blk.group) * lay.blocks_per_group(a.dim / a.groups) +
                                 blk.index_in_group) * N) * L;
  float* my_entry = sm.entry + threadIdx.x * K;
  float* my_reduce = sm.reduce + threadIdx.x * K;

  // q[k] = dL/dh_t carried from t + 1 (times its decay); from the last state's gradient at the end.
  float q[K], dA[K] = {};
#pragma unroll
  for (int k = 0; k < K; ++k) q[k] = lane.owns(k, N) && gr.dlast_state ? gr.dlast_state[bd * N + lane.state(k)] : 0.0f;
  for (int i = threadIdx.x; i < lay.channels * kTile; i += kThreads) sm.d_skip_sum[i] = sm.bias_sum[i] = 0.0f;

  // Stage delta' and u (and, for pass 2, dL/dy and d delta'/d delta) of one tile.
  auto stage = [&](int64_t t0, int len, bool gradients) {
    for_each_in_tile(lay.channels, kTile, [&](int c, int t) {
      const bool in = c < blk.count && t < len;
      const int64_t at = blk.first_row + c * L + t0 + t;
      const int slot = c * kPitch + t;
      const float bias = in && a.delta_bias ? a.delta_bias[blk.first + c] : 0.0f;
      const float raw = in ? load_float(static_cast<const T*>(a.delta), at) : 0.0f;
      sm.delta[slot] = in ? ss_delta(raw, bias, a.softplus) : 0.0f;
      sm.u[slot] = in ? load_float(static_cast<const T*>(a.u), at) : 0.0f;
      if (!gradients) return;
      float dy = 0.0f, dz_unused;
      if (in) ss_output_grad(load_float(dout, at), 0.0f, 0.0f, 0.0f, z, z ? load_float(z, at) : 0.0f, dy, dz_unused);
      sm.dy[slot] = dy;
      sm.dsoftplus[slot] = in ? ss_delta_grad(raw, bias, a.softplus) : 0.0f;
    });
  };

  for (int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
    const int64_t c0 = chunk * kCudaScanChunk;
    const int tiles = static_cast<int>((min64(L, c0 + kCudaScanChunk) - c0 + kTile - 1) / kTile);

    // Pass 1: the state entering each tile of the chunk, from the state saved before the chunk.
    float h[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t n = lane.state(k);
      h[k] = !lane.owns(k, N)    ? 0.0f
             : chunk > 0         ? gr.chunk_states[(bd * chunks + chunk - 1) * N + n]
             : a.initial_state   ? a.initial_state[bd * N + n]
                                 : 0.0f;
    }
    for (int j = 0; j < tiles; ++j) {
      store_states<K>(my_entry + j * kThreads * K, h);
      if (j + 1 == tiles) break;
      const int64_t t0 = c0 + j * kTile;
      __syncthreads();
      stage(t0, kTile, false);  // every tile but the chunk's last is whole
      stage_bc<T, K>(lay, kTile, b_rows, static_cast<const T*>(nullptr), N, L, t0, kTile, sm.b, sm.c);
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const float delta = sm.delta[lane.channel * kPitch + t], delta_u = delta * sm.u[lane.channel * kPitch + t];
        float bt[K];
        load_states<K>(sm.b + t * lay.padded + lane.sub * K, bt);
#pragma unroll
        for (int k = 0; k < K; ++k) h[k] = fmaf(rates.decay(k, delta), h[k], delta_u * bt[k]);
      }
    }

    // Pass 2: the tiles in reverse.
    for (int j = tiles - 1; j >= 0; --j) {
      const int64_t t0 = c0 + j * kTile;
      const int len = static_cast<int>(min64(kTile, L - t0));
      __syncthreads();
      stage(t0, len, true);
      stage_bc<T, K>(lay, kTile, b_rows, c_rows, N, L, t0, len, sm.b, sm.c);
      __syncthreads();

      // The tile's states (hs[t] after position t), and the dC terms dL/dy_t h_t.
      float entry[K], hs[kTile][K];
      load_states<K>(my_entry + j * kThreads * K, entry);
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const int slot = lane.channel * kPitch + t;
        const float delta = sm.delta[slot], delta_u = delta * sm.u[slot], dy = sm.dy[slot];
        float bt[K], dc[K];
        load_states<K>(sm.b + t * lay.padded + lane.sub * K, bt);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          hs[t][k] = fmaf(rates.decay(k, delta), t > 0 ? hs[t - 1][k] : entry[k], delta_u * bt[k]);
          dc[k] = dy * hs[t][k];
        }
        store_states<K>(my_reduce + t * Shared::kReducePitch, dc);
      }
      __syncthreads();
      sum_over_channels<K>(sm, lay, blk.count, N, L, len, gr.dC + partial_base + t0);
      __syncthreads();

      // Reverse: g = dL/dh_t = C_t dy_t + q; q <- exp(delta_t A) g for position t - 1.
#pragma unroll
      for (int t = kTile - 1; t >= 0; --t) {
        if (t >= len) continue;
        const int slot = lane.channel * kPitch + t;
        const float delta = sm.delta[slot], u = sm.u[slot], dy = sm.dy[slot], delta_u = delta * u;
        float bt[K], ct[K], db[K];
        load_states<K>(sm.b + t * lay.padded + lane.sub * K, bt);
        load_states<K>(sm.c + t * lay.padded + lane.sub * K, ct);
        float grad_bu = 0.0f, grad_delta_a = 0.0f, y = 0.0f;  // sums over states of g B, g a h_{t-1} A, C h
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const float decay = rates.decay(k, delta);
          const float g = fmaf(ct[k], dy, q[k]);
          const float g_log_decay = g * decay * (t > 0 ? hs[t - 1][k] : entry[k]);  // dL / d(delta A)
          db[k] = g * delta_u;
          grad_bu = fmaf(g, bt[k], grad_bu);
          grad_delta_a = fmaf(g_log_decay, rates.a[k], grad_delta_a);
          dA[k] = fmaf(g_log_decay, delta, dA[k]);
          y = fmaf(ct[k], hs[t][k], y);
          q[k] = decay * g;
        }
        store_states<K>(my_reduce + t * Shared::kReducePitch, db);
        const int part = t * kThreads + threadIdx.x;
        sm.grad_bu[part] = grad_bu, sm.grad_delta_a[part] = grad_delta_a, sm.y[part] = y;
      }
      __syncthreads();
      sum_over_channels<K>(sm, lay, blk.count, N, L, len, gr.dB + partial_base + t0);
      // Per (channel, position), always by the same thread: the running sums need no atomics.
      for_each_in_tile(blk.count, kTile, [&](int c, int t) {
        if (t >= len) return;
        float grad_bu = 0.0f, grad_delta_a = 0.0f, y = 0.0f;
        for (int sub = 0; sub < lay.lanes; ++sub) {
          const int part = t * kThreads + c * lay.lanes + sub;
          grad_bu += sm.grad_bu[part], grad_delta_a += sm.grad_delta_a[part], y += sm.y[part];
        }
        const int64_t at = blk.first_row + c * L + t0 + t;
        const int slot = c * kPitch + t;
        const float delta = sm.delta[slot], u = sm.u[slot], dy = sm.dy[slot];
        const float d_skip = a.D ? a.D[blk.first + c] : 0.0f;
        const float ddelta = fmaf(u, grad_bu, grad_delta_a) * sm.dsoftplus[slot];
        store_float(static_cast<T*>(gr.du), at, fmaf(delta, grad_bu, d_skip * dy));
        store_float(static_cast<T*>(gr.ddelta), at, ddelta);
        sm.d_skip_sum[c * kTile + t] = fmaf(dy, u, sm.d_skip_sum[c * kTile + t]);
        sm.bias_sum[c * kTile + t] += ddelta;
        if (z) {
          float dy_unused, dz;
          ss_output_grad(load_float(dout, at), y, u, d_skip, true, load_float(z, at), dy_unused, dz);
          store_float(static_cast<T*>(gr.dz), at, dz);
        }
      });
    }
  }

#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!lane.owns(k, N)) continue;
    gr.dA_partial[bd * N + lane.state(k)] = dA[k];
    gr.dinitial_state[bd * N + lane.state(k)] = q[k];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < blk.count; c += kThreads) {
    float d_skip = 0.0f, bias = 0.0f;
    for (int t = 0; t < kTile; ++t) d_skip += sm.d_skip_sum[c * kTile + t], bias += sm.bias_sum[c * kTile + t];
    gr.dD_partial[b * a.dim + blk.first + c] = d_skip;
    gr.ddelta_bias_partial[b * a.dim + blk.first + c] = bias;
  }
}

// ---- launch configuration, shared by the launchers and tests/cuda_emulator ------------------------

inline int64_t tiles_per_group(int64_t per_group, int64_t nstate) {
  return states_per_lane(nstate) == 4 ? Layout<4>(nstate).blocks_per_group(per_group)
                                      : Layout<8>(nstate).blocks_per_group(per_group);
}

template <int K>
dim3 grid_of(const ScanArgs& a) {
  const int64_t blocks = a.groups * Layout<K>(a.nstate).blocks_per_group(a.dim / a.groups);
  if (a.batch > 65535) throw std::invalid_argument("selective_scan (CUDA): batch must be at most 65535");
  if (blocks > (int64_t(1) << 31) - 1) throw std::invalid_argument("selective_scan (CUDA): dim too large");
  return dim3{static_cast<unsigned>(blocks), static_cast<unsigned>(a.batch), 1};
}

// Calls pick(element, states per lane) with a value of the element type for the dtype code and an
// std::integral_constant K for N; nothing when there is no channel (a grid may not be empty).
template <typename Pick>
void with_instantiation(const ScanArgs& a, int dtype, Pick&& pick) {
  if (a.batch == 0 || a.dim == 0) return;
  auto by_states = [&](auto element) {
    if (states_per_lane(a.nstate) == 4) return pick(element, std::integral_constant<int, 4>{});
    pick(element, std::integral_constant<int, 8>{});
  };
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return by_states(float{});
    case DType::BFloat16: return by_states(bfloat16{});
    case DType::Float16: return by_states(float16{});
  }
  unsupported_dtypes("selective_scan", dtype, dtype);
}

// Calls launch(kernel, grid, shared bytes) with the forward kernel for the dtype code and N.
template <typename Launch>
void with_forward_kernel(const ScanArgs& a, int dtype, Launch&& launch) {
  with_instantiation(a, dtype, [&](auto element, auto states) {
    constexpr int K = decltype(states)::value;
    launch(scan_forward_kernel<decltype(element), K>, grid_of<K>(a),
           sizeof(float) * ForwardShared<K>::floats(Layout<K>(a.nstate)));
  });
}

// The same for the backward kernel.
template <typename Launch>
void with_backward_kernel(const ScanArgs& a, int dtype, Launch&& launch) {
  with_instantiation(a, dtype, [&](auto element, auto states) {
    constexpr int K = decltype(states)::value;
    launch(scan_backward_kernel<decltype(element), K>, grid_of<K>(a),
           sizeof(float) * BackwardShared<K>::floats(Layout<K>(a.nstate)));
  });
}

}  // namespace scan_cuda
}  // namespace fastllm
