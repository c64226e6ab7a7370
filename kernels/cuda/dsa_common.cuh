// Internal helpers of the DSA CUDA kernels (sm90_*_indexer.cu, sm90_bf16_sparse_attention.cu,
// any_bf16_indexer_loss.cu): a row-major batched bf16 GEMM on cuBLASLt, casts and small device helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"
#include "kernels/dsa_ops.h"
#include "kernels/tensor.h"

namespace dsa::cuda::dsa_detail {

// C[M, N] = alpha * op(A) op(B) + beta * C, all row-major with leading dims, `batch` times with element
// strides. A and B bf16 (op(A) = A [M, K] or, with ta, A stored [K, M]; op(B) = B [K, N] or, with tb,
// B stored [N, K]); C f32 or bf16; compute f32.
struct RowGemm {
  bool ta = false, tb = false;
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;  // bf16
  int64_t lda = 0, strideA = 0;
  const void* B = nullptr;  // bf16
  int64_t ldb = 0, strideB = 0;
  void* C = nullptr;  // c_type
  int64_t ldc = 0, strideC = 0;
  DType c_type = DType::F32;
  float alpha = 1.f, beta = 0.f;
  int64_t batch = 1;
};
void row_gemm(const char* op, const RowGemm& g);

// dst bf16 [n] = src f32 [n]
void cast_f32_to_bf16(const float* src, __nv_bfloat16* dst, int64_t n, const char* op);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned grid_1d(int64_t n, int threads) {
  const int64_t g = ceil_div(n, threads);
  return static_cast<unsigned>(g < 1 ? 1 : (g > (1 << 20) ? (1 << 20) : g));
}

inline void expect_cuda(const char* op, const char* name, const Tensor& t, DType dt) {
  DSA_CHECK(t.defined() && t.device() == Device::CUDA && t.dtype() == dt, "[", op, "] ", name, " must be ",
            dtype_name(dt), " on cuda, got ", t.defined() ? t.desc() : std::string("undefined"));
}

// Rows per streamed block so that `bytes_per_row` * rows stays near `budget` bytes.
inline int64_t rows_for_budget(int64_t total, int64_t bytes_per_row, int64_t budget) {
  int64_t r = budget / (bytes_per_row > 0 ? bytes_per_row : 1);
  if (r < 1) r = 1;
  return r < total ? r : total;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide reductions (blockDim.x a multiple of 32, <= 1024); `red` is 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  float s = 0;
  for (int i = 0; i < nw; ++i) s += red[i];  // fixed order: deterministic
  return s;
}
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  float s = -INFINITY;
  for (int i = 0; i < nw; ++i) s = fmaxf(s, red[i]);
  return s;
}

// Quad reduce-scatter of the indexer scoring epilogues (mma.sync and wgmma): the 4 lanes of an MMA quad
// (c4 = lane & 3) each hold NV partial sums of the same NV (query, key) entries; lane c4 ends with the
// full sums of entries (c4 >> 1) * NV / 2 + (c4 & 1) * NV / 4 + i in x[i], i < NV / 4.
// NV / 2 + NV / 4 shuffles instead of NV / 2 butterflies of NV each.
template <int NV>
__device__ __forceinline__ void quad_reduce_scatter(const float (&v)[NV], float (&x)[NV / 4], int c4) {
  static_assert(NV >= 4 && NV % 4 == 0, "quad_reduce_scatter: NV must be a multiple of 4");
  const bool hi2 = c4 & 2, hi1 = c4 & 1;
  float u[NV / 2];
#pragma unroll
  for (int i = 0; i < NV / 2; ++i) {
    const float send = hi2 ? v[i] : v[i + NV / 2];
    u[i] = (hi2 ? v[i + NV / 2] : v[i]) + __shfl_xor_sync(0xffffffffu, send, 2);
  }
#pragma unroll
  for (int i = 0; i < NV / 4; ++i) {
    const float send = hi1 ? u[i] : u[i + NV / 4];
    x[i] = (hi1 ? u[i + NV / 4] : u[i]) + __shfl_xor_sync(0xffffffffu, send, 1);
  }
}

}  // namespace dsa::cuda::dsa_detail

