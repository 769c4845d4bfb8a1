// Selective scan, CUDA device code (the launchers are in selective_scan_cuda.cu). Plain CUDA C++
// without launch syntax, so tests/cuda_emulator also runs it on the CPU.
//
// Lanes own states, not positions. A channel's N states are spread over LANES consecutive lanes, K
// each, and every lane walks L in order with its states in registers: no scan across lanes and one
// exp per (position, state). A block of kThreads lanes covers kThreads / LANES channels of one group.
// K and LANES are template parameters, so every index below is a compile-time shift or mask.
//
// L is walked in tiles. Each thread loads its share of the next tile's inputs into registers while
// the block works on the current one (in vectors of up to 16 bytes where L and the inputs' alignment
// allow): all of a tile's loads are in flight together, and their latency overlaps the arithmetic
// instead of following it. At the top of a tile the loaded values go, with delta' and the other
// per-position factors computed once, into shared memory, where the lanes read them in position order.
// Sums over a channel's states (y, and the backward's per-position terms) leave each lane as a share
// in shared memory, added up by the thread that writes the position.
//
// The forward saves the state at the end of every chunk of kCudaScanChunk positions. The backward
// walks the chunks in reverse: pass 1 recomputes, from the saved state, the state entering each tile
// of the chunk; pass 2 takes the tiles in reverse, recomputes their states in registers and runs the
// reverse recurrence. dB and dC are summed over the block's channels in shared memory and written as
// one partial per block (deterministic; the caller sums the partials).
#pragma once

#include <type_traits>

#include "common/pack.h"
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
#endif

FASTLLM_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int min_int(int a, int b) { return a < b ? a : b; }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

// States per lane: 4 up to N = 128 (so LANES <= 32), 8 above.
FASTLLM_HD int states_per_lane(int64_t nstate) { return nstate <= 32 * 4 ? 4 : 8; }
FASTLLM_HD int lanes_per_channel(int64_t nstate) {
  int lanes = 1;
  while (lanes * states_per_lane(nstate) < nstate) lanes *= 2;
  return lanes;
}

// How a block's lanes cover channels and states: K states per lane, LANES lanes per channel.
template <int K, int LANES>
struct Layout {
  static constexpr int kStates = K, kLanes = LANES;
  static constexpr int kChannels = kThreads / LANES;  // per block
  static constexpr int kPadded = K * LANES;           // the states a channel's lanes hold, >= N
  // Positions per forward tile: at most 8 values per thread of each staged input, and at most 32.
  static constexpr int kForwardTile = min_int(32, min_int(8 * LANES, 8 * kThreads / kPadded));
  // The backward keeps the states of a whole tile in registers (kBackwardTile x K).
  static constexpr int kBackwardTile = 32 / K;
  static constexpr int kTilesPerChunk = kCudaScanChunk / kBackwardTile;
  static_assert(kCudaScanChunk % kForwardTile == 0 && kCudaScanChunk % kBackwardTile == 0, "tiles split chunks");

  FASTLLM_HD static int64_t blocks_per_group(int64_t per_group) { return (per_group + kChannels - 1) / kChannels; }
};

// One thread's share of a kRows x kTile tile (rows: channels or states, along L in memory), in vectors of
// kWidth consecutive positions: vector threadIdx.x + r kThreads is (row, first position) =
// (that / vectors per row, that % vectors per row * kWidth), so consecutive threads take consecutive
// vectors of a row, and a thread's positions are the same for every r.
template <int kRows, int kTile, int kVectorWidth = 1>
struct TileShare {
  static constexpr int kWidth = kVectorWidth, kVectorsPerRow = kTile / kWidth;
  static_assert(kTile % kWidth == 0 && kThreads % kVectorsPerRow == 0,
                "a tile row never straddles a thread's vectors");
  static constexpr int kPerThread = (kRows * kVectorsPerRow + kThreads - 1) / kThreads;
  __device__ static int position() { return threadIdx.x % kVectorsPerRow * kWidth; }
  __device__ static int row(int r) { return threadIdx.x / kVectorsPerRow + r * (kThreads / kVectorsPerRow); }
};

// Positions per global load of a kRows x kTile tile of T: one access of up to 16 bytes per thread when
// kVectorized (the launcher checks that L and every row's address allow it), at most the tile's width,
// and no wider than needed for every thread to hold one (the staging math is spread over all threads).
template <typename T, int kRows, int kTile, bool kVectorized>
constexpr int load_width() {
  return kVectorized ? min_int(min_int(16 / int(sizeof(T)), kTile), max_int(1, kRows * kTile / kThreads)) : 1;
}

// kWidth consecutive elements p[at ..] as floats (0 where !in); p + at is kWidth-element aligned.
template <int kWidth, typename T>
__device__ __forceinline__ void load_floats(const T* p, int64_t at, bool in, float (&out)[kWidth]) {
  Pack<T, kWidth> x{};
  if (in) x = load_pack<T, kWidth>(p + at);
#pragma unroll
  for (int j = 0; j < kWidth; ++j) out[j] = load_float(x.v, j);  // zero bits are 0 in every type
}

