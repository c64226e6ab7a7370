// Lightning indexer on the GPU: Hadamard rotation, FP8 e4m3 block quantization (bit-identical to the
// CPU reference), tensor-core scoring of query-row blocks against every key (FP8 e4m3 on wgmma where
// sm90_fp8_indexer_scores_wgmma.cu takes the shape, else mma.sync here; bf16 mma for the unquantized
// path); indexer_topk streams row blocks of those scores through the causal top-k of
// sm90_f32_topk_causal.cu.
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops_dsa.h"

namespace dsa::cuda {

using namespace dsa_detail;

namespace {

// ------------------------------------------------------------------------------------ hadamard / fp8

template <class In>
__device__ __forceinline__ float load_f(const In* p, int64_t i) {
  if constexpr (sizeof(In) == 4) return p[i];
  else return __bfloat162float(p[i]);
}
template <class Out>
__device__ __forceinline__ void store_f(Out* p, int64_t i, float v) {
  if constexpr (sizeof(Out) == 4) p[i] = v;
  else p[i] = __float2bfloat16_rn(v);
}

// One block per row; the butterflies pair (j, j + h) exactly like the CPU loop, in f32.
template <class In, class Out>
__global__ void hadamard_kernel(const In* __restrict__ x /*[rows, d]*/, Out* __restrict__ y /*[rows, d]*/, int d,
                                float norm) {
  extern __shared__ float v[];  // [d]
  const int64_t row = blockIdx.x;
  for (int i = threadIdx.x; i < d; i += blockDim.x) v[i] = load_f(x, row * d + i);
  __syncthreads();
  for (int h = 1; h < d; h *= 2) {
    for (int p = threadIdx.x; p < d / 2; p += blockDim.x) {
      const int j = (p / h) * 2 * h + p % h;
      const float a = v[j], b = v[j + h];
      v[j] = a + b;
      v[j + h] = a - b;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < d; i += blockDim.x) store_f(y, row * d + i, v[i] * norm);
}

// 2^ceil(log2(max(amax, 1e-4) / 448)) from the bits, as ops::fp8_block_scale.
__device__ __forceinline__ float fp8_scale_dev(float amax) {
  const float a = amax < 1e-4f ? 1e-4f : amax;
  const uint32_t bits = __float_as_uint(a * (1.0f / 448.0f));
  const int e = static_cast<int>((bits >> 23) & 0xffu) - 127 + ((bits & 0x7fffffu) != 0 ? 1 : 0);
  return __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
}

// One warp per (row, block) of `block` values; any output pointer may be null.
template <class In, class Out>
__global__ void fp8_quant_kernel(const In* __restrict__ x /*[n, d]*/, int64_t n, int d, int block, int nb,
                                 __nv_fp8_storage_t* __restrict__ codes /*[n, d]*/, float* __restrict__ scales /*[n, nb]*/,
                                 Out* __restrict__ deq /*[n, d]*/) {
  const int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (wid >= n * nb) return;
  const int64_t r = wid / nb;
  const int blk = static_cast<int>(wid % nb);
  const int begin = blk * block, end = min(d, begin + block);
  float amax = 0.f;
  for (int i = begin + lane; i < end; i += 32) amax = fmaxf(amax, fabsf(load_f(x, r * d + i)));
  amax = warp_max(amax);
  const float s = fp8_scale_dev(amax);
  if (scales && lane == 0) scales[r * nb + blk] = s;
  for (int i = begin + lane; i < end; i += 32) {
    const __nv_fp8_storage_t c = __nv_cvt_float_to_fp8(load_f(x, r * d + i) / s, __NV_SATFINITE, __NV_E4M3);
    if (codes) codes[r * d + i] = c;
    if (deq) {
      const __half_raw h = __nv_cvt_fp8_to_halfraw(c, __NV_E4M3);
      store_f(deq, r * d + i, __half2float(__half(h)) * s);
    }
  }
}

// Hadamard transform and FP8 block quantization of bf16 rows fused, one warp per row (32 <= d <= 1024, a
// power of two; the block a multiple of d / 32): lane l holds the E = d / 32 consecutive values
// [l E, l E + E) in f32 registers. Butterflies of stride h < E stay in the lane, wider ones pair lane l
// with l ^ (h / E); either way each pair computes (a + b, a - b) from the same two f32 values as the CPU
// loop, so the transform is bit-exact, and the quantization is fp8_quant_kernel's (the block's amax by
// shuffles over its 128 / E lanes).
template <int E>
__global__ void hadamard_fp8_warp_kernel(const __nv_bfloat16* __restrict__ x /*[rows, d]*/, int64_t rows, float norm,
                                         int block, __nv_fp8_storage_t* __restrict__ codes /*[rows, d]*/,
                                         float* __restrict__ scales /*[rows, nb = ceil(d / block)]*/) {
  constexpr int d = 32 * E;
  const int nb = (d + block - 1) / block;
  const int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float v[E];
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] = __bfloat162float(x[row * d + lane * E + e]);
#pragma unroll
  for (int h = 1; h < E; h *= 2)
#pragma unroll
    for (int e = 0; e < E; ++e)
      if ((e & h) == 0) {
        const float a = v[e], b = v[e + h];
        v[e] = a + b;
        v[e + h] = a - b;
      }
#pragma unroll
  for (int h = E; h < d; h *= 2) {
    const bool upper = lane & (h / E);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float o = __shfl_xor_sync(0xffffffffu, v[e], h / E);
      v[e] = upper ? o - v[e] : v[e] + o;
    }
  }
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    v[e] *= norm;
    amax = fmaxf(amax, fabsf(v[e]));
  }
  const int lanes_per_block = min(32, block / E);  // a power of two
  for (int o = 1; o < lanes_per_block; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = fp8_scale_dev(amax);
  if (lane % lanes_per_block == 0) scales[row * nb + lane * E / block] = s;
#pragma unroll
  for (int e = 0; e < E; ++e) codes[row * d + lane * E + e] = __nv_cvt_float_to_fp8(v[e] / s, __NV_SATFINITE, __NV_E4M3);
}

template <class Out>
__global__ void fp8_dequant_kernel(const __nv_fp8_storage_t* __restrict__ codes /*[n, d]*/,
                                   const float* __restrict__ scales /*[n, nb]*/, int64_t n, int d, int block, int nb,
                                   Out* __restrict__ y /*[n, d]*/) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * d; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / d;
    const int c = static_cast<int>(i % d);
    const __half_raw h = __nv_cvt_fp8_to_halfraw(codes[i], __NV_E4M3);
    store_f(y, i, __half2float(__half(h)) * scales[r * nb + c / block]);
  }
}

