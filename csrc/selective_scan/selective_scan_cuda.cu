// Launchers of the CUDA selective scan; the kernels and their design are in selective_scan_kernels.cuh.
#include "common/cuda_utils.h"
#include "selective_scan/selective_scan_kernels.cuh"

namespace fastllm {
namespace {

// Kernels asking for more than 48 KiB of dynamic shared memory must say so first.
template <typename Kernel>
void reserve_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "selective_scan shared memory");
}

}  // namespace

int64_t selective_scan_cuda_tiles(int64_t per_group, int64_t nstate) {
  return scan_cuda::tiles_per_group(per_group, nstate);
}

void selective_scan_fwd_cuda(const ScanArgs& args, const ScanForwardOut& out, int dtype, int device,
                             uintptr_t stream_handle) {
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  scan_cuda::with_forward_kernel(args, dtype, [&](auto kernel, dim3 grid, size_t bytes) {
    reserve_shared(kernel, bytes);
    kernel<<<grid, scan_cuda::kThreads, bytes, stream>>>(args, out);
    check_cuda(cudaGetLastError(), "selective_scan forward launch");
  });
}

void selective_scan_bwd_cuda(const ScanArgs& args, const ScanBackwardArgs& grads, int dtype, int device,
                             uintptr_t stream_handle) {
  set_device(device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  scan_cuda::with_backward_kernel(args, grads, dtype, [&](auto kernel, dim3 grid, size_t bytes) {
    reserve_shared(kernel, bytes);
    kernel<<<grid, scan_cuda::kThreads, bytes, stream>>>(args, grads);
    check_cuda(cudaGetLastError(), "selective_scan backward launch");
  });
}

}  // namespace fastllm
