// Fused sparse MQA attention on tensor cores (mma.sync m16n8k16 bf16, f32 accumulation), FlashMLA-style:
// a CTA owns NT query tokens x (HT * 16) heads; each (token, 16-head tile) is a warp pair. The K selected
// latent rows of every token are gathered by index into shared memory in blocks of BN rows (cp.async,
// 16-byte chunks, -1 slots zero-filled and masked; ST-stage pipeline), and every block is used for both
// the scores (all Dk columns) and the values (its first Dv columns).
//
// Forward, per block: warp `half` of a pair computes S = Q K^T for its BN/2 columns, the pair exchanges row
// maxima through shared memory (online softmax in f32 registers, exp2 with the scale folded in), writes P
// (bf16) to shared memory, then each warp accumulates O[:, half * Dv/2 ...] += P V over all BN rows.
// Backward, per block: recompute P = exp(S - lse) and dP = dO V^T for the warp's BN/2 columns,
// dS = P (dP - delta) scale, both bf16 to shared memory; dQ[:, half * Dk/2 ...] += dS K in registers; then
// the token's warps share dKV[idx] += dS^T Q (+ P^T dO on the value columns), contracted over all the CTA's
// heads and scattered with float4 atomics (sm_90) into an f32 [B, T, Dk] scratch (cast to bf16 by the caller).
// With p.probs set the backward also sums the recomputed P over each warp's 16 heads (the probs pass's
// sums, bit for bit): a training step gets the sparse KL's target without the forward's second S pass.
//
// NOTES:
// - Blocks in which no token of the CTA has a valid slot are skipped (__syncthreads_or at the top of the
//   iteration), which removes most of the causal prefix work (t < K) at no cost.
// - Shared-memory rows are padded by 16 bytes (stride Dk + 8) so ldmatrix rows fall in distinct banks.
// - The gather (Cfg::load): the 16-head tiles give a row eight lanes (whole 128-byte segments, in one wavefront
//   on the padded rows) over several passes; two lanes a row (one sector a row and instruction) cost 11% on the
//   bench-small forward (docs/perf_log.md v27). The 64-head tiles already have eight (256 threads, 32 rows).
// - Registers: the production backward keeps dQ for 16 heads x 288 columns per warp (144 f32 registers);
//   one CTA per SM with 8 warps, so the 255-register cap leaves room for the S/dP tiles.
// - Instantiations: (Dk, Dv) = (288, 256) (bench-small) and (576, 512) (production), H a multiple of 16;
//   other shapes return false and the caller uses the gather + cuBLASLt path.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"

