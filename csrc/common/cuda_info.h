#pragma once

namespace fastllm {
#if defined(FASTLLM_WITH_CUDA)
// CUDA runtime version linked into the module, e.g. 13000.
int cuda_runtime_version();
// Devices visible to the module's runtime; 0 (not an error) where no driver is installed.
int cuda_device_count();
#endif
}  // namespace fastllm
