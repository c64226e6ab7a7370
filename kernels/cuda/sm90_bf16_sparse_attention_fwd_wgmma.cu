// Sparse MQA attention forward on wgmma (sm_90a) for 64 heads per CTA: the production MLA shape (H a
// multiple of 64; (Dk, Dv) = (576, 512), and (288, 256) for the tests' small sizes). FlashMLA's sparse
// prefill plan on this project's no-swizzle tiles: a CTA owns one token and 64 heads, with two warpgroups;
// the token's K selected latent rows are gathered by index in blocks of 64 (cp.async, 16-byte chunks, -1
// slots zero-filled and masked, an ST-stage ring). Per block, warpgroup w:
//   S_w [64 heads, 32 keys] = Q K_w^T            wgmma m64n32k16, Q and the block both K-major tiles
//   row maxima exchanged with the other group    online softmax in f32, exp2 with the scale folded in
//   P_w -> shared memory                          bf16, the block's K-major [64 heads][64 keys] tile
//   O_w [64 heads, Dv / 2 columns] += P V_w       wgmma m64n128k16 with B read as the MN-major view of the
//                                                 block's first Dv columns (no transposed copy)
// The composed reference is the mma.sync kernel of sm90_bf16_sparse_attention_mma.cu (itself tested
// against the CPU); the tests run both on the same inputs.
//
// NOTES:
// - The default where H % 64 == 0 (DSA_SPARSE_ATTN_WGMMA=0 keeps the mma.sync kernel; read at each call):
//   266 vs 207 TFLOP/s at the production shape (docs/perf_log.md v12).
// - Shared memory (576 / 512): Q 72 KiB + two 72 KiB stages + P 8 KiB = 225 KiB of the 227 the SM allows;
//   (288 / 256) takes three stages.
// - Tiles, the gather and block_any: sparse_attention_wgmma.cuh.
// - Each phase waits for its wgmma chain (wait_group 0): overlapping the next block's S with this block's
//   P V needs a second S buffer. The warp-specialized kernel (sm90_bf16_sparse_attention_fwd_wgmma_ws.cu)
//   does that with the blocks taken in turn by two warpgroups, 2.1x this kernel on an H200 (docs/perf_log.md
//   v24): it is the default at 576 / 512, this kernel's instantiation there the composed reference
//   (DSA_SPARSE_ATTN_FWD_WS=0) that SparseAttentionForwardWs runs beside it.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/sparse_attention_wgmma.cuh"

namespace dsa::cuda::dsa_detail {

namespace {

constexpr int kBN = kSparseBlock;  // keys per block: 32 per warpgroup in S, all 64 in P V
constexpr int kThreads = 256;  // two warpgroups
static_assert(kThreads == 256, "gather_block_256 / gather_index_256: one gathered row a thread");
constexpr float kLog2e = 1.4426950408889634f;

template <int DK, int DV, int ST>
struct WgCfg {
  static constexpr int kTile = 64 * DK;  // elements of sQ and of one ring stage (64 rows of DK)
  static constexpr int kP = 64 * kBN;    // elements of sP
  static constexpr int kNB = DV / 256;   // m64n128 accumulators per warpgroup (Dv / 2 columns)
  static constexpr uint32_t kRowBlock = DK * 16;  // bytes between core matrices 8 rows apart
  static constexpr size_t smem() { return size_t(kTile) * (1 + ST) * 2 + size_t(kP) * 2 + (2 * 64 + ST * kBN) * 4; }
  static_assert(DK % 32 == 0 && DV % 256 == 0 && DV <= DK, "tile shapes");
  static_assert(smem() <= 227 * 1024, "shared memory");
};

template <int DK, int DV, int ST>
__global__ void __launch_bounds__(kThreads, 1) sparse_attn_fwd_wgmma_kernel(const SparseAttnParams p) {
  using C = WgCfg<DK, DV, ST>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem);  // [64 heads][DK], core-matrix tile
  __nv_bfloat16* sKV = sQ + C::kTile;                            // [ST][64 keys][DK], core-matrix tiles
  __nv_bfloat16* sP = sKV + ST * C::kTile;                       // [64 heads][64 keys], core-matrix tile
  float* red = reinterpret_cast<float*>(sP + C::kP);            // [2 groups][64 rows]
  int* sIdx = reinterpret_cast<int*>(red + 2 * 64);             // [ST][64]
  const int groups = p.H / 64;
  const int64_t bt = blockIdx.x / groups;
  const int h0 = (blockIdx.x % groups) * 64;
  const int wg = threadIdx.x / 128, wi = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int r0 = 16 * wi + g;  // this thread's rows r0 and r0 + 8 (heads h0 + r)
  const int nblk = (p.K + kBN - 1) / kBN;

