// The small kernels around the int4 linears of a Llama-family decoder step: RMSNorm, rotary embedding with the
// KV-cache write, batch-1 attention over the cache (split over the sequence, then combined), SiLU-gated MLP
// activation. Each is a memory-bound pass over a few kilobytes to megabytes; what matters is one launch each,
// no host round trip, and positions read from device memory so that one CUDA graph serves every decode step.
#include <cuda_fp16.h>

#include <cfloat>

#include "boundary.cuh"
#include "decode.cuh"
#include "pdl.cuh"

namespace awqe {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}


__device__ __forceinline__ float h2f(__half h) { return __half2float(h); }

// ---- RMSNorm: y = w * fp16(x * rsqrt(mean(x^2) + eps)), the sum in fp32 (transformers' LlamaRMSNorm order) ----

constexpr int kNormThreads = 256;
constexpr int kNormHeld = 16;  // half2 a thread keeps in registers: rows up to 8192 values are read once

__global__ void __launch_bounds__(kNormThreads)
rmsnorm_kernel(const __half2* x, const __half2* __restrict__ w, __half2* __restrict__ y, int dim2,
               float eps) {
    __shared__ float partial[kNormThreads / 32];
    pdl_launch_dependents();
    pdl_wait();
    const __half2* xr = x + (size_t)blockIdx.x * dim2;  // written by the kernel before: plain loads (pdl.cuh)
    __half2* yr = y + (size_t)blockIdx.x * dim2;
    const bool held = dim2 <= kNormThreads * kNormHeld;
    float2 v[kNormHeld];
    float ss = 0.f;
    if (held) {  // every load issued before any is used: one memory latency
#pragma unroll
        for (int j = 0; j < kNormHeld; ++j) {
            const int i = threadIdx.x + j * kNormThreads;
            v[j] = i < dim2 ? __half22float2(xr[i]) : make_float2(0.f, 0.f);
        }
#pragma unroll
        for (int j = 0; j < kNormHeld; ++j) ss += v[j].x * v[j].x + v[j].y * v[j].y;
    } else {
        for (int i = threadIdx.x; i < dim2; i += kNormThreads) {
            const float2 u = __half22float2(xr[i]);
            ss += u.x * u.x + u.y * u.y;
        }
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kNormThreads / 32; ++i) total += partial[i];
    const float r = rsqrtf(total / (2 * dim2) + eps);
    if (held) {
#pragma unroll
        for (int j = 0; j < kNormHeld; ++j) {
            const int i = threadIdx.x + j * kNormThreads;
            if (i < dim2) yr[i] = __hmul2(w[i], __floats2half2_rn(v[j].x * r, v[j].y * r));
        }
        return;
    }
    for (int i = threadIdx.x; i < dim2; i += kNormThreads) {
        const float2 u = __half22float2(xr[i]);
        yr[i] = __hmul2(w[i], __floats2half2_rn(u.x * r, u.y * r));
    }
}

// ---- Gemma 2/3's block boundary: the block's output normalised into the float32 residual stream, then the next
// product's input norm, in one pass (the stream and the output are read once) ----

constexpr int kResThreads = 512;

// h += out_w * (y * rsqrt(mean(y^2) + eps)) (out_w null: h += y; y null: h as it is), then
// x = fp16(next_w * (h * rsqrt(mean(h^2) + eps))), a row a block (boundary.cuh). Rows of up to 2 * kResThreads * 8
// values stay in registers; longer rows go through memory twice.
__global__ void __launch_bounds__(kResThreads)
residual_norm_kernel(const __half2* y, const __half2* __restrict__ out_w, float2* h,
                     const __half2* __restrict__ next_w, __half2* x, int dim2, float eps) {
    __shared__ float partial[kResThreads / 32];
    pdl_launch_dependents();
    pdl_wait();
    const size_t base = (size_t)blockIdx.x * dim2;  // y, h and x are written by kernels before this one: plain loads
    boundary_row<kResThreads, false>(y ? y + base : nullptr, out_w, h + base, next_w, x + base, dim2, eps, partial);
}

// ---- Rotary embedding (half-split, as Llama/NeoX) and the cache write ----
// Block (m, head) over q heads, then k heads, then v heads; thread i < D/2 rotates the pair (i, i + D/2).

