// Selective scan on the CPU. One task is (batch row, tile of kCpuLanes channels of one group); the
// channels of a tile are SIMD lanes, so B and C (shared by the group) are scalars in the inner loop
// and exp is vectorised. Tasks are independent (OpenMP over batch x channel tiles); the backward
// writes dB/dC per tile and the caller sums the tiles, so no task waits for another.
#include <algorithm>
#include <vector>

#include "common/cpu_utils.h"
#include "selective_scan/selective_scan.h"

namespace fastllm {
namespace {

constexpr int W = kCpuLanes;


struct Tile {
  int64_t b, g, index, first_channel, lanes;
};

Tile tile_of(const ScanArgs& a, int64_t task) {
  const int64_t per_group = cpu_tiles_per_group(a.dim, a.groups);
  const int64_t channels_per_group = a.dim / a.groups;
  Tile t;
  t.b = task / (a.groups * per_group);
  t.g = (task / per_group) % a.groups;
  t.index = task % per_group;
  t.first_channel = t.g * channels_per_group + t.index * W;
  t.lanes = std::min<int64_t>(W, channels_per_group - t.index * W);
  return t;
}

// Per-position inputs of one chunk, [position][lane]; lanes past the tile stay zero (a no-op scan).
struct ChunkInputs {
  std::vector<float> delta, delta_u, u;
  explicit ChunkInputs(size_t n) : delta(n * W, 0.0f), delta_u(n * W, 0.0f), u(n * W, 0.0f) {}
};

// Per-position work runs along t for one channel (contiguous, vectorised), then is transposed.
template <typename T>
FASTLLM_ALWAYS_INLINE void load_chunk(const ScanArgs& a, const Tile& tile, int64_t t0, int64_t len, ChunkInputs& in) {
  const T* u = static_cast<const T*>(a.u);
  const T* delta = static_cast<const T*>(a.delta);
  float delta_row[kScanChunk], u_row[kScanChunk];
  for (int64_t lane = 0; lane < tile.lanes; ++lane) {
    const int64_t d = tile.first_channel + lane;
    const T* delta_in = delta + (tile.b * a.dim + d) * a.length + t0;
    const T* u_in = u + (tile.b * a.dim + d) * a.length + t0;
    const float bias = a.delta_bias ? a.delta_bias[d] : 0.0f;
    if (a.softplus) {
      for (int64_t t = 0; t < len; ++t) delta_row[t] = ss_softplus(load_float(delta_in, t) + bias);
    } else {
      for (int64_t t = 0; t < len; ++t) delta_row[t] = load_float(delta_in, t) + bias;
    }
    for (int64_t t = 0; t < len; ++t) u_row[t] = load_float(u_in, t);
    for (int64_t t = 0; t < len; ++t) {
      in.delta[t * W + lane] = delta_row[t];
      in.u[t * W + lane] = u_row[t];
      in.delta_u[t * W + lane] = delta_row[t] * u_row[t];
    }
  }
}

// out = (y + D u) silu(z) for one channel of the chunk, y and u read from the [position][lane] buffers.
template <typename T>
FASTLLM_ALWAYS_INLINE void store_outputs(const ScanArgs& a, const ChunkInputs& in, const float* y, int64_t lane, int64_t row,
                                  int64_t len, float d, T* out) {
  float y_row[kScanChunk], u_row[kScanChunk];
  for (int64_t t = 0; t < len; ++t) {
    y_row[t] = y[t * W + lane];
    u_row[t] = in.u[t * W + lane];
  }
  if (a.z) {
    const T* z = static_cast<const T*>(a.z) + row;
    for (int64_t t = 0; t < len; ++t) store_float(out + row, t, ss_output(y_row[t], u_row[t], d, true, load_float(z, t)));
  } else {
    for (int64_t t = 0; t < len; ++t) store_float(out + row, t, ss_output(y_row[t], u_row[t], d, false, 0.0f));
  }
}

// The scan of state n over one chunk from h (updated in place); y += C h; with kHistory, history
// gets every h. The lane loop is one SIMD vector; restrict keeps the state in a register.
template <bool kHistory, typename T>
FASTLLM_ALWAYS_INLINE void scan_state(const ChunkInputs& in, const float* __restrict a_n, const T* b_row, const T* c_row,
                               int64_t len, float* __restrict h, float* __restrict y, float* __restrict history) {
  const float* __restrict delta = in.delta.data();
  const float* __restrict delta_u = in.delta_u.data();
  float hv[W];
  for (int l = 0; l < W; ++l) hv[l] = h[l];
  for (int64_t t = 0; t < len; ++t) {
    const float bt = load_float(b_row, t), ct = load_float(c_row, t);
    for (int l = 0; l < W; ++l) {
      hv[l] = ss_step(hv[l], delta[t * W + l], a_n[l], delta_u[t * W + l], bt);
      y[t * W + l] += ct * hv[l];
      if (kHistory) history[t * W + l] = hv[l];
    }
  }
  for (int l = 0; l < W; ++l) h[l] = hv[l];
}

// The reverse pass of state n over one chunk. g = dL/dh_t = C_t dy_t + (carry from t + 1), and
// dL/dh_{t-1} = a_t g is carried on; dh holds the carry entering (from the next chunk) and leaving.
// history: slot 0 the state entering the chunk, slot t + 1 the state h_t.
template <typename T>
FASTLLM_ALWAYS_INLINE void reverse_state(const ChunkInputs& in, const float* __restrict a_n, const T* b_row, const T* c_row,
                                  int64_t len, const float* __restrict history, const float* __restrict dy,
                                  float* __restrict dh, float* __restrict dA_n, float* __restrict du,
                                  float* __restrict ddelta, float* __restrict dB_row, float* __restrict dC_row) {
  const float* __restrict delta = in.delta.data();
  const float* __restrict delta_u = in.delta_u.data();
  const float* __restrict u = in.u.data();
  float carry[W], dA_acc[W];
  for (int l = 0; l < W; ++l) {
    carry[l] = dh[l];
    dA_acc[l] = dA_n[l];
  }
  for (int64_t t = len - 1; t >= 0; --t) {
    const float bt = load_float(b_row, t), ct = load_float(c_row, t);
    const int64_t i = t * W;
    float db[W], dc[W];
    for (int l = 0; l < W; ++l) {
      const float g = carry[l] + ct * dy[i + l];
      const float decay = ss_exp(delta[i + l] * a_n[l]);
      const float g_log_decay = g * decay * history[i + l];  // dL/d(delta A), history[i] = h_{t-1}
      dc[l] = dy[i + l] * history[i + W + l];
      db[l] = g * delta_u[i + l];
      du[i + l] += g * delta[i + l] * bt;
      ddelta[i + l] += g * u[i + l] * bt + g_log_decay * a_n[l];
      dA_acc[l] += g_log_decay * delta[i + l];
      carry[l] = decay * g;
    }
    float db_sum = 0.0f, dc_sum = 0.0f;
    for (int l = 0; l < W; ++l) {
      db_sum += db[l];
      dc_sum += dc[l];
    }
    dB_row[t] = db_sum;
    dC_row[t] = dc_sum;
  }
  for (int l = 0; l < W; ++l) {
    dh[l] = carry[l];
    dA_n[l] = dA_acc[l];
  }
}

struct TileParams {
  std::vector<float> A;  // [n][lane]
  std::vector<float> h;  // [n][lane]
};

TileParams tile_params(const ScanArgs& a, const Tile& tile) {
  TileParams p{std::vector<float>(a.nstate * W, 0.0f), std::vector<float>(a.nstate * W, 0.0f)};
  for (int64_t lane = 0; lane < tile.lanes; ++lane) {
    const int64_t d = tile.first_channel + lane;
    for (int64_t n = 0; n < a.nstate; ++n) {
      p.A[n * W + lane] = a.A[d * a.nstate + n];
      if (a.initial_state) p.h[n * W + lane] = a.initial_state[(tile.b * a.dim + d) * a.nstate + n];
    }
  }
  return p;
}

template <typename T>
FASTLLM_ALWAYS_INLINE void forward_tile(const ScanArgs& a, const ScanForwardOut& o, const Tile& tile) {
  const int64_t N = a.nstate, L = a.length, chunks = a.cpu_chunks();
  T* out = static_cast<T*>(o.out);
  TileParams p = tile_params(a, tile);
  ChunkInputs in(kScanChunk);
  std::vector<float> y(kScanChunk * W);
  const int64_t bc_base = (tile.b * a.groups + tile.g) * N * L;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * kScanChunk, len = std::min<int64_t>(kScanChunk, L - t0);
    load_chunk<T>(a, tile, t0, len, in);
    std::fill(y.begin(), y.end(), 0.0f);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t row = bc_base + n * L + t0;
      scan_state<false>(in, &p.A[n * W], static_cast<const T*>(a.B) + row, static_cast<const T*>(a.C) + row, len,
                        &p.h[n * W], y.data(), nullptr);
    }
    for (int64_t lane = 0; lane < tile.lanes; ++lane) {
      const int64_t d = tile.first_channel + lane;
      store_outputs(a, in, y.data(), lane, (tile.b * a.dim + d) * L + t0, len, a.D ? a.D[d] : 0.0f, out);
      float* saved = o.chunk_states + ((tile.b * a.dim + d) * chunks + c) * N;
      for (int64_t n = 0; n < N; ++n) saved[n] = p.h[n * W + lane];
    }
  }
}