__global__ void fill_kernel(float* p, int64_t n, float v) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) p[i] = v;
}

// ------------------------------------------------------------------------------------------ scoring

struct ScoreParams {
  const uint8_t* q;       // [B, T, Hi, D] fp8 codes or bf16
  const uint8_t* k;       // [B, T, D] fp8 codes or bf16
  const float* q_scale;   // [B, T, Hi, nb] (fp8 only)
  const float* k_scale;   // [B, T, nb] (fp8 only)
  const __nv_bfloat16* w; // [B, T, Hi]
  float* out;             // [B, R, T] f32: rows t0..t0+R-1, entries s <= t written
  float c;                // D^-0.5
  int B, T, Hi, D, nb, t0, R;
  int Hp, Dw, QB;         // heads padded to 16, words per padded row (Dp bytes / 4, multiple of 8), queries per CTA
  int async_k;            // key rows 16-byte aligned: cp.async double buffering
};

constexpr int kScoreWarps = 8;
constexpr int kScoreBN = 64;  // keys per tile

// Copies `bytes` bytes of a row into a zero-padded shared row of Dw words.
__device__ __forceinline__ void load_row(uint32_t* dst, const uint8_t* src, int bytes, int Dw, int lane_in,
                                         int nlanes) {
  if ((bytes & 3) == 0 && (reinterpret_cast<uintptr_t>(src) & 3) == 0) {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
    for (int i = lane_in; i < Dw; i += nlanes) dst[i] = i < bytes / 4 ? __ldg(s + i) : 0u;
  } else {
    for (int i = lane_in; i < Dw; i += nlanes) {
      uint32_t v = 0;
      for (int b = 0; b < 4; ++b)
        if (i * 4 + b < bytes) v |= static_cast<uint32_t>(src[i * 4 + b]) << (8 * b);
      dst[i] = v;
    }
  }
}