__global__ void rope_kv_kernel(const __half* qkv, const int* positions,
                               const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                               __half* __restrict__ q_out, __half* __restrict__ k_cache,
                               __half* __restrict__ v_cache, int n_heads, int n_kv, int D, int max_len) {
    pdl_launch_dependents();
    pdl_wait();
    const int m = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half_d = D / 2;
    const int pos = positions[m];
    if (pos < 0 || pos >= max_len) return;  // the host checks positions; never write outside the cache
    const __half* src = qkv + ((size_t)m * (n_heads + 2 * n_kv) + head) * D;
    if (head >= n_heads + n_kv) {  // v: copy
        const int h = head - n_heads - n_kv;
        __half* dst = v_cache + ((size_t)h * max_len + pos) * D;
        dst[i] = src[i];
        dst[i + half_d] = src[i + half_d];
        return;
    }
    const float c = cos_t[(size_t)pos * half_d + i], s = sin_t[(size_t)pos * half_d + i];
    const float x1 = h2f(src[i]), x2 = h2f(src[i + half_d]);
    __half* dst = head < n_heads ? q_out + ((size_t)m * n_heads + head) * D
                                 : k_cache + ((size_t)(head - n_heads) * max_len + pos) * D;
    dst[i] = __float2half_rn(x1 * c - x2 * s);
    dst[i + half_d] = __float2half_rn(x2 * c + x1 * s);
}

// ---- Decode attention, with the new token's rotary embedding and cache write fused in ----
// Block (head, split) covers kSplitKeys cache positions; each of its 4 warps takes 8 of them at once (loads
// first, then 8 independent butterfly sums), keeps an online softmax, and the block merges its warps into one
// partial (max, sum, unnormalised output). The new token's k and v come from qkv (rotated here; the split holding
// it keeps them in shared memory, and the first q head of each kv group writes them to the cache), so no block
// reads a cache row another block of this launch writes. The last block of a head to finish (a ticket counter
// that it resets) merges the splits' partials.

constexpr int kAttnWarps = 4;
constexpr int kKeysPerWarp = kSplitKeys / kAttnWarps;
constexpr int kAttnThreads = 32 * kAttnWarps;

// A lane's E consecutive values of one row, as float (half2 loads when E is even).
template <int E>
__device__ __forceinline__ void load_row(const __half* p, float (&out)[E]) {
    if constexpr (E % 2 == 0) {
#pragma unroll
        for (int e = 0; e < E; e += 2) {
            const float2 v = __half22float2(*reinterpret_cast<const __half2*>(p + e));
            out[e] = v.x;
            out[e + 1] = v.y;
        }
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = h2f(p[e]);
    }
}

// Half-split rotary embedding of one head held E values per lane: lane l's partner values sit in lane l ^ 16;
// c and sn are the lane's cos and sin values (load_rope). Results are rounded to fp16, as the model's rotated q
// and k are. norm_w non-null: the head's RMSNorm first (Qwen3's and Gemma 3's q/k norms), rounded as
// awqe_rmsnorm_f16 rounds: w * fp16(x * rsqrt(mean(x^2) + eps)).
template <int E>
__device__ __forceinline__ void rotate_head(const __half* src, const __half* norm_w, float eps, const float (&c)[E],
                                            const float (&sn)[E], int lane, float (&out)[E]) {
    float own[E];
    load_row<E>(src + lane * E, own);
    if (norm_w) {
        float ss = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) ss += own[e] * own[e];
        const float r = rsqrtf(warp_sum(ss) / (32 * E) + eps);
#pragma unroll
        for (int e = 0; e < E; ++e) own[e] = h2f(__hmul(__float2half_rn(own[e] * r), norm_w[lane * E + e]));
    }
    const float sign = lane < 16 ? -1.f : 1.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const float partner = __shfl_xor_sync(0xffffffffu, own[e], 16);
        out[e] = h2f(__float2half_rn(own[e] * c[e] + sign * partner * sn[e]));
    }
}

template <int E>
__device__ __forceinline__ void load_rope(const float* cos_row, const float* sin_row, int lane, float (&c)[E],
                                          float (&sn)[E]) {
    const int i0 = (lane & 15) * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        c[e] = __ldg(cos_row + i0 + e);
        sn[e] = __ldg(sin_row + i0 + e);
    }
}

