// The C ABI: argument checks (all before any CUDA call), status codes, thread-local error detail.
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdio>

#include "awq_edge_kernels.h"
#include "decode.cuh"
#include "layout.cuh"
#include "pdl.cuh"

namespace {

thread_local char g_last_error[512] = "";

awqe_status fail(awqe_status s, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(g_last_error, sizeof g_last_error, fmt, args);
    va_end(args);
    return s;
}

awqe_status cuda_status(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return AWQE_OK;
    return fail(AWQE_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

bool aligned(const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

// Whether [a, a + a_bytes) and [b, b + b_bytes) share a byte (null never overlaps).
bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
    if (!a || !b) return false;
    const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
    return x < y + b_bytes && y < x + a_bytes;
}

awqe_status check_shape(int N, int K, int block_size) {
    if (block_size != 32 && block_size != 64 && block_size != 128)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "block_size must be 32, 64 or 128, got %d", block_size);
    if (N < 1) return fail(AWQE_ERR_INVALID_ARGUMENT, "N must be at least 1, got %d", N);
    if (K < 1) return fail(AWQE_ERR_INVALID_ARGUMENT, "K must be at least 1, got %d", K);
    if (K % 8)
        return fail(AWQE_ERR_UNSUPPORTED, "K must be a multiple of 8 (16-byte activation loads), got %d", K);
    return AWQE_OK;
}

// Multiprocessor count, compute capability and shared memory per device, read once: every GEMM launch needs them.
std::atomic<int> g_sm_count[64];
std::atomic<int> g_cc_major[64];
std::atomic<int> g_smem_per_sm[64];
std::atomic<int> g_smem_reserved[64];

awqe_status device_info(awqe::Device* out) {
    int dev = 0;
    if (awqe_status s = cuda_status(cudaGetDevice(&dev), "cudaGetDevice")) return s;
    if (dev < 0 || dev >= 64) return fail(AWQE_ERR_UNSUPPORTED, "device index %d is beyond 63", dev);
    int n = g_sm_count[dev].load(std::memory_order_relaxed), major = g_cc_major[dev].load(std::memory_order_relaxed);
    int smem = g_smem_per_sm[dev].load(std::memory_order_relaxed);
    int reserved = g_smem_reserved[dev].load(std::memory_order_relaxed);
    if (n == 0 || major == 0 || smem == 0) {
        if (awqe_status s = cuda_status(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev),
                                        "cudaDeviceGetAttribute(multiProcessorCount)"))
            return s;
        if (awqe_status s = cuda_status(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev),
                                        "cudaDeviceGetAttribute(computeCapabilityMajor)"))
            return s;
        if (awqe_status s =
                cuda_status(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
                            "cudaDeviceGetAttribute(maxSharedMemoryPerMultiprocessor)"))
            return s;
        if (awqe_status s =
                cuda_status(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev),
                            "cudaDeviceGetAttribute(reservedSharedMemoryPerBlock)"))
            return s;
        g_sm_count[dev].store(n, std::memory_order_relaxed);
        g_cc_major[dev].store(major, std::memory_order_relaxed);
        g_smem_per_sm[dev].store(smem, std::memory_order_relaxed);
        g_smem_reserved[dev].store(reserved, std::memory_order_relaxed);
    }
    *out = awqe::Device{n, major, smem, reserved};
    return AWQE_OK;
}