  load_dense_rows<DK, 64, kThreads>(sQ, p.q + (bt * p.H + h0) * DK, DK);
  cp_async_commit();
  unsigned live_bits = 0;
#pragma unroll
  for (int i = 0; i < ST - 1; ++i) {
    if (i < nblk && gather_block<DK, kThreads>(p.kv, p.idx, p.K, p.T, bt, i, sKV + i * C::kTile, sIdx + i * kBN))
      live_bits |= 1u << i;
    cp_async_commit();
  }
  int s_next = gather_index_256(p.idx, p.K, bt, ST - 1);  // this thread's slot index of the next gathered block

  float o[C::kNB][64];
#pragma unroll
  for (int nb = 0; nb < C::kNB; ++nb)
#pragma unroll
    for (int i = 0; i < 64; ++i) o[nb][i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const float sl2 = p.scale * kLog2e;

  for (int blk = 0; blk < nblk; ++blk) {
    const int st = blk % ST;
    cp_async_wait<ST - 2>();
    fence_proxy_async();  // this thread's copies visible to wgmma's async proxy
    const bool live = block_any((live_bits >> st) & 1u);
    // Block blk + ST - 1 into the stage block blk - 1 used (every thread passed the barrier after its P V),
    // issued under this block's S MMAs.
    auto gather_ahead = [&] {
      const int nb = blk + ST - 1, ns = nb % ST;
      live_bits &= ~(1u << ns);
      if (nb < nblk && gather_block_256<DK>(p.kv, s_next, p.T, bt, sKV + ns * C::kTile, sIdx + ns * kBN))
        live_bits |= 1u << ns;
      cp_async_commit();
      s_next = gather_index_256(p.idx, p.K, bt, nb + 1);
    };
    if (!live) {
      gather_ahead();
      continue;
    }
    const __nv_bfloat16* kv_st = sKV + st * C::kTile;
    const int* idx_st = sIdx + st * kBN + 32 * wg;

    // S_w = Q K_w^T: 64 heads x this group's 32 keys (key rows 32 wg ..: core-matrix row block 4 wg).
    float s[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) s[i] = 0.f;
    wgmma_fence_operand(s);
    wgmma_fence();
#pragma unroll 4
    for (int ks = 0; ks < DK / 16; ++ks)
      WgmmaBf16<32>::ss<0, 0>(s, wgmma_desc(sQ + ks * 128, 128, C::kRowBlock),
                           wgmma_desc(kv_st + 4 * wg * (DK / 8) * 64 + ks * 128, 128, C::kRowBlock), ks > 0);
    wgmma_commit();
    gather_ahead();
    wgmma_wait<0>();
    wgmma_fence_operand(s);

    // Online softmax: mask, scale, the rows' maxima over both groups' keys.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float v = idx_st[8 * j + 2 * c + (e & 1)] >= 0 ? s[4 * j + e] * sl2 : -INFINITY;
        s[4 * j + e] = v;
        mx[e / 2] = fmaxf(mx[e / 2], v);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    if (c == 0) {
      red[wg * 64 + r0] = mx[0];
      red[wg * 64 + r0 + 8] = mx[1];
    }
    __syncthreads();
    float alpha[2], mu[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m_new = fmaxf(m_run[i], fmaxf(mx[i], red[(1 - wg) * 64 + r0 + 8 * i]));
      alpha[i] = m_new == -INFINITY ? 1.f : exp2f(m_run[i] - m_new);
      mu[i] = m_new == -INFINITY ? 0.f : m_new;
      m_run[i] = m_new;
      l_run[i] *= alpha[i];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float p0 = exp2f(s[4 * j] - mu[0]), p1 = exp2f(s[4 * j + 1] - mu[0]);
      const float p2 = exp2f(s[4 * j + 2] - mu[1]), p3 = exp2f(s[4 * j + 3] - mu[1]);
      l_run[0] += p0 + p1;
      l_run[1] += p2 + p3;
      const int key = 32 * wg + 8 * j + 2 * c;
      *reinterpret_cast<uint32_t*>(sP + tile_off<kBN>(r0, key)) = pack_bf16(p0, p1);
      *reinterpret_cast<uint32_t*>(sP + tile_off<kBN>(r0 + 8, key)) = pack_bf16(p2, p3);
    }
#pragma unroll
    for (int nb = 0; nb < C::kNB; ++nb)
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        o[nb][4 * j] *= alpha[0];
        o[nb][4 * j + 1] *= alpha[0];
        o[nb][4 * j + 2] *= alpha[1];
        o[nb][4 * j + 3] *= alpha[1];
      }
    fence_proxy_async();  // P stores visible to wgmma
    __syncthreads();      // both groups' P in sP

    // O_w += P V_w: K = the block's 64 keys (four k16 steps: key row blocks 2 ks, 2 ks + 1), N = this
    // group's Dv / 2 columns in m64n128 pieces. V's core matrices are the K tile's: lbo = the key row-block
    // stride, sbo = 128 bytes (adjacent 8-column groups).
#pragma unroll
    for (int nb = 0; nb < C::kNB; ++nb) wgmma_fence_operand(o[nb]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBN / 16; ++ks) {
      const uint64_t da = wgmma_desc(sP + ks * 128, 128, kBN * 16);
#pragma unroll
      for (int nb = 0; nb < C::kNB; ++nb) {
        const int col0 = wg * (DV / 2) + nb * 128;
        WgmmaBf16<128>::ss<0, 1>(o[nb], da, wgmma_desc(kv_st + 2 * ks * (DK / 8) * 64 + (col0 / 8) * 64, C::kRowBlock, 128),
                                  1);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int nb = 0; nb < C::kNB; ++nb) wgmma_fence_operand(o[nb]);
  }
  cp_async_wait<0>();

  // Row sums: the quad's lanes, then the two groups.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  __syncthreads();  // the last block's maxima are read
  if (c == 0) {
    red[wg * 64 + r0] = l_run[0];
    red[wg * 64 + r0 + 8] = l_run[1];
  }
  __syncthreads();
  const int64_t b = bt / p.T, t = bt % p.T;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r0 + 8 * i, h = h0 + r;
    const float l = l_run[i] + red[(1 - wg) * 64 + r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    __nv_bfloat16* orow = p.out + (bt * p.H + h) * DV + wg * (DV / 2);
#pragma unroll
    for (int nb = 0; nb < C::kNB; ++nb)
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<uint32_t*>(orow + nb * 128 + 8 * j + 2 * c) =
            pack_bf16(o[nb][4 * j + 2 * i] * inv, o[nb][4 * j + 2 * i + 1] * inv);
    if (wg == 0 && c == 0)
      p.lse[(b * p.H + h) * p.T + t] = l > 0.f ? m_run[i] * 0.6931471805599453f + logf(l) : -INFINITY;
  }
}

template <int DK, int DV, int ST>
void launch(const SparseAttnParams& p, const char* op) {
  using C = WgCfg<DK, DV, ST>;
  const auto kern = sparse_attn_fwd_wgmma_kernel<DK, DV, ST>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(C::smem())));
  const int64_t blocks = int64_t(p.B) * p.T * (p.H / 64);
  kern<<<static_cast<unsigned>(blocks), kThreads, C::smem(), stream()>>>(p);
  check_launch(op);
}

}  // namespace

