// Synthetic retrieval documents: key-value facts scattered through real text, most of them asked for
// later in the same document, so that a small model learns in-context retrieval over long distances
// within a short run. dsa-eval's needle test (eval/needle.h) plants the same fact and asks the same query.
//
// Format, at the token level (each piece is encoded on its own and the ids concatenated, so a key or a
// value is the same tokens wherever it stands, whatever text surrounds it):
//   fact   "\nThe value of key " KEY " is " VALUE ".\n"
//   query  "\nWhat is the value of key " KEY "? The value of key " KEY " is " VALUE ".\n"
// KEY and VALUE are strings of key_digits / value_digits decimal digits. In a query, VALUE is what the
// model must retrieve: everything before it is the prompt.
//
// A document of doc_tokens tokens (up to a fact's length) is built from one seed:
//  - facts: doc_tokens / fact_every of them, keys distinct within the document, values random;
//  - each fact is queried with probability query_fraction, at a point drawn uniformly after the fact;
//  - the rest is filler: the haystack corpus's documents (its train split for train documents, its val
//    split for val documents, so held-out text stays held out), body tokens only, in a seeded order,
//    cut where the next fact or query goes.
// Document i of a split depends only on (seed, split, i) and the haystack corpus: the output is
// identical for any number of jobs and any run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace dsa {

class RetrievalFormat {
 public:
  explicit RetrievalFormat(const Tokenizer& tok, int key_digits = 6, int value_digits = 6);

  // Tokens of a fact stating key = value.
  std::vector<int32_t> fact(const std::string& key, const std::string& value) const;
  // Tokens of a query up to the value (the prompt), and the value's own tokens (the answer); the
  // full query is prompt + answer + suffix().
  std::vector<int32_t> query_prompt(const std::string& key) const;
  std::vector<int32_t> answer(const std::string& value) const;
  const std::vector<int32_t>& suffix() const { return suffix_; }

  int key_digits() const { return key_digits_; }
  int value_digits() const { return value_digits_; }
  // A string of n random decimal digits from a splitmix64 state (advanced).
  static std::string random_digits(uint64_t& state, int n);
  // The text of each piece, for documentation and corpus.json.
  static const char* const kFactPrefix;
  static const char* const kQueryPrefix;

 private:
  const Tokenizer* tok_;
  int key_digits_, value_digits_;
  std::vector<int32_t> fact_prefix_, is_, suffix_, query_prefix_, query_mid_;
};

struct RetrievalOptions {
  std::string haystack;       // corpus directory whose text fills the documents
  std::string out_dir;
  int64_t train_docs = 1000;
  int64_t val_docs = 20;
  int64_t doc_tokens = 16384;
  int64_t fact_every = 512;   // one fact per this many tokens
  double query_fraction = 0.75;
  int key_digits = 6, value_digits = 6;
  uint64_t seed = 0;
};

struct RetrievalSummary {
  int64_t docs_train = 0, docs_val = 0, tokens_train = 0, tokens_val = 0;
  int64_t facts = 0, queries = 0;
};

// Writes OUT/train_00000.bin, OUT/val_00000.bin and OUT/corpus.json (format, options, counts).
RetrievalSummary build_retrieval_corpus(const RetrievalOptions& opt, const Tokenizer& tok);

// One document (exposed for tests) from its seed and the filler text to cut it from (at least
// opt.doc_tokens tokens; fewer are used, as many as the facts and queries leave room for).
struct RetrievalDoc {
  std::vector<int32_t> tokens;
  int64_t facts = 0, queries = 0;
  // Token index of each query's answer start, with its answer tokens (tests check the facts hold).
  std::vector<std::pair<int64_t, std::vector<int32_t>>> answers;
};
RetrievalDoc make_retrieval_doc(const RetrievalFormat& fmt, const RetrievalOptions& opt, uint64_t doc_seed,
                                const std::vector<int32_t>& filler);

}  // namespace dsa
