// Sparse MQA attention forward for the production MLA shape (Dk 576, Dv 512; H a multiple of 64) on wgmma
// (sm_90a), warp-specialized: a CTA owns one token and 64 heads with three warpgroups.
//   producer (WG 2)  gathers the token's selected latent rows by index, 64 a block, into two stages: cp.async
//                    of whole 128-byte lines into 128-byte-swizzled panels, completion on mbarriers.
//   consumers        take the blocks in turn, WG 0 the even ones (stage 0), WG 1 the odd ones (stage 1);
//                    each keeps half of O's columns (256 w ..):
//     S [64 heads, 64 keys] = Q K^T                 the block's owner, wgmma m64n64k16 (36 k steps)
//     the running row maxima                        WG 0's block's -> WG 1 -> the pair's, back to WG 0
//     O_w [64 heads, 256 columns] += P V_w          the owner's P from registers (m64n128k16 RS), the other
//                                                   block's from shared memory (SS)
//   so that one warpgroup's softmax runs under the other's MMAs, and each MMA is m64n64 or wider (the
//   two-warpgroup kernel of sm90_bf16_sparse_attention_fwd_wgmma.cu splits S into m64n32 halves whose
//   shared-memory reads exceed what the tensor cores use).
// The default at that shape (DSA_SPARSE_ATTN_FWD_WS=0 takes the two-warpgroup kernel of
// sm90_bf16_sparse_attention_fwd_wgmma.cu, which dispatches). The composed references are the CPU op and the
// two-warpgroup kernel; SparseAttentionForwardWs runs all three on the same inputs.
//
// A stage is 9 panels of 64 columns (128 bytes) x 64 gathered rows: chunk j (8 columns) of row r sits at
// r * 128 + ((j ^ r % 8) * 16) of its panel, wgmma's 128-byte-swizzled K-major atom; S reads it K-major,
// P V reads panels 0 .. 7 MN-major (V = the first 512 columns). Its two halves have their own barriers:
//   L = panels 0 .. 3 (V's columns 0 .. 255)   R = panels 4 .. 8 (V's 256 .. 511 and the RoPE columns)
//   stage 0 L: WG 0's S and P V                          released by WG 0
//   stage 0 R: WG 0's S; then P of the even block in panel 8 (dead RoPE columns) for WG 1's P V;
//              released by WG 1
//   stage 1 R: WG 1's S and P V                          released by WG 1
//   stage 1 L: WG 1's S, WG 0's P V (P of the odd block in its own panel sP1); released by WG 0
// The producer fills them in the order they free up: 0 L, 1 R, 0 R, 1 L.
//
// NOTES:
// - Shared memory: two 72 KiB stages + sP1 8 KiB + Q 72 KiB (no swizzle) = 224 KiB, 1 KiB of maxima,
//   flags and barriers, 1 KiB of alignment slack: 226 of the 227 KiB an SM has.
// - Registers: the consumers hold O (128 a thread), S (32) and P's A fragments (16): setmaxnreg gives them
//   232 each and the producer 40 (2 x 128 x 232 + 128 x 40 = 64512 of 65536).
// - Blocks past the last one with a valid slot are not gathered (a causal row's prefix); a block with no
//   valid slot before it is computed, its P zero.
// - One H200 (docs/perf_log.md v24, `dsa-bench kernels --only sparse`, T 4096, H 128, K 2048): 3.97 ms, 588
//   TFLOP/s at the bench's count against 8.50 ms, 274.9 for the two-warpgroup kernel. ncu: 2.5 sectors an L2
//   request against 1.0 (whole lines), L2 tag lookups 23% of peak against 53%. One H100 (v25): 599 against
//   275; every slot valid (the count all executed) 492 against 228.
// - compute-sanitizer racecheck reports hazards on hand-overs that the PTX memory model orders: the slot flags
//   and the cp.async stores against the consumers' accesses (mbarriers: full after the producer's arrivals,
//   empty after __syncwarp and one lane's arrival), the row maxima (bar.arrive / bar.sync) and the epilogue's
//   row sums (bar.sync of the 256 consumer threads). The producer kept to the kernel's end (instead of
//   returning) left them unchanged. tools/dsa_racecheck_probe.cu has each kind of hand-over alone in a few lines
//   (what the tool models; scripts/gpu_check.sh wgmma runs it; not yet run on a GPU). The default on the
//   tests (SparseAttentionForwardWs, SparseAttentionWgmma, `ctest -L gpu` with it forced: docs/perf_log.md v25).
#include <cmath>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/sparse_attention_wgmma.cuh"