template <typename T>
FASTLLM_ALWAYS_INLINE void backward_tile(const ScanArgs& a, const ScanBackwardArgs& gr, const Tile& tile) {
  const int64_t N = a.nstate, L = a.length, chunks = a.cpu_chunks();
  const int64_t tiles = cpu_tiles_per_group(a.dim, a.groups);
  const T* z = static_cast<const T*>(a.z);
  const T* dout = static_cast<const T*>(gr.dout);
  const T* delta_raw = static_cast<const T*>(a.delta);
  TileParams p = tile_params(a, tile);
  std::vector<float> h0(N * W), dh(N * W, 0.0f), dA(N * W, 0.0f), dD(W, 0.0f), dbias(W, 0.0f);
  std::vector<float> history(N * (kScanChunk + 1) * W), y(kScanChunk * W), dy(kScanChunk * W);
  std::vector<float> du(kScanChunk * W), ddelta(kScanChunk * W);
  ChunkInputs in(kScanChunk);
  for (int64_t lane = 0; lane < tile.lanes; ++lane)
    if (gr.dlast_state)
      for (int64_t n = 0; n < N; ++n)
        dh[n * W + lane] = gr.dlast_state[(tile.b * a.dim + tile.first_channel + lane) * N + n];
  const int64_t bc_base = (tile.b * a.groups + tile.g) * N * L;
  const int64_t partial_base = ((tile.b * a.groups + tile.g) * tiles + tile.index) * N * L;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kScanChunk, len = std::min<int64_t>(kScanChunk, L - t0);
    load_chunk<T>(a, tile, t0, len, in);
    // The state entering the chunk: the initial state, or the one saved at the previous chunk's end.
    for (int64_t lane = 0; lane < tile.lanes; ++lane) {
      const int64_t d = tile.first_channel + lane;
      for (int64_t n = 0; n < N; ++n)
        h0[n * W + lane] = c == 0 ? p.h[n * W + lane] : gr.chunk_states[((tile.b * a.dim + d) * chunks + c - 1) * N + n];
    }
    std::fill(y.begin(), y.end(), 0.0f);
    for (int64_t n = 0; n < N; ++n) {
      float* hist = &history[n * (kScanChunk + 1) * W];  // slot 0: the entry state, slot t + 1: h_t
      std::copy(&h0[n * W], &h0[n * W] + W, hist);
      float h[W];
      std::copy(&h0[n * W], &h0[n * W] + W, h);
      const int64_t row = bc_base + n * L + t0;
      scan_state<true>(in, &p.A[n * W], static_cast<const T*>(a.B) + row, static_cast<const T*>(a.C) + row, len, h,
                       y.data(), hist + W);
    }
    std::fill(dy.begin(), dy.end(), 0.0f);
    std::fill(du.begin(), du.end(), 0.0f);
    std::fill(ddelta.begin(), ddelta.end(), 0.0f);
    for (int64_t lane = 0; lane < tile.lanes; ++lane) {
      const int64_t d = tile.first_channel + lane;
      const int64_t row = (tile.b * a.dim + d) * L + t0;
      const float dd = a.D ? a.D[d] : 0.0f;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t i = t * W + lane;
        float g_y, g_z;
        ss_output_grad(load_float(dout, row + t), y[i], in.u[i], dd, z != nullptr, z ? load_float(z, row + t) : 0.0f,
                       g_y, g_z);
        if (z) store_float(static_cast<T*>(gr.dz), row + t, g_z);
        dy[i] = g_y;
        du[i] = g_y * dd;
        dD[lane] += g_y * in.u[i];
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      const int64_t row = bc_base + n * L + t0;
      reverse_state(in, &p.A[n * W], static_cast<const T*>(a.B) + row, static_cast<const T*>(a.C) + row, len,
                    &history[n * (kScanChunk + 1) * W], dy.data(), &dh[n * W], &dA[n * W], du.data(), ddelta.data(),
                    gr.dB + partial_base + n * L + t0, gr.dC + partial_base + n * L + t0);
    }
    for (int64_t lane = 0; lane < tile.lanes; ++lane) {
      const int64_t d = tile.first_channel + lane;
      const int64_t row = (tile.b * a.dim + d) * L + t0;
      const float bias = a.delta_bias ? a.delta_bias[d] : 0.0f;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t i = t * W + lane;
        const float g_delta = ddelta[i] * ss_delta_grad(load_float(delta_raw, row + t), bias, a.softplus);
        store_float(static_cast<T*>(gr.du), row + t, du[i]);
        store_float(static_cast<T*>(gr.ddelta), row + t, g_delta);
        dbias[lane] += g_delta;
      }
    }
  }
  for (int64_t lane = 0; lane < tile.lanes; ++lane) {
    const int64_t d = tile.first_channel + lane, bd = tile.b * a.dim + d;
    for (int64_t n = 0; n < N; ++n) {
      gr.dA_partial[bd * N + n] = dA[n * W + lane];
      gr.dinitial_state[bd * N + n] = dh[n * W + lane];
    }
    gr.dD_partial[bd] = dD[lane];
    gr.ddelta_bias_partial[bd] = dbias[lane];
  }
}