// The checks and launch every GEMM entry point shares; gated and the norm folds add their own rules.
awqe_status run_gemm(awqe::GemmFold f, int block_size, int warps_per_tile, cudaStream_t stream,
                     const awqe::BoundaryFold* bnd = nullptr) {
    const int M = f.M, N = f.N, K = f.K;
    if (awqe_status s = check_shape(N, K, block_size)) return s;
    if (f.gated && N % 16) return fail(AWQE_ERR_INVALID_ARGUMENT, "gated gemm: N must be a multiple of 16, got %d", N);
    if (M < 0) return fail(AWQE_ERR_INVALID_ARGUMENT, "M must not be negative, got %d", M);
    if (!f.x || !aligned(f.x, 16))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "x must be a non-null, 16-byte aligned fp16 array");
    if (!f.packed || !aligned(f.packed, 16))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "packed must be a non-null, 16-byte aligned buffer");
    if (!f.y || !aligned(f.y, 2))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "y must be a non-null, 2-byte aligned fp16 array");
    if (f.bias && !aligned(f.bias, 2)) return fail(AWQE_ERR_INVALID_ARGUMENT, "bias must be 2-byte aligned");
    if (f.rms_x && !aligned(f.rms_x, 16))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "rms_input must be a 16-byte aligned fp16 array");
    if (f.rms_x && !(f.eps >= 0.f)) return fail(AWQE_ERR_INVALID_ARGUMENT, "eps must be >= 0");
    if (!f.norm_w != !f.y_norm)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "norm_weight and norm_out must both be given or both be null");
    if (f.norm_w && f.gated)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "norm_out is not available with the gated epilogue");
    if (f.norm_w && (!aligned(f.norm_w, 2) || !aligned(f.y_norm, 2) || f.y_norm == f.y))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "norm_weight and norm_out must be 2-byte aligned, norm_out not y");
    if (f.rms_sumsq && !f.rms_x)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "rms_input_sumsq needs rms_input (the hidden state they sum)");
    if (f.rms_sumsq && !aligned(f.rms_sumsq, 4))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "rms_input_sumsq must be a 4-byte aligned fp32 array");
    if (f.sumsq_out && f.gated)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "sumsq_out is not available with the gated epilogue");
    if (f.sumsq_out && !aligned(f.sumsq_out, 4))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "sumsq_out must be a 4-byte aligned fp32 array");
    if (M > 0 && (f.rms_sumsq || f.sumsq_out)) {  // blocks read the sums others write: no sharing of a byte
        const size_t m = (size_t)M, y_bytes = m * (f.gated ? N / 2 : N) * 2, out_bytes = m * ((N + 15) / 16) * 4;
        const size_t in_bytes = m * ((K + 15) / 16) * 4;
        if (overlap(f.rms_sumsq, in_bytes, f.y, y_bytes) || overlap(f.rms_sumsq, in_bytes, f.y_norm, y_bytes) ||
            overlap(f.rms_sumsq, in_bytes, f.sumsq_out, out_bytes))
            return fail(AWQE_ERR_INVALID_ARGUMENT, "rms_input_sumsq must not overlap y, norm_out or sumsq_out");
        if (overlap(f.sumsq_out, out_bytes, f.y, y_bytes) || overlap(f.sumsq_out, out_bytes, f.y_norm, y_bytes) ||
            overlap(f.sumsq_out, out_bytes, f.x, m * K * 2) || overlap(f.sumsq_out, out_bytes, f.rms_x, m * K * 2) ||
            overlap(f.sumsq_out, out_bytes, f.bias, (size_t)N * 2))
            return fail(AWQE_ERR_INVALID_ARGUMENT, "sumsq_out must not overlap x, bias, y, rms_input or norm_out");
    }
    if (warps_per_tile != 0 && warps_per_tile != 1 && warps_per_tile != 2 && warps_per_tile != 4 &&
        warps_per_tile != 8)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "warps_per_tile must be 0, 1, 2, 4 or 8, got %d", warps_per_tile);
    if (bnd && (M != 1 || f.gated || f.rms_x || f.norm_w || f.sumsq_out))  // its warps meet at the boundary's barriers
        return fail(AWQE_ERR_INVALID_ARGUMENT, "the block boundary follows a plain one-token product only");
    if (M == 0) return AWQE_OK;
    awqe::Device dev{};
    if (awqe_status s = device_info(&dev)) return s;
    return cuda_status(awqe::launch_gemm(f, block_size, warps_per_tile, dev, stream, bnd),
                       f.gated ? "gated gemm launch" : bnd ? "gemm_residual_norm launch" : "gemm launch");
}

