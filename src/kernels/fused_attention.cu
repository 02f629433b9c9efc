// Fused scaled dot-product attention, forward pass (flash attention on CUDA cores).
//
// Shapes (all contiguous, row-major):
//   q    (B, H, Lq, D)      T = float | __half | __nv_bfloat16
//   k, v (B, H, Lk, D)      T
//   mask (B, Lk)            float, nonzero = attend, 0 = padding; ignored when has_mask == 0
//   out  (B, H, Lq, D)      T
//   lse  (B, H, Lq)         float: logsumexp of each row's scaled scores, +inf for a row that
//                           sees no key (its output is 0)
// Causal (bottom-right aligned): query i sees key j iff j <= i + (Lk - Lq).
//
// Algorithm (flash attention, one pass over K/V): every block owns BR = 32 query rows of one
// (batch, head) and walks the keys in tiles of BC = 32:
//   1. the 128 threads load the K and V tiles (BC x D each) into shared memory, converting to
//      f32, and the tile's padding mask;
//   2. every query row is handled by a quad of 4 consecutive threads, each holding D/4 of the
//      (pre-scaled) query and of the f32 output accumulator in registers, dimensions
//      sub, sub+4, sub+8, ... (sub = lane % 4): a score is D/4 FMAs per thread against shared K
//      (the 8 rows of a warp read the same K element: broadcast; the 4 subs read consecutive
//      words: no bank conflicts) plus two xor-shuffles inside the quad;
//   3. online softmax per row over the tile's BC scores: m_new = max(m, max_j s_j),
//      corr = exp(m - m_new), p_j = exp(s_j - m_new), l = l*corr + sum_j p_j,
//      o = o*corr + sum_j p_j V[j] (again D/4 FMAs per key per thread, from shared V);
//   4. after the last tile o / l is written in T and m + log(l) to lse.
// Tiles past the last key the block's last row may see (causal) are not visited; keys that are
// padded or causally hidden get s = -inf, so exp gives exactly 0. Everything accumulates in f32.
//
// Launch: grid (ceil(Lq / BR), B * H), block 128 threads (4 warps = 32 rows x 4 threads),
// static shared memory 2 * BC * D * 4 bytes + BC * 4 (32.1 KiB for D = 128). Entry points
// fused_attention_{f32,f16,bf16}_d{32,64,128}.
//
// Memory traffic per (batch, head): Q read once (Lq*D), O written once (Lq*D), K and V read
// once per query block: 2 * Lk * D * ceil(Lq / BR) elements (halved for causal), served mostly
// from L2; no Lq x Lk buffer exists anywhere. Arithmetic: 4 * Lq * Lk * D flops on CUDA cores
// (no tensor cores yet: that is the next step for f16/bf16, see notes/attention.md).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <mma.h>

