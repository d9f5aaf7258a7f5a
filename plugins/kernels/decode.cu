// The small kernels around the int4 linears of a Llama-family decoder step: RMSNorm, rotary embedding with the
// KV-cache write, batch-1 attention over the cache (split over the sequence, then combined), SiLU-gated MLP
// activation. Each is a memory-bound pass over a few kilobytes to megabytes; what matters is one launch each,
// no host round trip, and positions read from device memory so that one CUDA graph serves every decode step.
#include <cuda_fp16.h>

#include <cfloat>

#include "decode.cuh"

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

__global__ void __launch_bounds__(kNormThreads)
rmsnorm_kernel(const __half2* __restrict__ x, const __half2* __restrict__ w, __half2* __restrict__ y, int dim2,
               float eps) {
    __shared__ float partial[kNormThreads / 32];
    const __half2* xr = x + (size_t)blockIdx.x * dim2;
    __half2* yr = y + (size_t)blockIdx.x * dim2;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim2; i += kNormThreads) {
        const float2 v = __half22float2(xr[i]);
        ss += v.x * v.x + v.y * v.y;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kNormThreads / 32; ++i) total += partial[i];
    const float r = rsqrtf(total / (2 * dim2) + eps);
    for (int i = threadIdx.x; i < dim2; i += kNormThreads) {
        const float2 v = __half22float2(xr[i]);
        yr[i] = __hmul2(w[i], __floats2half2_rn(v.x * r, v.y * r));
    }
}

// ---- Rotary embedding (half-split, as Llama/NeoX) and the cache write ----
// Block (m, head) over q heads, then k heads, then v heads; thread i < D/2 rotates the pair (i, i + D/2).

__global__ void rope_kv_kernel(const __half* __restrict__ qkv, const int* __restrict__ positions,
                               const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                               __half* __restrict__ q_out, __half* __restrict__ k_cache,
                               __half* __restrict__ v_cache, int n_heads, int n_kv, int D, int max_len) {
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

// ---- Decode attention: one query token, keys/values 0 .. position (or the last `window` of them) ----
// Pass 1: block (head, split) covers kSplitKeys positions; each of its 4 warps takes 8 of them at once (loads
// first, then 8 independent butterfly sums), keeps an online softmax, and the block merges its warps into one
// partial (max, sum, unnormalised output). Pass 2: per head, merge the partials of the splits in use.

constexpr int kAttnWarps = 4;
constexpr int kKeysPerWarp = kSplitKeys / kAttnWarps;

// A lane's E consecutive values of one cache row, as float (half2 loads when E is even).
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

template <int E>  // E = head_dim / 32 values per lane
__global__ void __launch_bounds__(32 * kAttnWarps)
attention_split_kernel(const __half* __restrict__ q, const __half* __restrict__ k_cache,
                       const __half* __restrict__ v_cache, const int* __restrict__ position, float* __restrict__ ws_o,
                       float2* __restrict__ ws_ml, int n_heads, int n_kv, int max_len, int window, int max_splits,
                       float scale) {
    constexpr int D = 32 * E;
    const int head = blockIdx.x, split = blockIdx.y;
    const int length = min(position[0] + 1, max_len);
    const int n_splits = (length + kSplitKeys - 1) / kSplitKeys;
    if (split >= n_splits) return;
    const int lo = window > 0 ? max(0, length - window) : 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = head / (n_heads / n_kv);
    const __half* kb = k_cache + (size_t)kvh * max_len * D + lane * E;
    const __half* vb = v_cache + (size_t)kvh * max_len * D + lane * E;

    float qv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) qv[e] = h2f(q[(size_t)head * D + lane * E + e]) * scale;

    const int first = split * kSplitKeys + warp * kKeysPerWarp;
    float s[kKeysPerWarp];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
        const int t = first + j;
        float dot = 0.f;
        if (t >= lo && t < length) {
            float kk[E];
            load_row<E>(kb + (size_t)t * D, kk);
#pragma unroll
            for (int e = 0; e < E; ++e) dot += qv[e] * kk[e];
        }
        s[j] = dot;
    }
    float m = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
        s[j] = warp_sum(s[j]);
        const int t = first + j;
        s[j] = (t >= lo && t < length) ? s[j] : -FLT_MAX;
        m = fmaxf(m, s[j]);
    }
    float l = 0.f, acc[E] = {};
    if (m > -FLT_MAX) {
#pragma unroll
        for (int j = 0; j < kKeysPerWarp; ++j) {
            const int t = first + j;
            if (t < lo || t >= length) continue;
            const float p = __expf(s[j] - m);
            l += p;
            float vv[E];
            load_row<E>(vb + (size_t)t * D, vv);
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] += p * vv[e];
        }
    }

    __shared__ float sm_m[kAttnWarps], sm_l[kAttnWarps], sm_o[kAttnWarps][D];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_o[warp][lane * E + e] = acc[e];
    __syncthreads();
    float bm = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) bm = fmaxf(bm, sm_m[w]);
    const size_t slot = (size_t)head * max_splits + split;
    for (int d = threadIdx.x; d < D; d += 32 * kAttnWarps) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w)
            if (sm_m[w] > -FLT_MAX) o += __expf(sm_m[w] - bm) * sm_o[w][d];
        ws_o[slot * D + d] = o;
    }
    if (threadIdx.x == 0) {
        float bl = 0.f;
#pragma unroll
        for (int w = 0; w < kAttnWarps; ++w)
            if (sm_m[w] > -FLT_MAX) bl += __expf(sm_m[w] - bm) * sm_l[w];
        ws_ml[slot] = make_float2(bm, bl);
    }
}