// The tile loops, compiled per instruction set (common/cpu_utils.h) with everything they call inlined.
#define FASTLLM_SCAN_TILES(SUFFIX, T)                                                                     \
  FASTLLM_CPU_CLONES void forward_tile_##SUFFIX(const ScanArgs& a, const ScanForwardOut& o, const Tile& t) {   \
    forward_tile<T>(a, o, t);                                                                             \
  }                                                                                                       \
  FASTLLM_CPU_CLONES void backward_tile_##SUFFIX(const ScanArgs& a, const ScanBackwardArgs& g, const Tile& t) { \
    backward_tile<T>(a, g, t);                                                                            \
  }
FASTLLM_SCAN_TILES(f32, float)
FASTLLM_SCAN_TILES(bf16, bfloat16)
FASTLLM_SCAN_TILES(f16, float16)
#undef FASTLLM_SCAN_TILES

template <typename Fn>
void for_each_tile(const ScanArgs& a, int num_threads, Fn fn) {
  const int64_t tasks = a.batch * a.groups * cpu_tiles_per_group(a.dim, a.groups);
  (void)num_threads;
#if defined(FASTLLM_WITH_OPENMP)
  // Small scans stay on one thread: waking a team costs tens of microseconds, milliseconds on a
  // busy machine.
  const bool parallel = a.batch * a.dim * a.length * a.nstate >= (int64_t(1) << 18);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (parallel)
#endif
  for (int64_t task = 0; task < tasks; ++task) fn(tile_of(a, task));
}

}  // namespace

void selective_scan_fwd_cpu(const ScanArgs& args, const ScanForwardOut& out, int dtype, int num_threads) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return for_each_tile(args, num_threads, [&](const Tile& t) { forward_tile_f32(args, out, t); });
    case DType::BFloat16: return for_each_tile(args, num_threads, [&](const Tile& t) { forward_tile_bf16(args, out, t); });
    case DType::Float16: return for_each_tile(args, num_threads, [&](const Tile& t) { forward_tile_f16(args, out, t); });
  }
  unsupported_dtypes("selective_scan", dtype, dtype);
}

void selective_scan_bwd_cpu(const ScanArgs& args, const ScanBackwardArgs& grads, int dtype, int num_threads) {
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return for_each_tile(args, num_threads, [&](const Tile& t) { backward_tile_f32(args, grads, t); });
    case DType::BFloat16: return for_each_tile(args, num_threads, [&](const Tile& t) { backward_tile_bf16(args, grads, t); });
    case DType::Float16: return for_each_tile(args, num_threads, [&](const Tile& t) { backward_tile_f16(args, grads, t); });
  }
  unsupported_dtypes("selective_scan", dtype, dtype);
}

}  // namespace fastllm
