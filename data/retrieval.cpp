// Synthetic retrieval documents (format and construction described in retrieval.h).
#include "data/retrieval.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>

#include "data/data_util.h"
#include "data/shards.h"

namespace dsa {

namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  data_util::fail("[retrieval]", parts...);
}

using data_util::splitmix64;

double uniform(uint64_t& s) { return static_cast<double>(splitmix64(s) >> 11) * (1.0 / 9007199254740992.0); }

void append(std::vector<int32_t>& a, const std::vector<int32_t>& b) { a.insert(a.end(), b.begin(), b.end()); }

// Every document body of one split, concatenated in a seeded order: the filler text.
std::vector<int32_t> haystack_tokens(const std::string& dir, const std::string& split, uint64_t seed) {
  const auto files = list_shards(dir, split);
  if (files.empty()) fail(dir, ": no ", split, "_*.bin shards for the haystack (run dsa-prep corpus)");
  std::vector<ShardReader> shards;
  std::vector<std::pair<size_t, uint64_t>> docs;  // (shard, doc)
  for (const std::string& f : files) {
    shards.emplace_back(f);
    for (uint64_t d = 0; d < shards.back().n_docs(); ++d) docs.push_back({shards.size() - 1, d});
  }
  for (size_t i = docs.size(); i > 1; --i) std::swap(docs[i - 1], docs[splitmix64(seed) % i]);
  std::vector<int32_t> out;
  for (const auto& [s, d] : docs) append(out, shards[s].document(d));
  if (out.empty()) fail(dir, ": the haystack's ", split, " split holds no tokens");
  return out;
}

}  // namespace

const char* const RetrievalFormat::kFactPrefix = "\nThe value of key ";
const char* const RetrievalFormat::kQueryPrefix = "\nWhat is the value of key ";

RetrievalFormat::RetrievalFormat(const Tokenizer& tok, int key_digits, int value_digits)
    : tok_(&tok), key_digits_(key_digits), value_digits_(value_digits) {
  if (key_digits < 1 || key_digits > 18 || value_digits < 1 || value_digits > 18)
    fail("key and value digits must be in [1, 18], got ", key_digits, " and ", value_digits);
  fact_prefix_ = tok.encode(kFactPrefix, false);
  is_ = tok.encode(" is ", false);
  suffix_ = tok.encode(".\n", false);
  query_prefix_ = tok.encode(kQueryPrefix, false);
  query_mid_ = tok.encode("? The value of key ", false);
}

std::vector<int32_t> RetrievalFormat::fact(const std::string& key, const std::string& value) const {
  std::vector<int32_t> t = fact_prefix_;
  append(t, tok_->encode(key, false));
  append(t, is_);
  append(t, tok_->encode(value, false));
  append(t, suffix_);
  return t;
}

std::vector<int32_t> RetrievalFormat::query_prompt(const std::string& key) const {
  const std::vector<int32_t> k = tok_->encode(key, false);
  std::vector<int32_t> t = query_prefix_;
  append(t, k);
  append(t, query_mid_);
  append(t, k);
  append(t, is_);
  return t;
}

std::vector<int32_t> RetrievalFormat::answer(const std::string& value) const { return tok_->encode(value, false); }

std::string RetrievalFormat::random_digits(uint64_t& state, int n) {
  std::string s(static_cast<size_t>(n), '0');
  for (char& c : s) c = static_cast<char>('0' + splitmix64(state) % 10);
  return s;
}

RetrievalDoc make_retrieval_doc(const RetrievalFormat& fmt, const RetrievalOptions& opt, uint64_t doc_seed,
                                const std::vector<int32_t>& filler) {
  uint64_t rng = doc_seed;
  const int64_t n_facts = std::max<int64_t>(1, opt.doc_tokens / std::max<int64_t>(1, opt.fact_every));
  struct Insert {
    double at;  // filler position as a share of the filler, in [0, 1]
    int kind;   // 0 fact, 1 query: at one point a fact goes before the queries
    int64_t index;
    std::vector<int32_t> tokens;
    size_t answer_at = 0, answer_len = 0;  // queries: where the answer sits in `tokens`
  };
  std::vector<Insert> ins;
  std::set<std::string> keys;
  int64_t insert_tokens = 0;
  RetrievalDoc doc;
  for (int64_t f = 0; f < n_facts; ++f) {
    std::string key;
    do key = RetrievalFormat::random_digits(rng, fmt.key_digits());
    while (!keys.insert(key).second);
    const std::string value = RetrievalFormat::random_digits(rng, fmt.value_digits());
    const double at = uniform(rng);
    ins.push_back({at, 0, f, fmt.fact(key, value)});
    insert_tokens += static_cast<int64_t>(ins.back().tokens.size());
    ++doc.facts;
    if (uniform(rng) >= opt.query_fraction) continue;
    Insert q{at + (1.0 - at) * uniform(rng), 1, f, fmt.query_prompt(key)};
    const std::vector<int32_t> ans = fmt.answer(value);
    q.answer_at = q.tokens.size();
    q.answer_len = ans.size();
    append(q.tokens, ans);
    append(q.tokens, fmt.suffix());
    insert_tokens += static_cast<int64_t>(q.tokens.size());
    ins.push_back(std::move(q));
    ++doc.queries;
  }
  std::sort(ins.begin(), ins.end(), [](const Insert& a, const Insert& b) {
    return a.at != b.at ? a.at < b.at : a.kind != b.kind ? a.kind < b.kind : a.index < b.index;
  });
  const int64_t fill = std::min<int64_t>(static_cast<int64_t>(filler.size()),
                                         std::max<int64_t>(0, opt.doc_tokens - insert_tokens));
  int64_t used = 0;
  for (const Insert& i : ins) {
    const int64_t to = std::min<int64_t>(fill, static_cast<int64_t>(i.at * static_cast<double>(fill)));
    doc.tokens.insert(doc.tokens.end(), filler.begin() + used, filler.begin() + std::max(used, to));
    used = std::max(used, to);
    if (i.kind == 1)
      doc.answers.push_back({static_cast<int64_t>(doc.tokens.size() + i.answer_at),
                             std::vector<int32_t>(i.tokens.begin() + static_cast<int64_t>(i.answer_at),
                                                  i.tokens.begin() + static_cast<int64_t>(i.answer_at + i.answer_len))});
    append(doc.tokens, i.tokens);
  }
  doc.tokens.insert(doc.tokens.end(), filler.begin() + used, filler.begin() + fill);
  return doc;
}

