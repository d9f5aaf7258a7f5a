// What a kernel boundary costs in a CUDA graph of dependent kernels, and what a flag chain would save (bench/NOTES.md,
// r22). Built and run by bench/boundary.py; prints one JSON object.
//
// A chain of `kernels` launches of one kernel, `blocks` blocks of one warp each, each block busy for `work_ns`
// (%globaltimer) after its dependency resolves, then writing a word the next launch checks. Ways to resolve it:
//   plain: no launch attribute (the next kernel starts once this one has finished and flushed);
//   pdl:   programmatic dependent launch, launch_dependents at entry, griddepcontrol.wait (the decode step today);
//   flag:  the same launch, no griddepcontrol.wait: each block of launch k polls a counter (relaxed loads, a 32 ns
//          sleep, then one acquire fence) that every block of launch k - 1 adds to with one red.release.gpu after
//          writing its word: as r23's -DAWQE_FLAG_CHAIN build of the decode kernels did (rejected, removed after
//          55fb286; bench/NOTES.md, "The flag chain leaves the tree").
//   flag_pad, flag_late, flag_late_pad (r24, after r22 measured flag at 8-10 us a boundary): the counters 128 bytes
//          apart instead of adjacent (pad), and launch_dependents after the poll instead of at entry (late, so only
//          the launch after the running one is resident and polling, not every launch that fits).
// Per launch: the graph's time over its launches (us_per_kernel, which carries 1/kernels of the gap between
// replays); the boundary: the time a launch adds, from graphs of `kernels` and kernels / 2 launches, less work_ns.
// Every block checks the word of the launch before it (this replay's epoch, which the last launch advances: the
// driver checks it moved once a replay), so a chain that let a kernel run early counts errors. Every launch must fit
// on the GPU at once (the busy time is paid once), which main checks.
// Deadlock-free without the wait: launch k + 1 is scheduled only once every block of launch k has called
// launch_dependents, i.e. is resident, so a spinning block only waits on blocks already running.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CHECK(x)                                                                                     \
    do {                                                                                             \
        cudaError_t e_ = (x);                                                                        \
        if (e_ != cudaSuccess) {                                                                     \
            std::fprintf(stderr, "boundary: %s failed: %s (line %d)\n", #x, cudaGetErrorString(e_), \
                         __LINE__);                                                                  \
            std::exit(1);                                                                            \
        }                                                                                            \
    } while (0)

enum Mode { kPlain = 0, kPdl = 1, kFlag = 2, kFlagPad = 3, kFlagLate = 4, kFlagLatePad = 5, kModes = 6 };
static const char* kModeNames[] = {"plain", "pdl", "flag", "flag_pad", "flag_late", "flag_late_pad"};
constexpr int kPadWords = 32;  // one counter a 128-byte line in the padded modes

__host__ __device__ constexpr bool is_flag(int mode) { return mode >= kFlag; }
__host__ __device__ constexpr bool is_late(int mode) { return mode == kFlagLate || mode == kFlagLatePad; }
__host__ __device__ constexpr int stride_of(int mode) {
    return mode == kFlagPad || mode == kFlagLatePad ? kPadWords : 1;
}

