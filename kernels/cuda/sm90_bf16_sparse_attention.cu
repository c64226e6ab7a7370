// Sparse MQA attention on the GPU, streamed by blocks of query tokens: the K selected latent rows of
// every token are gathered once into a bounded scratch and all H heads share them (heads are the M
// dimension of per-token batched tensor-core GEMMs on cuBLASLt); softmax / gradient elementwise kernels
// in f32; dkv is scatter-added with f32 atomics into an f32 scratch, then cast to bf16.
//
// NOTES: this is the "gather + batched GEMM" formulation (bf16 operands, f32 accumulation, P and dS
// rounded to bf16 as the GEMM operands, like FlashAttention's P). The shapes the models use (Dk, Dv) =
// (288, 256) / (576, 512) with H a multiple of 16 run the fused kernels of sm90_bf16_sparse_attention_mma.cu
// instead; this path serves every other shape, and DSA_SPARSE_ATTN_GEMM=1 forces it (benchmarks, tests).
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/ops_dsa.h"

namespace dsa::cuda {

using namespace dsa_detail;

namespace {

__global__ void gather_kernel(const __nv_bfloat16* __restrict__ kv, const int32_t* __restrict__ idx, int64_t T,
                              int64_t Dk, int64_t K, int64_t bt0, int64_t R, __nv_bfloat16* __restrict__ kvg) {
  // one warp per (row, slot)
  const int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= R * K) return;
  const int64_t r = w / K, k = w % K, bt = bt0 + r, b = bt / T;
  const int32_t s = idx[bt * K + k];
  __nv_bfloat16* dst = kvg + w * Dk;
  if (s < 0) {
    for (int64_t i = lane; i < Dk; i += 32) dst[i] = __float2bfloat16_rn(0.f);
    return;
  }
  const __nv_bfloat16* src = kv + (b * T + s) * Dk;
  if ((Dk & 7) == 0) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int64_t i = lane; i < Dk / 8; i += 32) d4[i] = __ldg(s4 + i);
  } else {
    for (int64_t i = lane; i < Dk; i += 32) dst[i] = src[i];
  }
}

// One warp per (token, head) row of S [R, H, K]: lse, P = exp(S - lse) in bf16 (0 on invalid slots).
__global__ void softmax_kernel(const float* __restrict__ S /*[R, H, K] scaled*/, const int32_t* __restrict__ idx,
                               int64_t T, int64_t H, int64_t K, int64_t bt0, int64_t R,
                               __nv_bfloat16* __restrict__ P /*[R, H, K]*/, float* __restrict__ lse /*[B, H, T]*/) {
  const int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= R * H) return;
  const int64_t r = w / H, h = w % H, bt = bt0 + r, b = bt / T, t = bt % T;
  const int32_t* ir = idx + bt * K;
  const float* sr = S + w * K;
  float m = -INFINITY;
  for (int64_t k = lane; k < K; k += 32)
    if (ir[k] >= 0) m = fmaxf(m, sr[k]);
  m = warp_max(m);
  float sum = 0.f;
  for (int64_t k = lane; k < K; k += 32)
    if (ir[k] >= 0) sum += expf(sr[k] - m);
  sum = warp_sum(sum);
  const float l = m == -INFINITY ? -INFINITY : m + logf(sum);
  for (int64_t k = lane; k < K; k += 32)
    P[w * K + k] = __float2bfloat16_rn(ir[k] >= 0 && l != -INFINITY ? expf(sr[k] - l) : 0.f);
  if (lane == 0 && lse) lse[(b * H + h) * T + t] = l;
}

