// Dense causal attention forward on sm90 (FlashAttention-2 style, mma.sync bf16 tensor cores).
//
// One CTA owns BM = 16 * NW query rows of one (b, h); warp w owns rows [16w, 16w + 16). Key/value
// blocks of BN = 64 rows stream through a two-stage cp.async ring; for each block the warp computes
// S = Q K^T (f32 in registers), applies the causal mask only on blocks that cross the diagonal or T,
// updates its running row max / row sum (online softmax in the log2 domain) and accumulates
// O += P V with P repacked from the S accumulators. lse = (m + log2 l) * ln 2 in natural log.
//
// NOTES:
//  - Grid (B * H, query blocks) with the query block reversed: the longest (last) query blocks start
//    first, the short ones fill the tail.
//  - Blocks are visited from key 0 upwards; key 0 is visible to every row, so the running max is
//    finite after the first block and exp2(-inf - m) = 0 handles masked entries without special cases.
//  - The row sum is kept per thread (each thread holds 2 columns of every 8) and reduced across the
//    quad once at the end, as in FA2.
//  - Q fragments stay in registers up to DK = 192; for DK = 256 they are re-read from smem per block
//    to stay under 255 registers.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"
#include "kernels/cuda/ops_attention.h"

namespace dsa::cuda {
namespace attn {
namespace {

template <int DK, int DV>
struct FwdCfg {
  static constexpr int NW = DK <= 32 ? 4 : 8;
  static constexpr int NT = NW * 32, BM = 16 * NW, BN = 64;
  static constexpr int SK = DK + 8, SV = DV + 8;  // smem row strides (bf16)
  static constexpr bool kQReg = DK <= 192;
  static constexpr size_t kSmem = sizeof(__nv_bfloat16) * (size_t(BM) * SK + 2 * size_t(BN) * (SK + SV));
};

template <int DK, int DV>
__global__ void __launch_bounds__(FwdCfg<DK, DV>::NT, 1) attention_fwd_kernel(const AttentionParams p) {
  using C = FwdCfg<DK, DV>;
  constexpr int BM = C::BM, BN = C::BN, SK = C::SK, SV = C::SV, NT = C::NT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [BM, SK]
  __nv_bfloat16* Ks = Qs + BM * SK;                                  // [2][BN, SK]
  __nv_bfloat16* Vs = Ks + 2 * BN * SK;                              // [2][BN, SV]

  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H, g = h / (p.H / p.Hk);
  const int mblk = gridDim.y - 1 - blockIdx.y, m0 = mblk * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int T = p.T;
  const int64_t q_stride = int64_t(p.H) * p.Dk, k_stride = int64_t(p.Hk) * p.Dk, v_stride = int64_t(p.Hk) * p.Dv;
  const __nv_bfloat16* qg = static_cast<const __nv_bfloat16*>(p.q) + (int64_t(b) * T + m0) * q_stride + int64_t(h) * p.Dk;
  const __nv_bfloat16* kg = static_cast<const __nv_bfloat16*>(p.k) + int64_t(b) * T * k_stride + int64_t(g) * p.Dk;
  const __nv_bfloat16* vg = static_cast<const __nv_bfloat16*>(p.v) + int64_t(b) * T * v_stride + int64_t(g) * p.Dv;

  const int kv_end = min(T, m0 + BM);  // keys [0, kv_end) are visible to some row of this block
  const int nblocks = (kv_end + BN - 1) / BN;

  load_tile<BM, DK, NT>(Qs, qg, q_stride, T - m0, p.Dk);
  load_tile<BN, DK, NT>(Ks, kg, k_stride, T, p.Dk);
  load_tile<BN, DV, NT>(Vs, vg, v_stride, T, p.Dv);
  cp_async_commit();

  const float sl2 = p.scale * kLog2e;
  const int r_lo = m0 + warp * 16 + lane / 4;  // this thread's rows: r_lo, r_lo + 8
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float o[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  uint32_t qf[C::kQReg ? DK / 16 : 1][4];
  const __nv_bfloat16* q_lane = Qs + (warp * 16 + lane % 16) * SK + (lane / 16) * 8;

  for (int n = 0; n < nblocks; ++n) {
    cp_async_wait<0>();
    __syncthreads();
    if (n == 0 && C::kQReg) {
#pragma unroll
      for (int kk = 0; kk < (C::kQReg ? DK / 16 : 1); ++kk) ldmatrix_x4(qf[kk], q_lane + kk * 16);
    }
    if (n + 1 < nblocks) {  // prefetch the next block into the other stage (freed by the barrier above)
      const int n1 = (n + 1) * BN, st = (n + 1) & 1;
      load_tile<BN, DK, NT>(Ks + st * BN * SK, kg + n1 * k_stride, k_stride, T - n1, p.Dk);
      load_tile<BN, DV, NT>(Vs + st * BN * SV, vg + n1 * v_stride, v_stride, T - n1, p.Dv);
      cp_async_commit();
    }
    const __nv_bfloat16* Kb = Ks + (n & 1) * BN * SK;
    const __nv_bfloat16* Vb = Vs + (n & 1) * BN * SV;

    // S = Q K^T for this warp's 16 rows x BN keys.
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
      uint32_t a[4];
      if constexpr (C::kQReg) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = qf[kk][i];
      } else {
        ldmatrix_x4(a, q_lane + kk * 16);
      }
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) {
        uint32_t bfr[4];
        ldmatrix_x4(bfr, Kb + (j * 16 + lane % 8 + (lane / 16) * 8) * SK + kk * 16 + ((lane / 8) % 2) * 8);
        mma_m16n8k16_bf16(s[2 * j], a, bfr[0], bfr[1]);
        mma_m16n8k16_bf16(s[2 * j + 1], a, bfr[2], bfr[3]);
      }
    }