namespace dsa::cuda::dsa_detail {

namespace {

constexpr int kDK = 576, kDV = 512;          // the production MLA head dims (the only instantiation)
constexpr int kBN = kSparseBlock;            // 64 gathered rows a block
constexpr int kPanels = kDK / 64;            // 9 panels of 64 columns a row
constexpr uint32_t kPanelBytes = kBN * 128;  // 8 KiB
constexpr uint32_t kStageBytes = kPanels * kPanelBytes;
constexpr int kThreads = 384, kMathThreads = 256;
constexpr int kMathRegs = 232, kLoadRegs = 40;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kDV == 8 * 64 && kPanels == 9, "V is panels 0 .. 7, panel 8 the RoPE columns");

// Quarters (stage, half) and their barriers' index 2 stage + half.
constexpr int k0L = 0, k0R = 1, k1L = 2, k1R = 3;
// Named barriers (0 is __syncthreads), 256 threads each: the consumers' hand-overs.
constexpr int kBarMath = 1;  // both consumers (Q landed; the epilogue's row sums)
constexpr int kBarMax0 = 2;  // WG 0 -> WG 1: WG 0's block's maxima in sM0
constexpr int kBarMaxN = 3;  // WG 1 -> WG 0: the pair's maxima in sMN
constexpr int kBarP0 = 4;    // WG 0 -> WG 1: the even block's P in stage 0's panel 8
constexpr int kBarP1 = 5;    // WG 1 -> WG 0: the odd block's P in sP1
constexpr int kBarTail = 6;  // WG 1 -> WG 0: WG 1 took the last pair's P0 hand-over (an odd block count)

struct Smem {
  uint8_t* stage[2];  // [9 panels][64 rows][128 B], swizzled
  uint8_t* p1;        // [64 heads][64 keys] bf16, one swizzled panel
  __nv_bfloat16* q;   // [64 heads][576], core-matrix tile (sparse_attention_wgmma.cuh)
  float* m0;          // [64] the row maxima after WG 0's block of the pair
  float* mn;          // [64] the pair's row maxima
  float* red;         // [2][64] the consumers' row sums
  int8_t* valid;      // [2][64] the stages' slot flags
  uint64_t* full;     // [4] a quarter landed (128 producer arrivals)
  uint64_t* empty;    // [4] a quarter's readers are done (4 warp arrivals)
  int* last;          // the last slot with a valid index, -1 if none
  __device__ explicit Smem(unsigned char* raw) {
    uint8_t* b = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
    stage[0] = b;
    stage[1] = b + kStageBytes;
    p1 = b + 2 * kStageBytes;
    q = reinterpret_cast<__nv_bfloat16*>(p1 + kPanelBytes);
    m0 = reinterpret_cast<float*>(q + 64 * kDK);
    mn = m0 + 64;
    red = mn + 64;
    valid = reinterpret_cast<int8_t*>(red + 128);
    full = reinterpret_cast<uint64_t*>(valid + 128);
    empty = full + 4;
    last = reinterpret_cast<int*>(empty + 4);
  }
  static constexpr size_t bytes() {
    return 2 * size_t(kStageBytes) + kPanelBytes + 64 * kDK * 2 + 256 * 4 + 128 + 8 * 8 + 16 + 1024;
  }
};
static_assert(Smem::bytes() <= 227 * 1024, "shared memory");

// ------------------------------------------------------------------------------------------- producer
// Rows 16 g + 4 w + q of every block (g = 0 .. 3) are this thread's (warp w of the producer, lane 8 q + j),
// chunk j of each of their 128-byte lines: a warp instruction copies four whole lines into four rows' 32 banks.
template <int P0, int P1>
__device__ __forceinline__ void gather_half(const __nv_bfloat16* kv, int64_t row0, const int (&slot)[4], uint8_t* stage,
                                            int w, int q, int j) {
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const int r = 16 * g + 4 * w + q;
    uint8_t* dst = stage + r * 128 + ((j ^ (r & 7)) << 4);
    const __nv_bfloat16* s = kv + (slot[g] >= 0 ? (row0 + slot[g]) * kDK : 0) + 8 * j;
#pragma unroll
    for (int pn = P0; pn < P1; ++pn) cp_async16(dst + pn * kPanelBytes, s + pn * 64, slot[g] >= 0 ? 16 : 0);
  }
}
__device__ __forceinline__ void put_flags(int8_t* valid, const int (&slot)[4], int w, int q, int j) {
  if (j == 0)
#pragma unroll
    for (int g = 0; g < 4; ++g) valid[16 * g + 4 * w + q] = slot[g] >= 0;
}
__device__ __forceinline__ void landed(uint64_t* bar) {
  cp_async_mbar_arrive(bar);
  mbar_arrive(bar);
}

