// DeepSeek Sparse Attention ops: the lightning indexer (Hadamard, FP8 block quantization, scoring,
// top-k), sparse MQA attention over the selected tokens, and the indexer's KL losses and recall.
// Same conventions as kernels/ops.h: shapes checked at entry, errors start with "[op]", CPU compute in
// f32 or f64 (every float tensor of one call shares the dtype), indices i32. Calls whose operands live on
// Device::CUDA run the CUDA implementations of kernels/cuda/ops_dsa.h (bf16 operands, f32 statistics);
// every operand of one call is on one device.
//
// Files:
//   kernels/indexer.cpp            hadamard_transform, fp8 block quantization, indexer scores fwd/bwd, top-k
//   kernels/sparse_attention.cpp   sparse MQA attention fwd/bwd (gather by index, scatter-add gradients)
//   kernels/indexer_loss.cpp       dense and sparse indexer KL losses (blockwise), indexer recall
//
// Symbols (per batch b; B batch, T sequence, Hi = index_n_heads, D = index_head_dim, H = attention
// heads, Dk = kv_lora_rank + qk_rope_head_dim, Dv = kv_lora_rank, K = index_topk):
//   q_I [B, T, Hi, D]  indexer queries, after RoPE (pre-Hadamard, unquantized)
//   k_I [B, T, D]      indexer keys, after LayerNorm and RoPE (pre-Hadamard, unquantized)
//   w_I [B, T, Hi]     head weights = weights_proj(x) * Hi^-0.5
//   I[b,t,s] = sum_j w_I[b,t,j] * D^-0.5 * relu(q_I[b,t,j] . k_I[b,s])   for s <= t
//
// Detach semantics enforced by the API: the losses take the main attention's q/k/kv/lse as read-only
// inputs and return no gradient for them (the target p is a stop-gradient), and the indices are
// integer inputs (no gradient through the selection). Detaching the indexer's own inputs (x, c_q) from
// the main graph is the model's switch: these ops only return dq_I, dk_I, dw_I.
#pragma once

#include <cstdint>

#include "kernels/tensor.h"

