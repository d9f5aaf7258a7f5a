// The C ABI: argument checks (all before any CUDA call), status codes, thread-local error detail.
#include <atomic>
#include <cstdarg>
#include <cstdio>

#include "awq_edge_kernels.h"
#include "layout.cuh"

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

awqe_status check_shape(int N, int K, int block_size) {
    if (block_size != 32 && block_size != 64 && block_size != 128)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "block_size must be 32, 64 or 128, got %d", block_size);
    if (N < 1) return fail(AWQE_ERR_INVALID_ARGUMENT, "N must be at least 1, got %d", N);
    if (K < 1) return fail(AWQE_ERR_INVALID_ARGUMENT, "K must be at least 1, got %d", K);
    if (K % 8)
        return fail(AWQE_ERR_UNSUPPORTED, "K must be a multiple of 8 (16-byte activation loads), got %d", K);
    return AWQE_OK;
}

// Multiprocessor counts per device, read once: the launch heuristic needs them on every call.
std::atomic<int> g_sm_count[64];

awqe_status sm_count(int* out) {
    int dev = 0;
    if (awqe_status s = cuda_status(cudaGetDevice(&dev), "cudaGetDevice")) return s;
    if (dev < 0 || dev >= 64) return fail(AWQE_ERR_UNSUPPORTED, "device index %d is beyond 63", dev);
    int n = g_sm_count[dev].load(std::memory_order_relaxed);
    if (n == 0) {
        if (awqe_status s = cuda_status(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev),
                                        "cudaDeviceGetAttribute(multiProcessorCount)"))
            return s;
        g_sm_count[dev].store(n, std::memory_order_relaxed);
    }
    *out = n;
    return AWQE_OK;
}

}  // namespace

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
    if (awqe_status s = check_shape(N, K, block_size)) return s;
    if (M < 0) return fail(AWQE_ERR_INVALID_ARGUMENT, "M must not be negative, got %d", M);
    if (!x_f16 || !aligned(x_f16, 16))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "x must be a non-null, 16-byte aligned fp16 array");
    if (!packed || !aligned(packed, 16))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "packed must be a non-null, 16-byte aligned buffer");
    if (!y_f16 || !aligned(y_f16, 2))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "y must be a non-null, 2-byte aligned fp16 array");
    if (bias_f16_or_null && !aligned(bias_f16_or_null, 2))
        return fail(AWQE_ERR_INVALID_ARGUMENT, "bias must be 2-byte aligned");
    if (warps_per_tile != 0 && warps_per_tile != 1 && warps_per_tile != 2 && warps_per_tile != 4 &&
        warps_per_tile != 8)
        return fail(AWQE_ERR_INVALID_ARGUMENT, "warps_per_tile must be 0, 1, 2, 4 or 8, got %d", warps_per_tile);
    if (M == 0) return AWQE_OK;
    int sms = 0;
    if (awqe_status s = sm_count(&sms)) return s;
    return cuda_status(awqe::launch_gemm(static_cast<const uint16_t*>(x_f16), packed,
                                         static_cast<const uint16_t*>(bias_f16_or_null),
                                         static_cast<uint16_t*>(y_f16), M, N, K, block_size, warps_per_tile, sms,
                                         stream),
                       "gemm launch");
}

awqe_status awqe_gemm_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null, void* y_f16, int M,
                          int N, int K, int block_size, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream) {
    return awqe_gemm_f16_ex(x_f16, packed, bias_f16_or_null, y_f16, M, N, K, block_size, workspace,
                            workspace_bytes, 0, stream);
}

}  // extern "C"
