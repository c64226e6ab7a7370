// dsa-eval's evaluation of one model: at each context length and with dense and top-k sparse attention on
// the same weights, the held-out loss by position, the indexer's quality per layer and needle retrieval
// (definitions in eval/metrics.h). Held-out text is the val split of a corpus directory, packed in file
// order (files of one directory follow one another, so distant context is related text).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/retrieval.h"
#include "eval/runner.h"

namespace dsa::eval {

struct EvalConfig {
  std::string data;                             // corpus directory; its val split is read
  std::vector<int64_t> seq_lens = {4096, 16384};
  std::vector<AttentionMode> modes = {AttentionMode::Dense, AttentionMode::Sparse};
  int64_t topk = 0;                             // 0: the model's index_topk
  bool fp8 = true;                              // indexer scoring precision
  int64_t sequences = 4;                        // held-out windows per context length (loss by position)
  int64_t quality_sequences = 1;                // of those, how many the indexer figures use
  int64_t quality_rows = 256;                   // rows per layer and sequence (0: no indexer figures)
  std::vector<double> depths = {0.0, 0.25, 0.5, 0.75, 1.0};
  int64_t needle_trials = 4;                    // per context length and depth (0: no needles)
  uint64_t seed = 1234;
  int64_t training_seq_len = 0;                 // longer contexts are reported as extrapolation (0: unknown)
  double time_limit_s = 0;                      // > 0: stop there, marking what did not run
  bool progress = true;                         // a progress line on stderr
};

struct ModeResult {
  int64_t seq_len = 0;
  AttentionMode attention = AttentionMode::Dense;
  bool extrapolation = false;   // seq_len > the training length
  bool complete = true;         // false: the time limit cut it short
  int64_t sequences = 0;
  std::vector<Bucket> buckets;
  double loss_sum = 0;
  int64_t tokens = 0;
  std::vector<Quality> layers;  // sums per layer
  double model_recall_sum = 0;
  int64_t model_recall_rows = 0;
  std::vector<int64_t> correct, trials;  // per depth
  double seconds = 0;
};

struct EvalReport {
  EvalConfig config;
  int64_t topk = 0;
  std::vector<ModeResult> results;
};

// `fmt` null: no needle test (no tokenizer).
EvalReport evaluate(Model& model, const RetrievalFormat* fmt, const EvalConfig& cfg);

// Every figure, as written to --json.
nlohmann::json report_json(const EvalReport& r);
// One markdown table: per context length and attention, the loss, the loss of each position bucket, needle
// accuracy, recall / oracle / overlap / KL.
std::string report_table(const EvalReport& r);
const char* mode_name(AttentionMode m);

}  // namespace dsa::eval