namespace dsa::cuda::dsa_detail {

namespace {

__device__ __forceinline__ void pair_bar(int pair) { asm volatile("bar.sync %0, 64;\n" ::"r"(pair + 1)); }
// Shared-memory plan and the kv-block loader common to both kernels.
// GL: the gather's threads per row (0: kThreads / kRows, one pass over the rows; 8: whole 128-byte
// segments of a row per eight lanes, several passes).
template <int DK, int DV, int HT, int NT, int BN, int ST, int GL = 0> struct Cfg {
  static constexpr int kR = HT * 16;              // heads per CTA
  static constexpr int kWarps = 2 * HT * NT, kThreads = 32 * kWarps;
  static constexpr int kQS = DK + 8, kPS = BN + 8;  // padded row strides (elements); dO rows: DV + 8
  static constexpr int kRows = NT * BN;           // kv rows per stage
  static constexpr int kTpr = GL > 0 ? GL : kThreads >= kRows ? kThreads / kRows : 1;  // loader threads per row
  static constexpr int kPass = kThreads / kTpr, kPasses = (kRows + kPass - 1) / kPass;  // rows per pass, passes
  static constexpr int kQ = NT * kR * kQS;        // elements of sQ
  static constexpr int kKV = ST * kRows * kQS;    // elements of sKV
  static constexpr int kP = NT * kR * kPS;        // elements of sP / sdS
  static constexpr size_t fwd_smem() { return size_t(kQ + kKV + kP) * 2 + NT * HT * 32 * 4 + ST * kRows * 4; }
  static constexpr size_t bwd_smem() { return size_t(kQ + NT * kR * (DV + 8) + kKV + 2 * kP) * 2 + ST * kRows * 4; }
  static_assert(DK % 32 == 0 && DV % 32 == 0 && BN % 32 == 0, "tile shapes");
  static_assert(kThreads % kRows == 0 || kRows % kThreads == 0, "loader mapping");
  static_assert(kThreads % kTpr == 0 && kPasses <= 8, "loader passes");

  // Issues the cp.async gather of block `blk` of the CTA's tokens into stage `st` (rows of invalid slots
  // zero-filled, their index -1 in sIdx). Returns whether this thread saw a valid slot.
  static __device__ __forceinline__ bool load(const SparseAttnParams& p, int64_t bt0, int blk, int st, __nv_bfloat16* sKV,
                                              int* sIdx) {
    if constexpr (GL > 0) return load_lines(p, bt0, blk, st, sKV, sIdx);
    const int64_t N = int64_t(p.B) * p.T;
    bool any = false;
    for (int row = threadIdx.x / kTpr; row < kRows; row += kThreads / kTpr) {
      const int tk = row / BN, r = row % BN, slot = blk * BN + r;
      const int64_t bt = bt0 + tk;
      int s = -1;
      if (bt < N && slot < p.K) s = __ldg(p.idx + bt * p.K + slot);
      any |= s >= 0;
      if (threadIdx.x % kTpr == 0) sIdx[st * kRows + row] = s;
      const __nv_bfloat16* src = s >= 0 ? p.kv + ((bt / p.T) * p.T + s) * DK : p.kv;
      __nv_bfloat16* dst = sKV + (st * kRows + row) * kQS;
      for (int ch = threadIdx.x % kTpr; ch < DK / 8; ch += kTpr)
        cp_async16(dst + ch * 8, src + ch * 8, s >= 0 ? 16 : 0);
    }
    return any;
  }
  // load() with GL lanes per row over kPasses passes (the 16-head tiles' default, perf_log v27): the indices
  // of all passes are read first, so that their latencies overlap (the copies' addresses wait for them).
  // NOTES: with one pass it computes what load() does, but not in the same instructions (PTX compared): load()
  // stays as the code the 64-head tiles and DSA_SPARSE_ATTN_MMA_LINES=0 were tested and measured with, until
  // a GPU run checks those tiles through this one.
  static __device__ __forceinline__ bool load_lines(const SparseAttnParams& p, int64_t bt0, int blk, int st,
                                                    __nv_bfloat16* sKV, int* sIdx) {
    const int64_t N = int64_t(p.B) * p.T;
    int sv[kPasses];
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int row = threadIdx.x / kTpr + i * kPass, tk = row / BN, slot = blk * BN + row % BN;
      const int64_t bt = bt0 + tk;
      sv[i] = -1;
      if (row < kRows && bt < N && slot < p.K) sv[i] = __ldg(p.idx + bt * p.K + slot);
    }
    bool any = false;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int row = threadIdx.x / kTpr + i * kPass;
      if (kRows % kPass != 0 && row >= kRows) break;
      const int64_t bt = bt0 + row / BN;
      const int s = sv[i];
      any |= s >= 0;
      if (threadIdx.x % kTpr == 0) sIdx[st * kRows + row] = s;
      const __nv_bfloat16* src = s >= 0 ? p.kv + ((bt / p.T) * p.T + s) * DK : p.kv;
      __nv_bfloat16* dst = sKV + (st * kRows + row) * kQS;
      for (int ch = threadIdx.x % kTpr; ch < DK / 8; ch += kTpr)
        cp_async16(dst + ch * 8, src + ch * 8, s >= 0 ? 16 : 0);
    }
    return any;
  }
  // The CTA's place: tokens bt0 .. bt0 + NT - 1, heads h0 .. h0 + kR - 1; warp pair `pair` owns token
  // `tok`, 16-head tile `ht`, and `half` of every block's columns.
  struct Geom {
    int warp, lane, g, c, pair, half, tok, ht, h0, nblk;
    int64_t N, bt0;
    __device__ explicit Geom(const SparseAttnParams& p) {
      warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
      pair = warp / 2, half = warp % 2, tok = pair / HT, ht = pair % HT;
      const int groups = p.H / kR;
      N = int64_t(p.B) * p.T, bt0 = int64_t(blockIdx.x / groups) * NT;
      h0 = (blockIdx.x % groups) * kR;
      nblk = (p.K + BN - 1) / BN;
    }
  };
  // The ST-stage ring of gathered kv blocks: prologue() issues the first ST - 1 blocks; next(blk) waits
  // for block blk, issues block blk + ST - 1 into the stage just freed and returns whether any token of
  // the CTA has a valid slot in block blk (a block-uniform answer: the caller skips the block if not).
  struct Ring {
    unsigned live_bits = 0;
    __device__ void prologue(const SparseAttnParams& p, const Geom& G, __nv_bfloat16* sKV, int* sIdx) {
#pragma unroll
      for (int i = 0; i < ST - 1; ++i) {
        if (i < G.nblk && load(p, G.bt0, i, i, sKV, sIdx)) live_bits |= 1u << i;
        cp_async_commit();
      }
    }
    __device__ bool next(const SparseAttnParams& p, const Geom& G, int blk, __nv_bfloat16* sKV, int* sIdx) {
      const int st = blk % ST;
      cp_async_wait<ST - 2>();
      const bool live = __syncthreads_or((live_bits >> st) & 1u);
      const int nb = blk + ST - 1, ns = nb % ST;
      live_bits &= ~(1u << ns);
      if (nb < G.nblk && load(p, G.bt0, nb, ns, sKV, sIdx)) live_bits |= 1u << ns;
      cp_async_commit();
      return live;
    }
  };
  // Rows [NT][kR] of a [B*T, H, D] tensor (heads h0 ..) into a padded smem tile; tokens past N zero-filled.
  template <int D, int S>
  static __device__ __forceinline__ void load_rows(const __nv_bfloat16* g, int64_t bt0, int64_t N, int H, int h0,
                                                   __nv_bfloat16* s) {
    for (int i = threadIdx.x; i < NT * kR * (D / 8); i += kThreads) {
      const int tk = i / (kR * D / 8), rem = i % (kR * D / 8), r = rem / (D / 8), ch = rem % (D / 8);
      const int64_t bt = bt0 + tk;
      const bool ok = bt < N;
      cp_async16(s + (tk * kR + r) * S + ch * 8, g + ((ok ? bt : 0) * H + h0 + r) * D + ch * 8, ok ? 16 : 0);
    }
  }
};

