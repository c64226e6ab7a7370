// Dense causal attention backward on sm90 (FlashAttention-2 algorithm, mma.sync bf16 tensor cores).
//
//   1. delta[b, h, t] = rowsum(dout * o)                           (attn_bwd_delta_kernel)
//   2. one CTA per (b, kv head g, key block of BN = 16 * NW keys); warp w owns keys [16w, 16w + 16).
//      K and V stay in smem; for every head of the group and every query block (BM = 64) that can see
//      the keys, Q / dO / lse / delta stream through a two-stage cp.async ring and the warp computes
//        S^T = K Q^T,  P^T = exp(scale S^T - lse),  dV += P^T dO,  dP^T = V dO^T,
//        dS^T = P^T (dP^T - delta),  dK += dS^T Q          (dK, dV accumulate in registers)
//      then dS^T goes to smem and the CTA adds dQ += dS K into an f32 scratch with atomics.
//   3. dq = scale * dq_accum in bf16                                (attn_bwd_dq_kernel)
//
// NOTES:
//  - The CTA owns its (b, g, key block) across all heads of the group, so dK / dV have one writer
//    and are stored once, without atomics; only dQ (shared by all key blocks) uses f32 red.add.
//  - P^T is kept as packed bf16 after the dV product (it is the operand used there anyway); dS is
//    formed from those bf16 probabilities, which caps the live registers at dK + dV accumulators
//    + one f32 tile.
//  - The dQ product splits the CTA's [BM, DK] tile over the warps by (16-row tile, column half) and
//    walks it 16 columns at a time so at most 8 accumulator floats are live next to dK / dV.
//  - Grid (B * Hk, key blocks): early key blocks see the most queries and are scheduled first.
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
struct BwdCfg {
  static constexpr int NW = (DK >= 256 || DV >= 256 || DK <= 32) ? 4 : 8;
  static constexpr int NT = NW * 32, BN = 16 * NW, BM = 64;
  static constexpr int SK = DK + 8, SV = DV + 8, SS = BM + 8;  // smem row strides (bf16)
  static constexpr int kColParts = NW / (BM / 16);             // warps sharing one 16-row dQ tile
  static constexpr size_t kSmem = sizeof(__nv_bfloat16) * (size_t(BN) * (SK + SV) + 2 * size_t(BM) * (SK + SV) +
                                                           size_t(BN) * SS) +
                                  sizeof(float) * 4 * BM;
  static_assert((DK / 16) % kColParts == 0, "dQ column split");
};

// delta[b, h, t] = sum_c dout * o, one warp per (b, t, h) row.
__global__ void attn_bwd_delta_kernel(const AttentionParams p) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // (b * T + t) * H + h
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(p.B) * p.T * p.H) return;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.dout) + row * p.Dv;
  const __nv_bfloat16* y = static_cast<const __nv_bfloat16*>(p.o) + row * p.Dv;
  float s = 0.f;
  for (int c = lane; c < p.Dv; c += 32) s += __bfloat162float(x[c]) * __bfloat162float(y[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) {
    const int64_t h = row % p.H, bt = row / p.H, t = bt % p.T, b = bt / p.T;
    p.delta[(b * p.H + h) * p.T + t] = s;
  }
}

// dq = scale * dq_accum (bf16).
__global__ void attn_bwd_dq_kernel(const AttentionParams p, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) static_cast<__nv_bfloat16*>(p.dq)[i] = __float2bfloat16(p.dq_accum[i] * p.scale);
}