__device__ void produce(const SparseAttnParams& p, const Smem& sm, int64_t bt, int nlive) {
  const int lt = threadIdx.x - kMathThreads, w = lt >> 5, q = (lt >> 3) & 3, j = lt & 7;
  const int64_t row0 = (bt / p.T) * p.T;  // kv row of this sequence's slot 0
  const int32_t* idx = p.idx + bt * p.K;
  const int np = (nlive + 1) / 2;
  // This thread's rows' slot indices of blocks 2 i and 2 i + 1 (-1: invalid or past the live blocks), loaded
  // a pair ahead.
  int nxt[2][4];
  auto load = [&](int i) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int slot = (2 * i + h) * kBN + 16 * g + 4 * w + q;
        nxt[h][g] = 2 * i + h < nlive && slot < p.K ? __ldg(idx + slot) : -1;
      }
  };
  load(0);
  for (int i = 0; i < np; ++i) {
    int cur[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int g = 0; g < 4; ++g) cur[h][g] = nxt[h][g];
    if (i + 1 < np) load(i + 1);
    const bool has1 = 2 * i + 1 < nlive;
    const uint32_t ph = (i - 1) & 1;
    // Stage 0 L (with the even block's flags), stage 1 R (the odd block's flags), stage 0 R, stage 1 L.
    if (i > 0) mbar_wait(&sm.empty[k0L], ph);
    put_flags(sm.valid, cur[0], w, q, j);
    gather_half<0, 4>(p.kv, row0, cur[0], sm.stage[0], w, q, j);
    landed(&sm.full[k0L]);
    if (has1) {
      if (i > 0) mbar_wait(&sm.empty[k1R], ph);
      put_flags(sm.valid + kBN, cur[1], w, q, j);
      gather_half<4, kPanels>(p.kv, row0, cur[1], sm.stage[1], w, q, j);
      landed(&sm.full[k1R]);
    }
    if (i > 0) mbar_wait(&sm.empty[k0R], ph);
    gather_half<4, kPanels>(p.kv, row0, cur[0], sm.stage[0], w, q, j);
    landed(&sm.full[k0R]);
    if (has1) {
      if (i > 0) mbar_wait(&sm.empty[k1L], ph);
      gather_half<0, 4>(p.kv, row0, cur[1], sm.stage[1], w, q, j);
      landed(&sm.full[k1L]);
    }
  }
  cp_async_wait<0>();
}

