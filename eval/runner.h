// Runs a Model (CPU or GPU) for dsa-eval: one held-out sequence at a time, with dense or top-k sparse
// attention on the same weights. Returns the inputs of eval/metrics.h's figures: token losses by position
// bucket, and per layer the main attention's queries and keys, the indexer's operands and its selection
// (the indexer quality is then computed on the CPU for sampled rows), and greedy next tokens (needles).
#pragma once

#include <cstdint>
#include <vector>

#include "eval/metrics.h"
#include "model/model.h"

namespace dsa::eval {

struct PassOptions {
  AttentionMode attention = AttentionMode::Dense;
  int64_t topk = 0;           // keys per query under sparse attention, and for the indexer figures (0: index_topk)
  bool fp8 = true;            // the indexer scores on FP8 operands (else unquantized)
  int64_t quality_rows = 0;   // > 0: the indexer figures on about that many rows of each layer
};

struct PassResult {
  std::vector<Bucket> buckets;    // loss by position
  double loss_sum = 0;            // the model's own loss over the sequence (equals the buckets' sum)
  int64_t tokens = 0;
  std::vector<Quality> layers;    // per layer, sums over the measured rows (quality_rows > 0)
  double model_recall_sum = 0;    // the model's own recall over every row and layer (quality_rows > 0)
  int64_t model_recall_rows = 0;
};

class Runner {
 public:
  explicit Runner(Model& model) : m_(model) {}
  // One sequence: inputs, targets [T] (target -1: not scored).
  PassResult pass(const std::vector<int32_t>& inputs, const std::vector<int32_t>& targets, const PassOptions& o);
  // Greedy next tokens of one sequence under the same options (the needle test's NextTokenFn).
  NextTokenFn next_token(const PassOptions& o);
  int64_t topk(const PassOptions& o) const { return o.topk > 0 ? o.topk : m_.config().index_topk; }

 private:
  StepOptions step_options(const PassOptions& o) const;
  const Tensor& lm_head() const;
  const Tensor& positions(int64_t T);
  Quality layer_quality(int64_t l, const Tensor& x_in, int64_t T, const IndexerCache& ic, const Tensor& indices,
                        const PassOptions& o);

  Model& m_;
  RopeTables rope_;
  int64_t rope_T_ = 0;
  Tensor positions_;  // [T] i32 0..T-1 on the model's device
};

}  // namespace dsa::eval