template <int DK, int DV>
__global__ void __launch_bounds__(BwdCfg<DK, DV>::NT, 1) attention_bwd_kernel(const AttentionParams p) {
  using C = BwdCfg<DK, DV>;
  constexpr int BM = C::BM, BN = C::BN, SK = C::SK, SV = C::SV, SS = C::SS, NT = C::NT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [BN, SK]
  __nv_bfloat16* Vs = Ks + BN * SK;                                  // [BN, SV]
  __nv_bfloat16* Qs = Vs + BN * SV;                                  // [2][BM, SK]
  __nv_bfloat16* dOs = Qs + 2 * BM * SK;                             // [2][BM, SV]
  __nv_bfloat16* dSs = dOs + 2 * BM * SV;                            // [BN, SS]  dS^T (keys x queries)
  float* lse_s = reinterpret_cast<float*>(dSs + BN * SS);            // [2][BM] lse * log2(e)
  float* del_s = lse_s + 2 * BM;                                     // [2][BM]

  const int bg = blockIdx.x, b = bg / p.Hk, g = bg % p.Hk, rep = p.H / p.Hk;
  const int n0 = blockIdx.y * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int T = p.T;
  const int64_t q_stride = int64_t(p.H) * p.Dk, o_stride = int64_t(p.H) * p.Dv;
  const int64_t k_stride = int64_t(p.Hk) * p.Dk, v_stride = int64_t(p.Hk) * p.Dv;
  const __nv_bfloat16* qg = static_cast<const __nv_bfloat16*>(p.q) + int64_t(b) * T * q_stride;
  const __nv_bfloat16* dog = static_cast<const __nv_bfloat16*>(p.dout) + int64_t(b) * T * o_stride;

  load_tile<BN, DK, NT>(Ks, static_cast<const __nv_bfloat16*>(p.k) + (int64_t(b) * T + n0) * k_stride + int64_t(g) * p.Dk,
                        k_stride, T - n0, p.Dk);
  load_tile<BN, DV, NT>(Vs, static_cast<const __nv_bfloat16*>(p.v) + (int64_t(b) * T + n0) * v_stride + int64_t(g) * p.Dv,
                        v_stride, T - n0, p.Dv);

  const int mb_first = n0 / BM, mb_count = (T + BM - 1) / BM - mb_first;
  const int total = rep * mb_count;  // (head of the group, query block) iterations
  auto issue = [&](int it) {
    const int h = g * rep + it / mb_count, m0 = (mb_first + it % mb_count) * BM, st = it & 1;
    load_tile<BM, DK, NT>(Qs + st * BM * SK, qg + int64_t(m0) * q_stride + int64_t(h) * p.Dk, q_stride, T - m0, p.Dk);
    load_tile<BM, DV, NT>(dOs + st * BM * SV, dog + int64_t(m0) * o_stride + int64_t(h) * p.Dv, o_stride, T - m0,
                          p.Dv);
    for (int i = threadIdx.x; i < BM; i += NT) {
      const int t = m0 + i;
      const int64_t at = (int64_t(b) * p.H + h) * T + t;
      lse_s[st * BM + i] = t < T ? p.lse[at] * kLog2e : 0.f;
      del_s[st * BM + i] = t < T ? p.delta[at] : 0.f;
    }
    cp_async_commit();
  };
  issue(0);

  const float sl2 = p.scale * kLog2e;
  float dk[DK / 8][4], dv[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DK / 8; ++j) dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
  const int key_lo = n0 + warp * 16 + lane / 4;  // this thread's keys: key_lo, key_lo + 8
  const __nv_bfloat16* k_lane = Ks + (warp * 16 + lane % 16) * SK + (lane / 16) * 8;
  const __nv_bfloat16* v_lane = Vs + (warp * 16 + lane % 16) * SV + (lane / 16) * 8;
  const int dq_mt = warp % (BM / 16), dq_part = warp / (BM / 16);

  for (int it = 0; it < total; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < total) issue(it + 1);
    const int h = g * rep + it / mb_count, m0 = (mb_first + it % mb_count) * BM, st = it & 1;
    const __nv_bfloat16* Qb = Qs + st * BM * SK;
    const __nv_bfloat16* dOb = dOs + st * BM * SV;
    const float* lse_b = lse_s + st * BM;
    const float* del_b = del_s + st * BM;

    // S^T = K Q^T: this warp's 16 keys x BM queries.
    float s[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, k_lane + kk * 16);
#pragma unroll
      for (int j = 0; j < BM / 16; ++j) {
        uint32_t bfr[4];
        ldmatrix_x4(bfr, Qb + (j * 16 + lane % 8 + (lane / 16) * 8) * SK + kk * 16 + ((lane / 8) % 2) * 8);
        mma_m16n8k16_bf16(s[2 * j], a, bfr[0], bfr[1]);
        mma_m16n8k16_bf16(s[2 * j + 1], a, bfr[2], bfr[3]);
      }
    }
    // P^T = exp2(sl2 * S^T - lse2), zero where the query cannot see the key or lies past T.
    uint32_t pb[BM / 16][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      float x[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_lo + (e / 2) * 8, qi = j * 8 + (lane % 4) * 2 + (e % 2), t = m0 + qi;
        x[e] = (t < key || t >= T) ? 0.f : exp2f(s[j][e] * sl2 - lse_b[qi]);
      }
      pb[j / 2][(j % 2) * 2] = pack_bf16(x[0], x[1]);
      pb[j / 2][(j % 2) * 2 + 1] = pack_bf16(x[2], x[3]);
    }
    // dV += P^T dO.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
      for (int jd = 0; jd < DV / 16; ++jd) {
        uint32_t bfr[4];
        ldmatrix_x4_trans(bfr, dOb + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SV + jd * 16 + (lane / 16) * 8);
        mma_m16n8k16_bf16(dv[2 * jd], pb[kk], bfr[0], bfr[1]);
        mma_m16n8k16_bf16(dv[2 * jd + 1], pb[kk], bfr[2], bfr[3]);
      }
    }
    // dP^T = V dO^T (reuses s).
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DV / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, v_lane + kk * 16);
#pragma unroll
      for (int j = 0; j < BM / 16; ++j) {
        uint32_t bfr[4];
        ldmatrix_x4(bfr, dOb + (j * 16 + lane % 8 + (lane / 16) * 8) * SV + kk * 16 + ((lane / 8) % 2) * 8);
        mma_m16n8k16_bf16(s[2 * j], a, bfr[0], bfr[1]);
        mma_m16n8k16_bf16(s[2 * j + 1], a, bfr[2], bfr[3]);
      }
    }
    // dS^T = P^T (dP^T - delta), packed as the next A operand and stored (bf16) for the dQ product.
    uint32_t dsb[BM / 16][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      const int qi = j * 8 + (lane % 4) * 2;
      const float2 p01 = unpack_bf16(pb[j / 2][(j % 2) * 2]), p23 = unpack_bf16(pb[j / 2][(j % 2) * 2 + 1]);
      const float d0 = del_b[qi], d1 = del_b[qi + 1];
      const uint32_t lo = pack_bf16(p01.x * (s[j][0] - d0), p01.y * (s[j][1] - d1));
      const uint32_t hi = pack_bf16(p23.x * (s[j][2] - d0), p23.y * (s[j][3] - d1));
      dsb[j / 2][(j % 2) * 2] = lo;
      dsb[j / 2][(j % 2) * 2 + 1] = hi;
      *reinterpret_cast<uint32_t*>(dSs + (warp * 16 + lane / 4) * SS + qi) = lo;
      *reinterpret_cast<uint32_t*>(dSs + (warp * 16 + lane / 4 + 8) * SS + qi) = hi;
    }
    // dK += dS^T Q.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
      for (int jd = 0; jd < DK / 16; ++jd) {
        uint32_t bfr[4];
        ldmatrix_x4_trans(bfr, Qb + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SK + jd * 16 + (lane / 16) * 8);
        mma_m16n8k16_bf16(dk[2 * jd], dsb[kk], bfr[0], bfr[1]);
        mma_m16n8k16_bf16(dk[2 * jd + 1], dsb[kk], bfr[2], bfr[3]);
      }
    }
    __syncthreads();  // dS^T of all warps in smem
    // dQ[m0 + 16 dq_mt .., cols of dq_part] += dS K, 16 columns at a time, red.add into f32.
    {
      uint32_t af[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        ldmatrix_x4_trans(af[kk],
                          dSs + (kk * 16 + lane % 8 + (lane / 16) * 8) * SS + dq_mt * 16 + ((lane / 8) % 2) * 8);
      const int row0 = m0 + dq_mt * 16 + lane / 4;
      float* dq_row0 = p.dq_accum + (int64_t(b) * T + row0) * q_stride + int64_t(h) * p.Dk;
      constexpr int kCols = DK / C::kColParts;
#pragma unroll
      for (int c16 = 0; c16 < kCols / 16; ++c16) {
        const int cb = dq_part * kCols + c16 * 16;
        float acc[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t bfr[4];
          ldmatrix_x4_trans(bfr, Ks + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SK + cb + (lane / 16) * 8);
          mma_m16n8k16_bf16(acc[0], af[kk], bfr[0], bfr[1]);
          mma_m16n8k16_bf16(acc[1], af[kk], bfr[2], bfr[3]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = (e / 2) * 8, col = cb + j * 8 + (lane % 4) * 2 + (e % 2);
            if (row0 + r < T && col < p.Dk) atomicAdd(dq_row0 + r * q_stride + col, acc[j][e]);
          }
        }
      }
    }
  }

  // Epilogue: dK (times scale) and dV for keys < T, columns < Dk / Dv.
  __nv_bfloat16* dkg = static_cast<__nv_bfloat16*>(p.dk) + int64_t(b) * T * k_stride + int64_t(g) * p.Dk;
  __nv_bfloat16* dvg = static_cast<__nv_bfloat16*>(p.dv) + int64_t(b) * T * v_stride + int64_t(g) * p.Dv;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_lo + r * 8;
    if (key >= T) continue;