// The channels of block `block` of batch row `batch` (blocks never cross a group).
struct BlockChannels {
  int64_t batch, group, index_in_group, first;
  int count;
  int64_t first_row;  // offset of channel `first`'s row in (batch, dim, L) tensors
  int64_t bc_base;    // offset of the group's rows in (batch, groups, N, L) B and C

  template <typename Lay>
  FASTLLM_HD BlockChannels(const ScanArgs& a, Lay, int64_t block, int64_t batch) : batch(batch) {
    const int64_t per_group = a.dim / a.groups, blocks = Lay::blocks_per_group(per_group);
    group = block / blocks;
    index_in_group = block % blocks;
    first = group * per_group + index_in_group * Lay::kChannels;
    count = static_cast<int>(min64(Lay::kChannels, per_group - index_in_group * Lay::kChannels));
    first_row = (batch * a.dim + first) * a.length;
    bc_base = (batch * a.groups + group) * a.nstate * a.length;
  }
};

// The per-lane view: which channel and states this lane owns.
template <typename Lay>
struct LaneStates {
  static constexpr int K = Lay::kStates;
  int channel;  // within the block
  int sub;      // which K states of the channel
  bool active;  // the channel exists (lanes of missing channels still take part in barriers)
  int64_t d;    // global channel (clamped to the block's first for inactive lanes)

  __device__ LaneStates(const BlockChannels& blk) : channel(threadIdx.x / Lay::kLanes), sub(threadIdx.x % Lay::kLanes) {
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

// A log2(e) as hi + lo per owned state (A = 0 for states past N: a no-op scan).
template <int K>
struct DecayRates {
  float hi[K], lo[K], a[K];

  template <typename Lane>
  __device__ DecayRates(const ScanArgs& args, const Lane& lane) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      a[k] = lane.owns(k, args.nstate) ? args.A[lane.d * args.nstate + lane.state(k)] : 0.0f;
      hi[k] = a[k] * kLog2eHi;
      lo[k] = fmaf(a[k], kLog2eHi, -hi[k]) + a[k] * kLog2eLo;
    }
  }
  __device__ float decay(int k, float delta) const { return fast_exp2(fmaf(delta, hi[k], delta * lo[k])); }
};

// What a lane reads from the staged tile at one position: delta', delta' u, its K values of B and, with
// kC, of C, and with kDy the backward's dL/dy. The forward reads each position one step ahead of its
// use: it stores its share of y at every position, and the compiler may not move a shared load above
// a shared store, so reading in place waited out every position's loads. The backward reads in place:
// it already holds a tile of states at the 128-register cap, and a second position made it spill.
template <int K>
struct Position {
  float delta, delta_u, dy, b[K], c[K];
};

template <bool kC, bool kDy, int K, typename Shared>
__device__ __forceinline__ Position<K> read_position(const Shared& sm, int channel_row, int lane_states, int t) {
  Position<K> p;
  p.delta = sm.delta[channel_row + t];
  p.delta_u = p.delta * sm.u[channel_row + t];
  if constexpr (kDy) p.dy = sm.dy[channel_row + t];
  load_states<K>(sm.b + t * Shared::kBcPitch + lane_states, p.b);
  if constexpr (kC) load_states<K>(sm.c + t * Shared::kBcPitch + lane_states, p.c);
  return p;
}

// The inputs of one tile in registers, from their loads to their staging. Elements outside the tile
// (missing channels, positions past L, states past N) load as 0.
template <typename T, typename Lay, int kTile, bool kVectorized>
struct TileInputs {
  // per channel: delta, u, z, dL/dout; per state: B, C
  using Rows = TileShare<Lay::kChannels, kTile, load_width<T, Lay::kChannels, kTile, kVectorized>()>;
  using States = TileShare<Lay::kPadded, kTile, load_width<T, Lay::kPadded, kTile, kVectorized>()>;
  static constexpr int kRowWidth = Rows::kWidth, kStateWidth = States::kWidth;
  float delta[Rows::kPerThread][kRowWidth], u[Rows::kPerThread][kRowWidth], z[Rows::kPerThread][kRowWidth];
  float dout[Rows::kPerThread][kRowWidth];
  float b[States::kPerThread][kStateWidth], c[States::kPerThread][kStateWidth];

