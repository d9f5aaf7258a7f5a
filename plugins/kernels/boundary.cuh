// Gemma 2/3's block boundary on one row, by the threads of one block: residual_norm_kernel (decode.cu) runs it as a
// kernel of its own, fold_boundary (gemm.cu) in the last block of the product before it.
#pragma once

#include <cuda_fp16.h>

namespace awqe {

// The block's barrier in a form warps may reach from different places (fold_boundary: warp 0 after its epilogue,
// the others where they used to return). barrier.sync without .aligned admits that; __syncthreads is the .aligned
// form, which asks every thread to execute the same instruction.
__device__ __forceinline__ void block_barrier() { asm volatile("barrier.sync 0;" ::: "memory"); }

// The sum of v over the block's nt threads (warps summed in order); `part` holds nt / 32 floats and may be reused
// right after.
__device__ __forceinline__ float boundary_sum(float v, float* part, int nt) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    block_barrier();  // an earlier call's readers are done with `part`
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    block_barrier();
    float t = 0.f;
    for (int w = 0; w < nt / 32; ++w) t += part[w];
    return t;
}

template <bool kL2>  // y and h through L2 only (__ldcg): written by other blocks of the same kernel
__device__ __forceinline__ float2 load_pair(const float2* p) { return kL2 ? __ldcg(p) : *p; }
template <bool kL2>
__device__ __forceinline__ float2 load_pair(const __half2* p) { return __half22float2(kL2 ? __ldcg(p) : *p); }

// h (float32 [dim2 pairs], in place) += out_w * (y * rsqrt(mean(y^2) + eps)) (out_w null: h += y; y null: h as it
// is), then x = fp16(next_w * (h * rsqrt(mean(h^2) + eps))), by the block's kThreads threads (0: blockDim.x). Rows
// of up to kHeld pairs a thread stay in registers, every load before any use (one memory latency); longer rows go
// through memory, each thread re-reading only the h it wrote.
template <int kThreads, bool kL2>
__device__ __forceinline__ void boundary_row(const __half2* y, const __half2* out_w, float2* h, const __half2* next_w,
                                             __half2* x, int dim2, float eps, float* part) {
    constexpr int kHeld = 8;
    const int nt = kThreads ? kThreads : (int)blockDim.x;
    const float n = 2.f * dim2;
    float ss = 0.f;
    if (dim2 <= nt * kHeld) {
        float2 hv[kHeld], yv[kHeld];
#pragma unroll
        for (int j = 0; j < kHeld; ++j) {
            const int i = threadIdx.x + j * nt;
            hv[j] = i < dim2 ? load_pair<kL2>(h + i) : make_float2(0.f, 0.f);
            yv[j] = y && i < dim2 ? load_pair<kL2>(y + i) : make_float2(0.f, 0.f);
        }
        if (y) {
            float r = 1.f;
            if (out_w) {
#pragma unroll
                for (int j = 0; j < kHeld; ++j) ss += yv[j].x * yv[j].x + yv[j].y * yv[j].y;
                r = rsqrtf(boundary_sum(ss, part, nt) / n + eps);
            }
#pragma unroll
            for (int j = 0; j < kHeld; ++j) {
                const int i = threadIdx.x + j * nt;
                if (i >= dim2) continue;
                const float2 w = out_w ? __half22float2(out_w[i]) : make_float2(1.f, 1.f);
                hv[j].x += out_w ? w.x * (yv[j].x * r) : yv[j].x;
                hv[j].y += out_w ? w.y * (yv[j].y * r) : yv[j].y;
                h[i] = hv[j];
            }
        }
        ss = 0.f;
#pragma unroll
        for (int j = 0; j < kHeld; ++j) ss += hv[j].x * hv[j].x + hv[j].y * hv[j].y;
        const float r = rsqrtf(boundary_sum(ss, part, nt) / n + eps);
#pragma unroll
        for (int j = 0; j < kHeld; ++j) {
            const int i = threadIdx.x + j * nt;
            if (i >= dim2) continue;
            const float2 w = __half22float2(next_w[i]);
            x[i] = __floats2half2_rn(w.x * (hv[j].x * r), w.y * (hv[j].y * r));
        }
        return;
    }
    if (y) {
        float r = 1.f;
        if (out_w) {
            for (int i = threadIdx.x; i < dim2; i += nt) {
                const float2 u = load_pair<kL2>(y + i);
                ss += u.x * u.x + u.y * u.y;
            }
            r = rsqrtf(boundary_sum(ss, part, nt) / n + eps);
        }
        for (int i = threadIdx.x; i < dim2; i += nt) {
            const float2 u = load_pair<kL2>(y + i), w = out_w ? __half22float2(out_w[i]) : make_float2(1.f, 1.f);
            float2 v = load_pair<kL2>(h + i);
            v.x += out_w ? w.x * (u.x * r) : u.x;
            v.y += out_w ? w.y * (u.y * r) : u.y;
            h[i] = v;
        }
    }
    ss = 0.f;
    for (int i = threadIdx.x; i < dim2; i += nt) {
        const float2 v = h[i];
        ss += v.x * v.x + v.y * v.y;
    }
    const float r = rsqrtf(boundary_sum(ss, part, nt) / n + eps);
    for (int i = threadIdx.x; i < dim2; i += nt) {
        const float2 v = h[i], w = __half22float2(next_w[i]);
        x[i] = __floats2half2_rn(w.x * (v.x * r), w.y * (v.y * r));
    }
}

}  // namespace awqe