// ------------------------------------------------------------------------------------------ consumers
// S += Q K^T over the k steps of panels [P0, P1) of a stage (the first step overwrites when `init`).
template <int P0, int P1>
__device__ __forceinline__ void s_panels(float (&s)[32], const __nv_bfloat16* sq, const uint8_t* stage, bool init) {
#pragma unroll
  for (int ks = 4 * P0; ks < 4 * P1; ++ks)
    WgmmaBf16<64>::ss<0, 0>(s, wgmma_desc(sq + ks * 128, 128, kDK * 16),
                            wgmma_desc_swizzle<128>(stage + (ks >> 2) * kPanelBytes + (ks & 3) * 32),
                            !(init && ks == 4 * P0));
}
// V of keys 16 ks .. and the 128 columns of panels pn, pn + 1, read MN-major.
__device__ __forceinline__ uint64_t v_desc(const uint8_t* stage, int pn, int ks) {
  return wgmma_desc_sw128(stage + pn * kPanelBytes + ks * 16 * 128, kPanelBytes, 8 * 128);
}
// O_w += P V_w with P from registers (A fragments of k steps 0 .. 3) or from a swizzled panel.
__device__ __forceinline__ void pv_rs(float (&o)[2][64], const uint32_t (&a)[4][4], const uint8_t* stage, int wg) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) WgmmaBf16<128>::rs<1>(o[nb], a[ks], v_desc(stage, 4 * wg + 2 * nb, ks), 1);
}
__device__ __forceinline__ void pv_ss(float (&o)[2][64], const uint8_t* pp, const uint8_t* stage, int wg) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const uint64_t da = wgmma_desc_swizzle<128>(pp + ks * 32);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) WgmmaBf16<128>::ss<0, 1>(o[nb], da, v_desc(stage, 4 * wg + 2 * nb, ks), 1);
  }
}

// The block's scores masked (-inf for invalid slots) and scaled to log2 units in place; mx = max(m, the row
// maxima of rows r0, r0 + 8) over the block's 64 keys (the quad's lanes reduced).
__device__ __forceinline__ void mask_max(float (&s)[32], const int8_t* valid, int c, float sl2, const float (&m)[2],
                                         float (&mx)[2]) {
  mx[0] = m[0];
  mx[1] = m[1];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float v = valid[8 * j + 2 * c + (e & 1)] ? s[4 * j + e] * sl2 : -INFINITY;
      s[4 * j + e] = v;
      mx[e / 2] = fmaxf(mx[e / 2], v);
    }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
  }
}
// Moves the running state from maxima m to mn (>= m): O and l scaled by 2^(m - mn) (mn = -inf: nothing
// seen yet, all zero).
__device__ __forceinline__ void rescale(float (&o)[2][64], float (&l)[2], const float (&m)[2], const float (&mn)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float a = mn[i] == -INFINITY ? 1.f : exp2f(m[i] - mn[i]);
    l[i] *= a;
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        o[nb][4 * k + 2 * i] *= a;
        o[nb][4 * k + 2 * i + 1] *= a;
      }
  }
}
// P = 2^(s - mn) in place (0 where s = -inf), its row sums added to l, and its A fragments: k step ks is
// the accumulator's column groups 2 ks and 2 ks + 1 (mma.cuh, WgmmaBf16::rs).
__device__ __forceinline__ void softmax_p(float (&s)[32], const float (&mn)[2], float (&l)[2], uint32_t (&a)[4][4]) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float mu = mn[e / 2] == -INFINITY ? 0.f : mn[e / 2];
      s[4 * j + e] = exp2f(s[4 * j + e] - mu);
      l[e / 2] += s[4 * j + e];
    }
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int i = 0; i < 4; ++i) a[ks][i] = pack_bf16(s[8 * ks + 2 * i], s[8 * ks + 2 * i + 1]);
}
// P * f (rows r0, r0 + 8) as bf16 into a swizzled [64 heads][64 keys] panel; then visible to wgmma.
__device__ __forceinline__ void store_p(uint8_t* panel, const float (&s)[32], const float (&f)[2], int r0, int c) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r0 + 8 * i;
      *reinterpret_cast<uint32_t*>(panel + r * 128 + ((j ^ (r & 7)) << 4) + 4 * c) =
          pack_bf16(s[4 * j + 2 * i] * f[i], s[4 * j + 2 * i + 1] * f[i]);
    }
  fence_proxy_async();
}
__device__ __forceinline__ void wait_stage(uint64_t* bar, uint32_t parity) {
  mbar_wait(bar, parity);
  fence_proxy_async();  // the producer's cp.async writes, acquired by the wait, visible to wgmma
}
__device__ __forceinline__ void release(uint64_t* bar) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
}

