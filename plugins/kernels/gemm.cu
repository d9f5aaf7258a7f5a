// y = x @ W^T for M up to 16 rows per pass: int4 weights dequantised in registers, fp16 tensor-core mma, fp32 sums.
//
// Batch-1 decoding reads every weight once per token, so the kernel is built around the weight stream:
// each warp owns a 16-row tile and a share of its 64-value chunks, loads one 16-byte vector per lane per
// chunk, turns the nibbles into mma A fragments with lop3 (no conversion instructions), and lets the
// tensor cores do the multiply-adds, so the same instructions serve M = 1 to 8 (one mma n-tile) or
// 9 to 16 (two). The batch rows are the mma's n dimension; lanes of rows beyond M repeat row M - 1 and
// their results are dropped.
#include <cuda_fp16.h>

#include <vector>

#include "boundary.cuh"
#include "layout.cuh"
#include "pdl.cuh"

namespace awqe {
namespace {

constexpr int kMaxWarps = 8;
// Chunks a warp loads before it computes: 4 x 512 bytes in flight per warp. Stages of 8 measured no
// faster on the H100 (bench/NOTES.md, v3 and decode r6: 6-12% slower in the decode step) and need 170
// registers; -DAWQE_STAGE=8 builds them for such comparisons.
#ifndef AWQE_STAGE
#define AWQE_STAGE 4
#endif
constexpr int kStage = AWQE_STAGE;
static_assert(kStage % 2 == 0, "stages start at even chunks: whole blocks of 128 (layout.cuh)");
// The weight stream: cp.async into shared memory from sm_80 on (v5); -DAWQE_REGISTER_STREAM builds v4's
// register stages for every architecture, for A/B timing.
#if defined(AWQE_REGISTER_STREAM)
constexpr bool kAsyncBuild = false;
#else
constexpr bool kAsyncBuild = true;
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(AWQE_REGISTER_STREAM)
#define AWQE_ASYNC_STREAM 1
#endif
#if defined(AWQE_BULK_STREAM) && defined(AWQE_REGISTER_STREAM)
#error "AWQE_BULK_STREAM replaces the cp.async stream's copies; build it without AWQE_REGISTER_STREAM"
#endif
#if (defined(AWQE_PROBE_STREAM_ONLY) || defined(AWQE_PROBE_NO_X)) && defined(AWQE_REGISTER_STREAM)
#error "the r12 probes change the cp.async stream only; build them without AWQE_REGISTER_STREAM"
#endif
// Chunks per warp prefetched to L2 while the previous kernel finishes (8 KB a warp; the path without cp.async).
[[maybe_unused]] constexpr int kPrefetchChunks = 16;

// -DAWQE_PROBE_PLACEMENT (timing probe, bench/placement.py): each block of the M <= 8 kernel records its SM, and
// %globaltimer and its SM's clock at entry, when the PDL wait returns and when its tile's sums are done, so the
// placement of a launch's blocks and the SMs' idle time at its ramp and tail can be read back
// (awqe_probe_placement). Every launch writes the same slots: what is read back is the last launch's.
#if defined(AWQE_PROBE_PLACEMENT)
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned sm_id() {
    unsigned s;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
    return s;
}
__device__ ProbeRecord g_probe[kProbeBlocks];
#endif

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));  // (a & b) | c
    return d;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {  // i is a compile-time constant after unrolling
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 as_half2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// One packed word -> the four A registers of one k-step, each (q - zero) exactly in fp16.
// OR-ing a nibble into the mantissa of 1024.0 gives 1024 + q (low nibble) or 1024 + 16 q (high nibble), so
// subtracting 1024 + zero, or scaling by 1/16 and subtracting 64 + zero, is exact.
__device__ __forceinline__ void dequant(uint32_t q, __half2 zlo, __half2 zhi, uint32_t a[4]) {
    const uint32_t lo = 0x000F000F, hi = 0x00F000F0, magic = 0x64006400;
    const __half2 sixteenth = __float2half2_rn(1.f / 16.f);
    const uint32_t q8 = q >> 8;
    a[0] = as_u32(__hsub2(as_half2(lop3_and_or(q, lo, magic)), zlo));
    a[1] = as_u32(__hfma2(as_half2(lop3_and_or(q, hi, magic)), sixteenth, zhi));
    a[2] = as_u32(__hsub2(as_half2(lop3_and_or(q8, lo, magic)), zlo));
    a[3] = as_u32(__hfma2(as_half2(lop3_and_or(q8, hi, magic)), sixteenth, zhi));
}

// c += A (16 x 16, row-major fragment) * B (16 x 8, col-major fragment), fp32 accumulators.
__device__ __forceinline__ void mma_16x8x16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else  // Turing has only the k8 shape: two of them, over k 0..7 then 8..15 of the fragment
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
}

// The weights are read once: stream them past L1 and mark them first to leave L2 (the path without cp.async).
[[maybe_unused]] __device__ __forceinline__ uint4 load_streaming(const uint4* p) { return __ldcs(p); }

