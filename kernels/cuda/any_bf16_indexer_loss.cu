// Sparse indexer KL loss on the GPU (the dense loss and the recall are flash-style kernels in
// sm90_bf16_indexer_kl_dense.cu): the selected latent rows are gathered like the sparse attention
// and the loss works slot by slot.
// NOTES: straight-through over FP8 as on the CPU: the forward I uses the FP8 operands, the backward the
// unquantized bf16 q_I, k_I.
#include <cmath>
#include <vector>

#include "kernels/cuda/dsa_common.cuh"
#include "kernels/cuda/ops_dsa.h"

namespace dsa::cuda {

using namespace dsa_detail;

namespace {

const __nv_bfloat16* bf(const Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data<bf16>()); }
__nv_bfloat16* bf(Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data<bf16>()); }

void check_indexer_gpu(const char* op, const Tensor& q_main, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I) {
  expect_cuda(op, "q_I", q_I, DType::BF16);
  expect_cuda(op, "k_I", k_I, DType::BF16);
  expect_cuda(op, "w_I", w_I, DType::BF16);
  const int64_t B = q_main.size(0), T = q_main.size(1);
  expect_shape(op, "q_I", q_I, {B, T, -1, -1});
  expect_shape(op, "k_I", k_I, {B, T, q_I.size(3)});
  expect_shape(op, "w_I", w_I, {B, T, q_I.size(2)});
}

double host_sum(const Tensor& x) {
  const Tensor h = x.to(Device::CPU);
  const float* p = h.data<float>();
  double s = 0;
  for (int64_t i = 0; i < h.numel(); ++i) s += p[i];
  return s;
}

// ------------------------------------------------------------------------------------------ sparse

struct SparseKlParams {
  const float* S;             // [R, H, K] scaled main scores of the gathered rows
  const float* lse;           // [B, H, T] (sparse attention's)
  const int32_t* idx;         // [B, T, K]
  const __nv_bfloat16* qs;    // [B, T, Hi, D] scoring operands (fp8-dequantized or q_I)
  const __nv_bfloat16* ks;    // [B, T, D]
  const __nv_bfloat16* qi;    // [B, T, Hi, D] unquantized (backward)
  const __nv_bfloat16* ki;    // [B, T, D]
  const __nv_bfloat16* w;     // [B, T, Hi]
  float* row_loss;            // [B, T]
  float* counted;             // [B, T]
  __nv_bfloat16* dq;          // [B, T, Hi, D] or null
  __nv_bfloat16* dw;          // [B, T, Hi]
  float* dk;                  // [B, T, D] f32 (atomics)
  int T, H, Hi, D, K;
  int64_t bt0;
  float c, gs;
};

constexpr int kSparseWarps = 8;