#define BR 32
#define BC 32
#define THREADS 128

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename T, int D>
__device__ void attention_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              const float* __restrict__ mask, T* __restrict__ out, float* __restrict__ lse,
                              int H, int Lq, int Lk, float scale, int causal, int has_mask) {
    constexpr int DQ = D / 4;  // dimensions per thread
    __shared__ float ks[BC][D];
    __shared__ float vs[BC][D];
    __shared__ float kmask[BC];

    const int bh = blockIdx.y;
    const int b = bh / H;
    const int tid = threadIdx.x;
    const int sub = tid & 3;
    const int row = blockIdx.x * BR + (tid >> 2);
    const bool live = row < Lq;
    const T* qh = q + (size_t)bh * Lq * D;
    const T* kh = k + (size_t)bh * Lk * D;
    const T* vh = v + (size_t)bh * Lk * D;

    float qr[DQ], o[DQ];
#pragma unroll
    for (int i = 0; i < DQ; i++) {
        qr[i] = live ? to_f32(qh[(size_t)row * D + sub + 4 * i]) * scale : 0.f;
        o[i] = 0.f;
    }
    // keys this row sees (causal), and the most any row of the block sees
    const int shift = Lk - Lq;
    const int limit = causal ? min(Lk, max(0, row + 1 + shift)) : Lk;
    const int last_row = min(Lq - 1, (int)blockIdx.x * BR + BR - 1);
    const int end = causal ? min(Lk, max(0, last_row + 1 + shift)) : Lk;

    float m = -CUDART_INF_F, l = 0.f;
    for (int j0 = 0; j0 < end; j0 += BC) {
        __syncthreads();  // the previous tile is no longer read
        for (int e = tid; e < BC * D; e += THREADS) {
            const int j = e / D, c = e % D;
            const bool in = j0 + j < Lk;
            ks[j][c] = in ? to_f32(kh[(size_t)(j0 + j) * D + c]) : 0.f;
            vs[j][c] = in ? to_f32(vh[(size_t)(j0 + j) * D + c]) : 0.f;
        }
        if (tid < BC) {
            const int j = j0 + tid;
            kmask[tid] = (j < Lk && (!has_mask || mask[(size_t)b * Lk + j] != 0.f)) ? 1.f : 0.f;
        }
        __syncthreads();

        float s[BC];
        float tile_max = -CUDART_INF_F;
#pragma unroll
        for (int j = 0; j < BC; j++) {
            float part = 0.f;
#pragma unroll
            for (int i = 0; i < DQ; i++) part = fmaf(qr[i], ks[j][sub + 4 * i], part);
            part += __shfl_xor_sync(0xffffffff, part, 1);
            part += __shfl_xor_sync(0xffffffff, part, 2);
            const bool seen = kmask[j] != 0.f && j0 + j < limit;
            s[j] = seen ? part : -CUDART_INF_F;
            tile_max = fmaxf(tile_max, s[j]);
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new == -CUDART_INF_F) continue;  // nothing seen yet (uniform per quad, no shuffles below)
        const float corr = expf(m - m_new);     // 0 while m is still -inf
        float psum = 0.f;
#pragma unroll
        for (int i = 0; i < DQ; i++) o[i] *= corr;
#pragma unroll
        for (int j = 0; j < BC; j++) {
            const float p = expf(s[j] - m_new);
            psum += p;
#pragma unroll
            for (int i = 0; i < DQ; i++) o[i] = fmaf(p, vs[j][sub + 4 * i], o[i]);
        }
        l = l * corr + psum;
        m = m_new;
    }
    if (!live) return;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = out + ((size_t)bh * Lq + row) * D;
#pragma unroll
    for (int i = 0; i < DQ; i++) orow[sub + 4 * i] = from_f32<T>(o[i] * inv);
    if (sub == 0 && lse != nullptr) lse[(size_t)bh * Lq + row] = l > 0.f ? m + logf(l) : CUDART_INF_F;
}

#define ENTRY(NAME, T, D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                            \
        const T* q, const T* k, const T* v, const float* mask, T* out, float* lse, int H, int Lq, int Lk,  \
        float scale, int causal, int has_mask) {                                                          \
        attention_fwd<T, D>(q, k, v, mask, out, lse, H, Lq, Lk, scale, causal, has_mask);                  \
    }

ENTRY(fused_attention_f32_d32, float, 32)
ENTRY(fused_attention_f32_d64, float, 64)
ENTRY(fused_attention_f32_d128, float, 128)
ENTRY(fused_attention_f16_d32, __half, 32)
ENTRY(fused_attention_f16_d64, __half, 64)
ENTRY(fused_attention_f16_d128, __half, 128)
ENTRY(fused_attention_bf16_d32, __nv_bfloat16, 32)
ENTRY(fused_attention_bf16_d64, __nv_bfloat16, 64)
ENTRY(fused_attention_bf16_d128, __nv_bfloat16, 128)