// One chunk's activations for a lane: k = 8t .. 8t + 7 and 32 + 8t .. 32 + 8t + 7 (see layout.cuh).
// kReadOnly: through __ldg, for kernels launched without PDL (M > 8: each lane reads 4 x-vectors a chunk, and the
// read-only path keeps M = 16 at v4's speed, 30-45% faster than plain loads at the large shapes). With PDL, x is
// written while the kernel runs, so plain loads (ptxas may move __ldg above the wait, see pdl.cuh).
// kGuard: past K (only in a row's last chunks) they read as zeros; K is a multiple of 8, so each half is
// wholly inside or wholly outside.
template <bool kGuard, bool kReadOnly>
__device__ __forceinline__ void load_x(uint4 out[2], const uint16_t* p, int left) {
    const uint4* v = reinterpret_cast<const uint4*>(p);
    if constexpr (kReadOnly) {
        out[0] = !kGuard || left > 0 ? __ldg(v) : make_uint4(0, 0, 0, 0);
        out[1] = !kGuard || left > 32 ? __ldg(v + 4) : make_uint4(0, 0, 0, 0);
    } else {
        out[0] = !kGuard || left > 0 ? v[0] : make_uint4(0, 0, 0, 0);
        out[1] = !kGuard || left > 32 ? v[4] : make_uint4(0, 0, 0, 0);
    }
}

// Batch rows M <= 8 (one mma n-tile, MT = 1) is the decode GEMV: launched with PDL. M > 8 is not.
template <int MT>
constexpr bool kProgrammatic = MT == 1;

// acc += the products of one chunk: kUnits block-scale applications of 4 / kUnits mma k-steps each.
template <int MT, int kUnits>
__device__ __forceinline__ void compute_chunk(float (&acc)[MT][4], uint4 w, const uint2 (&p)[kUnits],
                                              const uint4 (&xv)[MT][2]) {
    constexpr int kSteps = 4 / kUnits;
#pragma unroll
    for (int v = 0; v < kUnits; ++v) {
        const __half2 zc = as_half2(p[v].y);
        const __half2 zlo = __low2half2(zc), zhi = __high2half2(zc);
        float part[MT][4] = {};
#pragma unroll
        for (int k = 0; k < kSteps; ++k) {
            const int s = v * kSteps + k;
            uint32_t a[4];
            dequant(word(w, s), zlo, zhi, a);
#pragma unroll
            for (int j = 0; j < MT; ++j)
                mma_16x8x16(part[j], a, word(xv[j][s >> 1], (2 * s) & 3), word(xv[j][s >> 1], (2 * s + 1) & 3));
        }
        const __half2 sc = as_half2(p[v].x);
        const float s_lo = __low2float(sc), s_hi = __high2float(sc);
#pragma unroll
        for (int j = 0; j < MT; ++j) {
            acc[j][0] += s_lo * part[j][0];
            acc[j][1] += s_lo * part[j][1];
            acc[j][2] += s_hi * part[j][2];
            acc[j][3] += s_hi * part[j][3];
        }
    }
}

// ---- Weight stream, sm_80 and newer: cp.async into a ring of shared-memory stages ----
// Each warp owns a ring of kDepth stages (kStage chunks of weights and their block parameters). Lanes copy their
// own 16-byte vectors with cp.async, so the bytes in flight per warp are kDepth - 1 to kDepth stages, not the
// registers a warp can spare (v4 held one stage in registers). The first kDepth stages are issued before the PDL
// wait (weights are constants; -DAWQE_PRE_WAIT=N: the first N), so a GEMV after a latency-bound kernel has its first
// bytes on chip already.
// A lane reads back its own weight vectors, but the block parameters (one 16-byte vector serves lanes of two
// values of g) cross lanes: a __syncwarp after each stage lands and before its slot is refilled.

[[maybe_unused]] __device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
#endif
}

[[maybe_unused]] __device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// -DAWQE_BULK_STREAM (sm_90, for A/B timing, bench/NOTES.md r16): lane 0 of each warp copies a whole stage (its
// kStage contiguous chunks, then its block parameters) with two TMA bulk copies that complete on the slot's
// mbarrier, instead of 32 lanes issuing a 16-byte cp.async each. Why: the wide one-warp GEMVs take as long on the
// H200 as on the H100 (22016 x 4096: 19.1 / 19.0 us), so a limit on each SM's requests in flight, not DRAM, may
// pace them; a bulk copy is one request of up to 2 KB to the SM's copy engine.
#if defined(AWQE_BULK_STREAM) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define AWQE_BULK 1
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, uint32_t phase) {
    asm volatile("{\n .reg .pred p;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 " @!p bra WAIT;\n}" ::"r"(smem_u32(bar)), "r"(phase) : "memory");
}
#endif

// A stage's block parameters: kStage * kChunkK / BS blocks of 8 uint2 (64 bytes) each, contiguous per tile.
template <int BS>
__host__ __device__ constexpr int stage_param_vectors() { return kStage * kChunkK / BS * 4; }
// uint4 per stage slot: the weights (32 per chunk), then the parameters rounded up to whole warps of 32.
template <int BS>
__host__ __device__ constexpr int stage_vectors() { return kStage * 32 + (stage_param_vectors<BS>() + 31) / 32 * 32; }

// Copy stage `c .. c + kStage - 1` (chunk indices of the tile) into `slot`. kGuard: chunks from `end` on skipped.
template <int BS, bool kGuard>
__device__ __forceinline__ void issue_stage(uint4* slot, const uint4* wt, const uint4* ptile, int c, int end,
                                            int lane) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (kGuard && c + u >= end) break;
        cp_async16(slot + u * 32 + lane, wt + (c + u) * 32);
    }
    constexpr int kParams = stage_param_vectors<BS>();
    const uint4* pp = ptile + c * kChunkK / BS * 4;  // c is even, so whole blocks for BS = 128 too
#pragma unroll
    for (int i = lane; i < kParams; i += 32) {
        if (kGuard && c + i / 4 * BS / kChunkK >= end) break;  // block i / 4 starts in chunk c + (i / 4) * BS / 64
        cp_async16(slot + kStage * 32 + i, pp + i);
    }
}