awqe::GemmFold plain(const void* x, const void* packed, const void* bias, void* y, int M, int N, int K, int gated) {
    awqe::GemmFold f{};
    f.x = static_cast<const uint16_t*>(x);
    f.packed = packed;
    f.bias = static_cast<const uint16_t*>(bias);
    f.y = static_cast<uint16_t*>(y);
    f.M = M, f.N = N, f.K = K, f.gated = gated;
    return f;
}

// Programmatic dependent launch: on by default where the device has it (compute capability >= 9.0).
std::atomic<int> g_pdl_switch{1};

}  // namespace

bool awqe::pdl_enabled() {
    awqe::Device dev{};
    return g_pdl_switch.load(std::memory_order_relaxed) && device_info(&dev) == AWQE_OK && dev.major >= 9;
}

extern "C" {

const char* awqe_status_string(awqe_status s) {
    switch (s) {
        case AWQE_OK: return "ok";
        case AWQE_ERR_INVALID_ARGUMENT: return "invalid argument";
        case AWQE_ERR_UNSUPPORTED: return "unsupported";
        case AWQE_ERR_CUDA: return "CUDA error";
    }
    return "unknown status";
}

const char* awqe_last_error(void) { return g_last_error; }

size_t awqe_packed_weight_bytes(int N, int K, int block_size) {
    if (check_shape(N, K, block_size) != AWQE_OK) return 0;
    return awqe::make_layout(N, K, block_size).bytes();
}

size_t awqe_workspace_bytes(int, int, int, int) { return 0; }

awqe_status awqe_repack_matmul_nbits(const uint8_t* B, const void* scales_f16, const uint8_t* zero_points_or_null,
                                     int N, int K, int block_size, void* packed, cudaStream_t stream) {
    if (awqe_status s = check_shape(N, K, block_size)) return s;
    if (!B) return fail(AWQE_ERR_INVALID_ARGUMENT, "B is null");
    if (!scales_f16 || !aligned(scales_f16, 2))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "scales must be a non-null, 2-byte aligned fp16 array");
    if (!packed || !aligned(packed, 16))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "packed must be a non-null, 16-byte aligned buffer");
    return cuda_status(awqe::launch_repack(B, static_cast<const uint16_t*>(scales_f16), zero_points_or_null, N, K,
                                           block_size, packed, stream),
                       "repack launch");
}

awqe_status awqe_dequantize_f16(const void* packed, int N, int K, int block_size, void* w_f16, cudaStream_t stream) {
    if (awqe_status s = check_shape(N, K, block_size)) return s;
    if (!packed || !aligned(packed, 16))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "packed must be a non-null, 16-byte aligned buffer");
    if (!w_f16 || !aligned(w_f16, 2))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "w must be a non-null, 2-byte aligned fp16 array");
    return cuda_status(awqe::launch_dequantize(packed, N, K, block_size, w_f16, stream), "dequantize launch");
}

awqe_status awqe_gemm_f16_ex(const void* x_f16, const void* packed, const void* bias_f16_or_null, void* y_f16,
                             int M, int N, int K, int block_size, void*, size_t, int warps_per_tile,
                             cudaStream_t stream) {
    return run_gemm(plain(x_f16, packed, bias_f16_or_null, y_f16, M, N, K, 0), block_size, warps_per_tile, stream);
}

awqe_status awqe_gemm_gated_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null, void* y_f16,
                                int M, int N, int K, int block_size, cudaStream_t stream) {
    return run_gemm(plain(x_f16, packed, bias_f16_or_null, y_f16, M, N, K, 1), block_size, 0, stream);
}