template <int E>  // E = head_dim / 32 values per lane
__global__ void __launch_bounds__(kAttnThreads)
decode_attention_kernel(const __half* qkv, const int* __restrict__ position,
                        const float* __restrict__ cos_t, const float* __restrict__ sin_t, __half* __restrict__ k_cache,
                        __half* __restrict__ v_cache, __half* __restrict__ out, float* __restrict__ ws_o,
                        float2* __restrict__ ws_ml, unsigned* __restrict__ tickets, int n_heads, int n_kv,
                        int max_len, int span, int window, int max_splits, float scale,
                        const __half* __restrict__ q_norm, const __half* __restrict__ k_norm, float norm_eps,
                        float softcap) {
    constexpr int D = 32 * E;
    pdl_launch_dependents();
#ifdef AWQE_ATTN_WAIT_FIRST  // diagnostic build: every read after the wait (bench/NOTES.md, r7b)
    pdl_wait();
#endif
    // Until pdl_wait this block reads only what earlier steps wrote: the position, the cache rows before it, the
    // rope tables. So the cache rows' memory latency overlaps the qkv product still running before this kernel.
    const int head = blockIdx.x, split = blockIdx.y;
    const int pos = position[0];
    if (pos < 0 || pos >= span) {  // the host checks positions; never touch memory outside the launch's span
        pdl_wait();  // but complete after the kernel before, as always, so the chain of waits stays ordered
        if (split == 0)  // and poison the head's output, so a span too short for the position cannot pass unseen
            for (int d = threadIdx.x; d < D; d += kAttnThreads) out[(size_t)head * D + d] = __float2half_rn(NAN);
        return;
    }
    const int length = pos + 1;
    const int n_splits = (length + kSplitKeys - 1) / kSplitKeys;
    if (split >= n_splits) return;  // the active splits wait
    const int lo = window > 0 ? max(0, length - window) : 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = n_heads / n_kv, kvh = head / group;
    float rc[E], rs[E];
    load_rope<E>(cos_t + (size_t)pos * (D / 2), sin_t + (size_t)pos * (D / 2), lane, rc, rs);

    // The cache rows of the warp's keys are requested first (every k and v row before any is used: one memory
    // latency, not two per key); rows not in use count as zeros; the new token's row comes from shared memory.
    const __half* kb = k_cache + (size_t)kvh * max_len * D + lane * E;
    const __half* vb = v_cache + (size_t)kvh * max_len * D + lane * E;
    const int first = split * kSplitKeys + warp * kKeysPerWarp;
    float kk[kKeysPerWarp][E], vv[kKeysPerWarp][E];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
        const int t = first + j;
        if (t >= lo && t < pos) {
            load_row<E>(kb + (size_t)t * D, kk[j]);
            load_row<E>(vb + (size_t)t * D, vv[j]);
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) kk[j][e] = vv[j][e] = 0.f;
        }
    }
    pdl_wait();  // qkv is written from here on

    float qv[E];
    rotate_head<E>(qkv + (size_t)head * D, q_norm, norm_eps, rc, rs, lane, qv);
