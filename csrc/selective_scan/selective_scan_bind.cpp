// Python bindings of the selective-scan kernels: data pointers (0 for an absent optional tensor),
// sizes and a dtype code in; results are written into buffers allocated by the caller.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "common/bind.h"
#include "selective_scan/selective_scan.h"

namespace py = pybind11;

namespace fastllm {
namespace {

// (batch, dim, length, nstate, groups) and the input pointers
// (u, delta, A, B, C, D, z, delta_bias, initial_state).
using Sizes = std::vector<int64_t>;
using Inputs = std::vector<uintptr_t>;

ScanArgs scan_args(const Sizes& s, const Inputs& p, bool softplus) {
  if (s.size() != 5 || p.size() != 9) throw std::invalid_argument("selective_scan: expected 5 sizes and 9 pointers");
  if (s[4] <= 0 || s[1] % s[4] != 0) throw std::invalid_argument("selective_scan: groups must divide dim");
  auto f = [](uintptr_t x) { return reinterpret_cast<const float*>(x); };
  auto v = [](uintptr_t x) { return reinterpret_cast<const void*>(x); };
  return {s[0], s[1], s[2], s[3], s[4], v(p[0]), v(p[1]), f(p[2]), v(p[3]), v(p[4]),
          f(p[5]), v(p[6]), f(p[7]), f(p[8]), softplus};
}

// (dout, dlast_state, chunk_states, du, ddelta, dz, dA, dD, ddelta_bias, dinitial_state, dB, dC).
ScanBackwardArgs backward_args(const Inputs& p) {
  if (p.size() != 12) throw std::invalid_argument("selective_scan backward: expected 12 pointers");
  auto f = [](uintptr_t x) { return reinterpret_cast<float*>(x); };
  auto v = [](uintptr_t x) { return reinterpret_cast<void*>(x); };
  return {v(p[0]), f(p[1]), f(p[2]), v(p[3]), v(p[4]), v(p[5]), f(p[6]), f(p[7]), f(p[8]), f(p[9]), f(p[10]), f(p[11])};
}

ScanForwardOut forward_out(uintptr_t out, uintptr_t chunk_states) {
  return {reinterpret_cast<void*>(out), reinterpret_cast<float*>(chunk_states)};
}

// (batch, dim, nstate, groups) and (state, x, dt, A, B, C, D, z, dt_bias, out).
StateUpdateArgs state_update_args(const Sizes& s, const Inputs& p, bool softplus) {
  if (s.size() != 4 || p.size() != 10)
    throw std::invalid_argument("selective_state_update: expected 4 sizes and 10 pointers");
  if (s[3] <= 0 || s[1] % s[3] != 0) throw std::invalid_argument("selective_state_update: groups must divide dim");
  auto f = [](uintptr_t x) { return reinterpret_cast<const float*>(x); };
  auto v = [](uintptr_t x) { return reinterpret_cast<const void*>(x); };
  return {s[0], s[1], s[2], s[3], reinterpret_cast<float*>(p[0]), v(p[1]), v(p[2]), f(p[3]), v(p[4]), v(p[5]),
          f(p[6]), v(p[7]), f(p[8]), softplus, reinterpret_cast<void*>(p[9])};
}

}  // namespace

void bind_selective_scan(py::module_& m) {
  m.def(
      "selective_state_update_cpu",
      [](const Sizes& sizes, const Inputs& pointers, bool softplus, int dtype, int num_threads) {
        const StateUpdateArgs args = state_update_args(sizes, pointers, softplus);
        py::gil_scoped_release release;
        selective_state_update_cpu(args, dtype, num_threads);
      },
      "One Mamba decoding step on the CPU, updating the state in place.");
  m.attr("selective_scan_chunk") = kScanChunk;
  m.def("selective_scan_cpu_tiles", &cpu_tiles_per_group, py::arg("dim"), py::arg("groups"),
        "Channel tiles per group of the CPU backward's dB, dC partial sums.");
  m.def(
      "selective_scan_fwd_cpu",
      [](const Sizes& sizes, const Inputs& inputs, bool softplus, uintptr_t out, uintptr_t chunk_states, int dtype,
         int num_threads) {
        const ScanArgs args = scan_args(sizes, inputs, softplus);
        py::gil_scoped_release release;
        selective_scan_fwd_cpu(args, forward_out(out, chunk_states), dtype, num_threads);
      },
      "Selective scan forward on the CPU; saves the state at the end of every chunk.");
  m.def(
      "selective_scan_bwd_cpu",
      [](const Sizes& sizes, const Inputs& inputs, bool softplus, const Inputs& grads, int dtype, int num_threads) {
        const ScanArgs args = scan_args(sizes, inputs, softplus);
        const ScanBackwardArgs g = backward_args(grads);
        py::gil_scoped_release release;
        selective_scan_bwd_cpu(args, g, dtype, num_threads);
      },
      "Selective scan backward on the CPU, recomputing each chunk from its saved state.");
#if defined(FASTLLM_WITH_CUDA)
  m.def(
      "selective_state_update_cuda",
      [](const Sizes& sizes, const Inputs& pointers, bool softplus, int dtype, int device, uintptr_t stream) {
        const StateUpdateArgs args = state_update_args(sizes, pointers, softplus);
        py::gil_scoped_release release;
        selective_state_update_cuda(args, dtype, device, stream);
      },
      "One Mamba decoding step on one CUDA device and stream, updating the state in place.");
  m.attr("selective_scan_cuda_chunk") = kCudaScanChunk;
  m.def("selective_scan_cuda_tiles", &selective_scan_cuda_tiles, py::arg("per_group"), py::arg("nstate"),
        "Channel tiles per group of the CUDA backward's dB, dC partial sums.");
  m.def(
      "selective_scan_fwd_cuda",
      [](const Sizes& sizes, const Inputs& inputs, bool softplus, uintptr_t out, uintptr_t chunk_states, int dtype,
         int device, uintptr_t stream) {
        const ScanArgs args = scan_args(sizes, inputs, softplus);
        py::gil_scoped_release release;
        selective_scan_fwd_cuda(args, forward_out(out, chunk_states), dtype, device, stream);
      },
      "Selective scan forward on one CUDA device and stream.");
  m.def(
      "selective_scan_bwd_cuda",
      [](const Sizes& sizes, const Inputs& inputs, bool softplus, const Inputs& grads, int dtype, int device,
         uintptr_t stream) {
        const ScanArgs args = scan_args(sizes, inputs, softplus);
        const ScanBackwardArgs g = backward_args(grads);
        py::gil_scoped_release release;
        selective_scan_bwd_cuda(args, g, dtype, device, stream);
      },
      "Selective scan backward on one CUDA device and stream.");
#endif
}

}  // namespace fastllm
