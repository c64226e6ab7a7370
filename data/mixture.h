// The training data stream of a run: one or more corpora (sources) mixed with weights, deterministically,
// as one sequence of windows that every data-parallel rank walks in step.
//
// Sequence n (counted from the start of the stream, over every stage) draws from source
// s(n) = the first s with u(n) < (w_0 + ... + w_s) / sum(w), u(n) = splitmix64(seed', n) / 2^64 in [0, 1):
// a fixed pseudo-random pattern, the same on every machine and rank count. Each source is a DocStream
// (doc_stream.h) of its corpus's train split, shuffled per epoch with a seed of its own (the run's seed
// and the source's name), so adding a source does not reorder the others.
//
// Data parallelism: an optimizer step of G sequences takes sequences [n, n + G); a rank fills only its
// own slice and skips the others' windows (the positions still advance), so every rank holds the same
// position and a saved position resumes on any rank count.
//
// The position is (n, each source's StreamPosition); state() writes it as JSON together with the
// stream's identity (stream_id(): the seed, the packing mode, and every source's name, weight and corpus
// size), and restore() refuses a state of another stream. Positions do not depend on the window length,
// so stages with different seq_len continue one stream (trainer/data_plan.h lays the stages out on it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/doc_stream.h"

namespace dsa {

struct SourceSpec {
  std::string name;    // [A-Za-z0-9_-]+, unique in the mixture
  std::string dir;     // corpus directory written by `dsa-prep corpus` (or `dsa-prep retrieval`)
  double weight = 1.0; // > 0; shares are weight / sum of weights
};

struct MixtureConfig {
  std::vector<SourceSpec> sources;
  uint64_t seed = 0;
  bool keep_documents_contiguous = false;
};

class Mixture {
 public:
  explicit Mixture(const MixtureConfig& cfg);

  // The next `global` windows of T tokens: this caller receives windows [first, first + count) of them
  // into in/tg [count * T] (resized), and `from` (may be null) the source index of each. count may be 0
  // (advance only).
  void next(int64_t T, int64_t global, int64_t first, int64_t count, std::vector<int32_t>& in,
            std::vector<int32_t>& tg, std::vector<int>* from = nullptr);
  // Advances by `global` windows of T tokens without reading any token.
  void skip(int64_t T, int64_t global);

  int source_of(int64_t sequence) const;  // s(n)
  int64_t sequences() const { return sequences_; }  // windows taken so far, over every source

  void rewind();  // back to the stream's beginning
  std::string state() const;  // JSON: format, stream, sequences, sources[{name, epoch, doc, offset}]
  // Throws "[data] restore: ..." on a state of another stream or a malformed one.
  void restore(const std::string& state);
  // The n ("sequences") of a state string; -1 when it is not a state of this stream (other stream,
  // other format, empty).
  int64_t sequences_in(const std::string& state) const;
  const std::string& stream_id() const { return id_; }

  const MixtureConfig& config() const { return cfg_; }
  const std::vector<DocStream>& sources() const { return streams_; }
  // Every source's vocab <= model_vocab, else "[data] DIR/SHARD: corpus vocab V > model vocab M".
  void check_vocab(int64_t model_vocab) const;

 private:
  MixtureConfig cfg_;
  std::vector<DocStream> streams_;
  std::vector<double> cumulative_;  // [sources] normalized cumulative weights, last = 1
  uint64_t pick_seed_ = 0;
  int64_t sequences_ = 0;
  std::string id_;
};

}  // namespace dsa