#pragma unroll
    for (int e = 0; e < E; ++e) qv[e] *= scale;

    __shared__ __align__(16) __half new_k[D], new_v[D];
    const bool holds_new = split == n_splits - 1;  // the new token is the last position
    if (holds_new && warp == 0) {
        float nk[E];
        rotate_head<E>(qkv + (size_t)(n_heads + kvh) * D, k_norm, norm_eps, rc, rs, lane, nk);
        const __half* vsrc = qkv + (size_t)(n_heads + n_kv + kvh) * D + lane * E;
        __half* kdst = k_cache + ((size_t)kvh * max_len + pos) * D + lane * E;
        __half* vdst = v_cache + ((size_t)kvh * max_len + pos) * D + lane * E;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            new_k[lane * E + e] = __float2half_rn(nk[e]);
            new_v[lane * E + e] = vsrc[e];
            if (head % group == 0) {
                kdst[e] = new_k[lane * E + e];
                vdst[e] = vsrc[e];
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j)  // constant indices keep kk and vv in registers
        if (first + j == pos) {
            load_row<E>(new_k + lane * E, kk[j]);
            load_row<E>(new_v + lane * E, vv[j]);
        }

    float s[kKeysPerWarp];
    float m = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot += qv[e] * kk[j][e];
        s[j] = dot;
    }
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
        s[j] = warp_sum(s[j]);
        if (softcap > 0.f) s[j] = softcap * tanhf(s[j] / softcap);  // Gemma 2's score soft-capping
        const int t = first + j;
        s[j] = (t >= lo && t < length) ? s[j] : -FLT_MAX;
        m = fmaxf(m, s[j]);
    }
    float l = 0.f, acc[E] = {};
    if (m > -FLT_MAX) {
#pragma unroll
        for (int j = 0; j < kKeysPerWarp; ++j) {
            const float p = s[j] > -FLT_MAX ? __expf(s[j] - m) : 0.f;
            l += p;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] += p * vv[j][e];
        }
    }

    // Merge the warps: block max bm, sum bl, unnormalised output o[d].
    __shared__ float sm_m[kAttnWarps], sm_l[kAttnWarps], sm_o[kAttnWarps][D];
    __shared__ bool last;
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_o[warp][lane * E + e] = acc[e];
    __syncthreads();
    float bm = -FLT_MAX, bl = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) bm = fmaxf(bm, sm_m[w]);
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w)
        if (sm_m[w] > -FLT_MAX) bl += __expf(sm_m[w] - bm) * sm_l[w];
    const size_t slot = (size_t)head * max_splits + split;
    for (int d = threadIdx.x; d < D; d += kAttnThreads) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w)
            if (sm_m[w] > -FLT_MAX) o += __expf(sm_m[w] - bm) * sm_o[w][d];
        if (n_splits == 1)
            out[(size_t)head * D + d] = __float2half_rn(o / bl);
        else
            ws_o[slot * D + d] = o;
    }
    if (n_splits == 1) return;
    if (threadIdx.x == 0) ws_ml[slot] = make_float2(bm, bl);

    // The last block of this head to get here merges every split (threadFenceReduction pattern).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&tickets[head], 1u) == (unsigned)(n_splits - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Every split's (max, sum) and output, kMergeBatch splits per round of loads (one memory latency per round,
    // not one per quantity), merged with a running max; thread d owns output values d, d + kAttnThreads, ...
    constexpr int kDims = (D + kAttnThreads - 1) / kAttnThreads, kMergeBatch = 16;
    const float2* ml = ws_ml + (size_t)head * max_splits;
    const float* wo = ws_o + (size_t)head * max_splits * D;
    float run_m = -FLT_MAX, run_l = 0.f, run_o[kDims] = {};
    for (int s0 = 0; s0 < n_splits; s0 += kMergeBatch) {
        float2 part[kMergeBatch];
        float po[kMergeBatch][kDims];
#pragma unroll
        for (int i = 0; i < kMergeBatch; ++i) {
            const int sp = s0 + i;
            part[i] = sp < n_splits ? __ldcg(&ml[sp]) : make_float2(-FLT_MAX, 0.f);
#pragma unroll
            for (int q = 0; q < kDims; ++q) {
                const int d = threadIdx.x + q * kAttnThreads;
                po[i][q] = sp < n_splits && d < D ? __ldcg(wo + (size_t)sp * D + d) : 0.f;
            }
        }
        float bm = run_m;
#pragma unroll
        for (int i = 0; i < kMergeBatch; ++i) bm = fmaxf(bm, part[i].x);
        if (bm == -FLT_MAX) continue;  // no key in these splits yet (all outside the window)
        const float c = run_m > -FLT_MAX ? __expf(run_m - bm) : 0.f;
        run_l *= c;
#pragma unroll
        for (int q = 0; q < kDims; ++q) run_o[q] *= c;
#pragma unroll
        for (int i = 0; i < kMergeBatch; ++i) {
            const float wgt = part[i].x > -FLT_MAX ? __expf(part[i].x - bm) : 0.f;
            run_l += wgt * part[i].y;
#pragma unroll
            for (int q = 0; q < kDims; ++q) run_o[q] += wgt * po[i][q];
        }
        run_m = bm;
    }
    const float inv = 1.f / run_l;
#pragma unroll
    for (int q = 0; q < kDims; ++q) {
        const int d = threadIdx.x + q * kAttnThreads;
        if (d < D) out[(size_t)head * D + d] = __float2half_rn(run_o[q] * inv);
    }
    if (threadIdx.x == 0) tickets[head] = 0;  // ready for the next step
}

// ---- SiLU-gated activation for prefill: out = fp16(silu(gate)) * up, gate_up rows alternating in blocks of 8
// (8 gate columns, then the 8 up columns of the same outputs), the layout the gated GEMM reads ----

__global__ void silu_mul_kernel(const __half* gate_up, __half* __restrict__ out, int inter,
                                size_t total) {
    pdl_launch_dependents();
    pdl_wait();
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const size_t row = i / inter, col = i % inter;
    const __half* r = gate_up + row * 2 * inter + (col / 8) * 16 + col % 8;
    const float g = h2f(r[0]);
    out[i] = __hmul(__float2half_rn(g / (1.f + __expf(-g))), r[8]);
}