// The activations of chunks c .. c + kStage - 1 (those before `end`) for this lane, all loads issued together.
template <int MT, bool kGuard>
__device__ __forceinline__ void load_stage_x(uint4 (&xv)[kStage][MT][2], const uint16_t* const (&xrow)[MT], int c,
                                             int end, int K, int t) {
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (kGuard && c + u >= end) break;
#pragma unroll
        for (int j = 0; j < MT; ++j)
            load_x<kGuard, !kProgrammatic<MT>>(xv[u][j], xrow[j] + (c + u) * kChunkK, K - (c + u) * kChunkK - 8 * t);
    }
}

// A stage's activations for this lane (L1/L2 hits), or with -DAWQE_PROBE_NO_X (a timing probe, wrong results)
// none: x read as 1.0 everywhere. kGuard: chunks from `end` on skipped, activations past K read as zeros.
template <int MT, bool kGuard>
__device__ __forceinline__ void stage_x(uint4 (&xv)[kStage][MT][2], const uint16_t* const (&xrow)[MT], int c, int end,
                                        int K, int lane) {
#if defined(AWQE_PROBE_NO_X) || defined(AWQE_PROBE_STREAM_ONLY)
#pragma unroll
    for (int u = 0; u < kStage; ++u)
#pragma unroll
        for (int j = 0; j < MT; ++j) xv[u][j][0] = xv[u][j][1] = make_uint4(0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u);
#else
    load_stage_x<MT, kGuard>(xv, xrow, c, end, K, lane & 3);
#endif
}

// acc += the products of the stage in `slot` with its activations xv (load_stage_x). kGuard as in run_stage.
template <int MT, int BS, bool kGuard>
__device__ __forceinline__ void compute_stage(float (&acc)[MT][4], const uint4* slot, uint4 (&xv)[kStage][MT][2],
                                              const uint16_t* const (&xrow)[MT], int c, int end, int K, int lane) {
#if defined(AWQE_PROBE_STREAM_ONLY)
    // Timing probe (wrong results): the weight stream alone, each landed vector read back from shared memory but no
    // products; with the default build it splits a GEMV's time into stream and compute (bench/NOTES.md, r12).
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (kGuard && c + u >= end) break;
        const uint4 w = slot[u * 32 + lane];
        acc[0][0] += __uint_as_float((w.x ^ w.y ^ w.z ^ w.w) & 0x3f800000u);
    }
#else
    constexpr int kUnitK = BS < kChunkK ? BS : kChunkK;
    constexpr int kUnits = kChunkK / kUnitK;
    const uint2* params = reinterpret_cast<const uint2*>(slot + kStage * 32) + (lane >> 2);
    stage_x<MT, kGuard>(xv, xrow, c, end, K, lane);
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (kGuard && c + u >= end) break;
        uint2 p[kUnits];
#pragma unroll
        for (int v = 0; v < kUnits; ++v) p[v] = params[(u * kChunkK + v * kUnitK) / BS * 8];
        compute_chunk<MT, kUnits>(acc, slot[u * 32 + lane], p, xv[u]);
    }
#endif
}

// The warp's chunks [begin, end) through its ring of kDepth stages: issue(s) copies stage s into its slot.
template <int BS, int kDepth>
struct AsyncStream {
    uint4* ring;
    const uint4* wt;
    const uint4* ptile;
    int begin, end, lane, stages;
#if defined(AWQE_BULK)
    unsigned long long* bars;  // the warp's kDepth mbarriers, one a slot