awqe_status awqe_gemm_norm_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null, void* y_f16,
                               int M, int N, int K, int block_size, int gated, const void* rms_input_or_null,
                               const float* rms_input_sumsq_or_null, float eps, const void* norm_weight_or_null,
                               void* norm_out_or_null, float* sumsq_out_or_null, cudaStream_t stream) {
    if (gated < 0 || gated > 3)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "gated must be 0 (none), 1 (SiLU), 2 (GELU-tanh) or 3 (GELU), got %d",
                    gated);
    awqe::GemmFold f = plain(x_f16, packed, bias_f16_or_null, y_f16, M, N, K, gated);
    f.rms_x = static_cast<const uint16_t*>(rms_input_or_null);
    f.rms_sumsq = rms_input_sumsq_or_null;
    f.eps = eps;
    f.sumsq_out = sumsq_out_or_null;
    f.norm_w = static_cast<const uint16_t*>(norm_weight_or_null);
    f.y_norm = static_cast<uint16_t*>(norm_out_or_null);
    return run_gemm(f, block_size, 0, stream);
}

void awqe_set_programmatic_launch(int enable) { g_pdl_switch.store(enable ? 1 : 0, std::memory_order_relaxed); }

awqe_status awqe_gemm_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null, void* y_f16, int M,
                          int N, int K, int block_size, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream) {
    return awqe_gemm_f16_ex(x_f16, packed, bias_f16_or_null, y_f16, M, N, K, block_size, workspace,
                            workspace_bytes, 0, stream);
}

awqe_status awqe_rmsnorm_f16(const void* x, const void* w, void* y, int rows, int dim, float eps,
                             cudaStream_t stream) {
    if (rows < 0 || dim < 2 || dim % 2)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "rmsnorm needs rows >= 0 and an even dim >= 2, got %d x %d", rows, dim);
    if (!(eps >= 0.f)) return fail(AWQE_ERR_INVALID_ARGUMENT, "eps must be >= 0");
    if (!x || !w || !y || !aligned(x, 4) || !aligned(w, 4) || !aligned(y, 4))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "x, w and y must be non-null and 4-byte aligned");
    if (x == y) return fail(AWQE_ERR_INVALID_ARGUMENT, "y must not alias x");
    if (rows == 0) return AWQE_OK;
    return cuda_status(awqe::launch_rmsnorm(x, w, y, rows, dim, eps, stream), "rmsnorm launch");
}

awqe_status awqe_rope_kv_f16(const void* qkv, const int32_t* positions, const float* cos, const float* sin,
                             void* q_out, void* k_cache, void* v_cache, int M, int n_heads, int n_kv, int head_dim,
                             int max_len, cudaStream_t stream) {
    if (M < 0 || n_heads < 1 || n_kv < 1 || n_heads % n_kv || max_len < 1)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "rope_kv: need M >= 0, n_heads a multiple of n_kv >= 1, max_len >= 1 "
                    "(got M=%d n_heads=%d n_kv=%d max_len=%d)", M, n_heads, n_kv, max_len);
    if (head_dim < 2 || head_dim % 2 || head_dim > 1024)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "rope_kv: head_dim must be even and at most 1024, got %d", head_dim);
    if (!qkv || !positions || !cos || !sin || !q_out || !k_cache || !v_cache)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "rope_kv: a pointer is null");
    if (M == 0) return AWQE_OK;
    return cuda_status(awqe::launch_rope_kv(qkv, positions, cos, sin, q_out, k_cache, v_cache, M, n_heads, n_kv,
                                            head_dim, max_len, stream),
                       "rope_kv launch");
}

size_t awqe_attention_workspace_bytes(int n_heads, int head_dim, int max_len) {
    if (n_heads < 1 || head_dim < 1 || max_len < 1) return 0;
    return awqe::attention_workspace_bytes(n_heads, head_dim, max_len);
}