template <int N>
__device__ __forceinline__ void zero_frags(float (&x)[N][4][2][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[j][mt][nt][e] = 0.f;
}

// NOTES: the GEMM is transposed, [64 keys, Dp] x [Dp, Hp heads] per (key tile, query): keys are M (four
// m16 tiles), the 16 heads of a slab are N (two n8 tiles), so each thread's accumulator holds 4 heads of
// 8 keys and the head sum is in-thread adds plus one 4-lane reduce-scatter (6 shuffles per 64 keys and
// query; the query-heads-as-M layout needed 10 shuffles per 8 keys and 16 heads). A warp pass takes two
// slabs that share the key fragments: two queries (Hi <= 16) or two slabs of one query (Hp padded to 32);
// a query's slabs stay in one warp, in order, so the head sum is deterministic and needs no shared
// partials (one slab per pass with several scale blocks: registers). Operand fragments come from ldmatrix (an m16n8k32 e4m3 fragment is byte-for-byte an m16n8k16
// bf16 one). With one scale block (D <= 128, or bf16), relu(z * sq * sk) * w = relu(z) * (w * sq) * sk:
// the query scale folds into the head weight and the key scale multiplies the head sum once; several
// blocks apply both scales per block before the relu. Key tiles (and their FP8 scales) are
// double-buffered with cp.async when rows are 16-byte aligned (synchronous loads otherwise); CTAs run
// from the last (longest) row block to the first, so the causal work imbalance leaves no tail.
template <bool kFp8, bool kMultiBlock, int KS /*ksteps, 0: runtime*/>
__global__ void __launch_bounds__(kScoreWarps * 32, 2) score_kernel(ScoreParams p) {
  constexpr int QP = kMultiBlock ? 1 : 2;  // slabs per warp pass (two queries' or one query's two)
  extern __shared__ uint32_t smem[];
  const int SW = p.Dw + 4;  // padded stride (words; 16-byte multiple): conflict-free ldmatrix rows
  const int MQ = p.QB * p.Hp;
  uint32_t* Qs = smem;                                             // [MQ, SW]
  uint32_t* Ks = Qs + MQ * SW;                                     // [2][BN, SW]
  float* weff = reinterpret_cast<float*>(Ks + 2 * kScoreBN * SW);  // [MQ] w * D^-0.5 (* q scale, one block)
  float* qsc = weff + MQ;                                          // [MQ, nb] (several blocks)
  float* ksc_all = qsc + MQ * p.nb;                                // [2][BN, nb]
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c4 = lane & 3;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * p.QB;  // first row (relative to t0); longest blocks first
  const int nq = min(p.QB, p.R - r0);
  const int tmax = p.t0 + r0 + nq - 1;
  const int bytes_q = kFp8 ? p.D : 2 * p.D;
  auto load_keys = [&](int buf, int s0) {
    uint32_t* Kd = Ks + buf * kScoreBN * SW;
    float* kd = ksc_all + buf * kScoreBN * p.nb;
    if (p.async_k) {
      const int cpr = p.Dw / 4;  // 16-byte chunks per padded row; bytes_q is a multiple of 16
      for (int i = tid; i < kScoreBN * cpr; i += kScoreWarps * 32) {
        const int row = i / cpr, ch = i % cpr, s = s0 + row;
        const bool ok = s < p.T && ch * 16 < bytes_q;
        const uint8_t* src = p.k + (static_cast<int64_t>(b) * p.T + (ok ? s : 0)) * bytes_q + (ok ? ch * 16 : 0);
        cp_async16(Kd + row * SW + ch * 4, src, ok ? 16 : 0);
      }
      if (kFp8)
        for (int i = tid; i < kScoreBN * p.nb; i += kScoreWarps * 32) {
          const int s = s0 + i / p.nb;
          if (s < p.T) cp_async4(kd + i, p.k_scale + (static_cast<int64_t>(b) * p.T + s) * p.nb + i % p.nb);
          else kd[i] = 0.f;
        }
    } else {
      for (int row = warp; row < kScoreBN; row += kScoreWarps) {
        const int s = s0 + row;
        if (s < p.T) load_row(Kd + row * SW, p.k + (static_cast<int64_t>(b) * p.T + s) * bytes_q, bytes_q, p.Dw, lane, 32);
        else for (int i = lane; i < p.Dw; i += 32) Kd[row * SW + i] = 0u;
        if (kFp8)
          for (int blk = lane; blk < p.nb; blk += 32)
            kd[row * p.nb + blk] = s < p.T ? p.k_scale[(static_cast<int64_t>(b) * p.T + s) * p.nb + blk] : 0.f;
      }
    }
    cp_async_commit();
  };
  load_keys(0, 0);
  // Query tile, weights and scales.
  for (int row = warp; row < MQ; row += kScoreWarps) {
    const int qi = row / p.Hp, j = row % p.Hp;
    const bool valid = qi < nq && j < p.Hi;
    const int64_t tok = static_cast<int64_t>(b) * p.T + p.t0 + r0 + qi;
    if (valid) load_row(Qs + row * SW, p.q + (tok * p.Hi + j) * bytes_q, bytes_q, p.Dw, lane, 32);
    else for (int i = lane; i < p.Dw; i += 32) Qs[row * SW + i] = 0u;
    if (lane == 0) {
      float we = valid ? __bfloat162float(p.w[tok * p.Hi + j]) * p.c : 0.f;
      if (kFp8 && !kMultiBlock && valid) we *= p.q_scale[tok * p.Hi + j];
      weff[row] = we;
    }
    if (kMultiBlock)
      for (int blk = lane; blk < p.nb; blk += 32) qsc[row * p.nb + blk] = valid ? p.q_scale[(tok * p.Hi + j) * p.nb + blk] : 0.f;
  }
  const int ksteps = KS > 0 ? KS : p.Dw / 8;  // 32 bytes of k per mma
  const int ksteps_per_blk = kMultiBlock ? 4 : ksteps;
  const int nblk = kMultiBlock ? (ksteps + 3) / 4 : 1;
  const int spq = p.Hp / 16;                   // slabs per query: 1, or even (Hp padded to 32)
  const int qstep = spq == 1 ? QP : 1;         // queries per warp pass
  const int passes = spq == 1 ? 1 : spq / QP;  // slab groups per query
  const int ntiles = tmax / kScoreBN + 1;
  // ldmatrix row addresses: A (keys) lane l -> key row (l & 7) + 8 * ((l >> 3) & 1), 16-byte half l >> 4;
  // B (heads) lane l -> head row (l & 7) + 8 * (l >> 4), half (l >> 3) & 1.
  const int a_off = ((lane & 7) + 8 * ((lane >> 3) & 1)) * SW + 4 * (lane >> 4);
  const int b_off = ((lane & 7) + 8 * (lane >> 4)) * SW + 4 * ((lane >> 3) & 1);
  for (int it = 0; it < ntiles; ++it) {
    const int s0 = it * kScoreBN;
    if (it + 1 < ntiles) load_keys((it + 1) & 1, s0 + kScoreBN);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t* Ks_cur = Ks + (it & 1) * kScoreBN * SW;
    const float* ksc = ksc_all + (it & 1) * kScoreBN * p.nb;
    for (int q0 = warp * qstep; q0 < nq; q0 += kScoreWarps * qstep) {
      // Slab j of a pass belongs to query q0 + j (one slab per query) or to q0 (several slabs per query).
      const int t_last = p.t0 + r0 + min(q0 + qstep, nq) - 1;
      if (s0 > t_last) continue;  // the whole tile is in the future of these queries
      float v[QP][4][2];          // [query of the pass][m tile][row g, g + 8]: head-summed scores
#pragma unroll
      for (int j = 0; j < QP; ++j)
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) v[j][mt][0] = v[j][mt][1] = 0.f;
#pragma unroll 1
      for (int ps = 0; ps < passes; ++ps) {
        int h0[QP];  // first query-head row of each slab
#pragma unroll
        for (int j = 0; j < QP; ++j) h0[j] = spq == 1 ? (q0 + j) * p.Hp : q0 * p.Hp + (ps * QP + j) * 16;
        float tot[QP][4][2][4];  // [slab][m tile][n tile][fragment], scaled sums over the blocks
        float acc[QP][4][2][4];  // one block's integer-exact products
        zero_frags(tot);
#pragma unroll 1
        for (int blk = 0; blk < nblk; ++blk) {
          zero_frags(acc);
          const int ks_end = KS > 0 ? KS : min(ksteps, (blk + 1) * ksteps_per_blk);
#pragma unroll(KS == 2 ? 2 : 1)
          for (int ks = KS > 0 ? 0 : blk * ksteps_per_blk; ks < ks_end; ++ks) {
            const int kw = ks * 8;
            uint32_t bq[QP][4];  // {nt 0 lo, nt 0 hi, nt 1 lo, nt 1 hi} per slab
#pragma unroll
            for (int j = 0; j < QP; ++j) ldmatrix_x4(bq[j], Qs + h0[j] * SW + b_off + kw);
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
              uint32_t a[4];
              ldmatrix_x4(a, Ks_cur + mt * 16 * SW + a_off + kw);
#pragma unroll
              for (int j = 0; j < QP; ++j) {
                if constexpr (kFp8) {
                  mma_m16n8k32_e4m3(acc[j][mt][0], a, bq[j][0], bq[j][1]);
                  mma_m16n8k32_e4m3(acc[j][mt][1], a, bq[j][2], bq[j][3]);
                } else {
                  mma_m16n8k16_bf16(acc[j][mt][0], a, bq[j][0], bq[j][1]);
                  mma_m16n8k16_bf16(acc[j][mt][1], a, bq[j][2], bq[j][3]);
                }
              }
            }
          }
          if constexpr (kMultiBlock) {
#pragma unroll
            for (int j = 0; j < QP; ++j)
#pragma unroll
              for (int nt = 0; nt < 2; ++nt) {
                const int h = h0[j] + nt * 8 + 2 * c4;
                const float sq0 = qsc[h * p.nb + blk], sq1 = qsc[(h + 1) * p.nb + blk];
#pragma unroll
                for (int mt = 0; mt < 4; ++mt) {
                  const float sk0 = ksc[(mt * 16 + g) * p.nb + blk], sk1 = ksc[(mt * 16 + g + 8) * p.nb + blk];
                  tot[j][mt][nt][0] += acc[j][mt][nt][0] * (sq0 * sk0);
                  tot[j][mt][nt][1] += acc[j][mt][nt][1] * (sq1 * sk0);
                  tot[j][mt][nt][2] += acc[j][mt][nt][2] * (sq0 * sk1);
                  tot[j][mt][nt][3] += acc[j][mt][nt][3] * (sq1 * sk1);
                }
              }
          }
        }
#pragma unroll
        for (int j = 0; j < QP; ++j)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int h = h0[j] + nt * 8 + 2 * c4;
            const float w0 = weff[h], w1 = weff[h + 1];
            float(&vj)[4][2] = v[spq == 1 ? j : 0];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
              float z[4];
#pragma unroll
              for (int e = 0; e < 4; ++e) z[e] = kMultiBlock ? tot[j][mt][nt][e] : acc[j][mt][nt][e];
              vj[mt][0] += fmaxf(z[0], 0.f) * w0 + fmaxf(z[1], 0.f) * w1;
              vj[mt][1] += fmaxf(z[2], 0.f) * w0 + fmaxf(z[3], 0.f) * w1;
            }
          }
      }
      // Reduce-scatter over the quad: lane c4 ends with m tile c4 (keys c4 * 16 + g and + 8): entry
      // m * 2 + r of the flattened v[j] is m tile m, key row g + 8 r.