// Both consumers' end: the row sums (the quad's lanes, then the other consumer's: both hold the same maxima
// m), O_w normalized into out, and (WG 0) lse.
__device__ __forceinline__ void epilogue(const SparseAttnParams& p, const Smem& sm, int64_t bt, int h0, int wg, int r0,
                                         int c, const float (&o)[2][64], const float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  if (c == 0) {
    sm.red[wg * 64 + r0] = l[0];
    sm.red[wg * 64 + r0 + 8] = l[1];
  }
  named_bar_sync(kBarMath, kMathThreads);
  const int64_t b = bt / p.T, t = bt % p.T;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r0 + 8 * i, h = h0 + r;
    const float lt = l[i] + sm.red[(1 - wg) * 64 + r];
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    __nv_bfloat16* orow = p.out + (bt * p.H + h) * kDV + wg * (kDV / 2);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int k = 0; k < 16; ++k)
        *reinterpret_cast<uint32_t*>(orow + nb * 128 + 8 * k + 2 * c) =
            pack_bf16(o[nb][4 * k + 2 * i] * inv, o[nb][4 * k + 2 * i + 1] * inv);
    if (wg == 0 && c == 0)
      p.lse[(b * p.H + h) * p.T + t] = lt > 0.f ? m[i] * 0.6931471805599453f + logf(lt) : -INFINITY;
  }
}
// A consumer's registers: rows r0 = 16 (warp % 4) + lane / 4 and r0 + 8 (heads h0 + r), the accumulator
// columns' lane c = lane % 4; O_w zero, maxima -inf, sums 0.
// NOTES: each consumer builds its own (the few lines that open consume0 and consume1): one O declared in the
// kernel and passed to both, live across the branch's join, cost 44 bytes of spills at 232 registers.
struct ConsumerState {
  int r0, c;
  float o[2][64], m[2], l[2];
  __device__ __forceinline__ ConsumerState() : r0(16 * ((threadIdx.x / 32) % 4) + (threadIdx.x % 32) / 4),
                                               c(threadIdx.x % 4), m{-INFINITY, -INFINITY}, l{0.f, 0.f} {
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int k = 0; k < 64; ++k) o[nb][k] = 0.f;
  }
};

