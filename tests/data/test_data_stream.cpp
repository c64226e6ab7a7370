// The data stream: DocStream (one corpus split: packing, contiguous documents, positions that survive a
// change of window length, skipping, validation batches) and Mixture (weighted sources, rank slices,
// exact resume on any rank count, stream identity).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <set>

#include "data/doc_stream.h"
#include "data/mixture.h"
#include "data/shards.h"

using namespace dsa;

namespace {

// Per process: ctest runs each test in its own process, several at a time.
const std::string kDir = std::string(DSA_BINARY_DIR) + "/test_data_stream_tmp_" + std::to_string(::getpid());
constexpr int32_t kBos = 0, kEos = 1, kVocab = 5000;

// Synthetic corpus: document d holds tokens base + (d*997 + i) % span (a token tells which corpus it came
// from, and with the document's first token, where). Lengths vary from 1 to 400.
std::vector<std::vector<int32_t>> make_corpus(const std::string& dir, const std::string& split, int n_docs,
                                              int per_shard, int32_t base = 2, int32_t span = 2998) {
  ::mkdir(dir.c_str(), 0755);
  std::vector<std::vector<int32_t>> docs;
  std::mt19937 rng(n_docs);
  for (int d = 0; d < n_docs; ++d) {
    std::vector<int32_t> v(1 + rng() % 400);
    for (size_t i = 0; i < v.size(); ++i) v[i] = base + static_cast<int32_t>((d * 997 + i) % span);
    docs.push_back(v);
  }
  for (int s = 0; s * per_shard < n_docs; ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "/%s_%05d.bin", split.c_str(), s);
    ShardWriter w(dir + name, kVocab, kBos, kEos);
    for (int d = s * per_shard; d < std::min(n_docs, (s + 1) * per_shard); ++d) w.add_document(docs[d].data(), docs[d].size());
    w.close();
  }
  return docs;
}

struct Stream : ::testing::Test {
  static void SetUpTestSuite() {
    docs = make_corpus(kDir, "train", 200, 60);
    make_corpus(kDir, "val", 20, 20);
    make_corpus(kDir + "_b", "train", 80, 80, 3000, 1000);  // a second source: tokens >= 3000
    make_corpus(kDir + "_b", "val", 10, 10, 3000, 1000);
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(kDir);
    std::filesystem::remove_all(kDir + "_b");
  }
  static std::vector<std::vector<int32_t>> docs;
  static std::vector<int32_t> window(DocStream& s, int64_t T, std::vector<int32_t>* tg = nullptr) {
    std::vector<int32_t> in(T), t(T);
    s.next(T, in.data(), t.data());
    if (tg) *tg = t;
    return in;
  }
};
std::vector<std::vector<int32_t>> Stream::docs;

int64_t framed_total(const std::vector<std::vector<int32_t>>& docs) {
  int64_t n = 0;
  for (const auto& d : docs) n += static_cast<int64_t>(d.size()) + 2;
  return n;
}

}  // namespace

TEST_F(Stream, PackedWindowsCoverTheShuffledDocumentsOnce) {
  DocStream s(kDir, "train", 42, false);
  EXPECT_EQ(s.vocab_size(), kVocab);
  EXPECT_EQ(s.n_docs(), 200);
  const int64_t T = 64, windows = (framed_total(docs) - 1) / T;  // an epoch: every window of T+1 tokens that fits
  std::vector<int32_t> stream, tg, prev_tg;
  for (int64_t w = 0; w < windows; ++w) {
    const std::vector<int32_t> in = window(s, T, &tg);
    for (int i = 0; i + 1 < T; ++i) ASSERT_EQ(tg[i], in[i + 1]);
    if (w > 0) {
      ASSERT_EQ(prev_tg[T - 1], in[0]) << "consecutive windows share one token";
    }
    prev_tg = tg;
    stream.insert(stream.end(), in.begin(), in.end());
  }
  EXPECT_EQ(s.position().epoch, 0);
  // The stream is the documents, each framed [BOS] doc [EOS], in a permuted order, each once.
  std::map<int32_t, int> by_first;
  for (int d = 0; d < 200; ++d) by_first[docs[d][0]] = d;
  std::set<int> seen;
  bool permuted = false;
  size_t p = 0;
  while (p < stream.size()) {
    ASSERT_EQ(stream[p], kBos) << "at " << p;
    size_t q = p + 1;
    while (q < stream.size() && stream[q] != kEos) ++q;
    if (q == stream.size()) break;  // the epoch's cut-off tail
    const int d = by_first.at(stream[p + 1]);
    EXPECT_EQ(std::vector<int32_t>(stream.begin() + p + 1, stream.begin() + q), docs[d]);
    permuted |= d != static_cast<int>(seen.size());
    EXPECT_TRUE(seen.insert(d).second) << "document " << d << " twice";
    p = q + 1;
  }
  EXPECT_GT(seen.size(), 190u);
  EXPECT_TRUE(permuted);
  window(s, T);
  EXPECT_EQ(s.position().epoch, 1);
}

