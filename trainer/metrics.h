// What a training run shows: one terminal line per log interval, a validation line per evaluation, and
// the same records as JSON lines in OUTPUT_DIR/metrics.jsonl (read by tools/dsa_plot.py).
//
// JSON keys, each written only when the record has it: stage, step, lm_loss, indexer_kl, grad_norm,
// indexer_grad_norm, lr,
// tokens_per_s, val_lm_loss, val_indexer_kl, recall. `step` counts optimizer steps completed within the
// stage (1..steps); the plot tool lines stages up one after another by name. Non-finite values (the
// step where a NaN appeared) are written as null: JSON has no NaN.
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

namespace dsa {

struct MetricRecord {
  std::string stage;
  int64_t step = 0;
  std::optional<double> lm_loss;         // training LM loss (mean over the step's tokens)
  std::optional<double> indexer_kl;      // training indexer KL (mean over query tokens)
  std::optional<double> grad_norm;       // gradient norm before clipping: of the main model's parameters, or of
                                         // the indexer's when it alone trains
  std::optional<double> indexer_grad_norm;  // the indexer's, when it trains beside the main model (sparse)
  std::optional<double> lr;              // lr of the main group, or of the indexer when it alone trains
  std::optional<double> tokens_per_s;
  std::optional<double> val_lm_loss;     // held-out LM loss
  std::optional<double> val_indexer_kl;  // held-out indexer KL
  std::optional<double> recall;          // held-out indexer recall of the true top-k attention mass
};

class MetricsLogger {
 public:
  // Creates the folder of `jsonl_path` and opens it for appending (a resumed run continues the file).
  // `terminal` receives the human-readable lines (nullptr: none, e.g. on ranks other than 0).
  explicit MetricsLogger(const std::string& jsonl_path, std::FILE* terminal = stdout);
  ~MetricsLogger();
  MetricsLogger(const MetricsLogger&) = delete;
  MetricsLogger& operator=(const MetricsLogger&) = delete;

  // A training record: the terminal line (with elapsed and ETA) and the JSON line, both flushed.
  void log_train(const MetricRecord& r, int64_t total_steps, double elapsed_s, double eta_s);
  // A validation record: the validation line and the JSON line, both flushed.
  void log_eval(const MetricRecord& r, int64_t total_steps);
  const std::string& path() const { return path_; }

  static std::string json_line(const MetricRecord& r);  // one object, no trailing newline
  // "[dense] step   120/400 | loss 5.4321 | kl 0.1234 | gnorm 1.23 | lr 3.00e-04 | 12.3K tok/s |
  //  elapsed 1m23s | ETA 3m10s" (fields the record lacks are left out)
  static std::string train_line(const MetricRecord& r, int64_t total_steps, double elapsed_s, double eta_s);
  // "[dense] step   120/400 | val loss 5.5012 | val kl 0.2100 | recall 0.8312"
  static std::string eval_line(const MetricRecord& r, int64_t total_steps);
  static std::string format_duration(double seconds);  // "12s", "3m10s", "1h02m", "--" when unknown
  // Seconds left, from the rate so far: elapsed * (total - done) / done (negative when done == 0).
  static double eta_seconds(double elapsed_s, int64_t steps_done, int64_t total_steps);

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  std::FILE* terminal_ = nullptr;
};

// `dsa-train plot ARGS...`: replaces the process with `python3 tools/dsa_plot.py ARGS...`, the script
// found under $DSA_SOURCE_DIR, then relative to the executable (build/bin/../../tools), then under the
// source tree this was built from. argv[0..argc) are the arguments after `plot`. Returns only on
// failure (127, with a message on stderr).
int run_plot_command(int argc, char** argv);

}  // namespace dsa