    __device__ __forceinline__ AsyncStream(uint4* ring_, const uint4* wt_, const uint4* ptile_, int begin_, int end_,
                                           int lane_, unsigned long long* bars_)
        : ring(ring_), wt(wt_ - lane_), ptile(ptile_), begin(begin_), end(end_), lane(lane_),
          stages(end_ > begin_ ? (end_ - begin_ + kStage - 1) / kStage : 0), bars(bars_) {
        if (lane == 0) {
            for (int i = 0; i < kDepth; ++i) mbar_init(bars + i);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncwarp();
    }
#else
    __device__ __forceinline__ AsyncStream(uint4* ring_, const uint4* wt_, const uint4* ptile_, int begin_, int end_,
                                           int lane_, unsigned long long* = nullptr)
        : ring(ring_), wt(wt_), ptile(ptile_), begin(begin_), end(end_), lane(lane_),
          stages(end_ > begin_ ? (end_ - begin_ + kStage - 1) / kStage : 0) {}
#endif

    __device__ __forceinline__ uint4* slot(int s) const { return ring + (s % kDepth) * stage_vectors<BS>(); }

    __device__ __forceinline__ void issue(int s) {
        const int c = begin + s * kStage;
#if defined(AWQE_BULK)
        if (s < stages && lane == 0) {  // the stage's chunks before `end` and the blocks that start in them
            const int n = min(kStage, end - c);
            const int np = min(stage_param_vectors<BS>(), 4 * ((n * kChunkK + BS - 1) / BS));
            unsigned long long* bar = bars + s % kDepth;
            mbar_expect_tx(bar, n * kChunkBytes + np * 16);
            bulk_copy(slot(s), wt + c * 32, n * kChunkBytes, bar);
            bulk_copy(slot(s) + kStage * 32, ptile + c * kChunkK / BS * 4, np * 16, bar);
        }
#else
        if (s < stages) {
            if (c + kStage <= end) issue_stage<BS, false>(slot(s), wt, ptile, c, end, lane);
            else issue_stage<BS, true>(slot(s), wt, ptile, c, end, lane);
        }
        cp_async_commit();  // empty groups past the end keep the group count uniform
#endif
    }

    // Before the PDL wait: the first kDepth stages, a slot each (weights are constants). For the small products
    // (o: 2 stages a warp) that is all of them, so their weights arrive while attention runs.
    // -DAWQE_PRE_WAIT=N (for A/B timing, bench/NOTES.md r21): only the first N of them before the wait, the rest
    // after it (prologue_rest), to tell r20's gain apart: fewer bytes requested beside the kernel still running, or
    // fewer in flight once streaming. Either way every slot is issued, and committed, before run's first wait. (A
    // bare -DAWQE_PRE_WAIT is N = 1; the register stream, -DAWQE_REGISTER_STREAM, has no ring and ignores it.)
    __device__ __forceinline__ void prologue() {
#pragma unroll
        for (int s = 0; s < kPreWait; ++s) issue(s);
    }
    __device__ __forceinline__ void prologue_rest() {
#pragma unroll
        for (int s = kPreWait; s < kDepth; ++s) issue(s);
    }
#if defined(AWQE_PRE_WAIT)
    static constexpr int kPreWait = AWQE_PRE_WAIT < kDepth ? AWQE_PRE_WAIT : kDepth;
    static_assert(AWQE_PRE_WAIT >= 0, "AWQE_PRE_WAIT: how many ring stages go out before the PDL wait, 0 or more");
#else
    static constexpr int kPreWait = kDepth;
#endif

    // After it: each stage is computed once it has landed, then its slot refilled with the stage kDepth ahead,
    // so kDepth - 1 stages stay in flight. fast_end: chunks whose activations all lie inside K.
    template <int MT>
    __device__ __forceinline__ void run(float (&acc)[MT][4], const uint16_t* const (&xrow)[MT], int fast_end, int K) {
        for (int s = 0; s < stages; ++s) {
            uint4 xv[kStage][MT][2];
#if defined(AWQE_BULK)
            mbar_wait(bars + s % kDepth, (s / kDepth) & 1);  // the slot's (s / kDepth)-th fill has landed
#else
            cp_async_wait<kDepth - 1>();  // stage s's group: kDepth + s committed, the newest kDepth - 1 may pend
            __syncwarp();  // block parameters are read by lanes other than the one that copied them
#endif
            const int c = begin + s * kStage;
            const bool fast = c + kStage <= fast_end;
            if (fast) {
                compute_stage<MT, BS, false>(acc, slot(s), xv, xrow, c, end, K, lane);
            } else {
                compute_stage<MT, BS, true>(acc, slot(s), xv, xrow, c, end, K, lane);
            }
            __syncwarp();  // every lane has read the slot before any lane refills it
            issue(s + kDepth);
        }
#if !defined(AWQE_BULK)
        cp_async_wait<0>();
#endif
    }
};

// ---- Weight stream before sm_80 (no cp.async): each stage's loads in registers, issued before use ----
// kStage * 512 bytes in flight per warp for the price of a few address instructions. kGuard: chunks from `end`
// on are skipped, activations past K read as zeros.
template <int MT, int BS, bool kGuard>
__device__ __forceinline__ void run_stage(float (&acc)[MT][4], const uint4* wt, const uint2* pt,
                                          const uint16_t* const (&xrow)[MT], int c, int end, int K, int t) {
    constexpr int kUnitK = BS < kChunkK ? BS : kChunkK;  // values per block-scale application
    constexpr int kUnits = kChunkK / kUnitK;
    const uint4* wp = wt + c * 32;
    const uint2* pp = pt + c * kChunkK / BS * 8;  // c is even, so exact for BS = 128 too
    uint4 w[kStage], xv[kStage][MT][2];
    uint2 p[kStage][kUnits];
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (kGuard && c + u >= end) break;
        w[u] = load_streaming(wp + u * 32);
#pragma unroll
        for (int v = 0; v < kUnits; ++v) p[u][v] = __ldg(pp + (u * kChunkK + v * kUnitK) / BS * 8);
    }
    load_stage_x<MT, kGuard>(xv, xrow, c, end, K, t);
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (kGuard && c + u >= end) break;
        compute_chunk<MT, kUnits>(acc, w[u], p[u], xv[u]);
    }
}

template <int MT, int BS>
__device__ __forceinline__ void stream_registers(float (&acc)[MT][4], const uint4* wt, const uint2* pt,
                                                 const uint16_t* const (&xrow)[MT], int begin, int end, int fast_end,
                                                 int K, int t) {
    int c = begin;
    for (; c + kStage <= fast_end; c += kStage) run_stage<MT, BS, false>(acc, wt, pt, xrow, c, end, K, t);
    for (; c < end; c += kStage) run_stage<MT, BS, true>(acc, wt, pt, xrow, c, end, K, t);
}

// The product as the caller asked for it (layout.cuh: x, bias, y, M, N, K, gated and the norm folds), and what the
// launcher derives from the layout.
struct GemmArgs : GemmFold {
    const uint4* weights;
    const uint2* params;
    int chunks, pblocks, mslices, per_warp;
};

// This lane's share of batch row m's sum of squares of h. From h itself: 16 vectors per lane at a time (8 for
// MT = 2, which holds twice the accumulators), 4096 values in one round trip to L2 (4 at a time cost the decode GEMVs
// 1-2 us each).
template <int MT>
__device__ __forceinline__ float lane_sumsq(const GemmArgs& a, int m, int lane) {
    constexpr int kRmsBatch = 16 / MT;
    const int vecs = a.K / 8;
    const uint4* h = reinterpret_cast<const uint4*>(a.rms_x + (size_t)m * a.K);
    float ss = 0.f;
    for (int i0 = lane; i0 < vecs; i0 += 32 * kRmsBatch) {  // kRmsBatch loads in flight: one L2 latency
        uint4 v[kRmsBatch];
#pragma unroll
        for (int b = 0; b < kRmsBatch; ++b) v[b] = i0 + 32 * b < vecs ? h[i0 + 32 * b] : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int b = 0; b < kRmsBatch; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = __half22float2(as_half2(word(v[b], e)));
                ss += f.x * f.x + f.y * f.y;
            }
    }
    return ss;
}