struct Chain {
    unsigned* counters;  // [kernels * stride]: blocks of launch k done (flag modes); the last launch resets them
    int* words;          // [kernels][blocks]: launch k's blocks write epoch * kernels + k
    int* epoch;          // one word: the replay's number, advanced by the last launch
    int* errors;         // words found wrong
};

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ unsigned load_relaxed(const unsigned* p) {
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

template <int kMode>
__global__ void link(Chain c, int k, int kernels, int blocks, unsigned work_ns) {
    constexpr int stride = stride_of(kMode);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (kMode != kPlain && !is_late(kMode)) asm volatile("griddepcontrol.launch_dependents;" :::);
    if (kMode == kPdl) asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    if (is_flag(kMode) && k > 0) {
        if (threadIdx.x == 0) {
            while (load_relaxed(c.counters + (size_t)(k - 1) * stride) < (unsigned)blocks) __nanosleep(32);
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
        }
        __syncwarp();
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // late: launch k + 1 is scheduled once every block of this one has seen launch k - 1 done
    if (is_late(kMode)) asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
    // epoch: written by the previous replay's last launch, which finished before this replay began
    const int epoch = *(volatile int*)c.epoch;
    if (threadIdx.x == 0 && k > 0) {
        const int seen = *(volatile int*)(c.words + (size_t)(k - 1) * blocks + blockIdx.x);
        if (seen != epoch * kernels + k - 1) atomicAdd(c.errors, 1);
    }
    const unsigned long long t0 = global_ns();
    if (threadIdx.x == 0)
        while (global_ns() - t0 < work_ns) {
        }
    __syncwarp();
    if (threadIdx.x == 0) {
        c.words[(size_t)k * blocks + blockIdx.x] = epoch * kernels + k;
        if (is_flag(kMode) && k < kernels - 1)  // the last launch has no successor; its counter counts below
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c.counters + (size_t)k * stride) : "memory");
    }
    if (k == kernels - 1 && threadIdx.x == 0) {
        // every launch before this one has finished its checks (its counter, or the wait, says so); one block
        // advances the epoch and clears the counters for the next replay once all of this launch's blocks read it
        unsigned* last = c.counters + (size_t)(kernels - 1) * stride;
        __threadfence();  // this block's reads of the epoch and the words come before its count
        if (atomicAdd(last, 1u) == (unsigned)blocks - 1) {
            for (int i = 0; i < kernels; ++i) c.counters[(size_t)i * stride] = 0;
            __threadfence();
            *(volatile int*)c.epoch = epoch + 1;
        }
    }
}

// The kernel of each mode, indexed by Mode.
static void (*const kLinks[])(Chain, int, int, int, unsigned) = {link<kPlain>, link<kPdl>, link<kFlag>,
                                                                  link<kFlagPad>, link<kFlagLate>, link<kFlagLatePad>};
static_assert(sizeof(kLinks) / sizeof(kLinks[0]) == kModes, "a kernel for every mode");
static_assert(sizeof(kModeNames) / sizeof(kModeNames[0]) == kModes, "a name for every mode");

static void launch(int mode, bool programmatic, cudaStream_t s, Chain c, int k, int kernels, int blocks,
                   unsigned work_ns) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(32);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = programmatic ? 1 : 0;
    CHECK(cudaLaunchKernelEx(&cfg, kLinks[mode], c, k, kernels, blocks, work_ns));
}

static std::vector<int> parse_list(const char* s) {
    std::vector<int> v;
    for (const char* p = s; *p;) {
        char* end;
        const long x = std::strtol(p, &end, 10);
        if (end == p || x < 0 || x > 1000000000) {
            std::fprintf(stderr, "boundary: '%s' is not a comma-separated list of counts\n", s);
            std::exit(2);
        }
        v.push_back((int)x);
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') {
            std::fprintf(stderr, "boundary: '%s' is not a comma-separated list of counts\n", s);
            std::exit(2);
        }
    }
    return v;
}

struct Timed {
    double ms;
    int errors, epoch;
};

// `reps` replays (after 5 untimed) of a graph of n launches in one mode; counters, words and epoch start cleared.
static Timed time_chain(int mode, Chain c, int n, int blocks, int work, int reps, int max_kernels, int max_blocks,
                        cudaStream_t s, cudaEvent_t e0, cudaEvent_t e1) {
    CHECK(cudaMemset(c.counters, 0, sizeof(unsigned) * max_kernels * kPadWords));
    CHECK(cudaMemset(c.words, 0xff, sizeof(int) * (size_t)max_kernels * max_blocks));
    CHECK(cudaMemset(c.epoch, 0, sizeof(int)));
    CHECK(cudaMemset(c.errors, 0, sizeof(int)));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int k = 0; k < n; ++k) launch(mode, mode != kPlain && k > 0, s, c, k, n, blocks, (unsigned)work);
    CHECK(cudaStreamEndCapture(s, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int w = 0; w < 5; ++w) CHECK(cudaGraphLaunch(exec, s));  // warm-up
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaEventRecord(e0, s));
    for (int r = 0; r < reps; ++r) CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaGetLastError());
    Timed t = {};
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.ms = ms;
    CHECK(cudaMemcpy(&t.errors, c.errors, sizeof(int), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(&t.epoch, c.epoch, sizeof(int), cudaMemcpyDeviceToHost));
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    return t;
}