awqe_status awqe_decode_attention_ex_f16(const void* qkv, const int32_t* position, const float* cos, const float* sin,
                                         void* k_cache, void* v_cache, void* out, int n_heads, int n_kv, int head_dim,
                                         int max_len, int window, float scale, const void* q_norm_or_null,
                                         const void* k_norm_or_null, float norm_eps, float softcap, int span,
                                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    if (head_dim != 32 && head_dim != 64 && head_dim != 96 && head_dim != 128 && head_dim != 256)
        return fail(AWQE_ERR_UNSUPPORTED, "attention: head_dim must be 32, 64, 96, 128 or 256, got %d", head_dim);
    if (n_heads < 1 || n_kv < 1 || n_heads % n_kv || max_len < 1 || window < 0)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "attention: need n_heads a multiple of n_kv >= 1, max_len >= 1, "
                    "window >= 0 (got n_heads=%d n_kv=%d max_len=%d window=%d)", n_heads, n_kv, max_len, window);
    if (max_len > awqe::kMaxSplits * awqe::kSplitKeys)
        return fail(AWQE_ERR_UNSUPPORTED, "attention: max_len %d is beyond %d positions", max_len,
                    awqe::kMaxSplits * awqe::kSplitKeys);
    if (!qkv || !position || !cos || !sin || !k_cache || !v_cache || !out || !aligned(qkv, 4) ||
        !aligned(k_cache, 4) || !aligned(v_cache, 4) || !aligned(out, 2))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "attention: a pointer is null, or qkv/caches are not 4-byte aligned");
    if (!q_norm_or_null != !k_norm_or_null ||
        (q_norm_or_null && (!aligned(q_norm_or_null, 2) || !aligned(k_norm_or_null, 2) || !(norm_eps >= 0.f) ||
                            !std::isfinite(norm_eps))))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "attention: q_norm and k_norm must both be given (2-byte aligned, "
                    "a finite eps >= 0) or both be null");
    if (!(softcap >= 0.f) || !std::isfinite(softcap))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "attention: softcap must be finite and >= 0 (0: none)");
    if (span < 0 || span > max_len)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "attention: span must be 0 (all of max_len) or 1 .. max_len %d, got %d",
                    max_len, span);
    const size_t need = awqe::attention_workspace_bytes(n_heads, head_dim, max_len);
    if (!workspace || !aligned(workspace, 8) || workspace_bytes < need)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "attention: workspace must be 8-byte aligned and hold %zu bytes", need);
    awqe::AttentionExtras extras;
    extras.q_norm = q_norm_or_null, extras.k_norm = k_norm_or_null, extras.norm_eps = norm_eps;
    extras.softcap = softcap, extras.span = span;
    return cuda_status(awqe::launch_decode_attention(qkv, position, cos, sin, k_cache, v_cache, out, n_heads, n_kv,
                                                     head_dim, max_len, window, scale, extras, workspace, stream),
                       "attention launch");
}

awqe_status awqe_decode_attention_f16(const void* qkv, const int32_t* position, const float* cos, const float* sin,
                                      void* k_cache, void* v_cache, void* out, int n_heads, int n_kv, int head_dim,
                                      int max_len, int window, float scale, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
    return awqe_decode_attention_ex_f16(qkv, position, cos, sin, k_cache, v_cache, out, n_heads, n_kv, head_dim,
                                        max_len, window, scale, nullptr, nullptr, 0.f, 0.f, 0, workspace,
                                        workspace_bytes, stream);
}

awqe_status awqe_residual_norm_f16(const void* y_or_null, const void* out_norm_or_null, float* h, const void* next_norm,
                                   void* x, int rows, int dim, float eps, cudaStream_t stream) {
    if (rows < 0 || dim < 2 || dim % 2)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "residual_norm needs rows >= 0 and an even dim >= 2, got %d x %d", rows,
                    dim);
    if (!(eps >= 0.f) || !std::isfinite(eps))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "residual_norm: eps must be finite and >= 0");
    if (!h || !next_norm || !x || !aligned(h, 8) || !aligned(next_norm, 4) || !aligned(x, 4) ||
        (y_or_null && !aligned(y_or_null, 4)) || (out_norm_or_null && !aligned(out_norm_or_null, 4)))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "residual_norm: h (8-byte aligned), next_norm and x (4-byte aligned) "
                    "must be non-null, y and out_norm 4-byte aligned where given");
    const size_t values = (size_t)rows * dim;
    if (overlap(x, 2 * values, y_or_null, 2 * values) || overlap(x, 2 * values, h, 4 * values))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "residual_norm: x must not overlap y or h");
    if (rows == 0) return AWQE_OK;
    return cuda_status(awqe::launch_residual_norm(y_or_null, out_norm_or_null, h, next_norm, x, rows, dim, eps, stream),
                       "residual_norm launch");
}

