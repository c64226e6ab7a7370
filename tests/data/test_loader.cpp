// Loader: packing, determinism, resume, rank slices, contiguous documents, validation, vocab check.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <map>
#include <random>
#include <set>

#include "data/loader.h"
#include "data/shards.h"

using namespace dsa;

namespace {

const std::string kDir = std::string(DSA_BINARY_DIR) + "/test_loader_tmp";
constexpr int32_t kBos = 0, kEos = 1, kVocab = 5000;

// Synthetic corpus: document d holds tokens 10+d*1000 .. (each token unique to its document and
// position, so a token tells where it came from). Lengths vary from 1 to 400.
std::vector<std::vector<int32_t>> make_corpus(const std::string& dir, const std::string& split, int n_docs,
                                              int per_shard) {
  ::mkdir(dir.c_str(), 0755);
  std::vector<std::vector<int32_t>> docs;
  std::mt19937 rng(n_docs);
  for (int d = 0; d < n_docs; ++d) {
    std::vector<int32_t> v(1 + rng() % 400);
    for (size_t i = 0; i < v.size(); ++i) v[i] = 2 + static_cast<int32_t>((d * 997 + i) % (kVocab - 2));
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

struct Fixture : ::testing::Test {
  static void SetUpTestSuite() {
    docs = make_corpus(kDir, "train", 200, 60);
    make_corpus(kDir, "val", 20, 20);
  }
  static std::vector<std::vector<int32_t>> docs;
  LoaderConfig cfg(int64_t T, int64_t B, int rank = 0, int world = 1) {
    LoaderConfig c;
    c.dir = kDir;
    c.seq_len = T;
    c.batch_per_rank = B;
    c.rank = rank;
    c.world = world;
    c.seed = 42;
    return c;
  }
};
std::vector<std::vector<int32_t>> Fixture::docs;

}  // namespace

TEST_F(Fixture, TargetsAreShiftedInputsAndStreamIsComplete) {
  Loader l(cfg(64, 4));
  EXPECT_EQ(l.vocab_size(), kVocab);
  EXPECT_EQ(l.n_docs(), 200);
  std::vector<int32_t> in, tg, stream;
  int64_t steps = l.steps_per_epoch();
  ASSERT_GT(steps, 10);
  for (int64_t s = 0; s < steps; ++s) {
    l.next(in, tg);
    ASSERT_EQ(in.size(), 256u);
    for (int b = 0; b < 4; ++b) {
      for (int i = 0; i + 1 < 64; ++i) ASSERT_EQ(tg[b * 64 + i], in[b * 64 + i + 1]);
      stream.insert(stream.end(), in.begin() + b * 64, in.begin() + (b + 1) * 64);
    }
    // Next window's first input is this window's last target.
    for (int b = 0; b + 1 < 4; ++b) ASSERT_EQ(tg[b * 64 + 63], in[(b + 1) * 64]);
  }
  EXPECT_EQ(l.epoch(), 0);
  // The stream is the documents, each framed [BOS] doc [EOS], in a permuted order (all distinct).
  std::map<int32_t, int> by_first;  // first token -> document (unique by construction)
  for (int d = 0; d < 200; ++d) by_first[docs[d][0]] = d;
  std::set<int> seen;
  size_t p = 0;
  while (p < stream.size()) {
    ASSERT_EQ(stream[p], kBos) << "at " << p;
    size_t q = p + 1;
    while (q < stream.size() && stream[q] != kEos) ++q;
    if (q == stream.size()) break;  // the epoch's cut-off tail
    ASSERT_TRUE(by_first.count(stream[p + 1]));
    int d = by_first[stream[p + 1]];
    EXPECT_EQ(std::vector<int32_t>(stream.begin() + p + 1, stream.begin() + q), docs[d]);
    EXPECT_TRUE(seen.insert(d).second) << "document " << d << " twice";
    p = q + 1;
  }
  EXPECT_GT(seen.size(), 150u);
  l.next(in, tg);
  EXPECT_EQ(l.epoch(), 1);
}

TEST_F(Fixture, DeterministicAndSeeded) {
  Loader a(cfg(100, 2)), b(cfg(100, 2));
  LoaderConfig c3 = cfg(100, 2);
  c3.seed = 43;
  Loader c(c3);
  std::vector<int32_t> ia, ta, ib, tb, ic, tc;
  bool differs = false;
  for (int s = 0; s < 50; ++s) {
    a.next(ia, ta);
    b.next(ib, tb);
    c.next(ic, tc);
    ASSERT_EQ(ia, ib);
    ASSERT_EQ(ta, tb);
    differs |= ia != ic;
  }
  EXPECT_TRUE(differs);
}

TEST_F(Fixture, ResumeEqualsUninterrupted) {
  for (bool contiguous : {false, true}) {
    LoaderConfig c = cfg(96, 3);
    c.keep_documents_contiguous = contiguous;
    Loader ref(c);
    std::vector<std::vector<int32_t>> want;
    std::vector<int32_t> in, tg;
    int total = static_cast<int>(ref.steps_per_epoch() * 2 + 5);  // crosses epochs
    for (int s = 0; s < total; ++s) {
      ref.next(in, tg);
      want.push_back(in);
      want.push_back(tg);
    }
    for (int cut : {0, 7, static_cast<int>(ref.steps_per_epoch()), total - 3}) {
      Loader a(c);
      for (int s = 0; s < cut; ++s) a.next(in, tg);
      std::string st = a.state();
      Loader b(c);
      b.restore(st);
      for (int s = cut; s < total; ++s) {
        b.next(in, tg);
        ASSERT_EQ(in, want[2 * s]) << "contiguous " << contiguous << " cut " << cut << " step " << s;
        ASSERT_EQ(tg, want[2 * s + 1]);
      }
    }
    // A state from another configuration is refused with a clear message.
    LoaderConfig other = c;
    other.seq_len = 50;
    Loader o(other);
    Loader src(c);
    EXPECT_THROW(o.restore(src.state()), std::runtime_error);
    EXPECT_THROW(o.restore("{not json"), std::runtime_error);
  }
}

TEST_F(Fixture, RankSlicesDisjointAndCovering) {
  for (bool contiguous : {false, true}) {
    const int world = 4, B = 2, T = 80;
    LoaderConfig c1 = cfg(T, B * world);
    c1.keep_documents_contiguous = contiguous;
    Loader single(c1);
    std::vector<Loader> ranks;
    for (int r = 0; r < world; ++r) {
      LoaderConfig c = cfg(T, B, r, world);
      c.keep_documents_contiguous = contiguous;
      ranks.emplace_back(c);
    }
    int64_t steps = single.steps_per_epoch();
    ASSERT_EQ(steps, ranks[0].steps_per_epoch());
    std::vector<int32_t> in, tg, rin, rtg;
    for (int64_t s = 0; s < steps; ++s) {
      single.next(in, tg);
      std::vector<int32_t> cat_in, cat_tg;
      for (int r = 0; r < world; ++r) {
        ranks[r].next(rin, rtg);
        cat_in.insert(cat_in.end(), rin.begin(), rin.end());
        cat_tg.insert(cat_tg.end(), rtg.begin(), rtg.end());
      }
      // Rank r's windows are exactly windows [r*B, (r+1)*B) of the world=1 step: disjoint, covering.
      ASSERT_EQ(cat_in, in);
      ASSERT_EQ(cat_tg, tg);
    }
  }
}

TEST_F(Fixture, ContiguousDocumentsAndPadding) {
  LoaderConfig c = cfg(128, 1);
  c.keep_documents_contiguous = true;
  c.split = "val";  // file order: documents come in order
  Loader l(c);
  std::vector<int32_t> in, tg;
  int64_t pads = 0;
  bool prev_full = false;
  for (int64_t s = 0; s < l.steps_per_epoch(); ++s) {
    l.next(in, tg);
    ASSERT_EQ(in.size(), 128u);
    // Each window starts with BOS or continues a document; after a target of -1 only padding follows.
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
    // A document shorter than a window never straddles two windows: a window that does not start
    // with BOS continues a long document, so the previous window was full (no padding).
    if (in[0] != kBos) {
      EXPECT_TRUE(prev_full) << "step " << s;
    }
    prev_full = !padding;
  }
  EXPECT_GT(pads, 0);
}

TEST_F(Fixture, ValidationBatchesAndVocabCheck) {
  LoaderConfig c = cfg(32, 2);
  auto v1 = validation_batches(c, 5), v2 = validation_batches(c, 5);
  ASSERT_EQ(v1.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(v1[i].inputs, v2[i].inputs);
  Loader val([&] { auto x = c; x.split = "val"; return x; }());
  std::vector<int32_t> in, tg;
  val.next(in, tg);
  EXPECT_EQ(in, v1[0].inputs);
  EXPECT_EQ(in[0], kBos);  // val is not shuffled: its first document starts the stream
  Loader train(c);
  EXPECT_NO_THROW(train.check_vocab(kVocab));
  try {
    train.check_vocab(100);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("train_00000.bin: corpus vocab 5000 > model vocab 100"), std::string::npos) << e.what();
  }
}

TEST(LoaderErrors, MissingAndTooSmall) {
  LoaderConfig c;
  c.dir = kDir + "_missing";
  c.seq_len = 16;
  c.batch_per_rank = 1;
  EXPECT_THROW(Loader l(c), std::runtime_error);
  std::string dir = kDir + "_tiny";
  ::mkdir(dir.c_str(), 0755);
  ShardWriter w(dir + "/train_00000.bin", 100, 0, 1);
  std::vector<int32_t> d = {5, 6, 7};
  w.add_document(d.data(), d.size());
  w.close();
  c.dir = dir;
  c.seq_len = 1024;
  try {
    Loader l(c);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("fewer than one step"), std::string::npos) << e.what();
  }
  c.seq_len = 2;
  Loader ok(c);  // [BOS 5 6 7 EOS]: two windows of 2
  std::vector<int32_t> in, tg;
  ok.next(in, tg);
  EXPECT_EQ(in, (std::vector<int32_t>{0, 5}));
  EXPECT_EQ(tg, (std::vector<int32_t>{5, 6}));
}