// acc[NS][4] (+)= A[16 x 16*KS] (row-major smem, stride sa) x B^T where B rows are [n][k] (row-major smem,
// stride sb): the S = Q K^T form. NS n8 tiles (even).
template <int NS, int KS>
__device__ __forceinline__ void mma_abt(float (&acc)[NS][4], const __nv_bfloat16* a, int sa, const __nv_bfloat16* b,
                                        int sb) {
  const int lane = threadIdx.x & 31;
#pragma unroll 2
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane % 16) * sa + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int n2 = 0; n2 < NS / 2; ++n2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (n2 * 16 + (lane / 16) * 8 + lane % 8) * sb + kk * 16 + ((lane / 8) % 2) * 8);
      mma_m16n8k16_bf16(acc[2 * n2], af, bf[0], bf[1]);
      mma_m16n8k16_bf16(acc[2 * n2 + 1], af, bf[2], bf[3]);
    }
  }
}
// s = S [16 heads, the warp's BN / 2 columns of the block] = Q K^T, the first step of the forward and of
// the probs pass (q_w: the warp's 16 query rows, kv_t: the token's BN gathered rows, both stride qs).
template <int DK, int BN, int NS>
__device__ __forceinline__ void block_scores(float (&s)[NS][4], const __nv_bfloat16* q_w, const __nv_bfloat16* kv_t,
                                             int half, int qs) {
#pragma unroll
  for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
  mma_abt<NS, DK / 16>(s, q_w, qs, kv_t + half * (BN / 2) * qs, qs);
}
// acc[NS][4] += A[16 x 16*KS] (row-major, stride sa) x B[16*KS x 8*NS] (row-major [k][n], stride sb): the P V form.
template <int NS, int KS>
__device__ __forceinline__ void mma_ab(float (&acc)[NS][4], const __nv_bfloat16* a, int sa, const __nv_bfloat16* b,
                                       int sb) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane % 16) * sa + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int n2 = 0; n2 < NS / 2; ++n2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * sb + n2 * 16 + (lane / 16) * 8);
      mma_m16n8k16_bf16(acc[2 * n2], af, bf[0], bf[1]);
      mma_m16n8k16_bf16(acc[2 * n2 + 1], af, bf[2], bf[3]);
    }
  }
}
// acc[2][4] += A^T B for one 16x16 output tile: A stored [k=16][m] (columns m0.., stride sa), B stored
// [k=16][n] (columns n0.., stride sb): the dKV = dS^T Q form (contraction over 16 heads).
__device__ __forceinline__ void mma_atb16(float (&acc)[2][4], const __nv_bfloat16* a, int sa,
                                          const __nv_bfloat16* b, int sb) {
  const int lane = threadIdx.x & 31;
  uint32_t af[4], bf[4];
  ldmatrix_x4_trans(af, a + ((lane / 16) * 8 + lane % 8) * sa + ((lane / 8) % 2) * 8);
  ldmatrix_x4_trans(bf, b + (((lane / 8) % 2) * 8 + lane % 8) * sb + (lane / 16) * 8);
  mma_m16n8k16_bf16(acc[0], af, bf[0], bf[1]);
  mma_m16n8k16_bf16(acc[1], af, bf[2], bf[3]);
}

constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------------- forward
template <int DK, int DV, int HT, int NT, int BN, int ST, int GL>
__global__ void __launch_bounds__(64 * HT * NT, 1) sparse_attn_fwd_kernel(const SparseAttnParams p) {
  using C = Cfg<DK, DV, HT, NT, BN, ST, GL>;
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);  // [NT][kR][kQS]
  __nv_bfloat16* sKV = sQ + C::kQ;                               // [ST][NT * BN][kQS]
  __nv_bfloat16* sP = sKV + C::kKV;                              // [NT * HT][16][kPS]
  float* sRed = reinterpret_cast<float*>(sP + C::kP);            // [NT * HT][2][16]
  int* sIdx = reinterpret_cast<int*>(sRed + NT * HT * 32);       // [ST][NT * BN]
  const typename C::Geom G(p);
  const int g = G.g, c = G.c, pair = G.pair, half = G.half, tok = G.tok, ht = G.ht;
  C::template load_rows<DK, C::kQS>(p.q, G.bt0, G.N, p.H, G.h0, sQ);
  typename C::Ring ring;
  ring.prologue(p, G, sKV, sIdx);
  constexpr int NS = BN / 16, NO = DV / 16;  // n8 tiles of the warp's S columns / O columns
  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const float sl2 = p.scale * kLog2e;
  const __nv_bfloat16* q_w = sQ + (tok * C::kR + ht * 16) * C::kQS;
  __nv_bfloat16* p_w = sP + pair * 16 * C::kPS;
  float* red = sRed + pair * 32;

  for (int blk = 0; blk < G.nblk; ++blk) {
    const int st = blk % ST;
    if (!ring.next(p, G, blk, sKV, sIdx)) continue;
    const __nv_bfloat16* kv_t = sKV + (st * C::kRows + tok * BN) * C::kQS;
    const int* idx_t = sIdx + st * C::kRows + tok * BN;
    float s[NS][4];
    block_scores<DK, BN>(s, q_w, kv_t, half, C::kQS);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = half * (BN / 2) + n * 8 + 2 * c + (e & 1);
        const float v = idx_t[col] >= 0 ? s[n][e] * sl2 : -INFINITY;
        s[n][e] = v;
        mx[e / 2] = fmaxf(mx[e / 2], v);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    if (c == 0) {
      red[half * 16 + g] = mx[0];
      red[half * 16 + g + 8] = mx[1];
    }
    pair_bar(pair);
    float alpha[2], mu[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m_run[i], fmaxf(mx[i], red[(1 - half) * 16 + g + 8 * i]));
      alpha[i] = m_new == -INFINITY ? 1.f : exp2f(m_run[i] - m_new);
      mu[i] = m_new == -INFINITY ? 0.f : m_new;
      m_run[i] = m_new;
      l_run[i] *= alpha[i];
    }
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      const float p0 = exp2f(s[n][0] - mu[0]), p1 = exp2f(s[n][1] - mu[0]);
      const float p2 = exp2f(s[n][2] - mu[1]), p3 = exp2f(s[n][3] - mu[1]);
      l_run[0] += p0 + p1;
      l_run[1] += p2 + p3;
      const int col = half * (BN / 2) + n * 8 + 2 * c;
      *reinterpret_cast<uint32_t*>(p_w + g * C::kPS + col) = pack_bf16(p0, p1);
      *reinterpret_cast<uint32_t*>(p_w + (g + 8) * C::kPS + col) = pack_bf16(p2, p3);
    }
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
      o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
    }
    pair_bar(pair);
    mma_ab<NO, BN / 16>(o, p_w, C::kPS, kv_t + half * (DV / 2), C::kQS);
  }
  cp_async_wait<0>();
  // Row sums: lanes of a quad, then the two warps of the pair.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  pair_bar(pair);  // the partner is done reading `red` of the last block
  if (c == 0) {
    red[half * 16 + g] = l_run[0];
    red[half * 16 + g + 8] = l_run[1];
  }
  pair_bar(pair);
  const int64_t bt = G.bt0 + tok;
  if (bt >= G.N) return;
  const int64_t b = bt / p.T, t = bt % p.T;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = l_run[i] + red[(1 - half) * 16 + g + 8 * i];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int h = G.h0 + ht * 16 + g + 8 * i;
    __nv_bfloat16* orow = p.out + (bt * p.H + h) * DV + half * (DV / 2);
#pragma unroll
    for (int n = 0; n < NO; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * c) = pack_bf16(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    if (half == 0 && c == 0)
      p.lse[(b * p.H + h) * p.T + t] = l > 0.f ? m_run[i] * 0.6931471805599453f + logf(l) : -INFINITY;
  }
}

