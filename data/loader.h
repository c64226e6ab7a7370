// Training-sequence loader over a corpus directory of token shards (see shards.h).
//
// Documents are framed as [BOS] tokens [EOS] (whichever the shards' tokenizer has) and, per epoch,
// put in a deterministic order: a seeded shuffle for split "train", file order for other splits.
//
// Packing (default): the framed documents form one stream; window g covers stream tokens
// [g*seq_len, g*seq_len + seq_len + 1): inputs are its first seq_len tokens, targets the last
// seq_len. keep_documents_contiguous: each document starts a window unless it fits in what is left
// of the current one; a document longer than a window is cut into consecutive windows (each chunk
// shares one token with the next, so every token is a target once); unused window space is padding
// (input = EOS or 0, target = -1).
//
// Data parallel: a step takes G = world * batch_per_rank consecutive windows; rank r gets windows
// [step*G + r*batch_per_rank, ... + batch_per_rank). Ranks are disjoint and together cover the
// epoch's first steps_per_epoch()*G windows; an epoch ends when fewer than G windows remain. The
// state is (epoch, next window), saved as JSON and restorable (also under another world size when
// the position is a multiple of the new G).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsa {

struct LoaderConfig {
  std::string dir;
  int64_t seq_len;
  int64_t batch_per_rank;
  int rank = 0, world = 1;
  uint64_t seed = 0;
  bool keep_documents_contiguous = false;
  std::string split = "train";
};

class Loader {
 public:
  explicit Loader(const LoaderConfig&);
  Loader(Loader&&) noexcept;
  ~Loader();

  // inputs, targets: [batch_per_rank * seq_len] each; targets = inputs shifted by one, -1 = none.
  void next(std::vector<int32_t>& inputs, std::vector<int32_t>& targets);
  std::string state() const;  // JSON, exact position
  void restore(const std::string& state);
  void reset();  // back to epoch 0, window 0

  int64_t vocab_size() const;  // the shards' tokenizer vocab
  // Throws "[loader] DIR/SHARD: corpus vocab V > model vocab M" when the model is too small.
  void check_vocab(int64_t model_vocab) const;
  int64_t epoch() const;
  int64_t steps_per_epoch() const;  // in the current epoch
  int64_t step_in_epoch() const;
  int64_t n_docs() const;
  int64_t n_tokens() const;  // stored tokens, without BOS/EOS
  int32_t bos_id() const;
  int32_t eos_id() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

struct Batch {
  std::vector<int32_t> inputs, targets;  // [batch_per_rank * seq_len] each
};

// The first n batches of cfg.dir's held-out split (cfg.split if not "train", else "val") for this
// rank, always the same ones: the validation iterator.
std::vector<Batch> validation_batches(LoaderConfig cfg, int64_t n);

}  // namespace dsa
