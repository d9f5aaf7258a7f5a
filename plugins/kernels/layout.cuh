// The kernels' repacked weight layout, shared by the repack and GEMM kernels, and their launchers.
//
// W [N, K] is cut into tiles of 16 rows and chunks of 64 values along K (K padded to whole blocks, then to a
// whole chunk). One chunk of one tile is 32 uint4 (512 bytes), one per lane of the warp that reads it, so a
// warp's load is one coalesced 512-byte line of 16-byte vectors. Lane l = 4g + t holds rows g and g + 8, as
// four uint32 words, word s for mma k-step s, at chunk-local k = 32 (s / 2) + 8t + 4 (s % 2) + 0..3.
// Within a word the nibbles are ordered so that one lop3 yields an mma A-fragment register directly:
//   nibble 0, 4 -> row g,     k +0, +1  (A reg 0)    nibble 2, 6 -> row g,     k +2, +3  (A reg 2)
//   nibble 1, 5 -> row g + 8, k +0, +1  (A reg 1)    nibble 3, 7 -> row g + 8, k +2, +3  (A reg 3)
// So the mma's logical k (2t, 2t+1, 2t+8, 2t+9) of step s is that physical k + (0, 1, 2, 3). The same
// permutation applies to x: a lane reads its activations of a chunk as two 16-byte loads (k 8t.. and
// 32 + 8t..), and steps 0-1 cover k 0..31, steps 2-3 k 32..63, so no step straddles a block of 32.
// After all tiles' weights come the block parameters: per tile and block, 8 uint2 (one per g):
//   .x = half2(scale[g], scale[g + 8]), .y = half2(1024 + zero[g], -(64 + zero[g + 8]))
// the constants the dequantisation subtracts (see gemm.cu). Padding rows and blocks have scale 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace awqe {

constexpr int kTileRows = 16;
constexpr int kChunkK = 64;
constexpr int kChunkBytes = 512;
constexpr int kBlockParamBytes = 64;

struct Layout {
    int tiles;    // ceil(N / 16)
    int blocks;   // MatMulNBits blocks per row, ceil(K / block_size)
    int chunks;   // 64-value chunks per tile row, ceil(blocks * block_size / 64)
    int pblocks;  // blocks with parameters per tile: every block a chunk touches, padding included
    size_t weight_bytes() const { return (size_t)tiles * chunks * kChunkBytes; }
    size_t bytes() const { return weight_bytes() + (size_t)tiles * pblocks * kBlockParamBytes; }
};

inline Layout make_layout(int N, int K, int block_size) {
    Layout l;
    l.tiles = (N + kTileRows - 1) / kTileRows;
    l.blocks = (K + block_size - 1) / block_size;
    l.chunks = (l.blocks * block_size + kChunkK - 1) / kChunkK;
    l.pblocks = (l.chunks * kChunkK + block_size - 1) / block_size;
    return l;
}

cudaError_t launch_repack(const uint8_t* B, const uint16_t* scales, const uint8_t* zero_points, int N, int K,
                          int block_size, void* packed, cudaStream_t stream);

cudaError_t launch_dequantize(const void* packed, int N, int K, int block_size, void* w, cudaStream_t stream);

struct Device {
    int sm_count;
    int major;          // compute capability
    int smem_per_sm;    // shared memory a SM holds, bytes
    int smem_reserved;  // of it, what the system reserves per resident block
};

// One product y [M, N] = x [M, K] @ W^T (+ bias) and what its epilogue may fold in.
struct GemmFold {
    const uint16_t* x;
    const void* packed;
    const uint16_t* bias;  // or null
    uint16_t* y;
    int M, N, K;
    // Non-zero: W's rows alternate in blocks of 8 between gate and up rows (N/2 of each); y [M, N/2] =
    // fp16(act(gate)) * up with act SiLU (1), GELU-tanh (2) or GELU-erf (3). 0: a plain product.
    int gated;
    // x = gamma * h pre-scaled by the caller and rms_x = h [M, K]: the sums are scaled by rsqrt(mean(h^2) + eps),
    // an RMSNorm folded into the product (before bias and gate). Null: none.
    const uint16_t* rms_x;
    float eps;
    // With rms_x: rms_sumsq [M, ceil(K / 16)] fp32, the per-tile sums of squares of rms_x that the product which
    // wrote it left (sumsq_out below); the mean is taken from them instead of re-reading rms_x's rows. Null: rms_x.
    const float* rms_sumsq;
    // Also y_norm [M, N] = fp16(norm_w * y), the next RMSNorm's pre-scaled input. Null: none (not with gated).
    const uint16_t* norm_w;
    uint16_t* y_norm;
    // Also sumsq_out [M, ceil(N / 16)] fp32: for each tile of 16 rows, the sum of fp16(y)^2 over its rows, in a
    // fixed order (not with gated). Null: none.
    float* sumsq_out;
};

// Gemma 2/3's block boundary after a product (M = 1, not with gated or GemmFold's outputs): the last block to finish
// (ticket: zero before, left at zero) updates the float32 stream h [N] += out_w * rmsnorm(y) (out_w null: += y) and
// writes x [N] = fp16(next_w * rmsnorm(h)), with GemmFold::eps, as residual_norm_kernel (decode.cu) does as a
// kernel of its own. Kept apart from GemmFold so that the other products' kernel arguments stay as they were.
struct BoundaryFold {
    float* h;
    const uint16_t* out_w;
    const uint16_t* next_w;
    uint16_t* x;
    unsigned* ticket;
};

// bnd non-null: the product with the boundary after it.
cudaError_t launch_gemm(const GemmFold& f, int block_size, int warps_per_tile, const Device& dev, cudaStream_t stream,
                        const BoundaryFold* bnd = nullptr);

// What a -DAWQE_PROBE_PLACEMENT build's M <= 8 GEMV records per block (gemm.cu; 40 bytes, the C API's layout):
// %globaltimer at entry, when the PDL wait returned and when the tile's sums were done; the SM; the SM's clock
// cycles from entry to the wait's return and to done; the block's threads.
struct ProbeRecord {
    unsigned long long entry_ns, released_ns, done_ns;
    unsigned sm, wait_cycles, done_cycles, threads;
};
constexpr int kProbeBlocks = 16384;
// Copies the last launch's records of blocks [0, max_blocks) into out and clears them: the count copied, or -1
// (not a probe build, or a CUDA error).
int probe_placement(ProbeRecord* out, int max_blocks);

}  // namespace awqe