  // Loads delta, u and B at positions t0 .. before `end` (<= L); C and z too for `outputs` (the forward,
  // the backward's pass 2), and dL/dout where dout_rows is given. A vector lies wholly before `end` or
  // wholly past it (end is L or a multiple of 8, and L % width == 0).
  __device__ void load(const ScanArgs& a, const void* dout_rows, const BlockChannels& blk, int64_t t0, int64_t end,
                       bool outputs) {
    const bool rows_in_time = t0 + Rows::position() < end;
#pragma unroll
    for (int r = 0; r < Rows::kPerThread; ++r) {
      const int row = Rows::row(r);
      const bool in = rows_in_time && row < blk.count;
      const int64_t at = blk.first_row + row * a.length + t0 + Rows::position();
      load_floats(static_cast<const T*>(a.delta), at, in, delta[r]);
      load_floats(static_cast<const T*>(a.u), at, in, u[r]);
      load_floats(static_cast<const T*>(a.z), at, in && outputs && a.z, z[r]);
      load_floats(static_cast<const T*>(dout_rows), at, in && dout_rows, dout[r]);
    }
    const bool states_in_time = t0 + States::position() < end;
#pragma unroll
    for (int r = 0; r < States::kPerThread; ++r) {
      const int n = States::row(r);
      const bool in = states_in_time && n < a.nstate;
      const int64_t at = blk.bc_base + n * a.length + t0 + States::position();
      load_floats(static_cast<const T*>(a.B), at, in, b[r]);
      load_floats(static_cast<const T*>(a.C), at, in && outputs, c[r]);
    }
  }

  // B (and C) into [position][kBcPitch] rows of the tile.
  template <int kBcPitch>
  __device__ void stage_bc(float* sb, float* sc) const {
    const int pos = States::position();
#pragma unroll
    for (int r = 0; r < States::kPerThread; ++r) {
      const int n = States::row(r);
      if (n >= Lay::kPadded) continue;
#pragma unroll
      for (int j = 0; j < kStateWidth; ++j) {
        sb[(pos + j) * kBcPitch + n] = b[r][j];
        if (sc) sc[(pos + j) * kBcPitch + n] = c[r][j];
      }
    }
  }
};

// ---- forward ---------------------------------------------------------------------------------------

// Shared memory of the forward, in floats, carved from the dynamic buffer.
template <typename Lay>
struct ForwardShared {
  static constexpr int kTile = Lay::kForwardTile;
  static constexpr int kPitch = kTile + 1;           // [channel][position]: conflict-free both ways
  static constexpr int kBcPitch = Lay::kPadded + 4;  // [position][state]: 16-byte rows, fewer conflicts
  static constexpr int kPartPitch = kThreads + 1;    // [position][lane]
  static constexpr int kRows = Lay::kChannels * kPitch;
  float *delta, *u, *gate;  // per channel: delta', u, silu(z) (1 without z)
  float *y_part;            // each lane's share of y, summed over a channel's lanes on output
  float *b, *c;
  float *bias, *d_skip;     // per channel of the block: delta_bias, D

  FASTLLM_HD static int64_t floats() {
    return 3 * kRows + kTile * kPartPitch + 2 * kTile * kBcPitch + 2 * Lay::kChannels;
  }
  FASTLLM_HD explicit ForwardShared(float* base) {
    delta = base, u = delta + kRows, gate = u + kRows, y_part = gate + kRows;
    b = y_part + kTile * kPartPitch, c = b + kTile * kBcPitch;
    bias = c + kTile * kBcPitch, d_skip = bias + Lay::kChannels;
  }
};

// delta_bias and D of the block's channels (0 where absent), visible after the next barrier.
__device__ __forceinline__ void stage_channel_constants(const ScanArgs& a, const BlockChannels& blk, int channels,
                                                        float* bias, float* d_skip) {
  for (int c = threadIdx.x; c < channels; c += kThreads) {
    const bool in = c < blk.count;
    bias[c] = in && a.delta_bias ? a.delta_bias[blk.first + c] : 0.0f;
    d_skip[c] = in && a.D ? a.D[blk.first + c] : 0.0f;
  }
}