// From the per-tile sums of squares the product before wrote (GemmFold::rms_sumsq): K / 16 floats a row instead of
// K halves, 8 loads a lane in flight (K = 8192 in one round trip).
__device__ __forceinline__ float lane_sumsq_of_tiles(const GemmArgs& a, int m, int lane) {
    const int parts = (a.K + kTileRows - 1) / kTileRows;
    const float* p = a.rms_sumsq + (size_t)m * parts;
    float ss = 0.f;
    for (int i0 = lane; i0 < parts; i0 += 32 * 8) {
        float v[8];
#pragma unroll
        for (int b = 0; b < 8; ++b) v[b] = i0 + 32 * b < parts ? p[i0 + 32 * b] : 0.f;
#pragma unroll
        for (int b = 0; b < 8; ++b) ss += v[b];
    }
    return ss;
}

// rsqrt(mean(h^2) + eps) of the batch rows this lane's accumulator columns hold (2t and 2t + 1 of each n-tile), from
// h (kTiles false) or from its tiles' sums. Two instances, not a branch inside one loop: the branch cost the hot
// kernels 8 registers (r18).
template <int MT, bool kTiles>
__device__ __forceinline__ void row_rstd(float (&rs)[MT][2], const GemmArgs& a, int m0, int lane) {
    const int t = lane & 3;
    const int rows = min(8 * MT, a.M - m0);
#pragma unroll
    for (int j = 0; j < MT; ++j) rs[j][0] = rs[j][1] = 1.f;
    for (int r = 0; r < rows; ++r) {
        float ss = kTiles ? lane_sumsq_of_tiles(a, m0 + r, lane) : lane_sumsq<MT>(a, m0 + r, lane);
#pragma unroll
        for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float r_std = rsqrtf(ss / a.K + a.eps);
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 2; ++i)
                if (r == 8 * j + 2 * t + i) rs[j][i] = r_std;
    }
}

// The gate's activation in fp32 from its fp16 value, as PyTorch computes F.silu and F.gelu on fp16 tensors (the
// caller rounds the result): kind 1 SiLU, 2 GELU with the tanh approximation (Gemma), 3 GELU with erf.
__device__ __forceinline__ float gate_activation(int kind, float x) {
    if (kind == 2) return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    if (kind == 3) return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
    return x / (1.f + __expf(-x));
}

// Block = the warps sharing one 16-row tile (and one slice of 8 * MT batch rows); MT mma n-tiles of 8 rows.
// Warp w takes the chunks [w * per_warp, (w + 1) * per_warp) of the tile; per_warp is even.
// Dynamic shared memory: each warp's ring of kDepth stages (sm_80+), then the cross-warp partial sums.
// Registers: as many as the kernel asks (~100 for MT = 1, ~167 for MT = 2; the default heuristic chose 80 for
// MT = 1 and spilled), so MT = 2 runs at most 4 warps a tile by default (choose_warps).
// -DAWQE_MIN_BLOCKS=3 caps the M <= 8 kernels at 80 registers (from 103-107; 8-40 bytes spilled), so a SM holds 24-25
// warps instead of 16, for A/B timing with -DAWQE_WARP_BUDGET=24: r9/r11's budget of 24 warps a SM ran grids of
// more than 16 warps a SM in two waves (bench/NOTES.md, r13's ncu: registers and shared memory cap occupancy at 16).
#ifndef AWQE_MIN_BLOCKS
#define AWQE_MIN_BLOCKS 1
#endif
// Gemma 2/3's block boundary after the product (BoundaryFold), by the block that finishes last: boundary_row
// (boundary.cuh, residual_norm_kernel's too) over every thread of it, y and h read from L2 (the other blocks wrote
// y). Its barriers are block_barrier's: warp 0 comes here after its epilogue, the other warps where they returned.
__device__ void fold_boundary(const GemmArgs& a, const BoundaryFold& b) {
    __shared__ float part[kMaxWarps];
    __shared__ bool last;
    __threadfence();  // this block's y before its ticket
    block_barrier();
    if (threadIdx.x == 0) last = atomicAdd(b.ticket, 1u) == gridDim.x - 1;
    block_barrier();
    if (!last) return;
    __threadfence();
    boundary_row<0, true>(reinterpret_cast<const __half2*>(a.y), reinterpret_cast<const __half2*>(b.out_w),
                          reinterpret_cast<float2*>(b.h), reinterpret_cast<const __half2*>(b.next_w),
                          reinterpret_cast<__half2*>(b.x), a.N / 2, a.eps, part);
    if (threadIdx.x == 0) *b.ticket = 0;  // ready for the next launch
}

