// Shared by the per-op binding files (csrc/<op>/<op>_bind.cpp), each defining bind_<op>(module).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace fastllm {

using Pointers = std::vector<uintptr_t>;

void bind_ademamix(pybind11::module_& m);
void bind_xielu(pybind11::module_& m);
void bind_selective_scan(pybind11::module_& m);
void bind_depth_weighted_average(pybind11::module_& m);
void bind_causal_conv1d(pybind11::module_& m);

}  // namespace fastllm