template <typename T, typename Lay, bool kVectorized>
__global__ void __launch_bounds__(kThreads, 4) scan_forward_kernel(const ScanArgs a, const ScanForwardOut o) {
  constexpr int K = Lay::kStates, kTile = Lay::kForwardTile;
  using Shared = ForwardShared<Lay>;
  using Inputs = TileInputs<T, Lay, kTile, kVectorized>;
  using Rows = typename Inputs::Rows;
  // The output goes one element per thread and row, so a channel's lane shares are read conflict-free.
  using Outputs = TileShare<Lay::kChannels, kTile>;
  constexpr int kPitch = Shared::kPitch, kPartPitch = Shared::kPartPitch;
  const BlockChannels blk(a, Lay{}, blockIdx.x, blockIdx.y);
  const LaneStates<Lay> lane(blk);
  const DecayRates<K> rates(a, lane);
  const Shared sm(dynamic_shared_floats());
  const int64_t b = blk.batch, N = a.nstate, L = a.length, chunks = a.cuda_chunks();
  stage_channel_constants(a, blk, Lay::kChannels, sm.bias, sm.d_skip);

  float h[K];
#pragma unroll
  for (int k = 0; k < K; ++k)
    h[k] = lane.owns(k, N) && a.initial_state ? a.initial_state[(b * a.dim + lane.d) * N + lane.state(k)] : 0.0f;

  Inputs next;
  next.load(a, nullptr, blk, 0, L, true);
  for (int64_t t0 = 0; t0 < L; t0 += kTile) {
    __syncthreads();  // the previous tile's values are consumed
    // Stage: positions outside the tile get delta' = 0, u = 0, B = 0: a no-op step, so the loop below
    // always runs the whole tile.
#pragma unroll
    for (int r = 0; r < Rows::kPerThread; ++r) {
      const int row = Rows::row(r);
      if (row >= Lay::kChannels) continue;
      const bool in = t0 + Rows::position() < L && row < blk.count;
      const float bias = sm.bias[row];  // read once: the stores below might alias it, for all the compiler knows
#pragma unroll
      for (int j = 0; j < Inputs::kRowWidth; ++j) {
        const int slot = row * kPitch + Rows::position() + j;
        sm.delta[slot] = in ? ss_delta(next.delta[r][j], bias, a.softplus) : 0.0f;
        sm.u[slot] = next.u[r][j];
        sm.gate[slot] = a.z ? ss_silu(next.z[r][j]) : 1.0f;
      }
    }
    next.template stage_bc<Shared::kBcPitch>(sm.b, sm.c);
    __syncthreads();
    if (t0 + kTile < L) next.load(a, nullptr, blk, t0 + kTile, L, true);

    auto read = [&](int t) { return read_position<true, false, K>(sm, lane.channel * kPitch, lane.sub * K, t); };
    Position<K> ahead = read(0);
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      const Position<K> x = ahead;
      if (t + 1 < kTile) ahead = read(t + 1);
      float y = 0.0f;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        h[k] = fmaf(rates.decay(k, x.delta), h[k], x.delta_u * x.b[k]);
        y = fmaf(x.c[k], h[k], y);
      }
      sm.y_part[t * kPartPitch + threadIdx.x] = y;
    }
    const int64_t end = min64(t0 + kTile, L);
    if (end % kCudaScanChunk == 0 || end == L) {
      float* saved = o.chunk_states + ((b * a.dim + lane.d) * chunks + (end - 1) / kCudaScanChunk) * N;
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (lane.owns(k, N)) saved[lane.state(k)] = h[k];
    }
    __syncthreads();
    const int pos = Outputs::position();
    if (t0 + pos >= L) continue;