// The product's body, inlined into the two kernels below. kBnd: with the block boundary b after it, where every
// warp of the block stays for it.
template <int MT, int BS, int kDepth, bool kBnd>
__device__ __forceinline__ void gemm_body(const GemmArgs& a, const BoundaryFold& b) {
    extern __shared__ uint4 smem[];
    const int tile = blockIdx.x / a.mslices, m0 = (blockIdx.x % a.mslices) * 8 * MT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int M = a.M, N = a.N, K = a.K;
#if defined(AWQE_PROBE_PLACEMENT)
    const unsigned long long probe_t0 = global_ns();
    const long long probe_c0 = clock64();
#endif
    const uint4* wt = a.weights + (size_t)tile * a.chunks * 32 + lane;
    // Lanes of batch rows >= M read row M - 1: their products land in accumulator columns nobody writes.
    const uint16_t* xrow[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] = a.x + (size_t)min(m0 + 8 * j + g, M - 1) * K + 8 * t;

    float acc[MT][4] = {};
    const int begin = warp * a.per_warp, end = min(a.chunks, begin + a.per_warp);
    const int fast_end = min(end, K / kChunkK);  // chunks whose activations all lie inside K
#if defined(AWQE_ASYNC_STREAM)
#if defined(AWQE_BULK)
    __shared__ alignas(8) unsigned long long bars[kMaxWarps * kDepth];
#else
    unsigned long long* bars = nullptr;
#endif
    AsyncStream<BS, kDepth> stream(smem + warp * kDepth * stage_vectors<BS>(), wt,
                                   reinterpret_cast<const uint4*>(a.params + (size_t)tile * a.pblocks * 8), begin, end,
                                   lane, bars ? bars + warp * kDepth : nullptr);
    stream.prologue();
    float* partial = reinterpret_cast<float*>(smem + nwarps * kDepth * stage_vectors<BS>());
#else
    // Pull the warp's first chunks towards L2 before waiting for the kernel that writes x (see pdl.cuh).
    for (int u = begin; u < min(end, begin + kPrefetchChunks); ++u)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(wt + u * 32));
    float* partial = reinterpret_cast<float*>(smem);
#endif
    // -DAWQE_PDL_LATE (for A/B timing, bench/NOTES.md r17): the next kernel is let in only once every block has
    // streamed its share, not at entry, so its blocks find the SMs as this kernel leaves them rather than wherever
    // a slot is free while it runs (an even placement, at the cost of the next prologue's overlap).
#if !defined(AWQE_PDL_LATE)
    pdl_launch_dependents();
#endif
    pdl_wait();
#if defined(AWQE_PROBE_PLACEMENT)
    const unsigned long long probe_t1 = global_ns();
    const long long probe_c1 = clock64();
#endif
#if defined(AWQE_ASYNC_STREAM)
    stream.prologue_rest();  // the slots the prologue left (none unless -DAWQE_PRE_WAIT)
#endif
    // The folded RMSNorm's 1/rms per batch row, for the warp that writes the outputs; its loads of h (L2) overlap
    // the weight stages already in flight.
    float rs[MT][2];
    if (a.rms_x && warp == 0) {
        if (a.rms_sumsq)
            row_rstd<MT, true>(rs, a, m0, lane);
        else
            row_rstd<MT, false>(rs, a, m0, lane);
    }
#if defined(AWQE_ASYNC_STREAM)
    stream.template run<MT>(acc, xrow, fast_end, K);
#else
    stream_registers<MT, BS>(acc, wt, a.params + (size_t)tile * a.pblocks * 8 + g, xrow, begin, end, fast_end, K, t);
#endif
#if defined(AWQE_PDL_LATE)
    pdl_launch_dependents();
#endif

    if (nwarps > 1) {  // the warps of a tile split its chunks: sum their fragments through shared memory
        float* mine = partial + (warp * 32 + lane) * (MT * 4);
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) mine[j * 4 + i] = acc[j][i];
        __syncthreads();
        if (warp != 0) {
            if constexpr (kBnd) fold_boundary(a, b);  // the same barriers as warp 0's call below
            return;
        }
        for (int o = 1; o < nwarps; ++o) {
            const float* theirs = partial + (o * 32 + lane) * (MT * 4);
#pragma unroll
            for (int j = 0; j < MT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[j][i] += theirs[j * 4 + i];
        }
    }
#if defined(AWQE_PROBE_PLACEMENT)
    if (MT == 1 && lane == 0 && blockIdx.x < kProbeBlocks)  // warp 0 (the others are in fold_boundary or gone)
        g_probe[blockIdx.x] = ProbeRecord{probe_t0, probe_t1, global_ns(), sm_id(), (unsigned)(probe_c1 - probe_c0),
                                          (unsigned)(clock64() - probe_c0), (unsigned)blockDim.x};
#endif
    if (a.rms_x) {  // the folded RMSNorm: scale each batch row's sums by its rsqrt(mean(h^2) + eps)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[j][i] *= rs[j][i & 1];
    }
    // Accumulator fragment: element i is row g + 8 (i / 2) of the tile, batch row 2t + (i % 2) of the n-tile.
    if (a.gated) {  // rows g (gate) and g + 8 (up) of a tile are one output: fp16(act(gate)) * up, as PyTorch rounds
        const int n = tile * (kTileRows / 2) + g, n_out = N / 2;
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int m = m0 + 8 * j + 2 * t + i;
                if (n >= n_out || m >= M) continue;
                float gv = acc[j][i], uv = acc[j][i + 2];
                if (a.bias) {
                    gv += __half2float(__ushort_as_half(a.bias[tile * kTileRows + g]));
                    uv += __half2float(__ushort_as_half(a.bias[tile * kTileRows + g + 8]));
                }
                const __half act = __float2half_rn(gate_activation(a.gated, __half2float(__float2half_rn(gv))));
                a.y[(size_t)m * n_out + n] = __half_as_ushort(__hmul(act, __float2half_rn(uv)));
            }
        return;
    }
    // sumsq_out: this lane's squares of the y it writes (batch row 2t + (i % 2) of each n-tile), taken as written
    // (bias may be y itself, an in-place residual add), then summed over the tile's 16 rows (g: lanes 4g + t) in a
    // fixed order.
    float ss[MT][2] = {};
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = tile * kTileRows + g + 8 * (i >> 1), m = m0 + 8 * j + 2 * t + (i & 1);
            if (n >= N || m >= M) continue;
            float v = acc[j][i];
            if (a.bias) v += __half2float(__ushort_as_half(a.bias[n]));
            const __half out = __float2half_rn(v);
            a.y[(size_t)m * N + n] = __half_as_ushort(out);
            if (a.norm_w) a.y_norm[(size_t)m * N + n] = __half_as_ushort(__hmul(__ushort_as_half(a.norm_w[n]), out));
            const float o = __half2float(out);
            ss[j][i & 1] += o * o;
        }
    if (a.sumsq_out) {
        const int tiles = gridDim.x / a.mslices;
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                float v = ss[j][i];
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                const int m = m0 + 8 * j + 2 * t + i;
                if (g == 0 && m < M) a.sumsq_out[(size_t)m * tiles + tile] = v;
            }
    }
    if constexpr (kBnd) fold_boundary(a, b);
}