    // Scale into the log2 domain and mask (only blocks crossing the diagonal or the end of T).
    const int n0 = n * BN;
    const bool need_mask = n0 + BN > m0 || n0 + BN > T;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * sl2;
        if (need_mask) {
          const int row = r_lo + (e / 2) * 8, col = n0 + j * 8 + (lane % 4) * 2 + (e % 2);
          if (col > row || col >= T) x = -INFINITY;
        }
        s[j][e] = x;
      }
    }
    // Online softmax.
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      alpha[r] = exp2f(m_run[r] - mx);
      m_run[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - mx);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - mx);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
    }
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }
    // O += P V.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int jd = 0; jd < DV / 16; ++jd) {
        uint32_t bfr[4];
        ldmatrix_x4_trans(bfr, Vb + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SV + jd * 16 + (lane / 16) * 8);
        mma_m16n8k16_bf16(o[2 * jd], a, bfr[0], bfr[1]);
        mma_m16n8k16_bf16(o[2 * jd + 1], a, bfr[2], bfr[3]);
      }
    }
  }

  // Epilogue: normalize, write out rows < T and columns < Dv, and lse.
  __nv_bfloat16* og = static_cast<__nv_bfloat16*>(p.out) + int64_t(h) * p.Dv;
  const int64_t o_stride = int64_t(p.H) * p.Dv;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = 1.f / l;
    const int row = r_lo + r * 8;
    if (row >= T) continue;
    __nv_bfloat16* orow = og + (int64_t(b) * T + row) * o_stride;
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      const int col = j * 8 + (lane % 4) * 2;
      const float x0 = o[j][2 * r] * inv, x1 = o[j][2 * r + 1] * inv;
      if (col + 1 < p.Dv && p.Dv % 2 == 0) {
        *reinterpret_cast<__nv_bfloat162*>(orow + col) = __floats2bfloat162_rn(x0, x1);
      } else {
        if (col < p.Dv) orow[col] = __float2bfloat16(x0);
        if (col + 1 < p.Dv) orow[col + 1] = __float2bfloat16(x1);
      }
    }
    if (lane % 4 == 0) p.lse[(int64_t(b) * p.H + h) * T + row] = (m_run[r] + log2f(l)) * kLn2;
  }
}

template <int DK, int DV>
void launch_fwd(const AttentionParams& p) {
  using C = FwdCfg<DK, DV>;
  auto kernel = attention_fwd_kernel<DK, DV>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmem)));
  const dim3 grid(p.B * p.H, (p.T + C::BM - 1) / C::BM);
  kernel<<<grid, C::NT, C::kSmem, stream()>>>(p);
  check_launch("attention_forward");
}

}  // namespace
}  // namespace attn

void launch_attention_forward(const AttentionParams& p) {
#define DSA_ATTN_FWD_CASE(dk, dv)                 \
  if (p.Dk <= dk && p.Dv <= dv) {                 \
    attn::launch_fwd<dk, dv>(p);                  \
    return;                                       \
  }
  DSA_ATTN_FOR_EACH_DIMS(DSA_ATTN_FWD_CASE)
#undef DSA_ATTN_FWD_CASE
  fail(strcat_("[attention_forward] head dims Dk=", p.Dk, " Dv=", p.Dv, " exceed the CUDA kernels' 256"));
}

Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor* lse_out) {
  const char* op = "attention_forward";
  for (const Tensor* t : {&q, &k, &v})
    DSA_CHECK(t->dtype() == DType::BF16 && t->device() == Device::CUDA, "[", op,
              "] CUDA inputs must be bf16 on the GPU, got ", t->desc());
  AttentionParams p{};
  p.B = int(q.size(0)), p.T = int(q.size(1)), p.H = int(q.size(2)), p.Dk = int(q.size(3));
  p.Hk = int(k.size(2)), p.Dv = int(v.size(3));
  DSA_CHECK(p.Dk <= 256 && p.Dv <= 256, "[", op, "] CUDA head dims must be <= 256, q ", q.desc(), ", v ", v.desc());
  DSA_CHECK(k.shape() == Shape({p.B, p.T, p.Hk, p.Dk}) && v.shape() == Shape({p.B, p.T, p.Hk, p.Dv}) &&
                p.Hk > 0 && p.H % p.Hk == 0,
            "[", op, "] bad shapes q ", q.desc(), ", k ", k.desc(), ", v ", v.desc());
  Tensor out = Tensor::empty({p.B, p.T, p.H, p.Dv}, DType::BF16, Device::CUDA);
  Tensor lse = Tensor::empty({p.B, p.H, p.T}, DType::F32, Device::CUDA);
  p.q = q.raw(), p.k = k.raw(), p.v = v.raw(), p.out = out.raw(), p.lse = lse.data<float>();
  p.scale = float(scale);
  if (p.B * p.T > 0 && p.H > 0 && !attention_forward_cudnn(p)) launch_attention_forward(p);
  if (lse_out) *lse_out = lse;
  return out;
}

}  // namespace dsa::cuda
