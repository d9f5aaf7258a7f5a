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

// -DAWQE_FLAG_CHAIN (r23, for A/B timing, bench/NOTES.md): inside a chain the host opens on a stream
// (awqe_chain_begin/end), each chained launch resolves its dependency on the launch before it by a counter instead
// of griddepcontrol.wait: every block of launch i, after its last memory access, adds 1 to done[i] with one release
// add; thread 0 of every block of launch i + 1 polls done[i] until it holds launch i's block count, then one acquire
// fence (chain_wait, below). So a launch starts when the
// last block before it has signalled, not when that grid has completed and flushed. Deadlock-free with PDL's rule
// (launch i + 1 is scheduled only once every block of launch i has called launch_dependents, so a spinning block
// waits on resident blocks only). Each counter is cleared in the chain: done[i] by block 0 of launch i + 2 (all of
// launch i + 1's blocks have passed their wait by then), the last two by a one-block kernel awqe_chain_end launches
// (it waits for the last launch's completion). The first launch of a chain waits with griddepcontrol.wait (its
// predecessor is not chained; so do its inactive attention splits), and so does whatever follows the chain; a launch
// that takes no link closes the chain first (the reset kernel goes before it). A spin that outlives
// kChainSpinNs counts a timeout (awqe_chain_timeouts) and goes on: wrong results, never a hang.
struct ChainLink {
    unsigned* wait = nullptr;  // done counter of the launch before (null: griddepcontrol.wait)
    unsigned wait_for = 0;     // the launch before's block count
    unsigned* done = nullptr;  // this launch's done counter (null: not chained)
    unsigned* reset0 = nullptr;  // the counter block 0 clears after its wait (see above)
    unsigned* timeouts = nullptr;  // spins that gave up
};

// The link for the next launch of `blocks` blocks on `stream`: a chained one while a chain is open on that stream,
// else the default (griddepcontrol.wait, no signal). chain_launching: called by every launch; one that took no link
// closes the chain open on its stream (its predecessor in a chain would otherwise not wait for it). In api.cpp.
ChainLink chain_next(cudaStream_t stream, unsigned blocks);
void chain_launching(cudaStream_t stream);
void chain_launch_failed();

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
#if defined(AWQE_FLAG_CHAIN)
    chain_launching(stream);
    const cudaError_t e = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
    if (e != cudaSuccess) chain_launch_failed();
    return e;
#else
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
#endif
}

#if (defined(AWQE_CHAIN_PAD) || defined(AWQE_CHAIN_LATE)) && !defined(AWQE_FLAG_CHAIN)
#error "AWQE_CHAIN_PAD and AWQE_CHAIN_LATE change the flag chain: build them with -DAWQE_FLAG_CHAIN"
#endif
#if defined(AWQE_FLAG_CHAIN)
constexpr unsigned long long kChainSpinNs = 200000000ull;  // 0.2 s
// r24's A/B flags, after r22/r23 measured the chain slower (bench/NOTES.md, "Outcomes of r21, r22, r23"):
// -DAWQE_CHAIN_PAD puts each counter on its own 128-byte line (api.cpp spaces them chain_stride() words apart);
// -DAWQE_CHAIN_LATE lets a chained launch's dependents in only once its blocks have seen the launch before done
// (AWQE_CHAIN_ENTRY_TRIGGER does nothing for a chained launch, chain_wait triggers after its barrier), so only the
// launch after the running one is resident and polling, not every launch that fits.
#if defined(AWQE_CHAIN_PAD)
constexpr int kChainStride = 32;
#else
constexpr int kChainStride = 1;
#endif
#if defined(AWQE_CHAIN_LATE) && defined(AWQE_PDL_LATE)
#error "AWQE_CHAIN_LATE and AWQE_PDL_LATE each move the trigger; build one of them"
#endif

__device__ __forceinline__ unsigned chain_load_relaxed(const unsigned* p) {
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// In place of pdl_wait(), by every thread of the block at the same point: thread 0 polls with relaxed loads (an
// acquire load would invalidate the SM's L1 at every poll) and a short sleep, then one acquire fence; the barrier
// hands the order on to the block.
__device__ __forceinline__ void chain_wait(const ChainLink& c) {
    if (!c.wait) {
        pdl_wait();
    } else if (threadIdx.x == 0 && threadIdx.y == 0) {
        unsigned long long t0;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        while (chain_load_relaxed(c.wait) < c.wait_for) {
            __nanosleep(32);
            unsigned long long t;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            if (t - t0 > kChainSpinNs) {
                atomicAdd(c.timeouts, 1u);
                break;
            }
        }
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
    }
    if (c.wait) __syncthreads();
#if defined(AWQE_CHAIN_LATE)
    if (c.wait) pdl_launch_dependents();
#endif
    if (c.reset0 && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0)
        atomicExch(c.reset0, 0u);
}

__device__ __forceinline__ void chain_release_add(unsigned* p) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(p) : "memory");
}

// The block's signal, after its last memory access, by every thread of the block at the same point: the barrier
// orders the block's accesses before thread 0's release.
__device__ __forceinline__ void chain_signal_block(const ChainLink& c) {
    if (!c.done) return;
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) chain_release_add(c.done);
}

// The same from one warp (the GEMV's warp 0, once the block's other warps have returned).
__device__ __forceinline__ void chain_signal_warp(const ChainLink& c) {
    if (!c.done) return;
    __syncwarp();
    if ((threadIdx.x & 31) == 0) chain_release_add(c.done);
}
#endif

// What a kernel that may be chained calls: with -DAWQE_FLAG_CHAIN its link's wait and signals; otherwise pdl_wait()
// and nothing (the link is not even a kernel argument there, so the default build's code stays as it was).
#if defined(AWQE_FLAG_CHAIN) && defined(AWQE_CHAIN_LATE)
#define AWQE_CHAIN_ENTRY_TRIGGER(link) \
    do {                               \
        if (!(link).wait)              \
            pdl_launch_dependents();   \
    } while (0)
#else
#define AWQE_CHAIN_ENTRY_TRIGGER(link) pdl_launch_dependents()
#endif
#if defined(AWQE_FLAG_CHAIN)
#define AWQE_CHAIN_WAIT(link) chain_wait(link)
#define AWQE_CHAIN_SIGNAL_BLOCK(link) chain_signal_block(link)
#define AWQE_CHAIN_SIGNAL_WARP(link) chain_signal_warp(link)
#else
#define AWQE_CHAIN_WAIT(link) pdl_wait()
#define AWQE_CHAIN_SIGNAL_BLOCK(link) ((void)0)
#define AWQE_CHAIN_SIGNAL_WARP(link) ((void)0)
#endif

template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
    return launch_kernel(true, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace awqe