#pragma unroll
      for (int j = 0; j < QP; ++j) {
        const int qi = q0 + j, t = p.t0 + r0 + qi;
        if (j > 0 && (spq != 1 || qi >= nq)) break;
        float flat[8], xs[2];
#pragma unroll
        for (int m = 0; m < 4; ++m) flat[2 * m] = v[j][m][0], flat[2 * m + 1] = v[j][m][1];
        quad_reduce_scatter<8>(flat, xs, c4);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float x = xs[r];
          const int key = c4 * 16 + g + 8 * r, s = s0 + key;
          if (kFp8 && !kMultiBlock) x *= ksc[key * p.nb];
          if (s <= t) p.out[(static_cast<int64_t>(b) * p.R + r0 + qi) * p.T + s] = x;
        }
      }
    }
    __syncthreads();  // every warp is done with this key buffer before the next iteration refills it
  }
}

// ----------------------------------------------------------------------------------------- host side

template <class F>
void dispatch_in(const Tensor& x, F&& f) {
  if (x.dtype() == DType::F32) f(x.data<float>());
  else f(reinterpret_cast<const __nv_bfloat16*>(x.data<bf16>()));
}

void check_float_cuda(const char* op, const Tensor& x) {
  DSA_CHECK(x.defined() && x.device() == Device::CUDA && (x.dtype() == DType::F32 || x.dtype() == DType::BF16), "[",
            op, "] x must be f32 or bf16 on cuda, got ", x.desc());
}