// --------------------------------------------------------------------------------------- probs pass
// After the forward (lse known): probs[bt, slot] += sum over the warp's 16 heads of exp(S - lse), i.e. the
// final softmax probabilities, recomputed with the forward's own S tiles and exp2 formulation.
// NOTES: the online softmax of the forward only knows each row's normalizer at the end, and the head sum
// needs per-head rescaling, so the head-summed probabilities cost a second S pass (gather + Q K^T, no P V
// and no P through shared memory). Only forward-only steps use it; a training step takes the sums from
// the backward kernel, which recomputes P anyway. With one 16-head tile per token (H = 16) every (token, slot) gets a
// single atomicAdd onto zero (deterministic); otherwise H / 16 adds per slot in f32.
template <int DK, int DV, int HT, int NT, int BN, int ST, int GL>
__global__ void __launch_bounds__(64 * HT * NT, 1) sparse_attn_probs_kernel(const SparseAttnParams p) {
  using C = Cfg<DK, DV, HT, NT, BN, ST, GL>;
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);  // [NT][kR][kQS]
  __nv_bfloat16* sKV = sQ + C::kQ;                               // [ST][NT * BN][kQS]
  int* sIdx = reinterpret_cast<int*>(sKV + C::kKV);              // [ST][NT * BN]
  const typename C::Geom G(p);
  const int g = G.g, c = G.c, half = G.half, tok = G.tok, ht = G.ht, h0 = G.h0;
  const int64_t N = G.N;
  C::template load_rows<DK, C::kQS>(p.q, G.bt0, N, p.H, h0, sQ);
  typename C::Ring ring;
  ring.prologue(p, G, sKV, sIdx);
  constexpr int NS = BN / 16;
  const float sl2 = p.scale * kLog2e;
  const int64_t bt = G.bt0 + tok;
  float l2[2];  // the rows' lse in log2 units (-inf: no valid slot, probability 0)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = h0 + ht * 16 + g + 8 * i;
    l2[i] = bt < N ? p.lse[((bt / p.T) * p.H + h) * p.T + bt % p.T] * kLog2e : -INFINITY;
  }
  const __nv_bfloat16* q_w = sQ + (tok * C::kR + ht * 16) * C::kQS;

  for (int blk = 0; blk < G.nblk; ++blk) {
    const int st = blk % ST;
    if (!ring.next(p, G, blk, sKV, sIdx)) continue;
    const __nv_bfloat16* kv_t = sKV + (st * C::kRows + tok * BN) * C::kQS;
    const int* idx_t = sIdx + st * C::kRows + tok * BN;
    float s[NS][4];
    block_scores<DK, BN>(s, q_w, kv_t, half, C::kQS);
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      float cs[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = half * (BN / 2) + n * 8 + 2 * c + j;
        const bool ok = idx_t[col] >= 0;
        const float p0 = ok && l2[0] != -INFINITY ? exp2f(s[n][j] * sl2 - l2[0]) : 0.f;
        const float p1 = ok && l2[1] != -INFINITY ? exp2f(s[n][2 + j] * sl2 - l2[1]) : 0.f;
        cs[j] = p0 + p1;
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) cs[j] += __shfl_xor_sync(0xffffffffu, cs[j], o);
      }
      if (g == 0 && bt < N)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = half * (BN / 2) + n * 8 + 2 * c + j;
          if (idx_t[col] >= 0) atomicAdd(p.probs + bt * p.K + blk * BN + col, cs[j]);
        }
    }
  }
  cp_async_wait<0>();
}

// ------------------------------------------------------------------------------------------ backward
template <int DK, int DV, int HT, int NT, int BN, int ST, int GL>
__global__ void __launch_bounds__(64 * HT * NT, 1) sparse_attn_bwd_kernel(const SparseAttnParams p) {
  using C = Cfg<DK, DV, HT, NT, BN, ST, GL>;
  constexpr int kOS = DV + 8;  // dO row stride
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);  // [NT][kR][kQS]
  __nv_bfloat16* sdO = sQ + C::kQ;                               // [NT][kR][kOS]
  __nv_bfloat16* sKV = sdO + NT * C::kR * kOS;                   // [ST][NT * BN][kQS]
  __nv_bfloat16* sP = sKV + C::kKV;                              // [NT * HT][16][kPS]
  __nv_bfloat16* sdS = sP + C::kP;                               // [NT * HT][16][kPS]
  int* sIdx = reinterpret_cast<int*>(sdS + C::kP);               // [ST][NT * BN]
  const typename C::Geom G(p);
  const int g = G.g, c = G.c, pair = G.pair, half = G.half, tok = G.tok, ht = G.ht, h0 = G.h0;
  const int64_t N = G.N, bt = G.bt0 + tok;
  const int64_t b = (bt < N ? bt : 0) / p.T, t = (bt < N ? bt : 0) % p.T;
  C::template load_rows<DK, C::kQS>(p.q, G.bt0, N, p.H, h0, sQ);
  C::template load_rows<DV, kOS>(p.dout, G.bt0, N, p.H, h0, sdO);
  typename C::Ring ring;
  ring.prologue(p, G, sKV, sIdx);
  // Per-row statistics of rows g and g + 8: lse in log2 units (+inf for an empty row: P = 0) and delta.
  float lse2[2], dlt[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = h0 + ht * 16 + g + 8 * i;
    const float l = bt < N ? p.lse[(b * p.H + h) * p.T + t] : -INFINITY;
    lse2[i] = l == -INFINITY ? INFINITY : l * kLog2e;
    dlt[i] = bt < N ? p.delta[bt * p.H + h] : 0.f;
  }
  constexpr int NS = BN / 16, NQ = DK / 16;  // n8 tiles of the warp's S columns / dQ columns
  float dq[NQ][4];