// WG 0: the even blocks (stage 0) and columns 0 .. 255.
__device__ void consume0(const SparseAttnParams& p, const Smem& sm, int64_t bt, int h0, int nlive, float sl2) {
  ConsumerState cs;
  const int r0 = cs.r0, c = cs.c;
  auto& o = cs.o;
  auto& m = cs.m;
  auto& l = cs.l;
  const int np = (nlive + 1) / 2;
  float s[32];
  uint32_t a[4][4];
  for (int i = 0; i < np; ++i) {
    const bool has1 = 2 * i + 1 < nlive;
    const uint32_t ph = i & 1;
#pragma unroll
    for (int k = 0; k < 32; ++k) s[k] = 0.f;
    wgmma_fence_operand(s);
    wait_stage(&sm.full[k0L], ph);
    wgmma_fence();
    s_panels<0, 4>(s, sm.q, sm.stage[0], true);
    wgmma_commit();
    if (i > 0) {  // the previous pair's P1 V1 (stage 1 L) done under these MMAs
      wgmma_wait<1>();
      release(&sm.empty[k1L]);
    }
    wait_stage(&sm.full[k0R], ph);
    s_panels<4, kPanels>(s, sm.q, sm.stage[0], false);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(s);
#pragma unroll
    for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);

    float m0[2];
    mask_max(s, sm.valid, c, sl2, m, m0);
    if (c == 0) {
      sm.m0[r0] = m0[0];
      sm.m0[r0 + 8] = m0[1];
    }
    named_bar_arrive(kBarMax0, kMathThreads);
    rescale(o, l, m, m0);
    softmax_p(s, m0, l, a);
#pragma unroll
    for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);
    wgmma_fence();
    pv_rs(o, a, sm.stage[0], 0);
    wgmma_commit();

    // The pair's maxima: P of this block handed over relative to them, O and l moved to them after P V.
    float mn[2] = {m0[0], m0[1]}, f[2] = {1.f, 1.f};
    if (has1) {
      named_bar_sync(kBarMaxN, kMathThreads);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        mn[k] = sm.mn[r0 + 8 * k];
        f[k] = m0[k] == -INFINITY ? 0.f : exp2f(m0[k] - mn[k]);
      }
    } else if (i > 0) {
      named_bar_sync(kBarTail, kMathThreads);  // WG 1 is past the previous pair's kBarP0
    }
    store_p(sm.stage[0] + 8 * kPanelBytes, s, f, r0, c);
    named_bar_arrive(kBarP0, kMathThreads);
    wgmma_wait<0>();
#pragma unroll
    for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);
    release(&sm.empty[k0L]);
    rescale(o, l, m0, mn);
    m[0] = mn[0];
    m[1] = mn[1];
    if (has1) {
      named_bar_sync(kBarP1, kMathThreads);
      wgmma_fence();
      pv_ss(o, sm.p1, sm.stage[1], 0);
      wgmma_commit();
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);
  epilogue(p, sm, bt, h0, 0, r0, c, o, m, l);
}

// WG 1: the odd blocks (stage 1) and columns 256 .. 511.
__device__ void consume1(const SparseAttnParams& p, const Smem& sm, int64_t bt, int h0, int nlive, float sl2) {
  ConsumerState cs;
  const int r0 = cs.r0, c = cs.c;
  auto& o = cs.o;
  auto& m = cs.m;
  auto& l = cs.l;
  const int np = (nlive + 1) / 2;
  float s[32];
  uint32_t a[4][4];
  for (int i = 0; i < np; ++i) {
    const bool has1 = 2 * i + 1 < nlive;
    const uint32_t ph = i & 1;
    float mn[2];
    if (has1) {
#pragma unroll
      for (int k = 0; k < 32; ++k) s[k] = 0.f;
      wgmma_fence_operand(s);
      wait_stage(&sm.full[k1R], ph);
      wgmma_fence();
      s_panels<4, kPanels>(s, sm.q, sm.stage[1], true);
      wgmma_commit();
      if (i > 0) {  // the previous pair's P0 V0 (stage 0 R) done under these MMAs
        wgmma_wait<1>();
        release(&sm.empty[k0R]);
      }
      wait_stage(&sm.full[k1L], ph);
      s_panels<0, 4>(s, sm.q, sm.stage[1], false);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operand(s);
#pragma unroll
      for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);

      named_bar_sync(kBarMax0, kMathThreads);
      const float m0[2] = {sm.m0[r0], sm.m0[r0 + 8]};
      mask_max(s, sm.valid + kBN, c, sl2, m0, mn);
      if (c == 0) {
        sm.mn[r0] = mn[0];
        sm.mn[r0 + 8] = mn[1];
      }
      named_bar_arrive(kBarMaxN, kMathThreads);
      rescale(o, l, m, mn);
      softmax_p(s, mn, l, a);
      const float one[2] = {1.f, 1.f};
      store_p(sm.p1, s, one, r0, c);
      named_bar_arrive(kBarP1, kMathThreads);
#pragma unroll
      for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);
      wgmma_fence();
      pv_rs(o, a, sm.stage[1], 1);
      wgmma_commit();
    } else {  // the last pair of an odd block count: WG 0's block only
      wgmma_wait<0>();  // (unconditional: ptxas then sees no path with O in flight below)
      if (i > 0) release(&sm.empty[k0R]);
#pragma unroll
      for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);
      named_bar_sync(kBarMax0, kMathThreads);
      mn[0] = sm.m0[r0];
      mn[1] = sm.m0[r0 + 8];
      rescale(o, l, m, mn);
