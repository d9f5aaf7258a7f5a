/* awq-edge CUDA int4 kernels: y = x @ dequant(W)^T for MatMulNBits 4-bit weights, behind a C ABI.
 *
 * W [N, K] arrives in onnxruntime's com.microsoft MatMulNBits layout (4 bits, block_size 32/64/128 along K,
 * fp16 scales, optional packed uint8 zero points, default 8) and is repacked once, device to device, into
 * the kernels' own layout. Activations and outputs are fp16; accumulation is fp32.
 *
 * Every function validates its arguments before any CUDA call, reports failures through its status
 * (detail in awqe_last_error(), per thread), and never prints or exits. All launches go on `stream`;
 * nothing synchronises. Pointers are device pointers.
 */
#ifndef AWQ_EDGE_KERNELS_H
#define AWQ_EDGE_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#if defined(__GNUC__)
#define AWQE_API __attribute__((visibility("default")))
#else
#define AWQE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    AWQE_OK = 0,
    AWQE_ERR_INVALID_ARGUMENT = 1, /* a null or misaligned pointer, a size out of range */
    AWQE_ERR_UNSUPPORTED = 2,      /* valid MatMulNBits, but not handled here (K not a multiple of 8) */
    AWQE_ERR_CUDA = 3              /* a CUDA call or launch failed */
} awqe_status;

AWQE_API const char* awqe_status_string(awqe_status s);
/* Thread-local detail for the last failure of this thread ("" if none yet). */
AWQE_API const char* awqe_last_error(void);

/* Bytes of the repacked weight buffer (weights, then scales and zero points); 0 for invalid sizes. */
AWQE_API size_t awqe_packed_weight_bytes(int N, int K, int block_size);

/* B uint8 [N, ceil(K/block_size), block_size/2], scales fp16 [N * n_blocks],
 * zero_points uint8 [N * ceil(n_blocks/2)] (two per byte, low nibble first) or NULL (= 8).
 * `packed` (16-byte aligned, awqe_packed_weight_bytes long) receives the kernels' layout. */
AWQE_API awqe_status awqe_repack_matmul_nbits(const uint8_t* B, const void* scales_f16,
                                              const uint8_t* zero_points_or_null, int N, int K, int block_size,
                                              void* packed, cudaStream_t stream);

/* W [N, K] = (q - zero) * scale as dense fp16 (2-byte aligned, N * K values), from the packed layout: for callers
 * that run large-M products (prefill) through a dense GEMM, where that beats awqe_gemm_f16's slices of 16. */
AWQE_API awqe_status awqe_dequantize_f16(const void* packed, int N, int K, int block_size, void* w_f16,
                                         cudaStream_t stream);

/* 0: no workspace is needed for any M. */
AWQE_API size_t awqe_workspace_bytes(int M, int N, int K, int block_size);

/* y [M, N] = x [M, K] @ W^T (+ bias [N]). x and packed 16-byte aligned; K a multiple of 8.
 * M = 0 does nothing. M <= 16 is one pass over the weights; larger M runs in slices of 16 rows. */
AWQE_API awqe_status awqe_gemm_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null, void* y_f16,
                                   int M, int N, int K, int block_size, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream);

/* awqe_gemm_f16 with the warps that share one 16-row tile chosen by the caller (1, 2, 4 or 8; 0 = the built-in
 * choice). For tuning and benchmarks; every choice computes the same sums, in a different fp32 order. */
AWQE_API awqe_status awqe_gemm_f16_ex(const void* x_f16, const void* packed, const void* bias_f16_or_null, void* y_f16,
                                      int M, int N, int K, int block_size, void* workspace, size_t workspace_bytes,
                                      int warps_per_tile, cudaStream_t stream);

/* ---- The rest of a Llama-family decoder step (fp16 tensors, fp32 arithmetic) ----
 * Positions live in device memory (int32), so a captured CUDA graph replays every decode step unchanged.
 * KV caches are [n_kv, max_len, head_dim] per layer; n_heads a multiple of n_kv (grouped-query attention). */

/* y [rows, dim] = w * fp16(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm in fp16; dim even,
 * x, w and y 4-byte aligned; y may not alias x. */
AWQE_API awqe_status awqe_rmsnorm_f16(const void* x, const void* w, void* y, int rows, int dim, float eps,
                                      cudaStream_t stream);

/* For M new tokens: qkv [M, (n_heads + 2 n_kv) * head_dim] (q heads, then k heads, then v heads) -> q_out
 * [M, n_heads, head_dim] and k rotated by the half-split (Llama/NeoX) rotary embedding, k and v written into
 * the caches at positions[m]. cos, sin: fp32 [max_len, head_dim / 2] with any rope scaling folded in.
 * head_dim even, at most 1024. Positions outside [0, max_len) are skipped on the device. */
