// Launchers of the decoder-step kernels (decode.cu); arguments are checked by the C ABI (api.cpp).
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

namespace awqe {

constexpr int kSplitKeys = 32;  // cache positions per attention block (4 warps x 8)
constexpr int kMaxSplits = 512;  // so the cache holds at most 16384 positions

size_t attention_workspace_bytes(int n_heads, int head_dim, int max_len);

cudaError_t launch_rmsnorm(const void* x, const void* w, void* y, int rows, int dim, float eps, cudaStream_t stream);

cudaError_t launch_residual_norm(const void* y, const void* out_w, float* h, const void* next_w, void* x, int rows,
                                 int dim, float eps, cudaStream_t stream);

cudaError_t launch_rope_kv(const void* qkv, const int* positions, const float* cos_t, const float* sin_t, void* q_out,
                           void* k_cache, void* v_cache, int M, int n_heads, int n_kv, int head_dim, int max_len,
                           cudaStream_t stream);

// What some families add to decode attention: per-head RMSNorms of q and k before the rotation (null: none) and
// score soft-capping (0: none).
struct AttentionExtras {
    const void* q_norm = nullptr;
    const void* k_norm = nullptr;
    float norm_eps = 0.f;
    float softcap = 0.f;
    int span = 0;  // the positions the launch covers (grid rows), 0 or >= max_len: all of the cache
};

cudaError_t launch_decode_attention(const void* qkv, const int* position, const float* cos_t, const float* sin_t,
                                    void* k_cache, void* v_cache, void* out, int n_heads, int n_kv, int head_dim,
                                    int max_len, int window, float scale, const AttentionExtras& extras,
                                    void* workspace, cudaStream_t stream);

cudaError_t launch_silu_mul(const void* gate_up, void* out, int M, int inter, cudaStream_t stream);

}  // namespace awqe