#pragma unroll
      for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);
    }
    m[0] = mn[0];
    m[1] = mn[1];
    named_bar_sync(kBarP0, kMathThreads);
    wgmma_fence();  // (has1: this block's P V still in flight on O, no other access in between)
    pv_ss(o, sm.stage[0] + 8 * kPanelBytes, sm.stage[0], 1);
    wgmma_commit();
    if (has1) {  // this block's P V done: stage 1 R free
      wgmma_wait<1>();
      release(&sm.empty[k1R]);
    }
    if (i + 2 == np && (nlive & 1)) named_bar_arrive(kBarTail, kMathThreads);
  }
  wgmma_wait<0>();
#pragma unroll
  for (int k = 0; k < 2; ++k) wgmma_fence_operand(o[k]);
  epilogue(p, sm, bt, h0, 1, r0, c, o, m, l);
}

__global__ void __launch_bounds__(kThreads, 1) sparse_attn_fwd_ws_kernel(const SparseAttnParams p) {
  extern __shared__ unsigned char smem_raw[];
  const Smem sm(smem_raw);
  const int groups = p.H / 64;
  const int64_t bt = blockIdx.x / groups;
  const int h0 = (blockIdx.x % groups) * 64;
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);

  if (threadIdx.x == 0) {
    for (int k = 0; k < 4; ++k) {
      mbar_init(&sm.full[k], 128);
      mbar_init(&sm.empty[k], 4);
    }
    *sm.last = -1;
    mbar_fence_init();
  }
  if (wg < 2) load_dense_rows<kDK, 64, kMathThreads>(sm.q, p.q + (bt * p.H + h0) * kDK, kDK);
  cp_async_commit();
  __syncthreads();  // barriers and sm.last initialized
  // The blocks to gather: up to the last valid slot.
  int last = -1;
  for (int k = threadIdx.x; k < p.K; k += kThreads)
    if (__ldg(p.idx + bt * p.K + k) >= 0) last = k;
  last = __reduce_max_sync(0xffffffffu, last);
  if ((threadIdx.x & 31) == 0 && last >= 0) atomicMax(sm.last, last);
  __syncthreads();
  // Shuffled: ptxas then sees the block count, and the roles below, as warp-uniform (a branch it cannot prove
  // uniform around wgmma makes it serialize them: C7520).
  const int nlive = __shfl_sync(0xffffffffu, (*sm.last + kBN) / kBN, 0);

  if (wg == 2) {
    setmaxnreg_dec<kLoadRegs>();
    produce(p, sm, bt, nlive);
    return;
  }
  setmaxnreg_inc<kMathRegs>();
  cp_async_wait<0>();
  fence_proxy_async();
  named_bar_sync(kBarMath, kMathThreads);  // Q landed for both consumers

  const float sl2 = p.scale * kLog2e;
  if (wg == 0) consume0(p, sm, bt, h0, nlive, sl2);
  else consume1(p, sm, bt, h0, nlive, sl2);
}

}  // namespace

void sparse_attention_fwd_ws(const SparseAttnParams& p) {
  DSA_CUDA_CHECK(cudaFuncSetAttribute(sparse_attn_fwd_ws_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Smem::bytes())));
  const int64_t blocks = int64_t(p.B) * p.T * (p.H / 64);
  sparse_attn_fwd_ws_kernel<<<static_cast<unsigned>(blocks), kThreads, Smem::bytes(), stream()>>>(p);
  check_launch("sparse_attention_forward");
}

}  // namespace dsa::cuda::dsa_detail