AWQE_API awqe_status awqe_rope_kv_f16(const void* qkv, const int32_t* positions, const float* cos,
                                      const float* sin, void* q_out, void* k_cache, void* v_cache, int M,
                                      int n_heads, int n_kv, int head_dim, int max_len, cudaStream_t stream);

/* Bytes of the workspace awqe_decode_attention_f16 needs (fp32 partials per head and 32-position split, one
 * ticket counter per head). Zero it once before the first call; the kernel leaves its counters at zero. */
AWQE_API size_t awqe_attention_workspace_bytes(int n_heads, int head_dim, int max_len);

/* One decode step's attention for the token at *position (int32 on the device, < max_len <= 16384): rotates its
 * q and k from qkv [(n_heads + 2 n_kv) * head_dim] (as awqe_rope_kv_f16), writes k and v into the caches, and
 * out [n_heads, head_dim] = softmax(scale * q k^T) v over cache positions 0 .. *position, or the last `window`
 * of them when window > 0. head_dim 32, 64, 96, 128 or 256; qkv and caches 4-byte aligned; workspace 8-byte
 * aligned. With programmatic dependent launch (sm_90+) the kernel reads *position, the cache rows before it and
 * cos/sin before the kernels launched before it on the stream have finished (only qkv is waited for), and every
 * kernel of this library lets its successor start early: write those before the last operation on the stream
 * that this library did not launch (a decoder step writes them in earlier steps, past a torch op). */
AWQE_API awqe_status awqe_decode_attention_f16(const void* qkv, const int32_t* position, const float* cos,
                                               const float* sin, void* k_cache, void* v_cache, void* out, int n_heads,
                                               int n_kv, int head_dim, int max_len, int window, float scale,
                                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* awqe_decode_attention_f16 with what some families add: q_norm and k_norm (fp16 [head_dim], both or neither) are
 * RMSNorms over each head of q and k before the rotation (Qwen3, Gemma 3), w * fp16(x * rsqrt(mean(x^2) + eps)) as
 * awqe_rmsnorm_f16 rounds (norm_eps finite, >= 0); softcap > 0 (finite) caps the scaled scores at
 * softcap * tanh(score / softcap) (Gemma 2). span (1 .. max_len, or 0 for max_len) bounds the positions this launch
 * covers: it launches one block per head and 32 positions of the span, so a step early in a long cache does not
 * schedule the blocks of positions it cannot reach; a position at or past span, or negative, writes NaN to out. A
 * CUDA graph replayed over several steps needs a span past the last step's position (awq_edge's decoder captures
 * one graph per power-of-two span). */
AWQE_API awqe_status awqe_decode_attention_ex_f16(const void* qkv, const int32_t* position, const float* cos,
                                                  const float* sin, void* k_cache, void* v_cache, void* out,
                                                  int n_heads, int n_kv, int head_dim, int max_len, int window,
                                                  float scale, const void* q_norm_or_null, const void* k_norm_or_null,
                                                  float norm_eps, float softcap, int span, void* workspace,
                                                  size_t workspace_bytes, cudaStream_t stream);

/* Gemma 2/3's block boundary in one kernel, on the float32 residual stream h [rows, dim] (updated in place):
 * h += out_norm * (y * rsqrt(mean(y^2) + eps)) for the block's fp16 output y [rows, dim] (out_norm NULL: h += y;
 * y NULL: h is left as it is), then x [rows, dim] = fp16(next_norm * (h * rsqrt(mean(h^2) + eps))), the next
 * product's input. Arithmetic in fp32, as transformers' Gemma RMSNorm; the norms hold the factor they multiply by
 * (Gemma's 1 + w). dim even, eps finite; h 8-byte aligned, the others 4-byte aligned; x may not overlap y or h. */
AWQE_API awqe_status awqe_residual_norm_f16(const void* y_or_null, const void* out_norm_or_null, float* h,
                                            const void* next_norm, void* x, int rows, int dim, float eps,
                                            cudaStream_t stream);

/* out [M, inter] = fp16(silu(gate)) * up for gate_up [M, 2 * inter] whose columns alternate in blocks of 8
 * between gate and up (the layout of awqe_gemm_gated_f16's weights); inter a multiple of 8. */
AWQE_API awqe_status awqe_silu_mul_f16(const void* gate_up, void* out, int M, int inter, cudaStream_t stream);