#pragma unroll
    for (int r = 0; r < Outputs::kPerThread; ++r) {
      const int row = Outputs::row(r);
      if (row >= blk.count) continue;
      float y = 0.0f;
#pragma unroll
      for (int sub = 0; sub < Lay::kLanes; ++sub) y += sm.y_part[pos * kPartPitch + row * Lay::kLanes + sub];
      const int slot = row * kPitch + pos;
      store_float(static_cast<T*>(o.out), blk.first_row + row * L + t0 + pos,
                  fmaf(sm.d_skip[row], sm.u[slot], y) * sm.gate[slot]);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------

// Shared memory of the backward, in floats, carved from the dynamic buffer.
template <typename Lay>
struct BackwardShared {
  static constexpr int K = Lay::kStates, kTile = Lay::kBackwardTile;
  static constexpr int kPitch = kTile + 1, kRows = Lay::kChannels * kPitch;
  static constexpr int kBcPitch = Lay::kPadded + 4;
  static constexpr int kPartPitch = kThreads + 1, kParts = kTile * kPartPitch;
  static constexpr int kReducePitch = kThreads * K + 4;  // + 4: the positions of a warp's reads hit distinct banks
  // Pass 2's scratch (grad_bu .. reduce), which pass 1 stages its longer tile in.
  static constexpr int kScratch = 3 * kParts + 2 * kTile * kBcPitch + kTile * kReducePitch;
  // Pass 1's tile of `tile` positions: whether its staging (delta', u per channel; B) fits the scratch,
  // and whether its inputs also take at most 20 registers per thread, as they are loaded while the
  // tile before it is walked.
  static constexpr bool entry_stage_fits(int tile) {
    return 2 * Lay::kChannels * (tile + 1) + tile * kBcPitch <= kScratch;
  }
  static constexpr bool entry_tile_fits(int tile) {
    return entry_stage_fits(tile) && (2 * Lay::kChannels + Lay::kPadded) * tile <= 20 * kThreads;
  }
  // Positions per pass-1 tile: the longest that fits (32 at N = 16).
  static constexpr int kEntryTile = entry_tile_fits(32) ? 32 : entry_tile_fits(16) ? 16 : kTile;
  static constexpr int kEntryPitch = kEntryTile + 1;
  static_assert(kEntryTile <= kCudaScanChunk && kEntryTile % kTile == 0 && entry_stage_fits(kEntryTile),
                "pass 1's tile fits the scratch and covers whole pass-2 tiles");
  static_assert(Lay::kChannels * kEntryPitch % 4 == 0, "pass 1's B rows start 16-byte aligned");

  // Staged per channel: delta', u, dL/dy, d delta' / d delta, and dL/dz / (y + D u).
  float *delta, *u, *dy, *dsoftplus, *dz_factor;
  // [channel][position in tile]: running sums of dL/dD and dL/d delta_bias, each slot always added to
  // by the same thread.
  float *d_skip_sum, *bias_sum;
  // [position][lane]: each lane's share of sum_n g B, sum_n g exp(delta A) h_{t-1} A and sum_n C h,
  // summed over a channel's lanes on output.
  float *grad_bu, *grad_delta_a, *y;
  float *b, *c;      // [position][kBcPitch]
  float *reduce;     // [position][kReducePitch]: each lane's dB or dC terms, at lane * K
  float *entry;      // [tile of the chunk][kThreads * K]: the state entering each tile, each lane its own
  float *bias, *d_skip;

  // Pass 1's tile (delta', u per channel; B), over pass 2's scratch.
  struct EntryStage {
    static constexpr int kBcPitch = BackwardShared::kBcPitch;  // read_position's B rows
    float *delta, *u, *b;
  } entries;

  FASTLLM_HD static int64_t floats() {
    return 7 * kRows + kScratch + Lay::kTilesPerChunk * kThreads * K + 2 * Lay::kChannels;
  }
  FASTLLM_HD explicit BackwardShared(float* base) {
    delta = base, u = delta + kRows, dy = u + kRows, dsoftplus = dy + kRows, dz_factor = dsoftplus + kRows;
    d_skip_sum = dz_factor + kRows, bias_sum = d_skip_sum + kRows;
    grad_bu = bias_sum + kRows, grad_delta_a = grad_bu + kParts, y = grad_delta_a + kParts;
    b = y + kParts, c = b + kTile * kBcPitch;
    reduce = c + kTile * kBcPitch, entry = reduce + kTile * kReducePitch;
    bias = entry + Lay::kTilesPerChunk * kThreads * K, d_skip = bias + Lay::kChannels;
    entries.delta = grad_bu, entries.u = entries.delta + Lay::kChannels * kEntryPitch;
    entries.b = entries.u + Lay::kChannels * kEntryPitch;
  }
};

// Sum the lanes' terms in `reduce` over the block's channels, for states < N and positions < len, into
// this block's partial slice (already offset to position t0). Every channel slot is added, so the
// loop unrolls: lanes of missing channels hold exact zeros (their dL/dy, delta' and states are 0).
template <typename Lay>
__device__ void sum_over_channels(const BackwardShared<Lay>& sm, int64_t nstate, int64_t length, int len,
                                  float* partial) {
  constexpr int kTile = BackwardShared<Lay>::kTile, kElements = Lay::kPadded * kTile;
  static_assert(Lay::kChannels % 4 == 0, "four running sums");
#pragma unroll
  for (int first = 0; first < kElements; first += kThreads) {
    const int i = first + threadIdx.x, n = i / kTile, t = i % kTile;
    if (i >= kElements || n >= nstate || t >= len) continue;
    const float* row = sm.reduce + t * BackwardShared<Lay>::kReducePitch + n;
    float sums[4] = {};
#pragma unroll
    for (int c = 0; c < Lay::kChannels; ++c) sums[c % 4] += row[c * Lay::kPadded];
    partial[n * length + t] = (sums[0] + sums[1]) + (sums[2] + sums[3]);
  }
}

// 4 blocks per SM: at most 128 registers, as many blocks as the shared memory (54 KiB at N = 16) allows.
//
// The chunks are taken from last to first. Pass 1 runs the chunk's recurrence from its saved entry
// state and stores the state entering each pass-2 tile; it needs no outputs, so its tiles are longer
// (kEntryTile positions, 32 at N = 16), which spreads a step's staging, barriers and loads over more
// positions. Pass 2 takes the chunk's tiles in reverse, recomputes a tile's states in registers and
// runs the reverse recurrence. Every step's inputs are loaded during the step before it; the first
// step of the next chunk is loaded once the reverse walk of tile 0 has freed the tile's states.
template <typename T, typename Lay, bool kVectorized>
__global__ void __launch_bounds__(kThreads, 4) scan_backward_kernel(const ScanArgs a, const ScanBackwardArgs gr) {
  constexpr int K = Lay::kStates, kTile = Lay::kBackwardTile;
  using Shared = BackwardShared<Lay>;
  constexpr int kEntryTile = Shared::kEntryTile;
  using Inputs = TileInputs<T, Lay, kTile, kVectorized>;
  using EntryInputs = TileInputs<T, Lay, kEntryTile, kVectorized>;
  using Rows = typename Inputs::Rows;
  using EntryRows = typename EntryInputs::Rows;
  using Outputs = TileShare<Lay::kChannels, kTile>;  // one element per thread and row, as in the forward
  constexpr int kPitch = Shared::kPitch, kPartPitch = Shared::kPartPitch;
  const BlockChannels blk(a, Lay{}, blockIdx.x, blockIdx.y);
  const LaneStates<Lay> lane(blk);
  const DecayRates<K> rates(a, lane);
  const Shared sm(dynamic_shared_floats());
  const int64_t b = blk.batch, N = a.nstate, L = a.length, chunks = a.cuda_chunks(), bd = b * a.dim + lane.d;
  // This block's slice of the (batch, groups, blocks per group, N, L) partial sums of dB and dC.
  const int64_t partial_base = (((b * a.groups + blk.group) * Lay::blocks_per_group(a.dim / a.groups) +
                                 blk.index_in_group) * N) * L;
  float* my_entry = sm.entry + threadIdx.x * K;
  float* my_reduce = sm.reduce + threadIdx.x * K;
  stage_channel_constants(a, blk, Lay::kChannels, sm.bias, sm.d_skip);
  for (int i = threadIdx.x; i < Shared::kRows; i += kThreads) sm.d_skip_sum[i] = sm.bias_sum[i] = 0.0f;

  // q[k] = dL/dh_t carried from t + 1 (times its decay); from the last state's gradient at the end.
  float q[K], dA[K] = {};
#pragma unroll
  for (int k = 0; k < K; ++k) q[k] = lane.owns(k, N) && gr.dlast_state ? gr.dlast_state[bd * N + lane.state(k)] : 0.0f;

  auto tiles_of = [&](int64_t chunk) {
    return static_cast<int>((min64(L - chunk * kCudaScanChunk, kCudaScanChunk) + kTile - 1) / kTile);
  };
  // Pass 1 covers the positions before the chunk's last tile.
  auto entry_end = [&](int64_t chunk, int tiles) { return chunk * kCudaScanChunk + int64_t(tiles - 1) * kTile; };
  Inputs next;
  EntryInputs next_entries;
  float next_entry[K];  // the state entering the next chunk
  auto load_tile = [&](int64_t chunk, int tile) {
    next.load(a, gr.dout, blk, chunk * kCudaScanChunk + int64_t(tile) * kTile, L, true);
  };
  auto load_entries = [&](int64_t chunk, int tiles, int step) {
    next_entries.load(a, nullptr, blk, chunk * kCudaScanChunk + int64_t(step) * kEntryTile, entry_end(chunk, tiles),
                      false);
  };
  auto load_chunk = [&](int64_t chunk) {  // the inputs of its first pass-1 step and the state entering it
    load_entries(chunk, tiles_of(chunk), 0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t n = lane.state(k);
      next_entry[k] = !lane.owns(k, N)  ? 0.0f
                      : chunk > 0       ? gr.chunk_states[(bd * chunks + chunk - 1) * N + n]
                      : a.initial_state ? a.initial_state[bd * N + n]
                                        : 0.0f;
    }
  };

  if (L > 0) load_chunk(chunks - 1);
  for (int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
    const int64_t c0 = chunk * kCudaScanChunk;
    const int tiles = tiles_of(chunk);

    // Pass 1: from the state entering the chunk to the state entering each later tile. It takes one
    // step even for a chunk of one tile (staging nothing then), and, like pass 2, leaves only after
    // the step that loads what follows it, so the compiler sees each step's inputs dead where unused.
    const int entry_steps = tiles > 1 ? ((tiles - 1) * kTile + kEntryTile - 1) / kEntryTile : 1;
    const int64_t end = entry_end(chunk, tiles);
    float h[K];
#pragma unroll
    for (int k = 0; k < K; ++k) h[k] = next_entry[k];
    for (int step = 0;; ++step) {
      const int64_t t0 = c0 + int64_t(step) * kEntryTile;
      const bool last = step + 1 >= entry_steps;
      __syncthreads();  // the previous step's values are consumed
      if (step == 0) store_states<K>(my_entry, next_entry);
#pragma unroll
      for (int r = 0; r < EntryRows::kPerThread; ++r) {
        const int row = EntryRows::row(r);
        if (row >= Lay::kChannels) continue;
        const bool in = t0 + EntryRows::position() < end && row < blk.count;
        const float bias = sm.bias[row];
#pragma unroll
        for (int j = 0; j < EntryInputs::kRowWidth; ++j) {
          const int slot = row * Shared::kEntryPitch + EntryRows::position() + j;
          sm.entries.delta[slot] = in ? ss_delta(next_entries.delta[r][j], bias, a.softplus) : 0.0f;
          sm.entries.u[slot] = next_entries.u[r][j];
        }
      }
      next_entries.template stage_bc<Shared::kBcPitch>(sm.entries.b, nullptr);
      __syncthreads();
      if (last) load_tile(chunk, tiles - 1);
      else load_entries(chunk, tiles, step + 1);

      // Positions past `end` are staged as no-op steps; the walk stops at the last tile's entry.
#pragma unroll
      for (int g = 0; g < kEntryTile / kTile; ++g) {
        const int tile = step * (kEntryTile / kTile) + g + 1;  // the tile whose entry this group ends at
        if (tile >= tiles) break;
#pragma unroll
        for (int t = g * kTile; t < (g + 1) * kTile; ++t) {
          const Position<K> x =
              read_position<false, false, K>(sm.entries, lane.channel * Shared::kEntryPitch, lane.sub * K, t);
#pragma unroll
          for (int k = 0; k < K; ++k) h[k] = fmaf(rates.decay(k, x.delta), h[k], x.delta_u * x.b[k]);
        }
        store_states<K>(my_entry + tile * kThreads * K, h);
      }
      if (last) break;
    }

    // Pass 2, tiles in reverse. The loop leaves only after tile 0 has loaded the next chunk's first
    // step, so the compiler sees those registers dead during the other tiles.
    for (int tile = tiles - 1;; --tile) {
      const int64_t t0 = c0 + int64_t(tile) * kTile;
      const int len = static_cast<int>(min64(kTile, L - t0));
      __syncthreads();  // the previous step's values are consumed
#pragma unroll
      for (int r = 0; r < Rows::kPerThread; ++r) {
        const int row = Rows::row(r);
        if (row >= Lay::kChannels) continue;
        const bool in = Rows::position() < len && row < blk.count;
        const float bias = sm.bias[row];  // read once, as in the forward
#pragma unroll
        for (int j = 0; j < Inputs::kRowWidth; ++j) {
          const int slot = row * kPitch + Rows::position() + j;
          const float raw = next.delta[r][j], dout = next.dout[r][j], z = next.z[r][j];
          sm.delta[slot] = in ? ss_delta(raw, bias, a.softplus) : 0.0f;
          sm.u[slot] = next.u[r][j];
          // ss_output_grad split in two: dz = dz_factor (y + D u) once y is known.
          sm.dy[slot] = a.z ? dout * ss_silu(z) : dout;
          sm.dz_factor[slot] = a.z ? dout * ss_silu_grad(z) : 0.0f;
          sm.dsoftplus[slot] = in ? ss_delta_grad(raw, bias, a.softplus) : 0.0f;
        }
      }
      next.template stage_bc<Shared::kBcPitch>(sm.b, sm.c);
      __syncthreads();
      if (tile > 0) load_tile(chunk, tile - 1);

      // The tile's states (hs[t] after position t), and the dC terms dL/dy_t h_t. Positions past L are
      // staged as no-op steps.
      float entry[K], hs[kTile][K];
      load_states<K>(my_entry + tile * kThreads * K, entry);
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        const Position<K> x = read_position<false, true, K>(sm, lane.channel * kPitch, lane.sub * K, t);
        float dc[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          hs[t][k] = fmaf(rates.decay(k, x.delta), t > 0 ? hs[t - 1][k] : entry[k], x.delta_u * x.b[k]);
          dc[k] = x.dy * hs[t][k];
        }
        store_states<K>(my_reduce + t * Shared::kReducePitch, dc);
      }
      __syncthreads();
      sum_over_channels<Lay>(sm, N, L, len, gr.dC + partial_base + t0);
      __syncthreads();

      // Reverse: g = dL/dh_t = C_t dy_t + q; q <- exp(delta_t A) g for position t - 1.
#pragma unroll
      for (int t = kTile - 1; t >= 0; --t) {
        if (t >= len) continue;
        const Position<K> x = read_position<true, true, K>(sm, lane.channel * kPitch, lane.sub * K, t);
        float db[K];
        float grad_bu = 0.0f, grad_delta_a = 0.0f, y = 0.0f;  // sums over states of g B, g a h_{t-1} A, C h
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const float decay = rates.decay(k, x.delta);
          const float g = fmaf(x.c[k], x.dy, q[k]);
          const float g_log_decay = g * decay * (t > 0 ? hs[t - 1][k] : entry[k]);  // dL / d(delta A)
          db[k] = g * x.delta_u;
          grad_bu = fmaf(g, x.b[k], grad_bu);
          grad_delta_a = fmaf(g_log_decay, rates.a[k], grad_delta_a);
          dA[k] = fmaf(g_log_decay, x.delta, dA[k]);
          y = fmaf(x.c[k], hs[t][k], y);
          q[k] = decay * g;
        }
        store_states<K>(my_reduce + t * Shared::kReducePitch, db);
        const int part = t * kPartPitch + threadIdx.x;
        sm.grad_bu[part] = grad_bu, sm.grad_delta_a[part] = grad_delta_a, sm.y[part] = y;
      }
      if (tile == 0) load_chunk(chunk > 0 ? chunk - 1 : 0);  // chunk 0: a harmless reload
      __syncthreads();
      sum_over_channels<Lay>(sm, N, L, len, gr.dB + partial_base + t0);
      const int pos = Outputs::position();
      // Per (channel, position), always by the same thread: the running sums need no atomics.
#pragma unroll
      for (int r = 0; r < Outputs::kPerThread; ++r) {
        const int row = Outputs::row(r);
        if (row >= blk.count || pos >= len) continue;
        float grad_bu = 0.0f, grad_delta_a = 0.0f, y = 0.0f;
#pragma unroll
        for (int sub = 0; sub < Lay::kLanes; ++sub) {
          const int part = pos * kPartPitch + row * Lay::kLanes + sub;
          grad_bu += sm.grad_bu[part], grad_delta_a += sm.grad_delta_a[part], y += sm.y[part];
        }
        const int64_t at = blk.first_row + row * L + t0 + pos;
        const int slot = row * kPitch + pos;
        const float delta = sm.delta[slot], u = sm.u[slot], dy = sm.dy[slot], d_skip = sm.d_skip[row];
        const float ddelta = fmaf(u, grad_bu, grad_delta_a) * sm.dsoftplus[slot];
        store_float(static_cast<T*>(gr.du), at, fmaf(delta, grad_bu, d_skip * dy));
        store_float(static_cast<T*>(gr.ddelta), at, ddelta);
        if (a.z) store_float(static_cast<T*>(gr.dz), at, fmaf(d_skip, u, y) * sm.dz_factor[slot]);
        sm.d_skip_sum[slot] = fmaf(dy, u, sm.d_skip_sum[slot]);
        sm.bias_sum[slot] += ddelta;
      }
      if (tile == 0) break;
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
    for (int t = 0; t < kTile; ++t) d_skip += sm.d_skip_sum[c * kPitch + t], bias += sm.bias_sum[c * kPitch + t];
    gr.dD_partial[b * a.dim + blk.first + c] = d_skip;
    gr.ddelta_bias_partial[b * a.dim + blk.first + c] = bias;
  }
}