// Codes and scales of hadamard(x) for x bf16 [rows, d].
void hadamard_fp8(const Tensor& x, int64_t d, Tensor* codes, Tensor* scales) {
  const int64_t rows = x.numel() / d;
  const int64_t block = ops::kFp8BlockSize;
  if (d >= 32 && d <= 512 && (d & (d - 1)) == 0 && block % (d / 32) == 0) {
    *codes = Tensor::empty({rows, d}, DType::F8E4M3, Device::CUDA);
    *scales = Tensor::empty({rows, ceil_div(d, block)}, DType::F32, Device::CUDA);
    if (rows == 0) return;
    const auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.data<bf16>());
    auto* cp = reinterpret_cast<__nv_fp8_storage_t*>(codes->data<fp8e4m3>());
    float* sp = scales->data<float>();
    const float norm = 1.0f / std::sqrt(static_cast<float>(d));
    const unsigned grid = static_cast<unsigned>(ceil_div(rows * 32, int64_t(256)));
    switch (d) {
      case 32: hadamard_fp8_warp_kernel<1><<<grid, 256, 0, stream()>>>(xp, rows, norm, (int)block, cp, sp); break;
      case 64: hadamard_fp8_warp_kernel<2><<<grid, 256, 0, stream()>>>(xp, rows, norm, (int)block, cp, sp); break;
      case 128: hadamard_fp8_warp_kernel<4><<<grid, 256, 0, stream()>>>(xp, rows, norm, (int)block, cp, sp); break;
      case 256: hadamard_fp8_warp_kernel<8><<<grid, 256, 0, stream()>>>(xp, rows, norm, (int)block, cp, sp); break;
      default: hadamard_fp8_warp_kernel<16><<<grid, 256, 0, stream()>>>(xp, rows, norm, (int)block, cp, sp); break;
    }
    check_launch("indexer_fp8_operands");
    return;
  }
  Tensor h = Tensor::empty({rows, d}, DType::F32, Device::CUDA);
  Tensor xv = x.view({rows, d});  // NOTES: transformed in f32 (a bf16 intermediate would round)
  hadamard_kernel<__nv_bfloat16, float><<<static_cast<unsigned>(rows), 128, d * sizeof(float), stream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(xv.data<bf16>()), h.data<float>(), static_cast<int>(d),
      1.0f / std::sqrt(static_cast<float>(d)));
  check_launch("indexer_fp8_operands");
  ops::Fp8Blocks q = fp8_block_quantize_codes(h, ops::kFp8BlockSize);
  *codes = q.codes;
  *scales = q.scales;
}

}  // namespace