#pragma unroll
    for (int j = 0; j < DK / 8; ++j) {
      const int col = j * 8 + (lane % 4) * 2;
      if (col < p.Dk) dkg[key * k_stride + col] = __float2bfloat16(dk[j][2 * r] * p.scale);
      if (col + 1 < p.Dk) dkg[key * k_stride + col + 1] = __float2bfloat16(dk[j][2 * r + 1] * p.scale);
    }
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      const int col = j * 8 + (lane % 4) * 2;
      if (col < p.Dv) dvg[key * v_stride + col] = __float2bfloat16(dv[j][2 * r]);
      if (col + 1 < p.Dv) dvg[key * v_stride + col + 1] = __float2bfloat16(dv[j][2 * r + 1]);
    }
  }
}

template <int DK, int DV>
void launch_bwd(const AttentionParams& p) {
  using C = BwdCfg<DK, DV>;
  auto kernel = attention_bwd_kernel<DK, DV>;
  DSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmem)));
  const dim3 grid(p.B * p.Hk, (p.T + C::BN - 1) / C::BN);
  kernel<<<grid, C::NT, C::kSmem, stream()>>>(p);
  check_launch("attention_backward");
}

}  // namespace
}  // namespace attn

void launch_attention_backward(const AttentionParams& p) {
  const int64_t rows = int64_t(p.B) * p.T * p.H;
  attn::attn_bwd_delta_kernel<<<unsigned((rows * 32 + 255) / 256), 256, 0, stream()>>>(p);
  check_launch("attention_backward");
  DSA_CUDA_CHECK(cudaMemsetAsync(p.dq_accum, 0, sizeof(float) * rows * p.Dk, stream()));
  [&] {
#define DSA_ATTN_BWD_CASE(dk, dv)                 \
  if (p.Dk <= dk && p.Dv <= dv) {                 \
    attn::launch_bwd<dk, dv>(p);                  \
    return;                                       \
  }
    DSA_ATTN_FOR_EACH_DIMS(DSA_ATTN_BWD_CASE)
#undef DSA_ATTN_BWD_CASE
    fail(strcat_("[attention_backward] head dims Dk=", p.Dk, " Dv=", p.Dv, " exceed the CUDA kernels' 256"));
  }();
  const int64_t n = rows * p.Dk;
  attn::attn_bwd_dq_kernel<<<unsigned((n + 255) / 256), 256, 0, stream()>>>(p, n);
  check_launch("attention_backward");
}