// probs[bt, k] = sum_h exp(S[r, h, k] - lse[b, h, t]) over valid slots (0 for -1 slots), one thread per (r, k).
__global__ void probs_sum_kernel(const float* __restrict__ S /*[R, H, K] scaled*/, const int32_t* __restrict__ idx,
                                 const float* __restrict__ lse /*[B, H, T]*/, int64_t T, int64_t H, int64_t K,
                                 int64_t bt0, int64_t R, float* __restrict__ probs /*[B, T, K]*/) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= R * K) return;
  const int64_t r = i / K, k = i % K, bt = bt0 + r, b = bt / T, t = bt % T;
  float a = 0.f;
  if (idx[bt * K + k] >= 0)
    for (int64_t h = 0; h < H; ++h) {
      const float l = lse[(b * H + h) * T + t];
      if (isfinite(l)) a += expf(S[(r * H + h) * K + k] - l);
    }
  probs[bt * K + k] = a;
}

// delta[r, h] = dout . out over Dv (one warp per row)
__global__ void delta_kernel(const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ out,
                             int64_t rows, int64_t Dv, float* __restrict__ delta) {
  const int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= rows) return;
  float s = 0.f;
  for (int64_t i = lane; i < Dv; i += 32)
    s += __bfloat162float(dout[w * Dv + i]) * __bfloat162float(out[w * Dv + i]);
  s = warp_sum(s);
  if (lane == 0) delta[w] = s;
}

// P = exp(S - lse), dS = P * (dP - delta) * scale, both bf16 [R, H, K]; 0 on invalid slots / empty rows.
__global__ void dscore_kernel(const float* __restrict__ S, const float* __restrict__ dP, const int32_t* __restrict__ idx,
                              const float* __restrict__ lse /*[B, H, T]*/, const float* __restrict__ delta /*[R, H]*/,
                              int64_t T, int64_t H, int64_t K, int64_t bt0, int64_t R, float scale,
                              __nv_bfloat16* __restrict__ P, __nv_bfloat16* __restrict__ dS) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < R * H * K; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = i % K, rh = i / K, h = rh % H, r = rh / H, bt = bt0 + r, b = bt / T, t = bt % T;
    const float l = lse[(b * H + h) * T + t];
    float p = 0.f, ds = 0.f;
    if (idx[bt * K + k] >= 0 && isfinite(l)) {
      p = expf(S[i] - l);
      ds = p * (dP[i] - delta[rh]) * scale;
    }
    P[i] = __float2bfloat16_rn(p);
    dS[i] = __float2bfloat16_rn(ds);
  }
}

// dkv[b, idx[bt, k]] += dkvg[r, k] (one warp per (row, slot), f32 atomics)
__global__ void scatter_kernel(const float* __restrict__ dkvg /*[R, K, Dk]*/, const int32_t* __restrict__ idx, int64_t T,
                               int64_t Dk, int64_t K, int64_t bt0, int64_t R, float* __restrict__ dkv /*[B, T, Dk]*/) {
  const int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= R * K) return;
  const int64_t r = w / K, k = w % K, bt = bt0 + r, b = bt / T;
  const int32_t s = idx[bt * K + k];
  if (s < 0) return;
  float* dst = dkv + (b * T + s) * Dk;
  const float* src = dkvg + w * Dk;
  for (int64_t i = lane; i < Dk; i += 32) atomicAdd(dst + i, src[i]);
}

struct Dims {
  int64_t B, T, H, Dk, Dv, K;
};

Dims check_common(const char* op, const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices) {
  expect_cuda(op, "q", q, DType::BF16);
  expect_cuda(op, "kv", kv, DType::BF16);
  expect_shape(op, "q", q, {-1, -1, -1, -1});
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3);
  expect_shape(op, "kv", kv, {B, T, Dk});
  DSA_CHECK(dv >= 1 && dv <= Dk, "[", op, "] dv must be in [1, ", Dk, "], got ", dv);
  check_indices_gpu(op, indices, B, T);
  return {B, T, H, Dk, dv, indices.size(2)};
}

bool force_gemm_path() {
  const char* e = std::getenv("DSA_SPARSE_ATTN_GEMM");
  return e && std::strcmp(e, "1") == 0;
}