namespace dsa_detail {
ScoreOperands make_operands(const Tensor& q_I, const Tensor& k_I, bool fp8) {
  ScoreOperands o;
  o.fp8 = fp8;
  const int64_t D = q_I.size(3);
  if (fp8) {
    hadamard_fp8(q_I, D, &o.q, &o.q_scale);
    hadamard_fp8(k_I, D, &o.k, &o.k_scale);
  } else {
    o.q = q_I;
    o.k = k_I;
  }
  return o;
}

void launch_scores(const ScoreOperands& o, const Tensor& w_I, int B, int T, int Hi, int D, int t0, int R, float* out) {
  if (R <= 0) return;
  if (launch_scores_wgmma(o, w_I, B, T, Hi, D, t0, R, out)) return;
  ScoreParams p{};
  p.q = static_cast<const uint8_t*>(o.q.raw());
  p.k = static_cast<const uint8_t*>(o.k.raw());
  p.q_scale = o.fp8 ? o.q_scale.data<float>() : nullptr;
  p.k_scale = o.fp8 ? o.k_scale.data<float>() : nullptr;
  p.w = reinterpret_cast<const __nv_bfloat16*>(w_I.data<bf16>());
  p.out = out;
  p.c = 1.0f / std::sqrt(static_cast<float>(D));
  p.B = B; p.T = T; p.Hi = Hi; p.D = D; p.t0 = t0; p.R = R;
  p.nb = o.fp8 ? static_cast<int>(ceil_div(D, ops::kFp8BlockSize)) : 1;
  // NOTES: heads padded to 16, or to 32 above 16 so a warp pass always takes two slabs of one query.
  p.Hp = static_cast<int>(Hi <= 16 ? 16 : ceil_div(Hi, 32) * 32);
  const int bytes = o.fp8 ? D : 2 * D;
  p.Dw = static_cast<int>(ceil_div(bytes, 32) * 8);
  // NOTES: at least 256 query-heads and 8 queries per CTA (16 queries at Hi = 16, 8 at Hi = 64): each key
  // tile feeds every warp; fewer queries only when the query tile would not fit in shared memory.
  p.QB = std::max(kScoreWarps, 256 / p.Hp);
  while (p.QB > 1 && static_cast<size_t>(p.QB) * p.Hp * (p.Dw + 4) * 4 > (size_t)150 * 1024) --p.QB;
  p.async_k = (bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.k) % 16 == 0 &&
               (!o.fp8 || reinterpret_cast<uintptr_t>(p.k_scale) % 4 == 0)) ? 1 : 0;
  const int MQ = p.QB * p.Hp, SW = p.Dw + 4;
  const size_t smem = sizeof(uint32_t) * (size_t)(MQ + 2 * kScoreBN) * SW +
                      sizeof(float) * (size_t)(MQ + MQ * p.nb + 2 * kScoreBN * p.nb);
  DSA_CHECK(smem <= 200 * 1024, "[indexer_scores] Hi=", Hi, " D=", D, " needs ", smem, " bytes of shared memory");
  dim3 grid(static_cast<unsigned>(ceil_div(R, p.QB)), static_cast<unsigned>(B));
  auto launch = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    kernel<<<grid, kScoreWarps * 32, smem, stream()>>>(p);
  };
  const int ks = p.Dw / 8;
  if (!o.fp8) {
    if (ks == 4) launch(score_kernel<false, false, 4>);
    else if (ks == 8) launch(score_kernel<false, false, 8>);
    else launch(score_kernel<false, false, 0>);
  } else if (p.nb == 1) {
    if (ks == 2) launch(score_kernel<true, false, 2>);
    else if (ks == 4) launch(score_kernel<true, false, 4>);
    else launch(score_kernel<true, false, 0>);
  } else {
    launch(score_kernel<true, true, 0>);
  }
  check_launch("indexer_scores");
}
}  // namespace dsa_detail


// --------------------------------------------------------------------------------------------- API