#pragma unroll
  for (int n = 0; n < NQ; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  const float sl2 = p.scale * kLog2e;
  const __nv_bfloat16* q_w = sQ + (tok * C::kR + ht * 16) * C::kQS;
  const __nv_bfloat16* do_w = sdO + (tok * C::kR + ht * 16) * kOS;
  __nv_bfloat16* p_w = sP + pair * 16 * C::kPS;
  __nv_bfloat16* ds_w = sdS + pair * 16 * C::kPS;

  for (int blk = 0; blk < G.nblk; ++blk) {
    const int st = blk % ST;
    if (!ring.next(p, G, blk, sKV, sIdx)) continue;
    const __nv_bfloat16* kv_t = sKV + (st * C::kRows + tok * BN) * C::kQS;
    const int* idx_t = sIdx + st * C::kRows + tok * BN;
    {
      float s[NS][4], dp[NS][4];
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
      mma_abt<NS, DK / 16>(s, q_w, C::kQS, kv_t + half * (BN / 2) * C::kQS, C::kQS);
      mma_abt<NS, DV / 16>(dp, do_w, kOS, kv_t + half * (BN / 2) * C::kQS, C::kQS);
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        const int col = half * (BN / 2) + n * 8 + 2 * c;
        float pv[4], dsv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = idx_t[col + (e & 1)] >= 0;
          pv[e] = ok ? exp2f(s[n][e] * sl2 - lse2[e / 2]) : 0.f;
          dsv[e] = pv[e] * (dp[n][e] - dlt[e / 2]) * p.scale;
        }
        if (p.probs) {  // head sums of the final probabilities: the probs pass's sums, bit for bit
          float cs[2] = {pv[0] + pv[2], pv[1] + pv[3]};
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) cs[j] += __shfl_xor_sync(0xffffffffu, cs[j], o);
          if (g == 0 && bt < N)
#pragma unroll
            for (int j = 0; j < 2; ++j)
              if (idx_t[col + j] >= 0) atomicAdd(p.probs + bt * p.K + blk * BN + col + j, cs[j]);
        }
        *reinterpret_cast<uint32_t*>(p_w + g * C::kPS + col) = pack_bf16(pv[0], pv[1]);
        *reinterpret_cast<uint32_t*>(p_w + (g + 8) * C::kPS + col) = pack_bf16(pv[2], pv[3]);
        *reinterpret_cast<uint32_t*>(ds_w + g * C::kPS + col) = pack_bf16(dsv[0], dsv[1]);
        *reinterpret_cast<uint32_t*>(ds_w + (g + 8) * C::kPS + col) = pack_bf16(dsv[2], dsv[3]);
      }
    }
    __syncthreads();  // dS / P of every head of the CTA's tokens are in shared memory
    // dQ[16 heads, half of Dk] += dS [16, BN] x K [BN, half of Dk]
    mma_ab<NQ, BN / 16>(dq, ds_w, C::kPS, kv_t + half * (DK / 2), C::kQS);
    // dKV[idx[slot], :] += dS^T Q (+ P^T dO on the first Dv columns), 16 x 16 output tiles shared by the
    // token's 2 * HT warps, contracted over the CTA's kR heads.
    if (bt < N) {
      const __nv_bfloat16* qt = sQ + tok * C::kR * C::kQS;
      const __nv_bfloat16* dot = sdO + tok * C::kR * kOS;
      const __nv_bfloat16* pt = sP + tok * HT * 16 * C::kPS;
      const __nv_bfloat16* dst = sdS + tok * HT * 16 * C::kPS;
      constexpr int kColTiles = DK / 16, kItems = (BN / 16) * kColTiles;
      for (int it = ht * 2 + half; it < kItems; it += 2 * HT) {
        const int mt = it / kColTiles, col0 = (it % kColTiles) * 16;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int hk = 0; hk < HT; ++hk) {
          mma_atb16(acc, dst + hk * 16 * C::kPS + mt * 16, C::kPS, qt + hk * 16 * C::kQS + col0, C::kQS);
          if (col0 < DV)
            mma_atb16(acc, pt + hk * 16 * C::kPS + mt * 16, C::kPS, dot + hk * 16 * kOS + col0, kOS);
        }
        // Lanes c, c^1 of a quad swap halves so each holds 4 consecutive columns: one float4 atomic per row.
        const bool odd = c & 1;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float sx = odd ? acc[0][2 * i] : acc[1][2 * i], sy = odd ? acc[0][2 * i + 1] : acc[1][2 * i + 1];
          const float rx = __shfl_xor_sync(0xffffffffu, sx, 1), ry = __shfl_xor_sync(0xffffffffu, sy, 1);
          const int s = idx_t[mt * 16 + g + 8 * i];
          if (s < 0) continue;
          const float4 v = odd ? make_float4(rx, ry, acc[1][2 * i], acc[1][2 * i + 1])
                               : make_float4(acc[0][2 * i], acc[0][2 * i + 1], rx, ry);
          float* row = p.dkv + (b * p.T + s) * DK + col0 + (odd ? 8 + 2 * (c - 1) : 2 * c);
          atomicAdd(reinterpret_cast<float4*>(row), v);
        }
      }
    }
  }
  cp_async_wait<0>();
  if (bt >= N) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = h0 + ht * 16 + g + 8 * i;
    __nv_bfloat16* row = p.dq + (bt * p.H + h) * DK + half * (DK / 2);