namespace dsa::cuda::dsa_detail {
// kvg [R, K, Dk] bf16 = kv[b, idx[bt, k]] for flat tokens bt = bt0 .. bt0 + R - 1 (b = bt / T); rows of
// invalid slots (-1) are zero. Defined in sm90_bf16_sparse_attention.cu.
void gather_rows(const __nv_bfloat16* kv /*[B, T, Dk]*/, const int32_t* idx /*[B, T, K]*/, int64_t T, int64_t Dk,
                 int64_t K, int64_t bt0, int64_t R, __nv_bfloat16* kvg /*[R, K, Dk]*/, const char* op);
// Checks indices i32 [B, T, K] on cuda (values are checked by the kernels' -1 test only: on the GPU an
// index outside [0, t] is the caller's contract, as documented in dsa_ops.h).
void check_indices_gpu(const char* op, const Tensor& idx, int64_t B, int64_t T);
// Indexer operands bf16 on the GPU: q_I [B, T, Hi, D], k_I [B, T, D], w_I [B, T, Hi], with B and T those
// of `ref` ([B, T, ...]: the main queries, or q_I itself).
inline void check_indexer_gpu(const char* op, const Tensor& ref, const Tensor& q_I, const Tensor& k_I,
                              const Tensor& w_I) {
  expect_cuda(op, "q_I", q_I, DType::BF16);
  expect_cuda(op, "k_I", k_I, DType::BF16);
  expect_cuda(op, "w_I", w_I, DType::BF16);
  const int64_t B = ref.size(0), T = ref.size(1);
  expect_shape(op, "q_I", q_I, {B, T, -1, -1});
  expect_shape(op, "k_I", k_I, {B, T, q_I.size(3)});
  expect_shape(op, "w_I", w_I, {B, T, q_I.size(2)});
}
// Sum of an f32 tensor, copied to the host and added in index order (deterministic).
inline double host_sum(const Tensor& x) {
  const Tensor h = x.to(Device::CPU);
  const float* p = h.data<float>();
  double s = 0;
  for (int64_t i = 0; i < h.numel(); ++i) s += p[i];
  return s;
}
// The sparse attention kernels' parameters (the mma.sync kernels of sm90_bf16_sparse_attention_mma.cu and
// the wgmma ones of sm90_bf16_sparse_attention_fwd_wgmma.cu / _wgmma_h16.cu), one struct for the family.
struct SparseAttnParams {
  const __nv_bfloat16* q;     // [B, T, H, Dk]
  const __nv_bfloat16* kv;    // [B, T, Dk]
  const int32_t* idx;         // [B, T, K], -1 = invalid
  __nv_bfloat16* out;         // [B, T, H, Dv] (forward)
  float* lse;                 // [B, H, T] (written by the forward, read by the backward)
  const __nv_bfloat16* dout;  // [B, T, H, Dv] (backward)
  const float* delta;         // [B * T, H] = rowsum(dout * out) (backward)
  __nv_bfloat16* dq;          // [B, T, H, Dk] (backward)
  float* dkv;                 // [B, T, Dk] f32, zeroed, scatter-accumulated (backward)
  float* probs;               // [B, T, K] f32, zeroed, head sums of the probabilities accumulated (the
                              // probs pass, or a backward when non-null)
  int B, T, H, K;
  float scale;
};
// q, kv, idx, B, T, H, K and scale of checked inputs (the rest null).
inline SparseAttnParams sparse_attn_params(const Tensor& q, const Tensor& kv, const Tensor& idx, double scale) {
  SparseAttnParams p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data<bf16>());
  p.kv = reinterpret_cast<const __nv_bfloat16*>(kv.data<bf16>());
  p.idx = idx.data<int32_t>();
  p.B = static_cast<int>(q.size(0));
  p.T = static_cast<int>(q.size(1));
  p.H = static_cast<int>(q.size(2));
  p.K = static_cast<int>(idx.size(2));
  p.scale = static_cast<float>(scale);
  return p;
}
// Fused tensor-core sparse attention (sm90_bf16_sparse_attention_mma.cu) on checked inputs: false (nothing
// launched) when (H, Dk, Dv) has no instantiation. out bf16 [B, T, H, Dv], lse f32 [B, H, T] written;
// probs_sum f32 [B, T, K] (zeroed by the caller; undefined = not needed) accumulated with the head sums;
// backward: dq bf16 [B, T, H, Dk] written, dkv32 f32 [B, T, Dk] (zeroed by the caller) accumulated.
bool sparse_attention_mma_forward(const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices, double scale,
                                  Tensor& out, Tensor& lse, Tensor& probs_sum);