Tensor hadamard_transform(const Tensor& x) {
  const char* op = "hadamard_transform";
  check_float_cuda(op, x);
  DSA_CHECK(x.ndim() >= 1, "[", op, "] x must have at least one dim, got ", x.desc());
  const int64_t d = x.size(-1);
  DSA_CHECK(d >= 1 && (d & (d - 1)) == 0 && d <= 8192, "[", op, "] last dim must be a power of two <= 8192, got ",
            x.desc());
  Tensor y = Tensor::empty(x.shape(), x.dtype(), Device::CUDA);
  const int64_t rows = x.numel() / d;
  if (rows == 0) return y;
  const float norm = 1.0f / std::sqrt(static_cast<float>(d));
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, d / 2)));
  const size_t smem = d * sizeof(float);
  if (x.dtype() == DType::F32)
    hadamard_kernel<float, float><<<static_cast<unsigned>(rows), threads, smem, stream()>>>(
        x.data<float>(), y.data<float>(), static_cast<int>(d), norm);
  else
    hadamard_kernel<__nv_bfloat16, __nv_bfloat16><<<static_cast<unsigned>(rows), threads, smem, stream()>>>(
        reinterpret_cast<const __nv_bfloat16*>(x.data<bf16>()), reinterpret_cast<__nv_bfloat16*>(y.data<bf16>()),
        static_cast<int>(d), norm);
  check_launch(op);
  return y;
}

namespace {
template <class Out>
void launch_quant(const Tensor& x, int64_t block, __nv_fp8_storage_t* codes, float* scales, Out* deq, const char* op) {
  const int64_t n = x.size(0), d = x.size(1), nb = ceil_div(d, block);
  if (n * d == 0) return;
  const int64_t warps = n * nb;
  dispatch_in(x, [&](auto* xp) {
    fp8_quant_kernel<std::remove_const_t<std::remove_pointer_t<decltype(xp)>>, Out>
        <<<grid_1d(warps * 32, 256), 256, 0, stream()>>>(xp, n, static_cast<int>(d), static_cast<int>(block),
                                                         static_cast<int>(nb), codes, scales, deq);
  });
  check_launch(op);
}
}  // namespace

ops::Fp8Blocks fp8_block_quantize_codes(const Tensor& x, int64_t block) {
  const char* op = "fp8_block_quantize_codes";
  check_float_cuda(op, x);
  expect_shape(op, "x", x, {-1, -1});
  DSA_CHECK(block >= 1, "[", op, "] block must be >= 1, got ", block);
  const int64_t n = x.size(0), d = x.size(1), nb = ceil_div(d, block);
  ops::Fp8Blocks q{Tensor::empty({n, d}, DType::F8E4M3, Device::CUDA), Tensor::empty({n, nb}, DType::F32, Device::CUDA)};
  launch_quant<float>(x, block, reinterpret_cast<__nv_fp8_storage_t*>(q.codes.data<fp8e4m3>()), q.scales.data<float>(),
                      nullptr, op);
  return q;
}

Tensor fp8_block_dequantize(const ops::Fp8Blocks& q, int64_t block, DType dtype) {
  const char* op = "fp8_block_dequantize";
  expect_cuda(op, "codes", q.codes, DType::F8E4M3);
  expect_cuda(op, "scales", q.scales, DType::F32);
  expect_shape(op, "codes", q.codes, {-1, -1});
  DSA_CHECK(block >= 1 && (dtype == DType::F32 || dtype == DType::BF16), "[", op,
            "] needs block >= 1 and dtype f32/bf16 on cuda");
  const int64_t n = q.codes.size(0), d = q.codes.size(1), nb = ceil_div(d, block);
  expect_shape(op, "scales", q.scales, {n, nb});
  Tensor y = Tensor::empty({n, d}, dtype, Device::CUDA);
  if (n * d == 0) return y;
  const auto* c = reinterpret_cast<const __nv_fp8_storage_t*>(q.codes.data<fp8e4m3>());
  if (dtype == DType::F32)
    fp8_dequant_kernel<float><<<grid_1d(n * d, 256), 256, 0, stream()>>>(c, q.scales.data<float>(), n, (int)d,
                                                                          (int)block, (int)nb, y.data<float>());
  else
    fp8_dequant_kernel<__nv_bfloat16><<<grid_1d(n * d, 256), 256, 0, stream()>>>(
        c, q.scales.data<float>(), n, (int)d, (int)block, (int)nb, reinterpret_cast<__nv_bfloat16*>(y.data<bf16>()));
  check_launch(op);
  return y;
}