#pragma unroll
    for (int n = 0; n < NQ; ++n)
      *reinterpret_cast<uint32_t*>(row + n * 8 + 2 * c) = pack_bf16(dq[n][2 * i], dq[n][2 * i + 1]);
  }
}

// delta[r] = dout[r, :] . out[r, :] over Dv (one warp per row, 16-byte loads)
__global__ void delta_kernel(const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ out,
                             int64_t rows, int dv, float* __restrict__ delta) {
  const int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= rows) return;
  float s = 0.f;
  for (int i = lane * 8; i < dv; i += 256) {
    const uint4 a = *reinterpret_cast<const uint4*>(dout + w * dv + i);
    const uint4 o = *reinterpret_cast<const uint4*>(out + w * dv + i);
    const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&o);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 x = __bfloat1622float2(a2[j]), y = __bfloat1622float2(o2[j]);
      s += x.x * y.x + x.y * y.y;
    }
  }
  s = warp_sum(s);
  if (lane == 0) delta[w] = s;
}

// A tile configuration as a type, so one dispatch serves several launchers.
template <int DK_, int DV_, int HT_, int NT_, int BN_, int ST_, int GL_ = 0>
struct Tiles {
  static constexpr int DK = DK_, DV = DV_, HT = HT_, NT = NT_, BN = BN_, ST = ST_, GL = GL_;
  using C = Cfg<DK, DV, HT, NT, BN, ST, GL>;
};

// One CTA per NT tokens and kR-head group.
template <class T, class Kernel>
void launch_kernel(Kernel kern, size_t smem, const SparseAttnParams& p, const char* op) {
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t blocks = ceil_div(int64_t(p.B) * p.T, T::NT) * (p.H / T::C::kR);
  kern<<<static_cast<unsigned>(blocks), T::C::kThreads, smem, stream()>>>(p);
  check_launch(op);
}

// Tile configuration by (Dk, Dv, H): HT = 4 (64 heads per CTA, one token) when H % 64 == 0, else HT = 1
// with several tokens per CTA. 0 = no instantiation.
int config_of(int64_t H, int64_t Dk, int64_t Dv) {
  const bool dims = (Dk == 288 && Dv == 256) || (Dk == 576 && Dv == 512);
  if (!dims || H % 16 != 0 || H == 0) return 0;
  return H % 64 == 0 ? 4 : 1;
}

// The 16-head tile configurations gather with eight lanes per row (whole 128-byte segments, four rows a warp
// instruction); DSA_SPARSE_ATTN_MMA_LINES=0 takes the one-pass gather of two lanes a row (one 32-byte sector
// a row and instruction: sixteen one-sector L2 requests), 1 / unset the default, anything else is refused.
// Measured (docs/perf_log.md v27, H100): the bench-small forward 1.90 -> 1.69 ms.
bool mma_gather_lines() {
  const char* e = std::getenv("DSA_SPARSE_ATTN_MMA_LINES");
  DSA_CHECK(!e || !*e || std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0,
            "[sparse_attention] DSA_SPARSE_ATTN_MMA_LINES must be 0, 1 or unset, got '", e, "'");
  return !(e && *e == '0');
}


}  // namespace