bool sparse_attention_mma_backward(const Tensor& dout, const Tensor& q, const Tensor& kv, int64_t dv,
                                   const Tensor& indices, const Tensor& out, const Tensor& lse, double scale,
                                   Tensor& dq, Tensor& dkv32, Tensor& probs_sum /*undefined: not wanted*/);
// The wgmma kernels, on the parameters sparse_attention_mma_forward / _backward built (shapes checked there:
// (Dk, Dv) (576, 512) or (288, 256), H % 16 == 0): false, launching nothing, where they do not apply (switch
// off, no sm_90a code, or the shape below). The forward writes out and lse (p.out, p.lse); the backward dq,
// dkv and probs (p.dq, p.dkv, p.probs) from p.lse and p.delta. Both try them first.
//  - H % 64 == 0: 64 heads per CTA, sm90_bf16_sparse_attention_fwd_wgmma.cu and _bwd_wgmma.cu (Dk 576 only);
//  - else 16 heads per CTA with the gathered keys as M, sm90_bf16_sparse_attention_wgmma_h16.cu (its forward
//    only under DSA_SPARSE_ATTN_WGMMA=1: slower than the mma.sync kernel, docs/perf_log.md v12).
bool sparse_attention_wgmma_forward(const SparseAttnParams& p, int dk, int dv);
bool sparse_attention_wgmma_backward(const SparseAttnParams& p, int dk, int dv);
// The warp-specialized forward at (576, 512), H % 64 == 0 (sm90_bf16_sparse_attention_fwd_wgmma_ws.cu): taken
// in place of the two-warpgroup kernel unless DSA_SPARSE_ATTN_FWD_WS=0 (1 or unset: taken; anything else
// refused, read at each call; docs/perf_log.md v24, v25).
void sparse_attention_fwd_ws(const SparseAttnParams& p);
bool sparse_attention_fwd_ws_enabled();
bool sparse_attention_wgmma16_forward(const SparseAttnParams& p, int dk, int dv);
bool sparse_attention_wgmma16_backward(const SparseAttnParams& p, int dk, int dv);
// DSA_SPARSE_ATTN_WGMMA, read at each call: unset = where measured faster (kMeasured), 0 = never, 1 = every
// wgmma kernel (the tests and the ops bench); kOff without sm_90a code. Another value is refused.
enum class SparseWgmmaMode { kOff, kMeasured, kAll };
SparseWgmmaMode sparse_attention_wgmma_mode();
}  // namespace dsa::cuda::dsa_detail

namespace dsa::cuda::dsa_detail {
// The indexer's scoring operands: fp8 codes + f32 scales of hadamard(q_I), hadamard(k_I), or the bf16
// q_I, k_I themselves (fp8 = false). Defined in sm90_fp8_indexer.cu.
struct ScoreOperands {
  Tensor q, k;              // [B, T, Hi, D], [B, T, D]: f8e4m3 codes or bf16
  Tensor q_scale, k_scale;  // [B*T*Hi, nb], [B*T, nb] f32 (fp8 only)
  bool fp8 = false;
};
ScoreOperands make_operands(const Tensor& q_I, const Tensor& k_I, bool fp8);
// out [B, R, T] f32: scores of rows t0 .. t0 + R - 1 against keys s <= t (other entries untouched).
void launch_scores(const ScoreOperands& o, const Tensor& w_I /*[B, T, Hi] bf16*/, int B, int T, int Hi, int D, int t0,
                   int R, float* out);
// The same scores on wgmma (sm90_fp8_indexer_scores_wgmma.cu): returns false, launching nothing, where it does
// not apply (bf16, Hi not 16/32/64, D not 64/128, no sm_90a code, DSA_INDEXER_WGMMA=0, read at each call; another
// value than 0, 1 or unset is refused); launch_scores tries it first.
bool launch_scores_wgmma(const ScoreOperands& o, const Tensor& w_I, int B, int T, int Hi, int D, int t0, int R,
                         float* out);
bool wgmma_available();  // an sm_90 device and this build's sm_90a code
// Causal top-k of score rows t = t0 + r (sm90_f32_topk_causal.cu): scores [B, R, T] f32 -> out rows
// out_row0 .. out_row0 + R - 1 of [B, T_out, K] i32 in `order`; values (may be null) the same rows of
// [B, T_out, K] f32, the winners' scores.
void launch_topk(const float* scores, int B, int R, int T, int t0, int K, ops::TopkOrder order, int32_t* out, int T_out,
                 int out_row0, float* values);
}  // namespace dsa::cuda::dsa_detail
