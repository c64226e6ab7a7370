// CUDA implementations of the DeepSeek Sparse Attention ops of kernels/dsa_ops.h (namespace dsa::cuda).
// The public entries in kernels/indexer.cpp, sparse_attention.cpp and indexer_loss.cpp dispatch here
// when their inputs live on Device::CUDA; the semantics are those of dsa_ops.h.
//
// GPU dtypes: q_I bf16 [B, T, Hi, D], k_I bf16 [B, T, D], w_I bf16 [B, T, Hi]; main-attention q / k / kv
// bf16, lse f32; indices i32; indexer gradients bf16 (accumulated in f32 scratch); scores f32.
#pragma once

#include <cstdint>

#include "kernels/dsa_ops.h"

namespace dsa::cuda {

// x [..., d] f32 or bf16 (d a power of two) -> same shape and dtype; computed in f32 with the CPU's
// butterfly order, so f32 inputs give bit-identical results.
Tensor hadamard_transform(const Tensor& x);
// x [N, d] f32 or bf16 -> codes [N, d] f8e4m3, scales [N, ceil(d / block)] f32 (bit-identical to the CPU).
ops::Fp8Blocks fp8_block_quantize_codes(const Tensor& x, int64_t block);
// codes -> [N, d] of dtype f32 or bf16.
Tensor fp8_block_dequantize(const ops::Fp8Blocks& q, int64_t block, DType dtype);
// dequant(quant(x)), same dtype as x (f32 or bf16); scales_out [N, ceil(d / block)] f32 or nullptr.
Tensor fp8_block_quantize(const Tensor& x, int64_t block, Tensor* scales_out);
// bf16 in, bf16 out (fp8 code * power-of-two scale is exact in bf16).
void indexer_fp8_operands(const Tensor& q_I, const Tensor& k_I, Tensor* q_hat, Tensor* k_hat);

// Scores of rows [t0, t1): f32 [B, t1 - t0, T], -inf above the diagonal (bf16 tensor-core dots).
Tensor indexer_scores_forward(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t t0, int64_t t1);
// scores f32 [B, R, T] -> indices i32 [B, R, K].
Tensor topk_causal(const Tensor& scores, int64_t t0, int64_t topk, ops::TopkOrder order);
Tensor indexer_topk(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t topk, bool fp8,
                    int64_t block_rows, Tensor* scores_out, ops::TopkOrder order);

// q bf16 [B, T, H, Dk], kv bf16 [B, T, Dk], indices i32 [B, T, K] -> out bf16 [B, T, H, Dv], lse f32 [B, H, T],
// probs_sum f32 [B, T, K] (optional).
Tensor sparse_attention_forward(const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices, double scale,
                                Tensor* lse_out, Tensor* probs_sum_out);
ops::SparseAttentionGrads sparse_attention_backward(const Tensor& dout, const Tensor& q, const Tensor& kv, int64_t dv,
                                                    const Tensor& indices, const Tensor& out, const Tensor& lse,
                                                    double scale, bool probs_sum);

ops::IndexerLossResult indexer_kl_dense(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main,
                                        double scale, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, bool fp8,
                                        double grad_scale, ops::IndexerGrads* grads, int64_t block_rows);
ops::IndexerLossResult indexer_kl_sparse(const Tensor& q_main, const Tensor& kv, const Tensor& lse_sparse,
                                         double scale, const Tensor& indices, const Tensor& q_I, const Tensor& k_I,
                                         const Tensor& w_I, bool fp8, double grad_scale, ops::IndexerGrads* grads);
// probs_sum f32 [B, T, K].
ops::IndexerLossResult indexer_kl_sparse_from_probs(const Tensor& probs_sum, const Tensor& indices, const Tensor& q_I,
                                                    const Tensor& k_I, const Tensor& w_I, bool fp8, double grad_scale,
                                                    ops::IndexerGrads* grads, const Tensor* slot_scores);
ops::IndexerRecall indexer_recall(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main, double scale,
                                  const Tensor& indices, int64_t block_rows);

}  // namespace dsa::cuda