bool sparse_attention_mma_forward(const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices, double scale,
                                  Tensor& out, Tensor& lse, Tensor& probs_sum) {
  const char* op = "sparse_attention_forward";
  const int64_t Dk = q.size(3), H = q.size(2);
  const int cfg = config_of(H, Dk, dv);
  if (cfg == 0 || q.numel() == 0 || indices.size(2) == 0) return false;
  SparseAttnParams p = sparse_attn_params(q, kv, indices, scale);
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data<bf16>());
  p.lse = lse.data<float>();
  // The forward and the probs pass share their tiles.
  const bool lines = mma_gather_lines();
  auto fwd_side = [&](auto launch) {
    if (Dk == 288) {
      if (cfg == 4) launch(Tiles<288, 256, 4, 1, 32, 3>{});
      else if (lines) launch(Tiles<288, 256, 1, 2, 32, 2, 8>{});
      else launch(Tiles<288, 256, 1, 2, 32, 2>{});
    } else {
      if (cfg == 4) launch(Tiles<576, 512, 4, 1, 32, 3>{});
      else if (lines) launch(Tiles<576, 512, 1, 2, 32, 2, 8>{});
      else launch(Tiles<576, 512, 1, 2, 32, 2>{});
    }
  };
  if (!sparse_attention_wgmma_forward(p, static_cast<int>(Dk), static_cast<int>(dv)))
    fwd_side([&](auto t) {
      using T = decltype(t);
      launch_kernel<T>(sparse_attn_fwd_kernel<T::DK, T::DV, T::HT, T::NT, T::BN, T::ST, T::GL>, T::C::fwd_smem(), p,
                       op);
    });
  if (probs_sum.defined()) {
    p.probs = probs_sum.data<float>();
    fwd_side([&](auto t) {
      using T = decltype(t);
      launch_kernel<T>(sparse_attn_probs_kernel<T::DK, T::DV, T::HT, T::NT, T::BN, T::ST, T::GL>,
                       size_t(T::C::kQ + T::C::kKV) * 2 + T::ST * T::C::kRows * 4, p, op);
    });
  }
  return true;
}

bool sparse_attention_mma_backward(const Tensor& dout, const Tensor& q, const Tensor& kv, int64_t dv,
                                   const Tensor& indices, const Tensor& out, const Tensor& lse, double scale,
                                   Tensor& dq, Tensor& dkv32, Tensor& probs_sum) {
  const char* op = "sparse_attention_backward";
  const int64_t Dk = q.size(3), H = q.size(2);
  const int cfg = config_of(H, Dk, dv);
  if (cfg == 0 || q.numel() == 0 || indices.size(2) == 0) return false;
  const int64_t rows = q.size(0) * q.size(1) * H;
  Tensor delta = Tensor::empty({rows}, DType::F32, Device::CUDA);
  delta_kernel<<<grid_1d(rows * 32, 256), 256, 0, stream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(dout.data<bf16>()), reinterpret_cast<const __nv_bfloat16*>(out.data<bf16>()),
      rows, static_cast<int>(dv), delta.data<float>());
  check_launch(op);
  SparseAttnParams p = sparse_attn_params(q, kv, indices, scale);
  p.lse = const_cast<float*>(lse.data<float>());
  p.dout = reinterpret_cast<const __nv_bfloat16*>(dout.data<bf16>());
  p.delta = delta.data<float>();
  p.dq = reinterpret_cast<__nv_bfloat16*>(dq.data<bf16>());
  p.dkv = dkv32.data<float>();
  p.probs = probs_sum.defined() ? probs_sum.data<float>() : nullptr;
  const bool lines = mma_gather_lines();
  if (sparse_attention_wgmma_backward(p, static_cast<int>(Dk), static_cast<int>(dv))) return true;
  auto launch = [&](auto t) {
    using T = decltype(t);
    launch_kernel<T>(sparse_attn_bwd_kernel<T::DK, T::DV, T::HT, T::NT, T::BN, T::ST, T::GL>, T::C::bwd_smem(), p, op);
  };
  if (Dk == 288) {
    if (cfg == 4) launch(Tiles<288, 256, 4, 1, 32, 2>{});
    else if (lines) launch(Tiles<288, 256, 1, 3, 32, 2, 8>{});
    else launch(Tiles<288, 256, 1, 3, 32, 2>{});
  } else {
    if (cfg == 4) launch(Tiles<576, 512, 4, 1, 32, 2>{});
    else if (lines) launch(Tiles<576, 512, 1, 1, 32, 2, 8>{});
    else launch(Tiles<576, 512, 1, 1, 32, 2>{});
  }
  return true;
}

}  // namespace dsa::cuda::dsa_detail