int main(int argc, char** argv) {
    int kernels = 64, reps = 200;
    std::vector<int> block_counts = {132, 768, 1376}, works = {0, 2000, 8000};  // as bench/boundary.py's defaults
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--kernels")) kernels = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--blocks")) block_counts = parse_list(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--work-ns")) works = parse_list(argv[i + 1]);
        else {
            std::fprintf(stderr, "boundary: unknown option %s (--kernels, --reps, --blocks, --work-ns)\n", argv[i]);
            return 2;
        }
    }
    if (argc % 2 == 0 || kernels < 4 || reps < 1 || block_counts.empty() || works.empty() ||
        *std::min_element(block_counts.begin(), block_counts.end()) < 1) {
        std::fprintf(stderr, "boundary: --kernels >= 4, --reps >= 1 and --blocks >= 1, each option with a value\n");
        return 2;
    }
    int dev = 0, count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        std::fprintf(stderr, "boundary: no CUDA GPU (or no driver for this CUDA runtime); run it on the GPU machine\n");
        return 1;
    }
    cudaDeviceProp prop;
    CHECK(cudaGetDevice(&dev));
    CHECK(cudaGetDeviceProperties(&prop, dev));
    const bool has_pdl = prop.major >= 9;
    const int max_blocks = *std::max_element(block_counts.begin(), block_counts.end());
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, link<kFlag>, 32, 0));
    if (max_blocks > per_sm * prop.multiProcessorCount) {
        std::fprintf(stderr, "boundary: --blocks %d is more than %s holds at once (%d): the busy time would be paid in "
                     "waves; use at most %d\n", max_blocks, prop.name, per_sm * prop.multiProcessorCount,
                     per_sm * prop.multiProcessorCount);
        return 2;
    }
    std::string name;
    for (const char* p = prop.name; *p; ++p) {
        if (*p == '"' || *p == '\\') name += '\\';
        name += *p;
    }

    Chain c;
    CHECK(cudaMalloc(&c.counters, sizeof(unsigned) * kernels * kPadWords));
    CHECK(cudaMalloc(&c.words, sizeof(int) * (size_t)kernels * max_blocks));
    CHECK(cudaMalloc(&c.epoch, sizeof(int)));
    CHECK(cudaMalloc(&c.errors, sizeof(int)));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));

    const int half = kernels / 2;
    std::string rows;
    for (int blocks : block_counts)
        for (int work : works)
            for (int mode = 0; mode < kModes; ++mode) {
                if (mode != kPlain && !has_pdl) continue;  // griddepcontrol needs sm_90
                const Timed full = time_chain(mode, c, kernels, blocks, work, reps, kernels, max_blocks, s, e0, e1);
                const Timed part = time_chain(mode, c, half, blocks, work, reps, kernels, max_blocks, s, e0, e1);
                const double us = full.ms * 1e3 / ((double)reps * kernels);
                const double added = (full.ms - part.ms) * 1e3 / ((double)reps * (kernels - half));
                char row[400];
                std::snprintf(row, sizeof row,
                              "%s{\"mode\": \"%s\", \"blocks\": %d, \"work_ns\": %d, \"us_per_kernel\": %.4f, "
                              "\"us_per_added_kernel\": %.4f, \"boundary_us\": %.4f, \"errors\": %d, "
                              "\"replays\": %d}",
                              rows.empty() ? "" : ",\n  ", kModeNames[mode], blocks, work, us, added,
                              added - work * 1e-3, full.errors + part.errors,
                              full.epoch == part.epoch ? full.epoch : -1);
                rows += row;
            }
    std::printf("{\"device\": \"%s\", \"sm_count\": %d, \"blocks_at_once\": %d, \"kernels\": %d, "
                "\"reps\": %d, \"rows\": [\n  %s]}\n",
                name.c_str(), prop.multiProcessorCount, per_sm * prop.multiProcessorCount, kernels, reps,
                rows.c_str());
    return 0;
}
