// Programmatic dependent launch (Hopper and newer): a kernel of the decode chain may be scheduled while the one
// before it finishes, so launch latency and the predecessor's tail overlap. Every kernel launched this way calls
// pdl_wait() before it reads anything a predecessor wrote and before it writes anything (a predecessor may still
// read it); only constant data (weights) may be touched earlier. Without the launch attribute, or before sm_90,
// both calls do nothing and launches serialise as usual.
// What a predecessor wrote must be read with plain loads: never __ldg or a `const T* __restrict__` pointer, whose
// non-coherent (.nc) loads ptxas treats as constant and may move above griddepcontrol.wait (seen in the SASS of
// decode_attention: a qkv load hoisted above the wait gave wrong results in CUDA graphs, bench/NOTES.md r7).
#pragma once

#include <cuda_runtime_api.h>

#include <utility>

namespace awqe {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream be scheduled once every block of this one has called it (or exited).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Whether launches on the current device use the attribute: compute capability 9.0 or newer, unless turned
// off with awqe_set_programmatic_launch(0) (kept for A/B timing).
bool pdl_enabled();

// programmatic: launch with the attribute (where enabled); false gives a plain launch, which starts only once the
// kernel before it has finished and flushed, so the kernel may read its predecessor's output through __ldg.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(bool programmatic, void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = programmatic && pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
    return launch_kernel(true, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace awqe