/* The gate/up projection and the SiLU gate in one pass: W [N, K] holds gate and up rows alternating in blocks of
 * 8 (N a multiple of 16); y [M, N / 2] = fp16(silu(gate)) * up, with gate = x W_gate^T (+ bias), up likewise,
 * each rounded to fp16 first. Other requirements as awqe_gemm_f16. */
AWQE_API awqe_status awqe_gemm_gated_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null,
                                         void* y_f16, int M, int N, int K, int block_size, cudaStream_t stream);

/* The decode step's RMSNorms folded into the products on both sides, so no norm kernel runs between them:
 * y [M, N] = rsqrt(mean(h^2) + eps) * (x @ W^T) (+ bias), with h = rms_input [M, K] and x = norm weight * h (fp16)
 * written by the product before (norm_out below); gated (W as awqe_gemm_gated_f16's): y [M, N / 2] =
 * fp16(act(fp16(gate))) * up with act 1 SiLU, 2 GELU with the tanh approximation (Gemma), 3 GELU with erf; 0 none.
 * rms_input NULL: no norm on the input. norm_weight [N] non-NULL (not with gated): also
 * norm_out [M, N] = fp16(norm_weight * y), the pre-scaled x of the next folded norm (y's own values rounded).
 * sumsq_out [M, ceil(N / 16)] fp32 non-NULL (not with gated): also, for each 16 rows of W, the sum of fp16(y)^2
 * over those columns of y, summed in a fixed order; the next product takes them as rms_input_sumsq (with
 * rms_input = this y), so that each of its blocks reads ceil(K / 16) floats for the mean instead of y's whole rows.
 * Equals awqe_rmsnorm_f16 then awqe_gemm_f16 up to fp16 rounding: the norm weight is applied before 1/rms, not
 * after. rms_input 16-byte aligned, eps >= 0; rms_input_sumsq (only with rms_input) and sumsq_out 4-byte aligned;
 * norm_weight and norm_out 2-byte aligned, norm_out not y; y, norm_out and sumsq_out may not overlap x, rms_input
 * or rms_input_sumsq. Otherwise as awqe_gemm_f16. */
AWQE_API awqe_status awqe_gemm_norm_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null,
                                        void* y_f16, int M, int N, int K, int block_size, int gated,
                                        const void* rms_input_or_null, const float* rms_input_sumsq_or_null,
                                        float eps, const void* norm_weight_or_null, void* norm_out_or_null,
                                        float* sumsq_out_or_null, cudaStream_t stream);

/* One token's product followed by Gemma 2/3's block boundary (awqe_residual_norm_f16) in one launch: y [1, N] =
 * x [1, K] @ W^T (+ bias), then the block that finishes last updates h [N] (float32, in place) += out_norm *
 * (y * rsqrt(mean(y^2) + eps)) (out_norm NULL: h += y) and writes x_out [N] = fp16(next_norm * (h *
 * rsqrt(mean(h^2) + eps))): the boundary's own launch and its wait go. ticket: one unsigned in device memory,
 * zero before the first call; each call leaves it at zero; calls that may run at once need their own. N even; y,
 * next_norm, out_norm, x_out and ticket 4-byte aligned, h 8-byte aligned; x_out, y and h do not overlap each
 * other or x. Otherwise as awqe_gemm_f16 with M = 1. Equals awqe_gemm_f16 then awqe_residual_norm_f16 up to the
 * order of the fp32 sums. */
AWQE_API awqe_status awqe_gemm_residual_norm_f16(const void* x_f16, const void* packed, const void* bias_f16_or_null,
                                                 void* y_f16, int N, int K, int block_size,
                                                 const void* out_norm_or_null, float* h, const void* next_norm,
                                                 void* x_out, float eps, unsigned* ticket, cudaStream_t stream);

/* Kernels of this library launch with programmatic dependent launch on compute capability 9.0 and newer, so each
 * overlaps the tail of the kernel before it (also inside CUDA graphs); GEMMs with M > 8 launch plainly. 0 turns
 * that off, 1 back on (default). */
AWQE_API void awqe_set_programmatic_launch(int enable);

/* A timing probe for benchmarks (bench/placement.py), live only in a library built with -DAWQE_PROBE_PLACEMENT:
 * copies, for blocks [0, max_blocks) of the last M <= 8 GEMM launched, 40-byte records (uint64 %globaltimer ns at
 * the block's entry, when its wait for the kernel before returned, and when its sums were done; uint32 SM, SM clock
 * cycles from entry to that return and to done, the block's threads) into out, clears them, and returns the count
 * copied; -1 in any other build or on a CUDA error. */
AWQE_API int awqe_probe_placement(void* out, int max_blocks);

#ifdef __cplusplus
}
#endif

#endif /* AWQ_EDGE_KERNELS_H */
