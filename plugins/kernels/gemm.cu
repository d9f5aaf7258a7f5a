// y = x @ W^T for M up to 16 rows per pass: int4 weights dequantised in registers, fp16 tensor-core mma, fp32 sums.
//
// Batch-1 decoding reads every weight once per token, so the kernel is built around the weight stream:
// each warp owns a 16-row tile and a share of its 64-value chunks, loads one 16-byte vector per lane per
// chunk, turns the nibbles into mma A fragments with lop3 (no conversion instructions), and lets the
// tensor cores do the multiply-adds, so the same instructions serve M = 1 to 8 (one mma n-tile) or
// 9 to 16 (two). The batch rows are the mma's n dimension; lanes of rows beyond M repeat row M - 1 and
// their results are dropped.
#include <cuda_fp16.h>

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
// Chunks per warp prefetched to L2 while the previous kernel finishes (8 KB a warp).
constexpr int kPrefetchChunks = 16;

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

// The weights are read once: stream them past L1 and mark them first to leave L2.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) { return __ldcs(p); }

// One chunk's activations for a lane: k = 8t .. 8t + 7 and 32 + 8t .. 32 + 8t + 7 (see layout.cuh).
// kGuard: past K (only in a row's last chunks) they read as zeros; K is a multiple of 8, so each half is
// wholly inside or wholly outside.
template <bool kGuard>
__device__ __forceinline__ void load_x(uint4 out[2], const uint16_t* p, int left) {
    const uint4* v = reinterpret_cast<const uint4*>(p);
    out[0] = !kGuard || left > 0 ? __ldg(v) : make_uint4(0, 0, 0, 0);
    out[1] = !kGuard || left > 32 ? __ldg(v + 4) : make_uint4(0, 0, 0, 0);
}

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

// One stage: the loads of kStage consecutive chunks c .. c + kStage - 1 are all issued before any is used, at
// constant offsets from one base, so the warp has kStage * 512 bytes in flight for the price of a few
// address instructions. kGuard: chunks from `end` on are skipped, activations past K read as zeros.
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
#pragma unroll
        for (int j = 0; j < MT; ++j)
            load_x<kGuard>(xv[u][j], xrow[j] + (c + u) * kChunkK, K - (c + u) * kChunkK - 8 * t);
    }
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
        if (kGuard && c + u >= end) break;
        compute_chunk<MT, kUnits>(acc, w[u], p[u], xv[u]);
    }
}

// Block = the warps sharing one 16-row tile (and one slice of 8 * MT batch rows); MT mma n-tiles of 8 rows.
// Warp w takes the chunks [w * per_warp, (w + 1) * per_warp) of the tile; per_warp is even.
template <int MT, int BS>
__global__ void __launch_bounds__(32 * kMaxWarps)
gemm_kernel(const uint16_t* __restrict__ x, const uint4* __restrict__ weights, const uint2* __restrict__ params,
            const uint16_t* __restrict__ bias, uint16_t* __restrict__ y, int M, int N, int K, int chunks,
            int pblocks, int mslices, int per_warp, int gated) {
    extern __shared__ float partial[];
    const int tile = blockIdx.x / mslices, m0 = (blockIdx.x % mslices) * 8 * MT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const uint4* wt = weights + (size_t)tile * chunks * 32 + lane;
    const uint2* pt = params + (size_t)tile * pblocks * 8 + g;
    // Lanes of batch rows >= M read row M - 1: their products land in accumulator columns nobody writes.
    const uint16_t* xrow[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) xrow[j] = x + (size_t)min(m0 + 8 * j + g, M - 1) * K + 8 * t;

    float acc[MT][4] = {};
    const int begin = warp * per_warp, end = min(chunks, begin + per_warp);
    // The weights are constants: pull the warp's first chunks towards L2 before waiting for the kernel that
    // writes x (programmatic dependent launch, see pdl.cuh), so a latency-bound predecessor (attention, a norm)
    // overlaps this kernel's weight stream.
    for (int u = begin; u < min(end, begin + kPrefetchChunks); ++u)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(wt + u * 32));
    pdl_launch_dependents();
    pdl_wait();
    const int fast_end = min(end, K / kChunkK);  // chunks whose activations all lie inside K
    int c = begin;
    for (; c + kStage <= fast_end; c += kStage) run_stage<MT, BS, false>(acc, wt, pt, xrow, c, end, K, t);
    for (; c < end; c += kStage) run_stage<MT, BS, true>(acc, wt, pt, xrow, c, end, K, t);

    if (nwarps > 1) {  // the warps of a tile split its chunks: sum their fragments through shared memory
        float* mine = partial + (warp * 32 + lane) * (MT * 4);
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) mine[j * 4 + i] = acc[j][i];
        __syncthreads();
        if (warp != 0) return;
        for (int o = 1; o < nwarps; ++o) {
            const float* theirs = partial + (o * 32 + lane) * (MT * 4);
#pragma unroll
            for (int j = 0; j < MT; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[j][i] += theirs[j * 4 + i];
        }
    }
    // Accumulator fragment: element i is row g + 8 (i / 2) of the tile, batch row 2t + (i % 2) of the n-tile.
    if (gated) {  // rows g (gate) and g + 8 (up) of a tile are one output: fp16(silu(gate)) * up, as PyTorch rounds
        const int n = tile * (kTileRows / 2) + g, n_out = N / 2;
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int m = m0 + 8 * j + 2 * t + i;
                if (n >= n_out || m >= M) continue;
                float gv = acc[j][i], uv = acc[j][i + 2];
                if (bias) {
                    gv += __half2float(__ushort_as_half(bias[tile * kTileRows + g]));
                    uv += __half2float(__ushort_as_half(bias[tile * kTileRows + g + 8]));
                }
                const float gate = __half2float(__float2half_rn(gv));
                const __half act = __float2half_rn(gate / (1.f + __expf(-gate)));
                y[(size_t)m * n_out + n] = __half_as_ushort(__hmul(act, __float2half_rn(uv)));
            }
        return;
    }
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = tile * kTileRows + g + 8 * (i >> 1), m = m0 + 8 * j + 2 * t + (i & 1);
            if (n >= N || m >= M) continue;
            float v = acc[j][i];
            if (bias) v += __half2float(__ushort_as_half(bias[n]));
            y[(size_t)m * N + n] = __half_as_ushort(__float2half_rn(v));
        }
}