Tensor fp8_block_quantize(const Tensor& x, int64_t block, Tensor* scales_out) {
  const char* op = "fp8_block_quantize";
  check_float_cuda(op, x);
  expect_shape(op, "x", x, {-1, -1});
  DSA_CHECK(block >= 1, "[", op, "] block must be >= 1, got ", block);
  const int64_t n = x.size(0), d = x.size(1), nb = ceil_div(d, block);
  Tensor y = Tensor::empty({n, d}, x.dtype(), Device::CUDA);
  float* scales = nullptr;
  if (scales_out) {
    *scales_out = Tensor::empty({n, nb}, DType::F32, Device::CUDA);
    scales = scales_out->data<float>();
  }
  if (x.dtype() == DType::F32) launch_quant<float>(x, block, nullptr, scales, y.data<float>(), op);
  else launch_quant<__nv_bfloat16>(x, block, nullptr, scales, reinterpret_cast<__nv_bfloat16*>(y.data<bf16>()), op);
  return y;
}

void indexer_fp8_operands(const Tensor& q_I, const Tensor& k_I, Tensor* q_hat, Tensor* k_hat) {
  const char* op = "indexer_fp8_operands";
  expect_cuda(op, "q_I", q_I, DType::BF16);
  expect_cuda(op, "k_I", k_I, DType::BF16);
  expect_shape(op, "q_I", q_I, {-1, -1, -1, -1});
  const int64_t D = q_I.size(3);
  expect_shape(op, "k_I", k_I, {q_I.size(0), q_I.size(1), D});
  DSA_CHECK(q_hat && k_hat, "[", op, "] q_hat and k_hat must be non-null");
  for (auto [x, out] : {std::pair{&q_I, q_hat}, std::pair{&k_I, k_hat}}) {
    Tensor codes, scales;
    hadamard_fp8(*x, D, &codes, &scales);
    *out = fp8_block_dequantize({codes, scales}, ops::kFp8BlockSize, DType::BF16).view(x->shape());
  }
}

Tensor indexer_scores_forward(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t t0, int64_t t1) {
  const char* op = "indexer_scores_forward";
  expect_shape(op, "q_I", q_I, {-1, -1, -1, -1});
  check_indexer_gpu(op, q_I, q_I, k_I, w_I);
  const int64_t B = q_I.size(0), T = q_I.size(1);
  DSA_CHECK(0 <= t0 && t0 <= t1 && t1 <= T, "[", op, "] rows [", t0, ", ", t1, ") out of range for T = ", T);
  Tensor out = Tensor::empty({B, t1 - t0, T}, DType::F32, Device::CUDA);
  if (out.numel() == 0) return out;
  fill_kernel<<<grid_1d(out.numel(), 256), 256, 0, stream()>>>(out.data<float>(), out.numel(), -INFINITY);
  check_launch(op);
  launch_scores(make_operands(q_I, k_I, false), w_I, (int)B, (int)T, (int)q_I.size(2), (int)q_I.size(3), (int)t0,
                (int)(t1 - t0), out.data<float>());
  return out;
}

Tensor indexer_topk(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t topk, bool fp8,
                    int64_t block_rows, Tensor* scores_out, ops::TopkOrder order) {
  const char* op = "indexer_topk";
  expect_shape(op, "q_I", q_I, {-1, -1, -1, -1});
  check_indexer_gpu(op, q_I, q_I, k_I, w_I);
  DSA_CHECK(topk >= 1, "[", op, "] topk must be >= 1, got ", topk);
  DSA_CHECK(block_rows >= 0, "[", op, "] block_rows must be >= 0, got ", block_rows);
  const int64_t B = q_I.size(0), T = q_I.size(1), Hi = q_I.size(2), D = q_I.size(3);
  if (fp8) DSA_CHECK((D & (D - 1)) == 0, "[", op, "] fp8 needs a power-of-two head dim, got ", D);
  Tensor out = Tensor::empty({B, T, topk}, DType::I32, Device::CUDA);
  if (scores_out) *scores_out = Tensor::empty({B, T, topk}, DType::F32, Device::CUDA);
  if (B * T == 0) return out;
  float* vals = scores_out ? scores_out->data<float>() : nullptr;
  const ScoreOperands o = make_operands(q_I, k_I, fp8);
  // NOTES: about 256 MiB of f32 scores per streamed row block (all of T = 8K in one block).
  const int64_t rb = block_rows > 0 ? std::min(block_rows, T) : rows_for_budget(T, B * T * 4, int64_t(256) << 20);
  Tensor S = Tensor::empty({B, rb, T}, DType::F32, Device::CUDA);
  for (int64_t t0 = 0; t0 < T; t0 += rb) {
    const int64_t R = std::min(T, t0 + rb) - t0;
    launch_scores(o, w_I, (int)B, (int)T, (int)Hi, (int)D, (int)t0, (int)R, S.data<float>());
    dsa_detail::launch_topk(S.data<float>(), (int)B, (int)R, (int)T, (int)t0, (int)topk, order, out.data<int32_t>(), (int)T,
                (int)t0, vals);
  }
  return out;
}

}  // namespace dsa::cuda