template <int MT, int BS, int kDepth>
__global__ void __launch_bounds__(32 * kMaxWarps, MT == 1 ? AWQE_MIN_BLOCKS : 1) gemm_kernel(const GemmArgs a) {
    gemm_body<MT, BS, kDepth, false>(a, BoundaryFold{});
}

// The boundary's own kernel, so that the products without it keep their argument (a larger one changed their
// code: 2-8 registers either way).
template <int MT, int BS, int kDepth>
__global__ void __launch_bounds__(32 * kMaxWarps, MT == 1 ? AWQE_MIN_BLOCKS : 1)
gemm_boundary_kernel(const GemmArgs a, const BoundaryFold b) {
    gemm_body<MT, BS, kDepth, true>(a, b);
}

// The most warps per tile (a power of two) that keeps the grid within about 16 warps per SM, so that all
// blocks are resident at once, while every warp keeps at least one full stage of chunks. A grid of more than 16
// one-warp tiles per SM takes two warps a tile instead, in two waves: Qwen2.5-7B's gate/up (37888 x 3584, 17.9
// tiles per SM) ran 33.2 us with one warp and 29.3 with two, and its decode step 10.8% faster (bench/NOTES.md, r9);
// at 10-14 tiles per SM (Llama's, Gemma-2's gate/up) one warp is faster.
// -DAWQE_WARP_BUDGET=N aims at N warps per SM instead, for A/B timing (24 lost 2-5% on the H100, r9).
#ifndef AWQE_WARP_BUDGET
#define AWQE_WARP_BUDGET 16
#endif
int choose_warps(int blocks, int chunks, int sm_count, int max_warps) {
    constexpr size_t kBudget = AWQE_WARP_BUDGET;
    int w = 1;
    while (w < max_warps && (size_t)blocks * 2 * w <= (size_t)sm_count * kBudget && kStage * 2 * w <= chunks) w *= 2;
    if (w == 1 && (size_t)blocks > (size_t)sm_count * kBudget && max_warps >= 2 && kStage * 2 * 2 <= chunks) w = 2;
    return w;
}

// Ring depth per warp (sm_80+): blocks of one or two warps (the large shapes, ~10-16 warps per SM) keep kDeep
// stages in flight each, blocks of 4-8 warps kShallow = 2 (their block's shared memory stays at 44 KB with the
// cross-warp sums, 48 KB for M > 8 at 8 warps: within what every architecture gives without opting in; larger
// builds, -DAWQE_STAGE=8, opt in at launch). kDeep was 3 until r20 (bench/NOTES.md, H100): the products alone timed
// the same at 2 and 3 stages, but the chained decode step ran 1.035x the tok/s at Llama-2-7B (1825.8 -> 1758.4 us a
// step) and 1.012x at Llama-3-8B; 4 had lost 1.5% against 3 (r7). So both are 2 now, and -DAWQE_DEPTH=3 (or
// -DAWQE_DEEP_WARPS=4 with it) builds the deeper ring for A/B timing.
#ifndef AWQE_DEPTH
#define AWQE_DEPTH 2
#endif
// -DAWQE_DEEP_WARPS=4 gives blocks of 4 warps the deep ring too, for A/B timing: r12's stream alone ran 15-23% faster
// at 4 warps a tile than at one on the wide products (22016 and 28672 rows), where the whole kernel at 4 warps, with
// 2 stages a warp, was slower. r13 (H100): the deep ring did not help them, 19.5 -> 20.3 us and 24.2 -> 25.2 us at
// 4 warps a tile (bench/NOTES.md); the default stays 2. It changes nothing unless AWQE_DEPTH is not 2.
#ifndef AWQE_DEEP_WARPS
#define AWQE_DEEP_WARPS 2
#endif
constexpr int kDeep = AWQE_DEPTH, kShallow = 2, kDeepWarps = AWQE_DEEP_WARPS;
static_assert(kDeepWarps >= 2 && kDeepWarps <= kMaxWarps && (kDeepWarps & (kDeepWarps - 1)) == 0,
              "AWQE_DEEP_WARPS: a power of two from 2 (the default) to 8");