// The most warps per tile (a power of two) that keeps the grid within about 16 warps per SM, so that all
// blocks are resident at once, while every warp keeps at least one full stage of chunks.
int choose_warps(int blocks, int chunks, int sm_count) {
    int w = 1;
    while (w < kMaxWarps && (size_t)blocks * 2 * w <= (size_t)sm_count * 16 && kStage * 2 * w <= chunks) w *= 2;
    return w;
}

template <int MT, int BS>
cudaError_t launch(const uint16_t* x, const void* packed, const uint16_t* bias, uint16_t* y, int M, int N, int K,
                   int warps, int sm_count, int gated, cudaStream_t stream) {
    const Layout l = make_layout(N, K, BS);
    const int mslices = (M + 8 * MT - 1) / (8 * MT);
    const int blocks = l.tiles * mslices;
    if (warps == 0) warps = choose_warps(blocks, l.chunks, sm_count);
    const int per_warp = ((l.chunks + warps - 1) / warps + 1) / 2 * 2;
    const size_t smem = warps > 1 ? (size_t)warps * 32 * MT * 4 * sizeof(float) : 0;
    const uint4* w = static_cast<const uint4*>(packed);
    const uint2* p = reinterpret_cast<const uint2*>(static_cast<const char*>(packed) + l.weight_bytes());
    return launch_pdl(gemm_kernel<MT, BS>, dim3(blocks), dim3(32 * warps), smem, stream, x, w, p, bias, y, M, N, K,
                      l.chunks, l.pblocks, mslices, per_warp, gated);
}

template <int MT>
cudaError_t launch_bs(const uint16_t* x, const void* packed, const uint16_t* bias, uint16_t* y, int M, int N, int K,
                      int block_size, int warps, int sm_count, int gated, cudaStream_t stream) {
    switch (block_size) {
        case 32: return launch<MT, 32>(x, packed, bias, y, M, N, K, warps, sm_count, gated, stream);
        case 64: return launch<MT, 64>(x, packed, bias, y, M, N, K, warps, sm_count, gated, stream);
        default: return launch<MT, 128>(x, packed, bias, y, M, N, K, warps, sm_count, gated, stream);
    }
}

}  // namespace

cudaError_t launch_gemm(const uint16_t* x, const void* packed, const uint16_t* bias, uint16_t* y, int M, int N,
                        int K, int block_size, int warps_per_tile, int sm_count, int gated, cudaStream_t stream) {
    // One mma n-tile covers M <= 8; beyond, two n-tiles per pass, and larger M in slices of 16 rows whose
    // blocks for one tile run side by side, so the weights' repeat reads come from L2.
    if (M <= 8) return launch_bs<1>(x, packed, bias, y, M, N, K, block_size, warps_per_tile, sm_count, gated, stream);
    return launch_bs<2>(x, packed, bias, y, M, N, K, block_size, warps_per_tile, sm_count, gated, stream);
}

}  // namespace awqe