awqe_status awqe_gemm_residual_norm_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null,
                                        void* y_f16, int N, int K, int block_size, const void* out_norm_or_null,
                                        float* h, const void* next_norm, void* x_out, float eps, unsigned* ticket,
                                        cudaStream_t stream) {
    if (N < 2 || N % 2)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "gemm_residual_norm: N (the stream's width) must be even, got %d", N);
    if (!(eps >= 0.f) || !std::isfinite(eps))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "gemm_residual_norm: eps must be finite and >= 0");
    if (!h || !next_norm || !x_out || !ticket || !aligned(h, 8) || !aligned(next_norm, 4) || !aligned(x_out, 4) ||
        !aligned(ticket, 4) || (y_f16 && !aligned(y_f16, 4)) || (out_norm_or_null && !aligned(out_norm_or_null, 4)))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "gemm_residual_norm: h (8-byte aligned), next_norm, x_out, ticket and y "
                    "(4-byte aligned) must be non-null, out_norm 4-byte aligned where given");
    const size_t n = (size_t)N;
    if (overlap(x_out, 2 * n, y_f16, 2 * n) || overlap(x_out, 2 * n, h, 4 * n) || overlap(y_f16, 2 * n, h, 4 * n) ||
        overlap(x_out, 2 * n, x_f16, 2 * (size_t)K) || overlap(ticket, 4, y_f16, 2 * n) ||
        overlap(ticket, 4, h, 4 * n) ||
        overlap(ticket, 4, x_out, 2 * n) || overlap(x_out, 2 * n, next_norm, 2 * n) ||
        overlap(x_out, 2 * n, out_norm_or_null, 2 * n) || overlap(h, 4 * n, next_norm, 2 * n) ||
        overlap(h, 4 * n, out_norm_or_null, 2 * n))
        return fail(AWQE_ERR_INVALID_ARGUMENT,
                    "gemm_residual_norm: x_out, y, h and ticket must not overlap each other, x or the norms");
    awqe::GemmFold f = plain(x_f16, packed, bias_f16_or_null, y_f16, 1, N, K, 0);
    f.eps = eps;
    const awqe::BoundaryFold bnd{h, static_cast<const uint16_t*>(out_norm_or_null),
                                 static_cast<const uint16_t*>(next_norm), static_cast<uint16_t*>(x_out), ticket};
    return run_gemm(f, block_size, 0, stream, &bnd);
}

awqe_status awqe_silu_mul_f16(const void* gate_up, void* out, int M, int inter, cudaStream_t stream) {
    if (M < 0 || inter < 8 || inter % 8)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "silu_mul: need M >= 0 and inter a multiple of 8, got %d x %d", M,
                    inter);
    if (!gate_up || !out || !aligned(gate_up, 2) || !aligned(out, 2))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "silu_mul: gate_up and out must be non-null and 2-byte aligned");
    if (M == 0) return AWQE_OK;
    return cuda_status(awqe::launch_silu_mul(gate_up, out, M, inter, stream), "silu_mul launch");
}

int awqe_probe_placement(void* out, int max_blocks) {
    static_assert(sizeof(awqe::ProbeRecord) == 40, "the C API's record layout");
    if (!out || max_blocks <= 0) return -1;
    return awqe::probe_placement(static_cast<awqe::ProbeRecord*>(out), max_blocks);
}

}  // extern "C"