TEST_F(Stream, DeterministicAndSeeded) {
  DocStream a(kDir, "train", 42, false), b(kDir, "train", 42, false), c(kDir, "train", 43, false);
  bool differs = false;
  for (int w = 0; w < 100; ++w) {
    const auto wa = window(a, 100);
    ASSERT_EQ(wa, window(b, 100));
    differs |= wa != window(c, 100);
  }
  EXPECT_TRUE(differs);
}

TEST_F(Stream, PositionsRestoreSkipAndSurviveAWindowLengthChange) {
  for (bool contiguous : {false, true}) {
    DocStream ref(kDir, "train", 7, contiguous);
    std::vector<std::vector<int32_t>> want;
    std::vector<StreamPosition> pos;
    // 90-token windows, then 200-token windows.
    auto T_of = [](int w) { return w < 300 ? 90 : 200; };  // 600 windows
    for (int w = 0; w < 600; ++w) {
      pos.push_back(ref.position());
      want.push_back(window(ref, T_of(w)));
    }
    EXPECT_GE(ref.position().epoch, 1) << "crosses an epoch; contiguous " << contiguous;
    for (int cut : {0, 7, 299, 300, 301, 550}) {
      // Skipping (no token read) advances exactly as reading does ...
      DocStream a(kDir, "train", 7, contiguous);
      for (int w = 0; w < cut; ++w) a.next(T_of(w), nullptr, nullptr);
      ASSERT_EQ(a.position(), pos[cut]) << "contiguous " << contiguous << " cut " << cut;
      // ... and a fresh stream moved to a saved position continues identically.
      DocStream b(kDir, "train", 7, contiguous);
      b.seek(pos[cut]);
      for (int w = cut; w < 600; ++w) ASSERT_EQ(window(b, T_of(w)), want[w]) << "contiguous " << contiguous << " w " << w;
    }
  }
  // Packed: after the switch the 200-token windows continue the same token stream.
  DocStream p(kDir, "train", 7, false);
  std::vector<int32_t> tg;
  for (int w = 0; w < 3; ++w) window(p, 90, &tg);
  EXPECT_EQ(window(p, 200)[0], tg[89]);
  DocStream bad(kDir, "train", 7, false);
  EXPECT_THROW(bad.seek({0, 5, 1000000}), std::runtime_error);
  EXPECT_THROW(bad.seek({0, 201, 0}), std::runtime_error);
}

TEST_F(Stream, ContiguousDocumentsAndPadding) {
  DocStream s(kDir, "val", 0, true);  // file order: documents come in order
  int64_t pads = 0;
  bool prev_full = false;
  for (int w = 0; w < 40; ++w) {
    std::vector<int32_t> tg;
    const std::vector<int32_t> in = window(s, 128, &tg);
    bool padding = false;
    for (int i = 0; i < 128; ++i) {
      if (tg[i] == -1) {
        padding = true;
      } else {
        ASSERT_FALSE(padding) << "target after padding at " << i;
      }
      if (padding) ++pads;
      if (!padding && i + 1 < 128) {
        ASSERT_EQ(tg[i], in[i + 1]);
      }
    }
    // A document shorter than a window never straddles two: a window that does not start with BOS
    // continues a long document, so the previous window was full.
    if (in[0] != kBos) {
      EXPECT_TRUE(prev_full) << "window " << w;
    }
    prev_full = !padding;
  }
  EXPECT_GT(pads, 0);
}

TEST_F(Stream, ValidationBatchesSliceRanksAndVocabCheck) {
  const auto one = validation_batches(kDir, false, 32, 4, 0, 1, 3);
  ASSERT_EQ(one.size(), 3u);
  EXPECT_EQ(one[0].inputs[0], kBos);  // val is not shuffled: its first document starts the stream
  for (int r = 0; r < 2; ++r) {
    const auto mine = validation_batches(kDir, false, 32, 2, r, 2, 3);
    for (int b = 0; b < 3; ++b)  // rank r's windows are windows [2r, 2r+2) of the one-rank batch
      EXPECT_EQ(mine[b].inputs, std::vector<int32_t>(one[b].inputs.begin() + r * 64, one[b].inputs.begin() + (r + 1) * 64));
  }
  DocStream s(kDir, "train", 0, false);
  EXPECT_NO_THROW(s.check_vocab(kVocab));
  try {
    s.check_vocab(100);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("train_00000.bin: corpus vocab 5000 > model vocab 100"), std::string::npos) << e.what();
  }
}