const __nv_bfloat16* bf(const Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data<bf16>()); }
__nv_bfloat16* bf(Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data<bf16>()); }

// S [R, H, K] = alpha * Q_r [H, Dk] x kvg_r [K, Dk]^T, with `dk` of the Dk columns used.
void scores_gemm(const char* op, const __nv_bfloat16* q, int64_t ldq, int64_t H, int64_t dk, const __nv_bfloat16* kvg,
                 int64_t Dk, int64_t K, int64_t R, float alpha, float* S) {
  RowGemm g;
  g.tb = true;
  g.M = H; g.N = K; g.K = dk;
  g.A = q; g.lda = ldq; g.strideA = H * ldq;
  g.B = kvg; g.ldb = Dk; g.strideB = K * Dk;
  g.C = S; g.ldc = K; g.strideC = H * K;
  g.alpha = alpha; g.batch = R;
  row_gemm(op, g);
}

}  // namespace

namespace dsa_detail {
void gather_rows(const __nv_bfloat16* kv, const int32_t* idx, int64_t T, int64_t Dk, int64_t K, int64_t bt0, int64_t R,
                 __nv_bfloat16* kvg, const char* op) {
  if (R * K == 0) return;
  gather_kernel<<<grid_1d(R * K * 32, 256), 256, 0, stream()>>>(kv, idx, T, Dk, K, bt0, R, kvg);
  check_launch(op);
}
void check_indices_gpu(const char* op, const Tensor& idx, int64_t B, int64_t T) {
  expect_cuda(op, "indices", idx, DType::I32);
  expect_shape(op, "indices", idx, {B, T, -1});
}
}  // namespace dsa_detail

Tensor sparse_attention_forward(const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices, double scale,
                                Tensor* lse_out, Tensor* probs_sum_out) {
  const char* op = "sparse_attention_forward";
  const Dims d = check_common(op, q, kv, dv, indices);
  Tensor out = Tensor::empty({d.B, d.T, d.H, d.Dv}, DType::BF16, Device::CUDA);
  Tensor lse = Tensor::empty({d.B, d.H, d.T}, DType::F32, Device::CUDA);
  Tensor psum;
  if (probs_sum_out) psum = Tensor::zeros({d.B, d.T, d.K}, DType::F32, Device::CUDA);
  const int64_t N = d.B * d.T;
  if (N > 0 && d.K > 0 && !force_gemm_path() &&
      sparse_attention_mma_forward(q, kv, dv, indices, scale, out, lse, psum)) {
    // fused tensor-core kernel
  } else if (N > 0 && d.K > 0) {
    const int64_t per_row = d.K * d.Dk * 2 + d.H * d.K * 6;
    const int64_t rb = rows_for_budget(N, per_row, int64_t(1) << 30);
    Tensor kvg = Tensor::empty({rb, d.K, d.Dk}, DType::BF16, Device::CUDA);
    Tensor S = Tensor::empty({rb, d.H, d.K}, DType::F32, Device::CUDA);
    Tensor P = Tensor::empty({rb, d.H, d.K}, DType::BF16, Device::CUDA);
    for (int64_t bt0 = 0; bt0 < N; bt0 += rb) {
      const int64_t R = std::min(N, bt0 + rb) - bt0;
      gather_rows(bf(kv), indices.data<int32_t>(), d.T, d.Dk, d.K, bt0, R, bf(kvg), op);
      scores_gemm(op, bf(q) + bt0 * d.H * d.Dk, d.Dk, d.H, d.Dk, bf(kvg), d.Dk, d.K, R, static_cast<float>(scale),
                  S.data<float>());
      softmax_kernel<<<grid_1d(R * d.H * 32, 256), 256, 0, stream()>>>(S.data<float>(), indices.data<int32_t>(), d.T,
                                                                        d.H, d.K, bt0, R, bf(P), lse.data<float>());
      check_launch(op);
      if (probs_sum_out) {
        probs_sum_kernel<<<grid_1d(R * d.K, 256), 256, 0, stream()>>>(S.data<float>(), indices.data<int32_t>(),
                                                                        lse.data<float>(), d.T, d.H, d.K, bt0, R,
                                                                        psum.data<float>());
        check_launch(op);
      }
      RowGemm g;  // out_r [H, Dv] = P_r [H, K] x kvg_r [K, 0:Dv]
      g.M = d.H; g.N = d.Dv; g.K = d.K;
      g.A = bf(P); g.lda = d.K; g.strideA = d.H * d.K;
      g.B = bf(kvg); g.ldb = d.Dk; g.strideB = d.K * d.Dk;
      g.C = bf(out) + bt0 * d.H * d.Dv; g.ldc = d.Dv; g.strideC = d.H * d.Dv; g.c_type = DType::BF16;
      g.batch = R;
      row_gemm(op, g);
    }
  } else if (N > 0) {
    out.zero_();
    lse.zero_();  // no slots: filled below
    const Tensor ninf = Tensor::full({d.B, d.H, d.T}, DType::F32, -INFINITY);
    lse.copy_from(ninf.to(Device::CUDA));
  }
  if (lse_out) *lse_out = lse;
  if (probs_sum_out) *probs_sum_out = psum;
  return out;
}