namespace dsa::ops {

// --------------------------------------------------------------------------------------- hadamard
// y = x H_d / sqrt(d) along the last dim (fast Walsh-Hadamard, Sylvester order), d a power of two.
// The normalized transform is symmetric and orthogonal, hence its own inverse and transpose: the
// backward of y = hadamard(x) is dx = hadamard(dy).  x [..., d] f32/f64 -> [..., d].
Tensor hadamard_transform(const Tensor& x);

// ------------------------------------------------------------------------------------------- fp8
constexpr int64_t kFp8BlockSize = 128;  // values per scale
// Power-of-two scale of one block: 2^ceil(log2(max(amax, 1e-4) * (1/448))), computed in f32 with the
// exponent taken from the bits (as DeepSeek's reference and the GPU kernels do).
float fp8_block_scale(float amax);
// Codes and scales. x [N, d] f32/f64 (values first rounded to f32); blocks of `block` consecutive
// values in each row (the last block of a row may be shorter when block does not divide d).
struct Fp8Blocks {
  Tensor codes;   // [N, d] f8e4m3: f32_to_fp8e4m3(x / scale) (round to nearest even, saturate at 448)
  Tensor scales;  // [N, ceil(d / block)] f32, powers of two
};
Fp8Blocks fp8_block_quantize_codes(const Tensor& x, int64_t block);
// x_hat [N, d] (dtype) = fp8e4m3_to_f32(codes) * scale.
Tensor fp8_block_dequantize(const Fp8Blocks& q, int64_t block, DType dtype);
// x_hat = dequant(quant(x)), same shape and dtype as x [N, d]; scales_out [N, ceil(d/block)] f32
// (nullptr = not needed).
Tensor fp8_block_quantize(const Tensor& x, int64_t block, Tensor* scales_out);
// The indexer's FP8 view of its operands: q_hat = fp8(hadamard(q_I)) with one scale per token-head
// (per 128 values), k_hat = fp8(hadamard(k_I)) with one scale per token. Shapes as q_I and k_I.
void indexer_fp8_operands(const Tensor& q_I, const Tensor& k_I, Tensor* q_hat, Tensor* k_hat);

// ------------------------------------------------------------------------------- indexer scoring
// Scores of query rows t in [t0, t1) against every key: I [B, t1 - t0, T], with I[b, r, s] for
// s <= t0 + r and -inf elsewhere (the causal mask). Memory O(B * (t1 - t0) * T): callers stream row blocks.
Tensor indexer_scores_forward(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t t0, int64_t t1);
// Backward of indexer_scores_forward for the same row block: dI [B, t1 - t0, T] (masked entries are
// ignored). ACCUMULATES (+=) into dq_I [B, T, Hi, D] (rows t0..t1-1 only), dk_I [B, T, D] and
// dw_I [B, T, Hi], so a caller zeroes them once and adds every row block. Any pointer may be null.
void indexer_scores_backward(const Tensor& dI, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t t0,
                             Tensor* dq_I, Tensor* dk_I, Tensor* dw_I);

// --------------------------------------------------------------------------------------- top-k
// Order of a row's selected slots. The set is the same either way: the K highest scores, equal scores
// ranked by lower index (NaN below -inf).
//   kScore: higher score first, equal scores lower index first (torch.topk's sorted order).
//   kIndex: ascending key index. Attention and the indexer losses do not depend on the slots' order
//           (up to the summation order of their floating-point sums); on the GPU this order needs no sort
//           of the winners (docs/perf_log.md v13), and gathers read the keys in address order.
enum class TopkOrder { kScore, kIndex };
const char* topk_order_name(TopkOrder o);  // "score" / "index"

// Top-k of score rows t = t0 + r over s <= t: scores [B, R, T] (entries s > t are ignored) ->
// indices [B, R, K] i32 in `order`. Every s <= t is selected when t + 1 <= K; unused slots (after the
// valid ones) hold -1.
Tensor topk_causal(const Tensor& scores, int64_t t0, int64_t topk, TopkOrder order = TopkOrder::kScore);
// S_t for every token: indices [B, T, K] i32, scored row block by row block (never [B, T, T]).
// fp8 = true scores the indexer_fp8_operands (Hadamard + FP8, as in production); fp8 = false scores
// the unquantized q_I, k_I in f32/f64 (ablation and reference). block_rows: query rows per streamed
// block (0 = automatic, about 32 MiB of scores); the result does not depend on it. scores_out (may be
// null) gets [B, T, K] the selected slots' scores (-inf on -1 slots; CPU: q_I's dtype, CUDA: f32), which
// indexer_kl_sparse_from_probs can take instead of scoring the slots again. Slots in `order` (topk_causal's).
Tensor indexer_topk(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t topk, bool fp8,
                    int64_t block_rows = 0, Tensor* scores_out = nullptr, TopkOrder order = TopkOrder::kScore);

// ------------------------------------------------------------------------------ sparse attention
// MQA-form attention of each query over its selected latent rows (slots with index -1 are skipped;
// an index must satisfy 0 <= s <= t; a duplicated index is one softmax term per slot):
//   p[b,t,h,k] = softmax_k(scale * q[b,t,h] . kv[b, idx[b,t,k]])   over the valid slots k
//   out[b,t,h] = sum_k p[b,t,h,k] * kv[b, idx[b,t,k], 0:Dv]
// q [B, T, H, Dk] (absorbed queries), kv [B, T, Dk] (latent rows [c_kv | k_pe]; the values are their
// first Dv dims), indices [B, T, K] i32 -> out [B, T, H, Dv]; lse_out [B, H, T] (nullptr = not needed)
// gets each row's log-sum-exp of the scaled scores (-inf and out = 0 for a row without valid slots).
// probs_sum_out [B, T, K] (nullptr = not needed; CPU: q's dtype, CUDA: f32) gets, per slot, the sum over
// heads of that slot's attention probability p[b,t,h,k] (0 for -1 slots; a duplicated index gets each
// slot's own term): the sparse indexer loss's target before renormalization (indexer_kl_sparse_from_probs).
Tensor sparse_attention_forward(const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices, double scale,
                                Tensor* lse_out, Tensor* probs_sum_out = nullptr);
struct SparseAttentionGrads {
  Tensor dq;         // [B, T, H, Dk]
  Tensor dkv;        // [B, T, Dk]: scatter-added over every (query, head, slot) that selected the row
  Tensor probs_sum;  // [B, T, K] when asked for: the forward's probs_sum_out, recomputed by the backward
};
SparseAttentionGrads sparse_attention_backward(const Tensor& dout /*[B, T, H, Dv]*/, const Tensor& q,
                                               const Tensor& kv, int64_t dv, const Tensor& indices,
                                               const Tensor& out /*[B, T, H, Dv]*/, const Tensor& lse /*[B, H, T]*/,
                                               double scale, bool probs_sum = false);

// --------------------------------------------------------------------------------- indexer loss
struct IndexerLossResult {
  double loss_sum = 0;  // sum over rows of KL(p_t || softmax(I_t))
  int64_t rows = 0;     // rows counted (tokens with at least one key)
};
struct IndexerGrads {
  Tensor dq;  // [B, T, Hi, D]
  Tensor dk;  // [B, T, D]
  Tensor dw;  // [B, T, Hi]
};
// Dense (warm-up) loss. Target p[t, s] = sum_h A_h[t, s] / sum_{s'<=t} sum_h A_h[t, s'] over s <= t, with
// A_h[t, s] = exp(scale * q_main[t, h] . k_main[s, h / (H / Hk)] - lse_main[h, t]) rebuilt block by block
// (q_main [B, T, H, Dk], k_main [B, T, Hk, Dk] with Hk dividing H, lse_main [B, H, T] from the main
// dense attention). softmax(I) over s <= t. When grads is non-null it receives fresh gradients of
// grad_scale * loss_sum w.r.t. q_I, k_I, w_I (dI = grad_scale * (softmax(I) - p)).
// fp8: I in the forward is scored on indexer_fp8_operands; the backward always differentiates the
// unquantized scores (straight-through over the FP8 rounding). block_rows as in indexer_topk.
IndexerLossResult indexer_kl_dense(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main, double scale,
                                   const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, bool fp8,
                                   double grad_scale, IndexerGrads* grads, int64_t block_rows = 0);
// Query rows per chunk of the GPU dense loss's gradient, whose f32 dI chunk [B, rows, T] is its workspace:
// about 256 MiB, and at least 32768 / Hi rows (the dq kernel's CTAs of 64 (row, head) pairs fill the GPU
// at long context: 512 rows at T = 128K left it 128 CTAs); never more than T. The memory plan reads it.
int64_t dense_kl_chunk_rows(int64_t B, int64_t T, int64_t Hi);
// Sparse loss over S_t = the valid slots of indices [B, T, K]: target p over S_t from the sparse
// attention (q_main [B, T, H, Dk], kv [B, T, Dk], lse_sparse [B, H, T] from sparse_attention_forward
// with the same indices and scale), renormalized over S_t; softmax(I) over S_t. Other arguments as
// indexer_kl_dense.
IndexerLossResult indexer_kl_sparse(const Tensor& q_main, const Tensor& kv, const Tensor& lse_sparse, double scale,
                                    const Tensor& indices, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I,
                                    bool fp8, double grad_scale, IndexerGrads* grads);
// The same loss with the target taken from probs_sum [B, T, K] (sparse_attention_forward's probs_sum_out for
// these indices): p = probs_sum renormalized over the valid slots of S_t, exactly indexer_kl_sparse's
// target, without recomputing the main attention scores. probs_sum: CPU q_I's dtype, CUDA f32.
// slot_scores (may be null): [B, T, K] the indexer scores of the slots (indexer_topk's scores_out for the
// same operands and fp8 flag), used as I instead of scoring the slots again (the forward's gather); the
// backward still reads the unquantized rows.
IndexerLossResult indexer_kl_sparse_from_probs(const Tensor& probs_sum, const Tensor& indices, const Tensor& q_I,
                                               const Tensor& k_I, const Tensor& w_I, bool fp8, double grad_scale,
                                               IndexerGrads* grads, const Tensor* slot_scores = nullptr);
// Recall of the selection: per row, the mass of the dense head-summed, L1-normalized attention p[t, :]
// (as in indexer_kl_dense) that falls on the distinct valid indices of S_t; summed over rows.
struct IndexerRecall {
  double recall_sum = 0;
  int64_t rows = 0;
  double mean() const { return rows ? recall_sum / static_cast<double>(rows) : 0.0; }
};
IndexerRecall indexer_recall(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main, double scale,
                             const Tensor& indices, int64_t block_rows = 0);

}  // namespace dsa::ops
