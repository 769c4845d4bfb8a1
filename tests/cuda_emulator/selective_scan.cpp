// The CUDA selective-scan and decoding-step kernels, run by the CPU emulator (cuda_emulator.h) behind a
// C interface with the same arguments as the module's selective_scan_{fwd,bwd}_cuda and
// selective_state_update_cuda bindings.
#include <cstdint>
#include <cstring>

#include "selective_scan/selective_scan_kernels.cuh"
#include "selective_scan/state_update_kernels.cuh"

using fastllm::ScanArgs;
using fastllm::ScanBackwardArgs;
using fastllm::ScanForwardOut;

namespace {

// sizes: (batch, dim, length, nstate, groups); inputs: (u, delta, A, B, C, D, z, delta_bias, initial_state).
ScanArgs scan_args(const int64_t* s, const uintptr_t* p, bool softplus) {
  auto f = [](uintptr_t x) { return reinterpret_cast<const float*>(x); };
  auto v = [](uintptr_t x) { return reinterpret_cast<const void*>(x); };
  return {s[0], s[1], s[2], s[3], s[4], v(p[0]), v(p[1]), f(p[2]), v(p[3]), v(p[4]),
          f(p[5]), v(p[6]), f(p[7]), f(p[8]), softplus};
}

size_t element_bytes(int dtype) { return dtype == int(fastllm::DType::Float32) ? 4 : 2; }

// NaN in every output before a launch (all-ones bytes are NaN in fp32, bf16 and fp16), so elements the
// kernel never writes show.
void poison(void* p, size_t bytes) {
  if (p) std::memset(p, 0xff, bytes);
}

}  // namespace

extern "C" {

int64_t emulated_scan_tiles(int64_t per_group, int64_t nstate) {
  return fastllm::scan_cuda::tiles_per_group(per_group, nstate);
}

int64_t emulated_scan_chunk() { return fastllm::kCudaScanChunk; }

void emulated_scan_forward(const int64_t* sizes, const uintptr_t* inputs, bool softplus, uintptr_t out,
                           uintptr_t chunk_states, int dtype) {
  const ScanArgs args = scan_args(sizes, inputs, softplus);
  const ScanForwardOut o{reinterpret_cast<void*>(out), reinterpret_cast<float*>(chunk_states)};
  const size_t rows = args.batch * args.dim;
  poison(o.out, rows * args.length * element_bytes(dtype));
  poison(o.chunk_states, rows * args.cuda_chunks() * args.nstate * sizeof(float));
  fastllm::scan_cuda::with_forward_kernel(args, dtype, [&](auto kernel, dim3 grid, size_t bytes) {
    cuda_emulator::launch(grid, dim3{fastllm::scan_cuda::kThreads}, bytes, kernel, args, o);
  });
}

// grads: (dout, dlast_state, chunk_states, du, ddelta, dz, dA, dD, ddelta_bias, dinitial_state, dB, dC).
void emulated_scan_backward(const int64_t* sizes, const uintptr_t* inputs, bool softplus, const uintptr_t* p,
                            int dtype) {
  const ScanArgs args = scan_args(sizes, inputs, softplus);
  auto f = [](uintptr_t x) { return reinterpret_cast<float*>(x); };
  auto v = [](uintptr_t x) { return reinterpret_cast<void*>(x); };
  const ScanBackwardArgs g{v(p[0]), f(p[1]), f(p[2]), v(p[3]), v(p[4]), v(p[5]),
                           f(p[6]), f(p[7]), f(p[8]), f(p[9]), f(p[10]), f(p[11])};
  const size_t rows = args.batch * args.dim, per_row = args.length * element_bytes(dtype);
  for (void* x : {g.du, g.ddelta, g.dz}) poison(x, rows * per_row);
  for (float* x : {g.dA_partial, g.dinitial_state}) poison(x, rows * args.nstate * sizeof(float));
  for (float* x : {g.dD_partial, g.ddelta_bias_partial}) poison(x, rows * sizeof(float));
  const size_t partials = args.batch * args.groups *
                          fastllm::scan_cuda::tiles_per_group(args.dim / args.groups, args.nstate) * args.nstate;
  for (float* x : {g.dB, g.dC}) poison(x, partials * args.length * sizeof(float));
  fastllm::scan_cuda::with_backward_kernel(args, g, dtype, [&](auto kernel, dim3 grid, size_t bytes) {
    cuda_emulator::launch(grid, dim3{fastllm::scan_cuda::kThreads}, bytes, kernel, args, g);
  });
}

// sizes: (batch, dim, nstate, groups); pointers: (state, x, dt, A, B, C, D, z, dt_bias, out).
void emulated_state_update(const int64_t* s, const uintptr_t* p, bool softplus, int dtype) {
  auto f = [](uintptr_t x) { return reinterpret_cast<const float*>(x); };
  auto v = [](uintptr_t x) { return reinterpret_cast<const void*>(x); };
  const fastllm::StateUpdateArgs args{s[0], s[1], s[2], s[3], reinterpret_cast<float*>(p[0]), v(p[1]), v(p[2]),
                                      f(p[3]), v(p[4]), v(p[5]), f(p[6]), v(p[7]), f(p[8]), softplus,
                                      reinterpret_cast<void*>(p[9])};
  poison(args.out, args.batch * args.dim * element_bytes(dtype));
  fastllm::state_update_cuda::with_state_update_kernel(args, dtype, [&](auto kernel, dim3 grid) {
    cuda_emulator::launch(grid, dim3{fastllm::state_update_cuda::kThreads}, 0, kernel, args);
  });
}

}  // extern "C"