__global__ void __launch_bounds__(kSparseWarps * 32) sparse_kl_kernel(SparseKlParams p) {
  extern __shared__ float sm[];
  const int DP = p.D + 1;
  float* pk = sm;                        // [K] target mass per slot
  float* Ik = pk + p.K;                  // [K] scores, then dI
  float* qsm = Ik + p.K;                 // [Hi, D+1]
  float* kbuf = qsm + p.Hi * DP;         // [warps, D]
  float* dqa = kbuf + kSparseWarps * p.D;  // [Hi, D]
  float* dwa = dqa + p.Hi * p.D;         // [Hi]
  float* gbuf = dwa + p.Hi;              // [warps, Hi]
  __shared__ float red[32];
  const int r = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bt = p.bt0 + r, b = bt / p.T, t = bt % p.T;
  const int32_t* ir = p.idx + bt * p.K;
  for (int i = tid; i < p.Hi * p.D; i += blockDim.x)
    qsm[(i / p.D) * DP + i % p.D] = __bfloat162float(p.qs[bt * p.Hi * p.D + i]);
  __syncthreads();
  for (int k = warp; k < p.K; k += kSparseWarps) {
    const int32_t s = ir[k];
    if (s < 0) {
      if (lane == 0) { pk[k] = -1.f; Ik[k] = -INFINITY; }
      continue;
    }
    float a = 0.f;
    for (int h = lane; h < p.H; h += 32)
      a += expf(p.S[(static_cast<int64_t>(r) * p.H + h) * p.K + k] - p.lse[(b * p.H + h) * p.T + t]);
    a = warp_sum(a);
    float* kb = kbuf + warp * p.D;
    for (int i = lane; i < p.D; i += 32) kb[i] = __bfloat162float(p.ks[(b * p.T + s) * p.D + i]);
    __syncwarp();
    float sc = 0.f;
    for (int j = lane; j < p.Hi; j += 32) {
      float z = 0.f;
      for (int i = 0; i < p.D; ++i) z += qsm[j * DP + i] * kb[i];
      sc += __bfloat162float(p.w[bt * p.Hi + j]) * p.c * fmaxf(z, 0.f);
    }
    sc = warp_sum(sc);
    __syncwarp();
    if (lane == 0) { pk[k] = a; Ik[k] = sc; }
  }
  __syncthreads();
  float psum = 0.f, imax = -INFINITY, nvalid = 0.f;
  for (int k = tid; k < p.K; k += blockDim.x)
    if (pk[k] >= 0.f) { psum += pk[k]; imax = fmaxf(imax, Ik[k]); nvalid += 1.f; }
  psum = block_sum(psum, red);
  imax = block_max(imax, red);
  nvalid = block_sum(nvalid, red);
  float z = 0.f;
  for (int k = tid; k < p.K; k += blockDim.x)
    if (pk[k] >= 0.f) z += expf(Ik[k] - imax);
  z = block_sum(z, red);
  const float log_z = imax + logf(z);
  float kl = 0.f;
  __syncthreads();
  for (int k = tid; k < p.K; k += blockDim.x) {
    if (pk[k] < 0.f) { Ik[k] = 0.f; continue; }
    const float pt = pk[k] / psum, log_q = Ik[k] - log_z;
    if (pt > 0.f) kl += pt * (logf(pt) - log_q);
    Ik[k] = p.gs * (expf(log_q) - pt);
  }
  kl = block_sum(kl, red);
  if (tid == 0) {
    p.row_loss[bt] = nvalid > 0.f ? kl : 0.f;
    p.counted[bt] = nvalid > 0.f ? 1.f : 0.f;
  }
  if (!p.dq) return;
  // Backward through the unquantized scores.
  for (int i = tid; i < p.Hi * p.D; i += blockDim.x) {
    qsm[(i / p.D) * DP + i % p.D] = __bfloat162float(p.qi[bt * p.Hi * p.D + i]);
    dqa[i] = 0.f;
  }
  for (int j = tid; j < p.Hi; j += blockDim.x) dwa[j] = 0.f;
  __syncthreads();
  for (int k = warp; k < p.K; k += kSparseWarps) {
    const int32_t s = ir[k];
    if (s < 0 || nvalid == 0.f) continue;
    const float g = Ik[k];
    float* kb = kbuf + warp * p.D;
    float* gb = gbuf + warp * p.Hi;
    for (int i = lane; i < p.D; i += 32) kb[i] = __bfloat162float(p.ki[(b * p.T + s) * p.D + i]);
    __syncwarp();
    for (int j = lane; j < p.Hi; j += 32) {
      float zz = 0.f;
      for (int i = 0; i < p.D; ++i) zz += qsm[j * DP + i] * kb[i];
      float gj = 0.f;
      if (zz > 0.f) {
        atomicAdd(&dwa[j], g * p.c * zz);
        gj = g * __bfloat162float(p.w[bt * p.Hi + j]) * p.c;
      }
      gb[j] = gj;
    }
    __syncwarp();
    for (int i = lane; i < p.D; i += 32) {
      float acc = 0.f;
      for (int j = 0; j < p.Hi; ++j) {
        const float gj = gb[j];
        if (gj != 0.f) {
          acc += gj * qsm[j * DP + i];
          atomicAdd(&dqa[j * p.D + i], gj * kb[i]);
        }
      }
      atomicAdd(p.dk + (b * p.T + s) * p.D + i, acc);
    }
    __syncwarp();
  }
  __syncthreads();
  for (int i = tid; i < p.Hi * p.D; i += blockDim.x) p.dq[bt * p.Hi * p.D + i] = __float2bfloat16_rn(dqa[i]);
  for (int j = tid; j < p.Hi; j += blockDim.x) p.dw[bt * p.Hi + j] = __float2bfloat16_rn(dwa[j]);
}

}  // namespace