ops::SparseAttentionGrads sparse_attention_backward(const Tensor& dout, const Tensor& q, const Tensor& kv, int64_t dv,
                                                    const Tensor& indices, const Tensor& out, const Tensor& lse,
                                                    double scale, bool probs_sum) {
  const char* op = "sparse_attention_backward";
  const Dims d = check_common(op, q, kv, dv, indices);
  expect_cuda(op, "dout", dout, DType::BF16);
  expect_cuda(op, "out", out, DType::BF16);
  expect_cuda(op, "lse", lse, DType::F32);
  expect_shape(op, "dout", dout, {d.B, d.T, d.H, d.Dv});
  expect_shape(op, "out", out, {d.B, d.T, d.H, d.Dv});
  expect_shape(op, "lse", lse, {d.B, d.H, d.T});
  ops::SparseAttentionGrads g{Tensor::empty(q.shape(), DType::BF16, Device::CUDA),
                              Tensor::empty(kv.shape(), DType::BF16, Device::CUDA), Tensor()};
  if (probs_sum) g.probs_sum = Tensor::zeros({d.B, d.T, d.K}, DType::F32, Device::CUDA);
  Tensor dkv32 = Tensor::zeros(kv.shape(), DType::F32, Device::CUDA);
  const int64_t N = d.B * d.T;
  if (N > 0 && d.K == 0) g.dq.zero_();
  if (N > 0 && d.K > 0 && !force_gemm_path() &&
      sparse_attention_mma_backward(dout, q, kv, dv, indices, out, lse, scale, g.dq, dkv32, g.probs_sum)) {
    // fused tensor-core kernel
  } else if (N > 0 && d.K > 0) {
    const int64_t per_row = d.K * d.Dk * 6 + d.H * d.K * 12 + d.H * 4;
    const int64_t rb = rows_for_budget(N, per_row, int64_t(1) << 30);
    Tensor kvg = Tensor::empty({rb, d.K, d.Dk}, DType::BF16, Device::CUDA);
    Tensor dkvg = Tensor::empty({rb, d.K, d.Dk}, DType::F32, Device::CUDA);
    Tensor S = Tensor::empty({rb, d.H, d.K}, DType::F32, Device::CUDA);
    Tensor dP = Tensor::empty({rb, d.H, d.K}, DType::F32, Device::CUDA);
    Tensor P = Tensor::empty({rb, d.H, d.K}, DType::BF16, Device::CUDA);
    Tensor dS = Tensor::empty({rb, d.H, d.K}, DType::BF16, Device::CUDA);
    Tensor delta = Tensor::empty({rb, d.H}, DType::F32, Device::CUDA);
    const int32_t* idx = indices.data<int32_t>();
    for (int64_t bt0 = 0; bt0 < N; bt0 += rb) {
      const int64_t R = std::min(N, bt0 + rb) - bt0;
      const __nv_bfloat16* qr = bf(q) + bt0 * d.H * d.Dk;
      const __nv_bfloat16* gr = bf(dout) + bt0 * d.H * d.Dv;
      gather_rows(bf(kv), idx, d.T, d.Dk, d.K, bt0, R, bf(kvg), op);
      delta_kernel<<<grid_1d(R * d.H * 32, 256), 256, 0, stream()>>>(gr, bf(out) + bt0 * d.H * d.Dv, R * d.H, d.Dv,
                                                                      delta.data<float>());
      check_launch(op);
      scores_gemm(op, qr, d.Dk, d.H, d.Dk, bf(kvg), d.Dk, d.K, R, static_cast<float>(scale), S.data<float>());
      scores_gemm(op, gr, d.Dv, d.H, d.Dv, bf(kvg), d.Dk, d.K, R, 1.f, dP.data<float>());  // dP = dout V^T
      dscore_kernel<<<grid_1d(R * d.H * d.K, 256), 256, 0, stream()>>>(
          S.data<float>(), dP.data<float>(), idx, lse.data<float>(), delta.data<float>(), d.T, d.H, d.K, bt0, R,
          static_cast<float>(scale), bf(P), bf(dS));
      check_launch(op);
      if (probs_sum) {
        probs_sum_kernel<<<grid_1d(R * d.K, 256), 256, 0, stream()>>>(S.data<float>(), idx, lse.data<float>(), d.T, d.H,
                                                                        d.K, bt0, R, g.probs_sum.data<float>());
        check_launch(op);
      }
      RowGemm gq;  // dq_r [H, Dk] = dS_r [H, K] x kvg_r [K, Dk]
      gq.M = d.H; gq.N = d.Dk; gq.K = d.K;
      gq.A = bf(dS); gq.lda = d.K; gq.strideA = d.H * d.K;
      gq.B = bf(kvg); gq.ldb = d.Dk; gq.strideB = d.K * d.Dk;
      gq.C = bf(g.dq) + bt0 * d.H * d.Dk; gq.ldc = d.Dk; gq.strideC = d.H * d.Dk; gq.c_type = DType::BF16;
      gq.batch = R;
      row_gemm(op, gq);
      RowGemm gk;  // dkvg_r [K, Dk] = dS_r^T [K, H] x q_r [H, Dk]
      gk.ta = true;
      gk.M = d.K; gk.N = d.Dk; gk.K = d.H;
      gk.A = bf(dS); gk.lda = d.K; gk.strideA = d.H * d.K;
      gk.B = qr; gk.ldb = d.Dk; gk.strideB = d.H * d.Dk;
      gk.C = dkvg.data<float>(); gk.ldc = d.Dk; gk.strideC = d.K * d.Dk;
      gk.batch = R;
      row_gemm(op, gk);
      RowGemm gv = gk;  // dkvg_r [K, 0:Dv] += P_r^T [K, H] x dout_r [H, Dv]
      gv.N = d.Dv;
      gv.A = bf(P);
      gv.B = gr; gv.ldb = d.Dv; gv.strideB = d.H * d.Dv;
      gv.beta = 1.f;
      row_gemm(op, gv);
      scatter_kernel<<<grid_1d(R * d.K * 32, 256), 256, 0, stream()>>>(dkvg.data<float>(), idx, d.T, d.Dk, d.K, bt0, R,
                                                                         dkv32.data<float>());
      check_launch(op);
    }
  }
  cast_f32_to_bf16(dkv32.data<float>(), bf(g.dkv), dkv32.numel(), op);
  return g;
}

}  // namespace dsa::cuda