// ------------------------------------------------------------------------------------------------
// Tensor-core variant for f16/bf16 (WMMA m16n16k16, f32 accumulators): opt-in with
// WICK_ATTENTION_CUDA_KERNEL=wmma until it has been checked on a GPU.
//
// Block: 4 warps, WBR = 64 query rows (16 per warp), key tiles of WBC = 32. Shared memory (T = 16-bit):
//   Qs  64 x D  T   (loaded once, zero rows past Lq)        8 / 16 KiB for D = 64 / 128
//   Ks, Vs  32 x D  T  (zero rows past Lk)                   2 x (4 / 8) KiB
//   Ss  per warp 16 x 32 f32: the scores, then reused as the 16 x 16 f32 staging tile of P.V
//   Ps  per warp 16 x 32 T: P for the P.V product
//   corr, l per warp: 16 f32 each
// Per tile, warp w: S (16 x 32) = Q_w K^T with D/16 x 2 mma (K^T read as a col_major matrix_b
// straight from the row-major K tile); the online softmax runs row by row with lane j owning key j
// (two 5-step butterfly reductions per row); P goes to Ps in T; then for every 16-column chunk of D,
// P (16 x 32) . V (32 x 16) is two mma into a fresh accumulator, staged through Ss, and added to
// the warp's output rows held in registers (lane: row lane/2, 8 columns) after scaling by corr.
// Launch: grid (ceil(Lq / 64), B * H), 128 threads. Memory traffic as above with BR = 64.
#define WBR 64
#define WBC 32

template <typename T, int D>
__device__ void attention_fwd_wmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   const float* __restrict__ mask, T* __restrict__ out, float* __restrict__ lse,
                                   int H, int Lq, int Lk, float scale, int causal, int has_mask) {
    using namespace nvcuda;
    __shared__ __align__(32) T qs[WBR * D];
    __shared__ __align__(32) T ks[WBC * D];
    __shared__ __align__(32) T vs[WBC * D];
    __shared__ __align__(32) float ss[4][16 * WBC];
    __shared__ __align__(32) T ps[4][16 * WBC];
    __shared__ float corr_s[4][16];
    __shared__ float l_s[4][16];
    __shared__ float kmask[WBC];

    const int bh = blockIdx.y;
    const int b = bh / H;
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int q0 = blockIdx.x * WBR;
    const T* qh = q + (size_t)bh * Lq * D;
    const T* kh = k + (size_t)bh * Lk * D;
    const T* vh = v + (size_t)bh * Lk * D;
    const T zero = from_f32<T>(0.f);

    for (int e = tid; e < WBR * D; e += THREADS) {
        const int r = e / D, c = e % D;
        qs[e] = q0 + r < Lq ? qh[(size_t)(q0 + r) * D + c] : zero;
    }
    const int shift = Lk - Lq;
    const int last_row = min(Lq - 1, q0 + WBR - 1);
    const int end = causal ? min(Lk, max(0, last_row + 1 + shift)) : Lk;

    // running max and sum of the warp's 16 rows, replicated in every lane
    float m[16], l[16];
#pragma unroll
    for (int r = 0; r < 16; r++) { m[r] = -CUDART_INF_F; l[r] = 0.f; }
    // the output: row lane/2, columns (lane%2)*8 + t of every 16-column chunk
    float o[D / 16][8];
#pragma unroll
    for (int c = 0; c < D / 16; c++)
#pragma unroll
        for (int t = 0; t < 8; t++) o[c][t] = 0.f;

    float* sw = ss[warp];
    T* pw = ps[warp];
    const int wrow0 = q0 + warp * 16;  // the warp's first query row

    for (int j0 = 0; j0 < end; j0 += WBC) {
        __syncthreads();  // the previous tile is no longer read
        for (int e = tid; e < WBC * D; e += THREADS) {
            const int j = e / D, c = e % D;
            const bool in = j0 + j < Lk;
            ks[e] = in ? kh[(size_t)(j0 + j) * D + c] : zero;
            vs[e] = in ? vh[(size_t)(j0 + j) * D + c] : zero;
        }
        if (tid < WBC) {
            const int j = j0 + tid;
            kmask[tid] = (j < Lk && (!has_mask || mask[(size_t)b * Lk + j] != 0.f)) ? 1.f : 0.f;
        }
        __syncthreads();

        // S = Q_w K^T (16 x 32)
#pragma unroll
        for (int nb = 0; nb < WBC / 16; nb++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
                wmma::load_matrix_sync(a, qs + warp * 16 * D + kk * 16, D);
                wmma::load_matrix_sync(bk, ks + nb * 16 * D + kk * 16, D);
                wmma::mma_sync(acc, a, bk, acc);
            }
            wmma::store_matrix_sync(sw + nb * 16, acc, WBC, wmma::mem_row_major);
        }
        __syncwarp();

        // online softmax, lane = key
        const bool key_ok = kmask[lane] != 0.f;
#pragma unroll
        for (int r = 0; r < 16; r++) {
            const int row = wrow0 + r;
            const int limit = causal ? min(Lk, max(0, row + 1 + shift)) : Lk;
            const float s = (key_ok && j0 + lane < limit) ? sw[r * WBC + lane] * scale : -CUDART_INF_F;
            float mx = s;
#pragma unroll
            for (int w = 16; w > 0; w >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, w));
            const float m_new = fmaxf(m[r], mx);
            float p = 0.f, corr = 1.f;
            if (m_new != -CUDART_INF_F) {
                p = expf(s - m_new);
                corr = expf(m[r] - m_new);
            }
            float sum = p;
#pragma unroll
            for (int w = 16; w > 0; w >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, w);
            l[r] = l[r] * corr + sum;
            m[r] = m_new;
            pw[r * WBC + lane] = from_f32<T>(p);
            if (lane == 0) corr_s[warp][r] = corr;
        }
        __syncwarp();

        // O = corr * O + P V, one 16-column chunk at a time, staged through sw
        const float my_corr = corr_s[warp][lane >> 1];
