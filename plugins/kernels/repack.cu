// One-time repack, device to device, of MatMulNBits tensors into the layout of layout.cuh, and its inverse
// to dense fp16 weights for callers that hand large-M products to a dense GEMM.
#include <cuda_fp16.h>

#include "layout.cuh"

namespace awqe {
namespace {

// One thread per uint32 word of the packed weights: eight nibbles for rows g, g + 8 of one k-step.
__global__ void repack_weights(const uint8_t* __restrict__ B, uint32_t* __restrict__ out, int N, int block_size,
                               Layout l) {
    const size_t words = (size_t)l.tiles * l.chunks * 128;
    const int padded_k = l.blocks * block_size;
    for (size_t w = blockIdx.x * (size_t)blockDim.x + threadIdx.x; w < words; w += (size_t)gridDim.x * blockDim.x) {
        const int s = w & 3, lane = (w >> 2) & 31;
        const size_t tile_chunk = w >> 7;
        const int chunk = tile_chunk % l.chunks, tile = tile_chunk / l.chunks;
        const int g = lane >> 2, t = lane & 3;
        uint32_t word = 0;
        for (int i = 0; i < 8; ++i) {
            const int row = tile * kTileRows + g + 8 * (i & 1);
            const int k = chunk * kChunkK + 32 * (s >> 1) + 8 * t + 4 * (s & 1) + (i >> 2) + 2 * ((i >> 1) & 1);
            // Padding is multiplied by x = 0 or ends in a row nobody writes; any 4-bit value does.
            uint32_t q = 8;
            if (row < N && k < padded_k) q = (B[(size_t)row * (padded_k / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
            word |= q << (4 * i);
        }
        out[w] = word;
    }
}

__device__ uint32_t half2_bits(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// One thread per (tile, block, g): the scales and zero-point constants for rows g and g + 8.
__global__ void repack_params(const uint16_t* __restrict__ scales, const uint8_t* __restrict__ zero_points,
                              uint2* __restrict__ out, int N, Layout l) {
    const size_t count = (size_t)l.tiles * l.pblocks * 8;
    const int zp_stride = (l.blocks + 1) / 2;
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < count; p += (size_t)gridDim.x * blockDim.x) {
        const int g = p & 7;
        const int blk = (p >> 3) % l.pblocks, tile = (p >> 3) / l.pblocks;
        uint32_t scale_bits[2] = {0, 0};  // fp16 +0: padding contributes nothing
        int zero[2] = {8, 8};
        for (int h = 0; h < 2; ++h) {
            const int row = tile * kTileRows + g + 8 * h;
            if (row >= N || blk >= l.blocks) continue;
            scale_bits[h] = scales[(size_t)row * l.blocks + blk];
            if (zero_points) zero[h] = (zero_points[(size_t)row * zp_stride + blk / 2] >> (4 * (blk & 1))) & 0xF;
        }
        out[p] = make_uint2(scale_bits[0] | (scale_bits[1] << 16), half2_bits(1024.f + zero[0], -(64.f + zero[1])));
    }
}

// One thread per packed word: its eight weights (q - zero) * scale, written to W [N, K] where they exist.
__global__ void dequantize_weights(const uint32_t* __restrict__ packed, const uint2* __restrict__ params,
                                   __half* __restrict__ w, int N, int K, int block_size, Layout l) {
    const size_t words = (size_t)l.tiles * l.chunks * 128;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x) {
        const int s = i & 3, lane = (i >> 2) & 31;
        const int chunk = (i >> 7) % l.chunks, tile = (i >> 7) / l.chunks;
        const int g = lane >> 2, t = lane & 3;
        const uint32_t word = packed[i];
        for (int n = 0; n < 8; ++n) {
            const int row = tile * kTileRows + g + 8 * (n & 1);
            const int k = chunk * kChunkK + 32 * (s >> 1) + 8 * t + 4 * (s & 1) + (n >> 2) + 2 * ((n >> 1) & 1);
            if (row >= N || k >= K) continue;
            const uint2 p = params[((size_t)tile * l.pblocks + k / block_size) * 8 + g];
            const __half2 sc = *reinterpret_cast<const __half2*>(&p.x), zc = *reinterpret_cast<const __half2*>(&p.y);
            // Undo the constants repack_params stored: .y = (1024 + zero[g], -(64 + zero[g + 8])).
            const float zero = (n & 1) ? -__high2float(zc) - 64.f : __low2float(zc) - 1024.f;
            const float scale = (n & 1) ? __high2float(sc) : __low2float(sc);
            const float q = (word >> (4 * n)) & 0xF;
            w[(size_t)row * K + k] = __float2half_rn((q - zero) * scale);
        }
    }
}

unsigned grid_for(size_t items, int threads) {
    const size_t blocks = (items + threads - 1) / threads;
    return (unsigned)(blocks < 65535 ? blocks : 65535);
}

}  // namespace

cudaError_t launch_repack(const uint8_t* B, const uint16_t* scales, const uint8_t* zero_points, int N, int K,
                          int block_size, void* packed, cudaStream_t stream) {
    const Layout l = make_layout(N, K, block_size);
    const int threads = 256;
    repack_weights<<<grid_for((size_t)l.tiles * l.chunks * 128, threads), threads, 0, stream>>>(
        B, static_cast<uint32_t*>(packed), N, block_size, l);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    uint2* params = reinterpret_cast<uint2*>(static_cast<char*>(packed) + l.weight_bytes());
    repack_params<<<grid_for((size_t)l.tiles * l.pblocks * 8, threads), threads, 0, stream>>>(scales, zero_points,
                                                                                               params, N, l);
    return cudaGetLastError();
}

cudaError_t launch_dequantize(const void* packed, int N, int K, int block_size, void* w, cudaStream_t stream) {
    const Layout l = make_layout(N, K, block_size);
    const uint2* params = reinterpret_cast<const uint2*>(static_cast<const char*>(packed) + l.weight_bytes());
    dequantize_weights<<<grid_for((size_t)l.tiles * l.chunks * 128, 256), 256, 0, stream>>>(
        static_cast<const uint32_t*>(packed), params, static_cast<__half*>(w), N, K, block_size, l);
    return cudaGetLastError();
}

}  // namespace awqe