template <int E>
cudaError_t launch_attention_e(const void* qkv, const int* position, const float* cos_t, const float* sin_t,
                               void* k_cache, void* v_cache, void* out, int n_heads, int n_kv, int max_len, int window,
                               float scale, const AttentionExtras& x, void* workspace, cudaStream_t stream) {
    const int max_splits = (max_len + kSplitKeys - 1) / kSplitKeys;
    // One block row per split of the span only: the blocks past the position's split return at once, but each is
    // still scheduled before the next kernel may start (a 4096-position cache is 128 splits a head).
    const int span = x.span > 0 && x.span < max_len ? x.span : max_len;
    const int splits = (span + kSplitKeys - 1) / kSplitKeys;
    float* ws_o = static_cast<float*>(workspace);
    float2* ws_ml = reinterpret_cast<float2*>(ws_o + (size_t)n_heads * max_splits * 32 * E);
    unsigned* tickets = reinterpret_cast<unsigned*>(ws_ml + (size_t)n_heads * max_splits);
    return launch_pdl(decode_attention_kernel<E>, dim3(n_heads, splits), dim3(kAttnThreads), 0, stream,
                      static_cast<const __half*>(qkv), position, cos_t, sin_t, static_cast<__half*>(k_cache),
                      static_cast<__half*>(v_cache), static_cast<__half*>(out), ws_o, ws_ml, tickets, n_heads, n_kv,
                      max_len, span, window, max_splits, scale, static_cast<const __half*>(x.q_norm),
                      static_cast<const __half*>(x.k_norm), x.norm_eps, x.softcap);
}

}  // namespace

size_t attention_workspace_bytes(int n_heads, int head_dim, int max_len) {
    const size_t splits = (size_t)(max_len + kSplitKeys - 1) / kSplitKeys;
    return (size_t)n_heads * splits * (head_dim * sizeof(float) + sizeof(float2)) + (size_t)n_heads * sizeof(unsigned);
}

cudaError_t launch_rmsnorm(const void* x, const void* w, void* y, int rows, int dim, float eps, cudaStream_t stream) {
    return launch_pdl(rmsnorm_kernel, dim3(rows), dim3(kNormThreads), 0, stream, static_cast<const __half2*>(x),
                      static_cast<const __half2*>(w), static_cast<__half2*>(y), dim / 2, eps);
}

cudaError_t launch_residual_norm(const void* y, const void* out_w, float* h, const void* next_w, void* x, int rows,
                                 int dim, float eps, cudaStream_t stream) {
    return launch_pdl(residual_norm_kernel, dim3(rows), dim3(kResThreads), 0, stream, static_cast<const __half2*>(y),
                      static_cast<const __half2*>(out_w), reinterpret_cast<float2*>(h),
                      static_cast<const __half2*>(next_w), static_cast<__half2*>(x), dim / 2, eps);
}

cudaError_t launch_rope_kv(const void* qkv, const int* positions, const float* cos_t, const float* sin_t, void* q_out,
                           void* k_cache, void* v_cache, int M, int n_heads, int n_kv, int head_dim, int max_len,
                           cudaStream_t stream) {
    return launch_pdl(rope_kv_kernel, dim3(M, n_heads + 2 * n_kv), dim3(head_dim / 2), 0, stream,
                      static_cast<const __half*>(qkv), positions, cos_t, sin_t, static_cast<__half*>(q_out),
                      static_cast<__half*>(k_cache), static_cast<__half*>(v_cache), n_heads, n_kv, head_dim, max_len);
}

cudaError_t launch_decode_attention(const void* qkv, const int* position, const float* cos_t, const float* sin_t,
                                    void* k_cache, void* v_cache, void* out, int n_heads, int n_kv, int head_dim,
                                    int max_len, int window, float scale, const AttentionExtras& extras,
                                    void* workspace, cudaStream_t stream) {
#define AWQE_ATTENTION_CASE(E)                                                                                     \
    case 32 * E:                                                                                                    \
        return launch_attention_e<E>(qkv, position, cos_t, sin_t, k_cache, v_cache, out, n_heads, n_kv, max_len,    \
                                     window, scale, extras, workspace, stream);
    switch (head_dim) {
        AWQE_ATTENTION_CASE(1)
        AWQE_ATTENTION_CASE(2)
        AWQE_ATTENTION_CASE(3)
        AWQE_ATTENTION_CASE(4)
        AWQE_ATTENTION_CASE(8)
    }
#undef AWQE_ATTENTION_CASE
    return cudaErrorInvalidValue;  // unreachable: the C ABI admits only the sizes above
}

cudaError_t launch_silu_mul(const void* gate_up, void* out, int M, int inter, cudaStream_t stream) {
    const size_t total = (size_t)M * inter;
    const int threads = 256;
    return launch_pdl(silu_mul_kernel, dim3((unsigned)((total + threads - 1) / threads)), dim3(threads), 0, stream,
                      static_cast<const __half*>(gate_up), static_cast<__half*>(out), inter, total);
}

}  // namespace awqe