ops::IndexerLossResult indexer_kl_sparse(const Tensor& q_main, const Tensor& kv, const Tensor& lse_sparse,
                                         double scale, const Tensor& indices, const Tensor& q_I, const Tensor& k_I,
                                         const Tensor& w_I, bool fp8, double grad_scale, ops::IndexerGrads* grads) {
  const char* op = "indexer_kl_sparse";
  expect_cuda(op, "q_main", q_main, DType::BF16);
  expect_cuda(op, "kv", kv, DType::BF16);
  expect_cuda(op, "lse_sparse", lse_sparse, DType::F32);
  expect_shape(op, "q_main", q_main, {-1, -1, -1, -1});
  const int64_t B = q_main.size(0), T = q_main.size(1), H = q_main.size(2), Dk = q_main.size(3);
  expect_shape(op, "kv", kv, {B, T, Dk});
  expect_shape(op, "lse_sparse", lse_sparse, {B, H, T});
  check_indices_gpu(op, indices, B, T);
  check_indexer_gpu(op, q_main, q_I, k_I, w_I);
  const int64_t Hi = q_I.size(2), D = q_I.size(3), K = indices.size(2);
  Tensor qs = q_I, ks = k_I;
  if (fp8) indexer_fp8_operands(q_I, k_I, &qs, &ks);
  ops::IndexerLossResult res;
  if (grads) {
    grads->dq = Tensor::empty(q_I.shape(), DType::BF16, Device::CUDA);
    grads->dk = Tensor::empty(k_I.shape(), DType::BF16, Device::CUDA);
    grads->dw = Tensor::empty(w_I.shape(), DType::BF16, Device::CUDA);
  }
  const int64_t N = B * T;
  if (N == 0) return res;
  Tensor dk32 = grads ? Tensor::zeros(k_I.shape(), DType::F32, Device::CUDA) : Tensor();
  Tensor row_loss = Tensor::zeros({B, T}, DType::F32, Device::CUDA);
  Tensor counted = Tensor::zeros({B, T}, DType::F32, Device::CUDA);
  if (K > 0) {
    const int64_t rb = rows_for_budget(N, K * Dk * 2 + H * K * 4, int64_t(512) << 20);
    Tensor kvg = Tensor::empty({rb, K, Dk}, DType::BF16, Device::CUDA);
    Tensor S = Tensor::empty({rb, H, K}, DType::F32, Device::CUDA);
    const size_t smem = sizeof(float) * (2 * K + Hi * (D + 1) + kSparseWarps * D + Hi * D + Hi + kSparseWarps * Hi);
    DSA_CHECK(smem <= 200 * 1024, "[", op, "] K=", K, " Hi=", Hi, " D=", D, " needs too much shared memory");
    cudaFuncSetAttribute(sparse_kl_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    for (int64_t bt0 = 0; bt0 < N; bt0 += rb) {
      const int64_t R = std::min(N, bt0 + rb) - bt0;
      gather_rows(bf(kv), indices.data<int32_t>(), T, Dk, K, bt0, R, bf(kvg), op);
      RowGemm m;  // S_r [H, K] = scale * q_r [H, Dk] kvg_r [K, Dk]^T
      m.tb = true;
      m.M = H; m.N = K; m.K = Dk;
      m.A = bf(q_main) + bt0 * H * Dk; m.lda = Dk; m.strideA = H * Dk;
      m.B = bf(kvg); m.ldb = Dk; m.strideB = K * Dk;
      m.C = S.data<float>(); m.ldc = K; m.strideC = H * K;
      m.alpha = static_cast<float>(scale);
      m.batch = R;
      row_gemm(op, m);
      SparseKlParams p{S.data<float>(), lse_sparse.data<float>(), indices.data<int32_t>(), bf(qs), bf(ks), bf(q_I),
                       bf(k_I), bf(w_I), row_loss.data<float>(), counted.data<float>(),
                       grads ? bf(grads->dq) : nullptr, grads ? bf(grads->dw) : nullptr,
                       grads ? dk32.data<float>() : nullptr, (int)T, (int)H, (int)Hi, (int)D, (int)K, bt0,
                       1.0f / std::sqrt(static_cast<float>(D)), static_cast<float>(grad_scale)};
      sparse_kl_kernel<<<static_cast<unsigned>(R), kSparseWarps * 32, smem, stream()>>>(p);
      check_launch(op);
    }
  } else if (grads) {
    grads->dq.zero_();
    grads->dw.zero_();
  }
  if (grads) cast_f32_to_bf16(dk32.data<float>(), bf(grads->dk), dk32.numel(), op);
  res.loss_sum = host_sum(row_loss);
  res.rows = static_cast<int64_t>(std::llround(host_sum(counted)));
  return res;
}

}  // namespace dsa::cuda