// ---- launch configuration, shared by the launchers and tests/cuda_emulator ------------------------

// Calls pick(Layout<K, LANES>{}) with the layout for N (1 <= N <= 256).
template <typename Pick>
void with_layout(int64_t nstate, Pick&& pick) {
  switch (lanes_per_channel(nstate)) {
    case 1: return pick(Layout<4, 1>{});
    case 2: return pick(Layout<4, 2>{});
    case 4: return pick(Layout<4, 4>{});
    case 8: return pick(Layout<4, 8>{});
    case 16: return pick(Layout<4, 16>{});
  }
  if (states_per_lane(nstate) == 4) return pick(Layout<4, 32>{});
  pick(Layout<8, 32>{});
}

inline int64_t tiles_per_group(int64_t per_group, int64_t nstate) {
  int64_t blocks = 0;
  with_layout(nstate, [&](auto lay) { blocks = decltype(lay)::blocks_per_group(per_group); });
  return blocks;
}

template <typename Lay>
dim3 grid_of(const ScanArgs& a) {
  const int64_t blocks = a.groups * Lay::blocks_per_group(a.dim / a.groups);
  if (a.batch > 65535) throw std::invalid_argument("selective_scan (CUDA): batch must be at most 65535");
  if (blocks > (int64_t(1) << 31) - 1) throw std::invalid_argument("selective_scan (CUDA): dim too large");
  return dim3{static_cast<unsigned>(blocks), static_cast<unsigned>(a.batch), 1};
}