__global__ void attention_combine_kernel(const float* __restrict__ ws_o, const float2* __restrict__ ws_ml,
                                         const int* __restrict__ position, __half* __restrict__ out, int D,
                                         int max_len, int max_splits) {
    const int head = blockIdx.x;
    const int length = min(position[0] + 1, max_len);
    const int n_splits = (length + kSplitKeys - 1) / kSplitKeys;
    const float2* ml = ws_ml + (size_t)head * max_splits;
    float gm = -FLT_MAX;
    for (int s = 0; s < n_splits; ++s) gm = fmaxf(gm, ml[s].x);
    float denom = 0.f;
    for (int s = 0; s < n_splits; ++s)
        if (ml[s].x > -FLT_MAX) denom += __expf(ml[s].x - gm) * ml[s].y;
    const float inv = 1.f / denom;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < n_splits; ++s)
            if (ml[s].x > -FLT_MAX) o += __expf(ml[s].x - gm) * ws_o[((size_t)head * max_splits + s) * D + d];
        out[(size_t)head * D + d] = __float2half_rn(o * inv);
    }
}

// ---- SiLU-gated activation: out = fp16(silu(gate)) * up, gate_up rows = [gate | up] ----

__global__ void silu_mul_kernel(const __half2* __restrict__ gate_up, __half2* __restrict__ out, int inter2,
                                size_t total2) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total2) return;
    const size_t row = i / inter2, col = i % inter2;
    const __half2* r = gate_up + row * 2 * inter2;
    const float2 g = __half22float2(r[col]);
    const __half2 act = __floats2half2_rn(g.x / (1.f + __expf(-g.x)), g.y / (1.f + __expf(-g.y)));
    out[i] = __hmul2(act, r[inter2 + col]);
}

template <int E>
cudaError_t launch_attention_e(const void* q, const void* k_cache, const void* v_cache, const int* position,
                               void* out, int n_heads, int n_kv, int max_len, int window, float scale,
                               void* workspace, cudaStream_t stream) {
    const int max_splits = (max_len + kSplitKeys - 1) / kSplitKeys;
    float* ws_o = static_cast<float*>(workspace);
    float2* ws_ml = reinterpret_cast<float2*>(ws_o + (size_t)n_heads * max_splits * 32 * E);
    attention_split_kernel<E><<<dim3(n_heads, max_splits), 32 * kAttnWarps, 0, stream>>>(
        static_cast<const __half*>(q), static_cast<const __half*>(k_cache), static_cast<const __half*>(v_cache),
        position, ws_o, ws_ml, n_heads, n_kv, max_len, window, max_splits, scale);
    if (cudaError_t e = cudaGetLastError()) return e;
    attention_combine_kernel<<<n_heads, 32 * E < 128 ? 32 * E : 128, 0, stream>>>(
        ws_o, ws_ml, position, static_cast<__half*>(out), 32 * E, max_len, max_splits);
    return cudaGetLastError();
}

}  // namespace

size_t attention_workspace_bytes(int n_heads, int head_dim, int max_len) {
    const size_t splits = (size_t)(max_len + kSplitKeys - 1) / kSplitKeys;
    return (size_t)n_heads * splits * (head_dim * sizeof(float) + sizeof(float2));
}

cudaError_t launch_rmsnorm(const void* x, const void* w, void* y, int rows, int dim, float eps, cudaStream_t stream) {
    rmsnorm_kernel<<<rows, kNormThreads, 0, stream>>>(static_cast<const __half2*>(x), static_cast<const __half2*>(w),
                                                      static_cast<__half2*>(y), dim / 2, eps);
    return cudaGetLastError();
}

cudaError_t launch_rope_kv(const void* qkv, const int* positions, const float* cos_t, const float* sin_t, void* q_out,
                           void* k_cache, void* v_cache, int M, int n_heads, int n_kv, int head_dim, int max_len,
                           cudaStream_t stream) {
    rope_kv_kernel<<<dim3(M, n_heads + 2 * n_kv), head_dim / 2, 0, stream>>>(
        static_cast<const __half*>(qkv), positions, cos_t, sin_t, static_cast<__half*>(q_out),
        static_cast<__half*>(k_cache), static_cast<__half*>(v_cache), n_heads, n_kv, head_dim, max_len);
    return cudaGetLastError();
}

cudaError_t launch_attention_decode(const void* q, const void* k_cache, const void* v_cache, const int* position,
                                    void* out, int n_heads, int n_kv, int head_dim, int max_len, int window,
                                    float scale, void* workspace, cudaStream_t stream) {
#define AWQE_ATTENTION_CASE(E)                                                                                \
    case 32 * E:                                                                                               \
        return launch_attention_e<E>(q, k_cache, v_cache, position, out, n_heads, n_kv, max_len, window, scale, \
                                     workspace, stream);
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
    const size_t total2 = (size_t)M * inter / 2;
    const int threads = 256;
    silu_mul_kernel<<<(unsigned)((total2 + threads - 1) / threads), threads, 0, stream>>>(
        static_cast<const __half2*>(gate_up), static_cast<__half2*>(out), inter / 2, total2);
    return cudaGetLastError();
}

}  // namespace awqe