TEST(StreamErrors, MissingAndTooSmall) {
  EXPECT_THROW(DocStream(kDir + "_missing", "train", 0, false), std::runtime_error);
  const std::string dir = kDir + "_tiny";
  ::mkdir(dir.c_str(), 0755);
  ShardWriter w(dir + "/train_00000.bin", 100, 0, 1);
  std::vector<int32_t> d = {5, 6, 7};
  w.add_document(d.data(), d.size());
  w.close();
  DocStream s(dir, "train", 0, false);
  std::vector<int32_t> in(1024), tg(1024);
  try {
    s.next(1024, in.data(), tg.data());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("fewer than one window"), std::string::npos) << e.what();
  }
  DocStream ok(dir, "train", 0, false);  // [BOS 5 6 7 EOS]: two windows of 2
  ok.next(2, in.data(), tg.data());
  EXPECT_EQ(std::vector<int32_t>(in.begin(), in.begin() + 2), (std::vector<int32_t>{0, 5}));
  EXPECT_EQ(std::vector<int32_t>(tg.begin(), tg.begin() + 2), (std::vector<int32_t>{5, 6}));
  std::filesystem::remove_all(dir);
}

namespace {
MixtureConfig two_sources(double wa, double wb, uint64_t seed = 11) {
  MixtureConfig c;
  c.sources = {{"a", kDir, wa}, {"b", kDir + "_b", wb}};
  c.seed = seed;
  return c;
}
}  // namespace

TEST_F(Stream, MixtureDrawsSourcesByWeight) {
  Mixture m(two_sources(3, 1));
  std::vector<int32_t> in, tg;
  std::vector<int> from;
  int64_t b_count = 0, n = 0;
  for (int step = 0; step < 500; ++step) {
    m.next(32, 8, 0, 8, in, tg, &from);
    for (int i = 0; i < 8; ++i) {
      // Every non-padding token of a window comes from the source `from` names (b's tokens are >= 3000).
      for (int t = 0; t < 32; ++t)
        if (in[i * 32 + t] > kEos) {
          ASSERT_EQ(in[i * 32 + t] >= 3000, from[i] == 1);
        }
      b_count += from[i];
      ++n;
    }
  }
  EXPECT_EQ(m.sequences(), 4000);
  // Share of b: 1/4; the pattern is pseudo-random, so allow 4 binomial standard deviations,
  // 4 * sqrt(0.25 * 0.75 / 4000) = 0.027.
  EXPECT_NEAR(static_cast<double>(b_count) / static_cast<double>(n), 0.25, 0.027);
}

TEST_F(Stream, MixtureRanksSliceOneStreamAndResumeOnAnyRankCount) {
  for (bool contiguous : {false, true}) {
    MixtureConfig cfg = two_sources(1, 1);
    cfg.keep_documents_contiguous = contiguous;
    const int world = 4, mb = 2, G = world * mb, T = 48;
    Mixture single(cfg);
    std::vector<Mixture> ranks;
    for (int r = 0; r < world; ++r) ranks.emplace_back(cfg);
    std::vector<int32_t> in, tg, rin, rtg;
    std::string saved;
    std::vector<std::vector<int32_t>> after;
    for (int step = 0; step < 60; ++step) {
      single.next(T, G, 0, G, in, tg);
      std::vector<int32_t> cat;
      for (int r = 0; r < world; ++r) {
        ranks[r].next(T, G, r * mb, mb, rin, rtg);
        cat.insert(cat.end(), rin.begin(), rin.end());
      }
      ASSERT_EQ(cat, in) << "rank slices are windows [r*mb, (r+1)*mb) of the one-rank step";
      for (int r = 1; r < world; ++r) ASSERT_EQ(ranks[r].state(), ranks[0].state());
      if (step == 29) saved = ranks[2].state();
      if (step >= 30) after.push_back(in);
    }
    // A position saved by one of four ranks resumes a one-rank job exactly, at another window length too.
    Mixture resumed(cfg);
    resumed.restore(saved);
    EXPECT_EQ(resumed.sequences(), 30 * G);
    for (int step = 30; step < 60; ++step) {
      resumed.next(T, G, 0, G, in, tg);
      ASSERT_EQ(in, after[step - 30]) << "contiguous " << contiguous << " step " << step;
    }
  }
}

TEST_F(Stream, MixtureStateBelongsToItsStream) {
  Mixture a(two_sources(1, 1)), other_seed(two_sources(1, 1, 12)), other_weight(two_sources(1, 2));
  EXPECT_EQ(a.stream_id(), Mixture(two_sources(1, 1)).stream_id());
  EXPECT_NE(a.stream_id(), other_seed.stream_id());
  EXPECT_NE(a.stream_id(), other_weight.stream_id());
  a.skip(64, 10);
  EXPECT_EQ(a.sequences_in(a.state()), 10);
  EXPECT_EQ(other_seed.sequences_in(a.state()), -1);
  try {
    other_weight.restore(a.state());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("belongs to data stream " + a.stream_id()), std::string::npos) << e.what();
  }
  try {
    a.restore(R"({"format": "dsa-loader-1", "epoch": 0, "window": 4})");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("resumes only at a stage boundary"), std::string::npos) << e.what();
  }
  EXPECT_THROW(a.restore("{not json"), std::runtime_error);
  EXPECT_THROW(Mixture(two_sources(1, 0)), std::runtime_error);
  a.rewind();
  EXPECT_EQ(a.sequences(), 0);
}