RetrievalSummary build_retrieval_corpus(const RetrievalOptions& opt, const Tokenizer& tok) {
  if (opt.haystack.empty() || opt.out_dir.empty()) fail("needs a haystack corpus and an output directory");
  if (opt.doc_tokens < 64) fail("--doc-tokens must be >= 64, got ", opt.doc_tokens);
  if (opt.fact_every < 16) fail("--fact-every must be >= 16, got ", opt.fact_every);
  if (!(opt.query_fraction >= 0 && opt.query_fraction <= 1)) fail("--query-fraction must be in [0, 1]");
  if (opt.train_docs < 1 || opt.val_docs < 0) fail("--docs must be >= 1 and --val-docs >= 0");
  const RetrievalFormat fmt(tok, opt.key_digits, opt.value_digits);
  if (::mkdir(opt.out_dir.c_str(), 0755) != 0 && errno != EEXIST) fail(opt.out_dir, ": cannot create directory");
  for (const char* split : {"train", "val"})
    for (const std::string& f : list_shards(opt.out_dir, split)) std::remove(f.c_str());
  RetrievalSummary sum;
  const char* splits[2] = {"train", "val"};
  for (int s = 0; s < 2; ++s) {
    const int64_t n = s == 0 ? opt.train_docs : opt.val_docs;
    if (n == 0) continue;
    const std::vector<int32_t> hay = haystack_tokens(opt.haystack, splits[s], opt.seed + 17 * static_cast<uint64_t>(s));
    ShardWriter w(opt.out_dir + "/" + splits[s] + "_00000.bin", tok.vocab_size(), tok.bos_id(), tok.eos_id());
    std::vector<int32_t> filler(static_cast<size_t>(opt.doc_tokens));
    for (int64_t i = 0; i < n; ++i) {
      // Filler: doc_tokens haystack tokens from where the previous document's left off (wrapping).
      const uint64_t start = static_cast<uint64_t>(i) * static_cast<uint64_t>(opt.doc_tokens) % hay.size();
      for (size_t k = 0; k < filler.size(); ++k) filler[k] = hay[(start + k) % hay.size()];
      uint64_t seed = opt.seed * 0x9e3779b97f4a7c15ull + (static_cast<uint64_t>(s) << 40) + static_cast<uint64_t>(i);
      const RetrievalDoc d = make_retrieval_doc(fmt, opt, splitmix64(seed), filler);
      w.add_document(d.tokens.data(), d.tokens.size());
      (s ? sum.docs_val : sum.docs_train)++;
      (s ? sum.tokens_val : sum.tokens_train) += static_cast<int64_t>(d.tokens.size());
      sum.facts += d.facts;
      sum.queries += d.queries;
    }
    w.close();
  }
  nlohmann::json j = {{"format", "dsa-retrieval-1"}, {"tokenizer", tok.path()}, {"vocab_size", tok.vocab_size()},
                      {"bos_id", tok.bos_id()}, {"eos_id", tok.eos_id()}, {"haystack", opt.haystack},
                      {"seed", opt.seed}, {"doc_tokens", opt.doc_tokens}, {"fact_every", opt.fact_every},
                      {"query_fraction", opt.query_fraction}, {"key_digits", opt.key_digits},
                      {"value_digits", opt.value_digits}, {"fact", std::string(RetrievalFormat::kFactPrefix) + "KEY is VALUE.\n"},
                      {"query", std::string(RetrievalFormat::kQueryPrefix) + "KEY? The value of key KEY is VALUE.\n"},
                      {"docs_train", sum.docs_train}, {"docs_val", sum.docs_val}, {"tokens_train", sum.tokens_train},
                      {"tokens_val", sum.tokens_val}, {"facts", sum.facts}, {"queries", sum.queries}};
  std::ofstream(opt.out_dir + "/corpus.json") << j.dump(2) << "\n";
  return sum;
}

}  // namespace dsa