ops::AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, double scale) {
  const char* op = "attention_backward";
  for (const Tensor* t : {&dout, &q, &k, &v, &out})
    DSA_CHECK(t->dtype() == DType::BF16 && t->device() == Device::CUDA, "[", op,
              "] CUDA operands must be bf16 on the GPU, got ", t->desc());
  DSA_CHECK(lse.dtype() == DType::F32 && lse.device() == Device::CUDA, "[", op, "] lse must be f32 on the GPU, got ",
            lse.desc());
  AttentionParams p{};
  p.B = int(q.size(0)), p.T = int(q.size(1)), p.H = int(q.size(2)), p.Dk = int(q.size(3));
  p.Hk = int(k.size(2)), p.Dv = int(v.size(3));
  DSA_CHECK(p.Dk <= 256 && p.Dv <= 256, "[", op, "] CUDA head dims must be <= 256, q ", q.desc(), ", v ", v.desc());
  const Shape qs{p.B, p.T, p.H, p.Dk}, os{p.B, p.T, p.H, p.Dv};
  DSA_CHECK(q.shape() == qs && k.shape() == Shape({p.B, p.T, p.Hk, p.Dk}) && v.shape() == Shape({p.B, p.T, p.Hk, p.Dv}) &&
                dout.shape() == os && out.shape() == os && lse.shape() == Shape({p.B, p.H, p.T}) && p.Hk > 0 &&
                p.H % p.Hk == 0,
            "[", op, "] bad shapes q ", q.desc(), ", k ", k.desc(), ", v ", v.desc(), ", dout ", dout.desc(), ", out ",
            out.desc(), ", lse ", lse.desc());
  ops::AttentionGrads grads{Tensor::empty(q.shape(), DType::BF16, Device::CUDA),
                            Tensor::empty(k.shape(), DType::BF16, Device::CUDA),
                            Tensor::empty(v.shape(), DType::BF16, Device::CUDA)};
  if (q.numel() == 0 || v.numel() == 0) return grads;
  Tensor delta = Tensor::empty({p.B, p.H, p.T}, DType::F32, Device::CUDA);
  Tensor dq_accum = Tensor::empty(qs, DType::F32, Device::CUDA);
  p.q = q.raw(), p.k = k.raw(), p.v = v.raw(), p.lse = const_cast<float*>(lse.data<float>());
  p.dout = dout.raw(), p.o = out.raw(), p.delta = delta.data<float>(), p.dq_accum = dq_accum.data<float>();
  p.dq = grads.dq.raw(), p.dk = grads.dk.raw(), p.dv = grads.dv.raw();
  p.scale = float(scale);
  if (!attention_backward_cudnn(p)) launch_attention_backward(p);
  return grads;
}

}  // namespace dsa::cuda