SparseWgmmaMode sparse_attention_wgmma_mode() {
  const char* e = std::getenv("DSA_SPARSE_ATTN_WGMMA");
  SparseWgmmaMode mode = SparseWgmmaMode::kMeasured;
  if (e && *e) {
    DSA_CHECK(std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0,
              "[sparse_attention] DSA_SPARSE_ATTN_WGMMA must be 0, 1 or unset, got '", e, "'");
    mode = *e == '0' ? SparseWgmmaMode::kOff : SparseWgmmaMode::kAll;
  }
  return wgmma_available() ? mode : SparseWgmmaMode::kOff;
}

bool sparse_attention_fwd_ws_enabled() {
  const char* e = std::getenv("DSA_SPARSE_ATTN_FWD_WS");
  if (!e || !*e) return true;
  DSA_CHECK(std::strcmp(e, "0") == 0 || std::strcmp(e, "1") == 0,
            "[sparse_attention] DSA_SPARSE_ATTN_FWD_WS must be 0, 1 or unset, got '", e, "'");
  return *e == '1';
}

bool sparse_attention_wgmma_forward(const SparseAttnParams& p, int dk, int dv) {
  const bool ws = sparse_attention_fwd_ws_enabled();  // read (and a bad value refused) on every device
  const SparseWgmmaMode mode = sparse_attention_wgmma_mode();
  if (mode == SparseWgmmaMode::kOff) return false;
  // NOTES: the 16-head forward (keys as M, N = 16 per wgmma) measured slower than the mma.sync kernel
  // (bench-small T = 16K: 2.18 vs 1.85 ms, docs/perf_log.md v12): it runs only when asked for (=1).
  if (p.H % 64 != 0) return mode == SparseWgmmaMode::kAll && sparse_attention_wgmma16_forward(p, dk, dv);
  const char* op = "sparse_attention_forward";
  if (dk == 576 && dv == 512 && ws) sparse_attention_fwd_ws(p);
  else if (dk == 576 && dv == 512) launch<576, 512, 2>(p, op);
  else if (dk == 288 && dv == 256) launch<288, 256, 3>(p, op);
  else return false;
  return true;
}

}  // namespace dsa::cuda::dsa_detail
