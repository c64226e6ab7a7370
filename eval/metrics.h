// The figures dsa-eval reports, as functions of plain inputs (CPU), so each can be checked against a
// hand-computed case (tests/eval). Running a model to get those inputs is eval/runner.h.
//
// Loss by position: held-out token losses summed in log-spaced position buckets [0, 512), [512, 2K),
// [2K, 8K), [8K, 32K), ... (edges 512 * 4^i), the last one cut at the sequence length. A token at
// position t (0-based in its window) is predicted from t+1 tokens of context.
//
// Indexer quality, for one layer and query rows t of one sequence (rows with t + 1 > K, where the
// selection is a real choice):
//   p[t, s]  = (1/H) sum_h softmax_s(scale * q[t,h] . k[s,h]),  s <= t   (the dense, head-summed attention,
//              L1-normalized: the warm-up's target)
//   recall   = sum of p[t, s] over the distinct valid indices of the indexer's selection S_t
//   oracle   = the largest recall any K keys can reach: the mass of p's own top-K (what a perfect
//              indexer would get; low when attention is diffuse)
//   overlap  = |S_t intersect D_t| / K, D_t = the top-K of p (higher first, equal values: lower index)
//   kl       = KL(p[t, :] || softmax(I[t, :])) over s <= t, I the indexer scores as the selection
//              computed them (FP8 or not)
// Means are over rows, each row counting once.
//
// Needle: a fact (data/retrieval.h) planted at a depth of a held-out haystack, its query at the end;
// correct when greedy decoding of the answer gives the value. NOTES: greedy decoding of the answer
// equals its teacher-forced argmaxes: if the argmax after each true prefix is the next true token, greedy
// decoding produces exactly the answer, and at the first wrong argmax it diverges. So one forward pass
// over [haystack, fact, query, answer] scores a needle (needle_correct).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/retrieval.h"
#include "kernels/tensor.h"

namespace dsa::eval {

// ---------------------------------------------------------------------------------- loss by position
struct Bucket {
  int64_t begin = 0, end = 0;  // positions [begin, end)
  double loss_sum = 0;
  int64_t tokens = 0;          // tokens with a target
  double mean() const { return tokens ? loss_sum / static_cast<double>(tokens) : 0.0; }
};
// [0, 512), [512, 2048), ... covering [0, T) (the last bucket ends at T).
std::vector<Bucket> position_buckets(int64_t T);
void add_buckets(std::vector<Bucket>& into, const std::vector<Bucket>& b);

// ---------------------------------------------------------------------------------- indexer quality
struct Quality {
  double recall = 0, oracle = 0, overlap = 0, kl = 0;  // sums over rows
  int64_t rows = 0;
  void add(const Quality& o);
  Quality mean() const;  // the sums divided by rows
};
// Rows to measure in a sequence of T tokens with K keys kept: `n` rows with t + 1 > K, in blocks of up to
// `block` consecutive rows whose starts are spread evenly over [K, T) (all of them when n covers it).
std::vector<int64_t> quality_rows(int64_t T, int64_t K, int64_t n, int64_t block = 32);
// One layer of one sequence (every tensor on the CPU, f32):
//   q [T, H, dk], k [T, H, dk]: the main attention's queries and keys (MHA form, after RoPE); scale its
//   score scale; qI [T, Hi, di], kI [T, di], wI [T, Hi]: the indexer's queries, keys and head weights;
//   fp8: score I on the FP8 operands (ops::indexer_fp8_operands), as the selection did; indices [T, K]:
//   the selection (-1 = none). Rows must be sorted.
Quality indexer_quality(const Tensor& q, const Tensor& k, double scale, const Tensor& qI, const Tensor& kI,
                        const Tensor& wI, bool fp8, const Tensor& indices, const std::vector<int64_t>& rows);

// ---------------------------------------------------------------------------------------- needle
struct Needle {
  std::vector<int32_t> tokens;  // [T + 1]: haystack with the fact at `fact_at`, then the query and answer
  int64_t fact_at = 0;          // token index where the fact starts
  int64_t answer_at = 0;        // token index of the answer's first token (tokens end with the answer)
  std::string key, value;
};
// A needle of T + 1 tokens (inputs: the first T) from `haystack` (at least T tokens of held-out text):
// the fact at `depth` (0: the start, 1: right before the query) of the haystack part; key and value
// drawn from `seed`.
Needle make_needle(const RetrievalFormat& fmt, const std::vector<int32_t>& haystack, int64_t T, double depth,
                   uint64_t seed);
// The greedy next token after each of `positions` of `inputs` (one sequence).
using NextTokenFn = std::function<std::vector<int32_t>(const std::vector<int32_t>& inputs,
                                                       const std::vector<int64_t>& positions)>;
bool needle_correct(const Needle& n, const NextTokenFn& next_token);

}  // namespace dsa::eval