// bnd non-null: gemm_boundary_kernel (M = 1).
template <int MT, int BS, int kDepth>
cudaError_t launch(GemmArgs a, int blocks, int warps, bool async_copy, const Device& dev, cudaStream_t stream,
                   const BoundaryFold* bnd) {
    if (MT != 1 && bnd) return cudaErrorInvalidValue;  // unreachable: the C ABI admits the boundary at M = 1 only
    const void* kernel = reinterpret_cast<const void*>(gemm_kernel<MT, BS, kDepth>);
    if constexpr (MT == 1)
        if (bnd) kernel = reinterpret_cast<const void*>(gemm_boundary_kernel<MT, BS, kDepth>);
    const size_t partial = warps > 1 ? (size_t)warps * 32 * MT * 4 * sizeof(float) : 0;
    const size_t ring = async_copy ? (size_t)warps * kDepth * stage_vectors<BS>() * sizeof(uint4) : 0;
    // static shared memory counts towards the 48 KB a launch gets without opting in: the bulk build's mbarriers,
    // fold_boundary's sums
#if defined(AWQE_BULK_STREAM)
    constexpr size_t kBulkStatic = sizeof(unsigned long long) * kMaxWarps * kDepth;
#else
    constexpr size_t kBulkStatic = 0;
#endif
    const size_t kStatic = kBulkStatic + (bnd ? 64 : 0);
    size_t dynamic = ring + partial;
#if defined(AWQE_SPREAD)
    // -DAWQE_SPREAD (for A/B timing, bench/NOTES.md r19): each block asks for enough shared memory that a SM holds
    // at most ceil(blocks / SMs) of them. r15's probe (H100) found Llama-2-7B's gate/up, 1376 one-warp blocks, on
    // 107 of 132 SMs, 69 of them with 16 blocks: placed early (programmatic launch) into the SMs the kernel before
    // left first, up to the register limit.
    // Only where that is fewer warps than the registers let in (16 a SM): o and down's 8-warp blocks already sit 2
    // a SM, and holding them there with shared memory would only keep the next kernel's blocks out.
    const int per_sm = (blocks + dev.sm_count - 1) / dev.sm_count;
    if (MT == 1 && blocks > dev.sm_count && per_sm * warps < 16) {
        // A block's share, in the 128-byte units shared memory is allocated in (dynamic + static + reserved)
        const size_t share = (size_t)dev.smem_per_sm / per_sm / 128 * 128, reserved = dev.smem_reserved;
        if (share > reserved + kStatic + dynamic) {
            dynamic = share - reserved - kStatic;
            const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                       cudaSharedmemCarveoutMaxShared);
            if (e != cudaSuccess) return e;
        }
    }
#endif
    if (dynamic + kStatic > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dynamic);
        if (e != cudaSuccess) return e;
    }
    if constexpr (MT == 1)
        if (bnd)
            return launch_kernel(kProgrammatic<MT>, gemm_boundary_kernel<MT, BS, kDepth>, dim3(blocks),
                                 dim3(32 * warps), dynamic, stream, a, *bnd);
    return launch_kernel(kProgrammatic<MT>, gemm_kernel<MT, BS, kDepth>, dim3(blocks), dim3(32 * warps), dynamic,
                         stream, a);
}

template <int MT, int BS>
cudaError_t launch_shape(const GemmFold& f, int warps, const Device& dev, cudaStream_t stream,
                         const BoundaryFold* bnd) {
    const Layout l = make_layout(f.N, f.K, BS);
    GemmArgs a{f};
    a.weights = static_cast<const uint4*>(f.packed);
    a.params = reinterpret_cast<const uint2*>(static_cast<const char*>(f.packed) + l.weight_bytes());
    a.chunks = l.chunks, a.pblocks = l.pblocks;
    a.mslices = (f.M + 8 * MT - 1) / (8 * MT);
    const int blocks = l.tiles * a.mslices;
    if (warps == 0) warps = choose_warps(blocks, l.chunks, dev.sm_count, MT == 1 ? kMaxWarps : 4);
    a.per_warp = ((l.chunks + warps - 1) / warps + 1) / 2 * 2;
    const bool async_copy = kAsyncBuild && dev.major >= 8;
    if (warps <= kDeepWarps) return launch<MT, BS, kDeep>(a, blocks, warps, async_copy, dev, stream, bnd);
    return launch<MT, BS, kShallow>(a, blocks, warps, async_copy, dev, stream, bnd);
}

template <int MT>
cudaError_t launch_mt(const GemmFold& f, int block_size, int warps, const Device& dev, cudaStream_t stream,
                      const BoundaryFold* bnd) {
    switch (block_size) {
        case 32: return launch_shape<MT, 32>(f, warps, dev, stream, bnd);
        case 64: return launch_shape<MT, 64>(f, warps, dev, stream, bnd);
        default: return launch_shape<MT, 128>(f, warps, dev, stream, bnd);
    }
}

}  // namespace

int probe_placement(ProbeRecord* out, int max_blocks) {
#if defined(AWQE_PROBE_PLACEMENT)
    const int n = max_blocks < kProbeBlocks ? max_blocks : kProbeBlocks;
    if (n <= 0 || cudaDeviceSynchronize() != cudaSuccess) return -1;
    if (cudaMemcpyFromSymbol(out, g_probe, n * sizeof(ProbeRecord)) != cudaSuccess) return -1;
    // Cleared, so that a slot no block of the next launch writes reads as zero (bench/placement.py refuses those).
    static const std::vector<ProbeRecord> zeros(kProbeBlocks);
    if (cudaMemcpyToSymbol(g_probe, zeros.data(), kProbeBlocks * sizeof(ProbeRecord)) != cudaSuccess) return -1;
    return n;
#else
    (void)out, (void)max_blocks;
    return -1;
#endif
}

cudaError_t launch_gemm(const GemmFold& f, int block_size, int warps_per_tile, const Device& dev, cudaStream_t stream,
                        const BoundaryFold* bnd) {
    // One mma n-tile covers M <= 8; beyond, two n-tiles per pass, and larger M in slices of 16 rows whose
    // blocks for one tile run side by side, so the weights' repeat reads come from L2.
    if (f.M <= 8) return launch_mt<1>(f, block_size, warps_per_tile, dev, stream, bnd);
    return launch_mt<2>(f, block_size, warps_per_tile, dev, stream, nullptr);  // bnd: M = 1 only (the C ABI)
}

}  // namespace awqe