#pragma unroll
        for (int c = 0; c < D / 16; c++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kb = 0; kb < WBC / 16; kb++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
                wmma::load_matrix_sync(a, pw + kb * 16, WBC);
                wmma::load_matrix_sync(bv, vs + kb * 16 * D + c * 16, D);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(sw, acc, 16, wmma::mem_row_major);
            __syncwarp();
#pragma unroll
            for (int t = 0; t < 8; t++) o[c][t] = o[c][t] * my_corr + sw[(lane >> 1) * 16 + (lane & 1) * 8 + t];
            __syncwarp();
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < 16; r++) l_s[warp][r] = l[r];
    }
    __syncwarp();
    const int row = wrow0 + (lane >> 1);
    if (row >= Lq) return;
    const float lr = l_s[warp][lane >> 1];
    const float inv = lr > 0.f ? 1.f / lr : 0.f;
    T* orow = out + ((size_t)bh * Lq + row) * D + (lane & 1) * 8;
#pragma unroll
    for (int c = 0; c < D / 16; c++)
#pragma unroll
        for (int t = 0; t < 8; t++) orow[c * 16 + t] = from_f32<T>(o[c][t] * inv);
    if ((lane & 1) == 0 && lse != nullptr) {
        // m of this lane's row: the replicated m[] indexed statically
        float mr = -CUDART_INF_F;
#pragma unroll
        for (int r = 0; r < 16; r++) if (r == (lane >> 1)) mr = m[r];
        lse[(size_t)bh * Lq + row] = lr > 0.f ? mr + logf(lr) : CUDART_INF_F;
    }
}

#define ENTRY_WMMA(NAME, T, D)                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                            \
        const T* q, const T* k, const T* v, const float* mask, T* out, float* lse, int H, int Lq, int Lk,  \
        float scale, int causal, int has_mask) {                                                          \
        attention_fwd_wmma<T, D>(q, k, v, mask, out, lse, H, Lq, Lk, scale, causal, has_mask);             \
    }

ENTRY_WMMA(fused_attention_wmma_f16_d64, __half, 64)
ENTRY_WMMA(fused_attention_wmma_f16_d128, __half, 128)
ENTRY_WMMA(fused_attention_wmma_bf16_d64, __nv_bfloat16, 64)
ENTRY_WMMA(fused_attention_wmma_bf16_d128, __nv_bfloat16, 128)