// Whether the kernels may load whole vectors (up to 16 bytes) of the (batch, dim, L) and
// (batch, groups, N, L) inputs: L a multiple of the widest vector and every input 16-byte aligned, so
// every row of every tile starts aligned.
inline bool vectorizable(const ScanArgs& a, const void* dout, int dtype) {
  const int64_t widest = static_cast<DType>(dtype) == DType::Float32 ? 4 : 8;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return a.length % widest == 0 && aligned(a.u) && aligned(a.delta) && aligned(a.B) && aligned(a.C) &&
         aligned(a.z) && aligned(dout);  // null (no z, the forward's dout) counts as aligned
}

// Calls pick(element, layout, vectorized) with a value of the element type for the dtype code, the
// layout for N and std::bool_constant<vectorizable>; nothing when there is no channel (a grid may not
// be empty).
template <typename Pick>
void with_instantiation(const ScanArgs& a, const void* dout, int dtype, Pick&& pick) {
  if (a.batch == 0 || a.dim == 0) return;
  const bool vectorized = vectorizable(a, dout, dtype);
  auto by_layout = [&](auto element) {
    with_layout(a.nstate, [&](auto lay) {
      if (vectorized) pick(element, lay, std::true_type{});
      else pick(element, lay, std::false_type{});
    });
  };
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: return by_layout(float{});
    case DType::BFloat16: return by_layout(bfloat16{});
    case DType::Float16: return by_layout(float16{});
  }
  unsupported_dtypes("selective_scan", dtype, dtype);
}

// Calls launch(kernel, grid, shared bytes) with the forward kernel for the inputs.
template <typename Launch>
void with_forward_kernel(const ScanArgs& a, int dtype, Launch&& launch) {
  with_instantiation(a, nullptr, dtype, [&](auto element, auto lay, auto vectorized) {
    using Lay = decltype(lay);
    launch(scan_forward_kernel<decltype(element), Lay, vectorized()>, grid_of<Lay>(a),
           sizeof(float) * ForwardShared<Lay>::floats());
  });
}

// The same for the backward kernel, which also loads dL/dout.
template <typename Launch>
void with_backward_kernel(const ScanArgs& a, const ScanBackwardArgs& grads, int dtype, Launch&& launch) {
  with_instantiation(a, grads.dout, dtype, [&](auto element, auto lay, auto vectorized) {
    using Lay = decltype(lay);
    launch(scan_backward_kernel<decltype(element), Lay, vectorized()>, grid_of<Lay>(a),
           sizeof(float) * BackwardShared<Lay>::floats());
  });
}

}  // namespace scan_cuda
}  // namespace fastllm
