// Corpus preparation: text/code files, directories, tarballs and JSON Lines in; token shards out (shards.h).
//
// Documents are whole files, enumerated in a fixed order (inputs as given, directories walked in
// byte-sorted name order, tarball members in archive order), except JSON Lines files (*.jsonl, plain or
// .gz/.xz/.bz2/.zst), where each non-empty line is a JSON object and its string field `jsonl_field`
// ("text") one document named FILE:LINE; a line that is not such an object stops with FILE:LINE.
// `sample` < 1 keeps a document when a hash of (seed, its name) falls under it (the split is then
// decided as if every document were kept); `min_bytes` and `max_doc_bytes` skip shorter and longer ones. Files that look binary (a NUL byte in
// the first 8 KiB), empty files and unreadable files are skipped with a count (unreadable ones also
// with a warning naming them). Text is tokenized as bytes where it is not valid UTF-8. Each document
// goes to "val" when a hash of (seed, its name) falls under val_fraction, else to "train", so the
// split does not depend on --jobs or on which other files are present. Output is identical for
// any number of jobs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace dsa {

struct CorpusOptions {
  std::string out_dir;
  std::vector<std::string> inputs;
  double val_fraction = 0.01;
  uint64_t seed = 0;
  int jobs = 0;                          // 0: all cores
  int64_t max_bytes = 0;                 // 0: no limit; stop after this many document bytes
  int64_t max_files = 0;                 // 0: no limit
  int64_t shard_tokens = int64_t(1) << 28;  // start a new shard past this many tokens
  bool progress = true;                  // progress bar on stderr
  double sample = 1.0;                   // (0, 1]: share of documents kept, by a hash of their names
  int64_t min_bytes = 0;                 // skip documents shorter than this (long-context slices)
  int64_t max_doc_bytes = 0;             // 0: no limit; skip documents longer than this (generated tables)
  std::string jsonl_field = "text";      // the text field of JSON Lines inputs
};

struct CorpusSummary {
  int64_t docs_train = 0, docs_val = 0;
  int64_t tokens_train = 0, tokens_val = 0;
  int64_t bytes = 0;
  int64_t skipped_binary = 0, skipped_empty = 0, skipped_unreadable = 0;
  int64_t skipped_short = 0, skipped_long = 0, skipped_sampled = 0;
  int64_t longest_tokens = 0;
  std::string longest_name;
  int64_t docs_over_16k = 0;  // documents longer than 16384 tokens (long-context material)
  double seconds = 0;
};

CorpusSummary build_corpus(const CorpusOptions& opt, const Tokenizer& tok);

// Human-readable summary lines (also written to OUT/corpus.json as JSON).
std::string format_summary(const CorpusSummary& s);

}  // namespace dsa
