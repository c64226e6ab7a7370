// GPU DSA ops (kernels/cuda/ops_dsa.h through the kernels/dsa_ops.h entries) against the CPU reference
// fed the same bf16-rounded inputs in f32. Timings: `dsa-bench ops --only indexer_kl,sparse_attention,indexer`.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/dsa_ops.h"
#include "tests/gpu/gpu_util.h"
#include "tests/test_util.h"

namespace dsa {
namespace {

using testing::poisoned_gpu;
using testing::randn;
using testing::bf16_tol;
using testing::rel_close;
using testing::same_bits;
using testing::to_gpu;

// f32 CPU tensor holding bf16-rounded values of a random normal tensor, and its bf16 GPU copy.
struct Pair {
  Tensor cpu, gpu;
};
Pair rand_pair(const Shape& s, uint64_t seed, double sd = 1.0) {
  Tensor x = randn(s, seed, sd, DType::F32).to(DType::BF16).to(DType::F32);
  return {x, to_gpu(x, DType::BF16)};
}
Tensor f32_of(const Tensor& g) { return g.to(Device::CPU).to(DType::F32); }

// Random causal indices [B, T, K]: slot 0 = t, others in [0, t] or -1 (duplicates allowed).
Tensor rand_indices(int64_t B, int64_t T, int64_t K, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tensor idx = Tensor::empty({B, T, K}, DType::I32);
  int32_t* p = idx.data<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        int32_t v = static_cast<int32_t>(rng() % static_cast<uint64_t>(t + 1));
        if (k == 0) v = static_cast<int32_t>(t);
        else if (rng() % 7 == 0) v = -1;
        p[(b * T + t) * K + k] = v;
      }
  return idx;
}

// Sets the switch `name` to a value no switch takes ("yes") and expects `call` to be refused with an error that
// names it: a value the code cannot honour is never read as the default. The caller restores the variable.
template <class F>
void expect_refused_by_name(const char* name, F&& call) {
  setenv(name, "yes", 1);
  try {
    call();
    ADD_FAILURE() << name << "=yes was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
}

// rand_indices, then either causal prefixes (rows t < K take slots 0 .. t, the rest -1) or every fifth row
// empty (all slots -1: nothing gathered, out 0, lse -inf).
Tensor masked_indices(int64_t B, int64_t T, int64_t K, uint64_t seed, bool prefix) {
  Tensor idx = rand_indices(B, T, K, seed);
  for (int64_t bt = 0; bt < B * T; ++bt)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = bt % T;
      int32_t& v = idx.data<int32_t>()[bt * K + k];
      if (prefix && t < K) v = k <= t ? static_cast<int32_t>(k) : -1;
      if (!prefix && t % 5 == 0) v = -1;
    }
  return idx;
}

// ------------------------------------------------------------------------------------ hadamard / fp8

TEST(GpuDsa, HadamardBitExact) {
  DSA_REQUIRE_GPU();
  for (int64_t d : {16, 64, 128}) {
    const Tensor x = randn({2, 37, 3, d}, 11 + d, 1.0, DType::F32);
    const Tensor g = ops::hadamard_transform(to_gpu(x, DType::F32)).to(Device::CPU);
    const Tensor c = ops::hadamard_transform(x);
    EXPECT_TRUE(same_bits(g, c)) << "d = " << d;
  }
}

TEST(GpuDsa, Fp8CodesBitExact) {
  DSA_REQUIRE_GPU();
  for (int64_t block : {128, 100, 32}) {
    Tensor x = randn({75, 300}, 5 + block, 3.0, DType::F32);
    float* p = x.data<float>();
    // Edge cases: amax exactly 448 * 2^k, tiny blocks (below the 1e-4 floor), saturation, exact zeros.
    for (int64_t i = 0; i < 300; ++i) {
      p[0 * 300 + i] = i == 7 ? 448.0f * 0.25f : 0.001f * static_cast<float>(i % 13);
      p[1 * 300 + i] = 1e-6f * static_cast<float>(i % 5 - 2);
      p[2 * 300 + i] = 0.f;
      p[3 * 300 + i] = std::ldexp(1.0f, static_cast<int>(i % 40) - 20) * (i % 2 ? -1.f : 1.f);
    }
    const ops::Fp8Blocks c = ops::fp8_block_quantize_codes(x, block);
    const ops::Fp8Blocks g = ops::fp8_block_quantize_codes(to_gpu(x, DType::F32), block);
    const Tensor gc = g.codes.to(Device::CPU), gs = g.scales.to(Device::CPU);
    EXPECT_TRUE(same_bits(gc, c.codes)) << "codes, block " << block;
    EXPECT_TRUE(same_bits(gs, c.scales)) << "scales, block " << block;
    Tensor cs, gsc;
    const Tensor cr = ops::fp8_block_quantize(x, block, &cs);
    const Tensor gr = ops::fp8_block_quantize(to_gpu(x, DType::F32), block, &gsc).to(Device::CPU);
    EXPECT_TRUE(same_bits(gr, cr)) << "round trip, block " << block;
    const Tensor gd = ops::fp8_block_dequantize(g, block, DType::F32).to(Device::CPU);
    const Tensor cd = ops::fp8_block_dequantize(c, block, DType::F32);
    EXPECT_TRUE(same_bits(gd, cd)) << "dequantize, block " << block;
  }
}

TEST(GpuDsa, Fp8OperandsExact) {
  DSA_REQUIRE_GPU();
  // Every head dim of the warp-per-row kernel (32 .. 512, one scale block or several) and the block-per-row
  // fallback (16, 1024).
  for (int64_t d : {16, 32, 64, 128, 256, 512, 1024}) {
    const Pair q = rand_pair({2, 37, 3, d}, 1 + d), k = rand_pair({2, 37, d}, 2 + d);
    Tensor cq, ck, gq, gk;
    ops::indexer_fp8_operands(q.cpu, k.cpu, &cq, &ck);
    ops::indexer_fp8_operands(q.gpu, k.gpu, &gq, &gk);
    EXPECT_TRUE(testing::all_close(f32_of(gq), cq, 0, 0)) << "d = " << d;
    EXPECT_TRUE(testing::all_close(f32_of(gk), ck, 0, 0)) << "d = " << d;
  }
}

// --------------------------------------------------------------------------------------- indexer

struct IndexerCase {
  int64_t B, T, Hi, D, K;
  int64_t block_rows = 0;  // fp8 top-k: rows per streamed block (0: all rows in one)
};

// Every GPU slot equals the CPU slot, or both point at scores equal within tol (a near-tie); -1 padding
// must match exactly.
::testing::AssertionResult same_selection(const Tensor& gpu_idx, const Tensor& cpu_idx, const Tensor& scores /*[B,T,T]*/,
                                          double tol, int64_t* exact) {
  const int64_t B = cpu_idx.size(0), T = cpu_idx.size(1), K = cpu_idx.size(2);
  const int32_t* g = gpu_idx.data<int32_t>();
  const int32_t* c = cpu_idx.data<int32_t>();
  *exact = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = (b * T + t) * K + k;
        if (g[i] == c[i]) {
          ++*exact;
          continue;
        }
        if (g[i] < 0 || c[i] < 0 || g[i] > t)
          return ::testing::AssertionFailure() << "slot (" << b << ", " << t << ", " << k << "): gpu " << g[i]
                                               << " cpu " << c[i];
        const double sg = scores.item((b * T + t) * T + g[i]), sc = scores.item((b * T + t) * T + c[i]);
        if (std::fabs(sg - sc) > tol * (1.0 + std::fabs(sc)))
          return ::testing::AssertionFailure() << "slot (" << b << ", " << t << ", " << k << "): gpu " << g[i] << " ("
                                               << sg << ") cpu " << c[i] << " (" << sc << ")";
      }
  return ::testing::AssertionSuccess();
}

TEST(GpuDsa, IndexerScoresForward) {
  DSA_REQUIRE_GPU();
  for (const IndexerCase& c : {IndexerCase{2, 37, 4, 64, 8}, IndexerCase{2, 300, 16, 64, 64}, IndexerCase{1, 65, 20, 24, 8}}) {
    const Pair q = rand_pair({c.B, c.T, c.Hi, c.D}, 3), k = rand_pair({c.B, c.T, c.D}, 4),
               w = rand_pair({c.B, c.T, c.Hi}, 5, 0.5);
    const int64_t t0 = c.T / 3, t1 = c.T;
    const Tensor cs = ops::indexer_scores_forward(q.cpu, k.cpu, w.cpu, t0, t1);
    const Tensor gs = ops::indexer_scores_forward(q.gpu, k.gpu, w.gpu, t0, t1).to(Device::CPU);
    double num = 0, den = 0;
    bool mask_ok = true;
    for (int64_t i = 0; i < cs.numel(); ++i) {
      const double a = gs.item(i), b = cs.item(i);
      if (std::isinf(b)) {
        mask_ok = mask_ok && std::isinf(a) && a < 0;
        continue;
      }
      ASSERT_TRUE(std::isfinite(a)) << "at " << i;
      num += (a - b) * (a - b);
      den += b * b;
    }
    EXPECT_TRUE(mask_ok);
    EXPECT_LE(std::sqrt(num / den), 1e-5) << "T = " << c.T;
  }
}

// Bound on the relative RMS error of the GPU's scores against the CPU's (both on the same FP8 codes).
// mma.sync accumulates the exact e4m3 products in f32: 1e-5. The wgmma kernel (sm_90a; Hi 16/32/64 and
// D 64/128, one scale block) keeps about 14 bits in the tensor core's FP8 accumulation (DeepSeek-V3
// report, section 3.3.2), errors near 2^-13 = 1.2e-4 of a dot product (measured RMS 6.1e-5 .. 1.3e-4):
// bound 2^-11 = 4.9e-4. One dropped head (about 1/Hi >= 1.6% of a score) exceeds either bound 30-fold.
double fp8_score_tol(const IndexerCase& c) {
  const bool wgmma_shape = (c.Hi == 16 || c.Hi == 32 || c.Hi == 64) && (c.D == 64 || c.D == 128);
  return wgmma_shape ? std::ldexp(1.0, -11) : 1e-5;
}

void check_topk(const IndexerCase& c, bool fp8) {
  const Pair q = rand_pair({c.B, c.T, c.Hi, c.D}, 30 + c.T), k = rand_pair({c.B, c.T, c.D}, 31 + c.T),
             w = rand_pair({c.B, c.T, c.Hi}, 32 + c.T, 0.5);
  const Tensor cpu = ops::indexer_topk(q.cpu, k.cpu, w.cpu, c.K, fp8);
  Tensor vals_g;
  const Tensor gpu = ops::indexer_topk(q.gpu, k.gpu, w.gpu, c.K, fp8, fp8 ? c.block_rows : c.T / 4 + 1, &vals_g).to(Device::CPU);
  Tensor qs = q.cpu, ks = k.cpu;
  if (fp8) ops::indexer_fp8_operands(q.cpu, k.cpu, &qs, &ks);
  const Tensor scores = ops::indexer_scores_forward(qs, ks, w.cpu, 0, c.T);
  {  // the winners' scores: the CPU scores at the GPU's indices, -inf on -1 slots
    ASSERT_EQ(vals_g.shape(), (Shape{c.B, c.T, c.K}));
    const Tensor v = vals_g.to(Device::CPU);
    double num = 0, den = 0;
    for (int64_t i = 0; i < gpu.numel(); ++i) {
      const int32_t s = gpu.data<int32_t>()[i];
      const double a = v.item(i);
      if (s < 0) {
        ASSERT_TRUE(std::isinf(a) && a < 0) << "slot " << i;
        continue;
      }
      const double b = scores.item((i / c.K) * c.T + s);
      num += (a - b) * (a - b);
      den += b * b;
    }
    EXPECT_LE(std::sqrt(num / std::max(den, 1e-30)), fp8 ? fp8_score_tol(c) : 1e-5)
        << "top-k values, T = " << c.T << " fp8 = " << fp8;
  }
  int64_t exact = 0;
  EXPECT_TRUE(same_selection(gpu, cpu, scores, fp8 ? 2e-3 : 1e-4, &exact)) << "T = " << c.T << " fp8 = " << fp8;
  const double frac = static_cast<double>(exact) / static_cast<double>(cpu.numel());
  EXPECT_GE(frac, fp8 ? 0.95 : 0.995) << "exact fraction, T = " << c.T << " fp8 = " << fp8;
  std::printf("[topk] T=%lld K=%lld fp8=%d exact %.5f\n", (long long)c.T, (long long)c.K, (int)fp8, frac);
}

TEST(GpuDsa, IndexerTopkBf16) {
  DSA_REQUIRE_GPU();
  for (const IndexerCase& c : {IndexerCase{2, 37, 4, 64, 8}, IndexerCase{2, 300, 16, 64, 64}, IndexerCase{2, 300, 4, 32, 300}})
    check_topk(c, false);
}

TEST(GpuDsa, IndexerTopkFp8) {
  DSA_REQUIRE_GPU();
  // Hi 16/32/64 with D 64/128 take the wgmma kernels on sm_90a (odd T, a last CTA with few queries, row
  // blocks starting mid-tile; T = 1600 in one block: a CTA streams 12-13 key tiles through its ring (Hi = 64:
  // 8 stages, warpgroups up to 4 tiles apart); row blocks of 100 start at t0 = 4 mod 8, so some key tiles lie
  // past one warpgroup's queries but not another's; B = 2 at Hi = 64: the TMA box's sequence coordinate,
  // last tiles running past T); Hi = 4 and D = 256 (two scale blocks) the mma.sync one.
  for (const IndexerCase& c : {IndexerCase{2, 37, 4, 64, 8}, IndexerCase{2, 300, 16, 128, 64}, IndexerCase{1, 300, 64, 256, 32},
                               IndexerCase{1, 777, 64, 128, 256, 200}, IndexerCase{2, 531, 16, 64, 64},
                               IndexerCase{1, 301, 32, 64, 48, 97}, IndexerCase{1, 130, 64, 64, 16},
                               IndexerCase{1, 1600, 64, 64, 128}, IndexerCase{1, 900, 64, 128, 64, 100},
                               IndexerCase{2, 333, 64, 128, 40, 70}, IndexerCase{2, 1200, 64, 64, 96}})
    check_topk(c, true);
  // A value of a kernel switch that names no kernel is refused by name, not read as the default.
  const Pair q = rand_pair({1, 40, 16, 64}, 73), k = rand_pair({1, 40, 64}, 74), w = rand_pair({1, 40, 16}, 75, 0.5);
  const char* name = "DSA_INDEXER_WGMMA";
  struct Env {  // restores the switch as the run set it (the suite may run under DSA_INDEXER_WGMMA=0 too)
    const char* name;
    std::string old;
    bool had;
    ~Env() { had ? setenv(name, old.c_str(), 1) : unsetenv(name); }
  } env{name, std::getenv(name) ? std::getenv(name) : "", std::getenv(name) != nullptr};
  expect_refused_by_name(name, [&] {
    ops::indexer_topk(q.gpu, k.gpu, w.gpu, 8, true);
  });
}

TEST(GpuDsa, TopkCausalTies) {
  DSA_REQUIRE_GPU();
  // Many exact ties (integers), some NaN: order must be higher score first, then lower index.
  const int64_t B = 2, R = 40, T = 300, K = 50;
  Tensor s = Tensor::empty({B, R, T}, DType::F32);
  std::mt19937 rng(7);
  for (int64_t i = 0; i < s.numel(); ++i) s.data<float>()[i] = static_cast<float>(rng() % 5) - 2.f;
  s.data<float>()[3] = std::nanf("");
  const Tensor cpu = ops::topk_causal(s, T - R, K);
  const Tensor gpu = ops::topk_causal(to_gpu(s, DType::F32), T - R, K).to(Device::CPU);
  EXPECT_TRUE(same_bits(gpu, cpu));
}

TEST(GpuDsa, TopkCausalLongRows) {
  DSA_REQUIRE_GPU();
  // Long rows through each path of the radix select: few candidates after the first digit (normal
  // scores), exact ties resolved on the index digits (3 values: ~3000 candidates), and candidate-list
  // overflow (2 values; or all scores within one binade) re-reading the whole row. K = 64 and 512 take
  // the sampled threshold first (rows of at least 4 K + 1024): kept for normal scores and 3 values,
  // given up for the overflowing ones; K = 2048 goes straight to the full passes.
  const int64_t B = 1, R = 24, T = 9000;
  for (int dist = 0; dist < 4; ++dist)
    for (const int64_t K : {64, 512, 2048}) {
      Tensor s = Tensor::empty({B, R, T}, DType::F32);
      std::mt19937 rng(11 + dist);
      std::normal_distribution<float> nd(0.f, 1.f);
      for (int64_t i = 0; i < s.numel(); ++i) {
        float v = nd(rng);
        if (dist == 1) v = static_cast<float>(rng() % 3) - 1.f;
        if (dist == 2) v = static_cast<float>(rng() % 2);
        if (dist == 3) v = 1.f + 1e-3f * v;
        s.data<float>()[i] = v;
      }
      const Tensor cpu = ops::topk_causal(s, T - R, K);
      const Tensor gpu = ops::topk_causal(to_gpu(s, DType::F32), T - R, K).to(Device::CPU);
      EXPECT_TRUE(same_bits(gpu, cpu)) << "dist " << dist << " K " << K;
    }
}

// The index-order top-k (ops::TopkOrder::kIndex): the winners marked in a bitmap and compacted in index
// order (rows up to 131072 keys), the swapped-composite sort past that (a row of 140000 keys), the rows of
// t + 1 <= K; bit-exact to the CPU on the same scores. Then indexer_topk: the score order's slots sorted by
// index, with the same scores.
// NOTES: exact equality on purpose. The selection does no arithmetic: both backends rank the same f32 bits
// (host-generated, copied bit for bit) by the same total order (score, then lower index, NaN lowest), so
// the derived tolerance is zero and one wrong slot is a bug. The second half compares one GPU scoring
// computation (same kernel, same inputs and shapes) read out in two orders.
TEST(GpuDsa, TopkIndexOrder) {
  DSA_REQUIRE_GPU();
  const auto order = ops::TopkOrder::kIndex;
  struct Rows {
    int64_t R, T, K;
    int dist;
  };
  for (const Rows& c : {Rows{40, 300, 50, 1}, Rows{24, 9000, 64, 0}, Rows{24, 9000, 512, 1}, Rows{24, 9000, 2048, 2},
                        Rows{24, 9000, 512, 3}, Rows{3, 140000, 512, 0}, Rows{300, 300, 64, 0}}) {
    Tensor s = Tensor::empty({1, c.R, c.T}, DType::F32);
    std::mt19937 rng(17 + c.dist);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (int64_t i = 0; i < s.numel(); ++i) {
      float v = nd(rng);
      if (c.dist == 1) v = static_cast<float>(rng() % 3) - 1.f;
      if (c.dist == 2) v = static_cast<float>(rng() % 2);
      if (c.dist == 3) v = 1.f + 1e-3f * v;
      s.data<float>()[i] = v;
    }
    s.data<float>()[5] = std::nanf("");
    const Tensor cpu = ops::topk_causal(s, c.T - c.R, c.K, order);
    const Tensor gpu = ops::topk_causal(to_gpu(s, DType::F32), c.T - c.R, c.K, order).to(Device::CPU);
    EXPECT_TRUE(same_bits(gpu, cpu)) << "T " << c.T << " K " << c.K << " dist " << c.dist;
  }
  const IndexerCase c{2, 531, 16, 64, 64};
  const Pair q = rand_pair({c.B, c.T, c.Hi, c.D}, 80), k = rand_pair({c.B, c.T, c.D}, 81),
             w = rand_pair({c.B, c.T, c.Hi}, 82, 0.5);
  Tensor vs, vi;
  const Tensor by_score = ops::indexer_topk(q.gpu, k.gpu, w.gpu, c.K, true, 0, &vs).to(Device::CPU);
  const Tensor by_index = ops::indexer_topk(q.gpu, k.gpu, w.gpu, c.K, true, 0, &vi, order).to(Device::CPU);
  const Tensor vs_c = vs.to(Device::CPU), vi_c = vi.to(Device::CPU);
  for (int64_t row = 0; row < c.B * c.T; ++row) {
    std::vector<std::pair<int32_t, float>> want;
    for (int64_t i = 0; i < c.K; ++i)
      if (by_score.data<int32_t>()[row * c.K + i] >= 0)
        want.emplace_back(by_score.data<int32_t>()[row * c.K + i], vs_c.data<float>()[row * c.K + i]);
    std::sort(want.begin(), want.end());
    for (int64_t i = 0; i < c.K; ++i) {
      const int32_t got = by_index.data<int32_t>()[row * c.K + i];
      const float gv = vi_c.data<float>()[row * c.K + i];
      if (i >= static_cast<int64_t>(want.size())) {
        EXPECT_EQ(got, -1) << "row " << row << " slot " << i;
        EXPECT_TRUE(std::isinf(gv) && gv < 0) << "row " << row << " slot " << i;
        continue;
      }
      EXPECT_EQ(got, want[i].first) << "row " << row << " slot " << i;
      EXPECT_EQ(gv, want[i].second) << "row " << row << " slot " << i;
    }
  }
}

// ------------------------------------------------------------------------------- sparse attention

struct AttnCase {
  int64_t B, T, H, Dk, Dv, K;
};

// One case's inputs for the tests of a kernel variant against the CPU and its sibling: q, kv, the index sets
// (masked_indices: causal prefixes or every fifth row empty) and dout drawn with seeds seed .. seed + 3, and the
// case's name for the failure messages.
struct SparseInputs {
  double scale;
  Pair q, kv, dout;
  Tensor idx, idx_g;
  std::string what;
};
SparseInputs sparse_inputs(const AttnCase& c, uint64_t seed, bool prefix) {
  SparseInputs in{1.0 / std::sqrt(static_cast<double>(c.Dk)),
                  rand_pair({c.B, c.T, c.H, c.Dk}, seed),
                  rand_pair({c.B, c.T, c.Dk}, seed + 1),
                  rand_pair({c.B, c.T, c.H, c.Dv}, seed + 3),
                  masked_indices(c.B, c.T, c.K, seed + 2, prefix),
                  Tensor(),
                  "T = " + std::to_string(c.T) + " H = " + std::to_string(c.H) + " Dk = " + std::to_string(c.Dk) +
                      " K = " + std::to_string(c.K) + (prefix ? " prefix" : " random, empty rows")};
  in.idx_g = in.idx.to(Device::CUDA);
  return in;
}

TEST(GpuDsa, SparseAttentionForwardBackward) {
  DSA_REQUIRE_GPU();
  // Fused tensor-core path: (288, 256) and (576, 512) with H % 16 == 0 (H % 64 == 0: 64 heads per CTA; else
  // 16 with several tokens per CTA; K not a multiple of the 32-row block); the rest: gather + cuBLASLt.
  for (const AttnCase& c : {AttnCase{2, 37, 4, 16, 12, 8}, AttnCase{2, 300, 16, 288, 256, 64},
                            AttnCase{1, 65, 128, 576, 512, 48}, AttnCase{1, 70, 32, 288, 256, 100},
                            AttnCase{2, 37, 64, 288, 256, 40}, AttnCase{1, 33, 16, 576, 512, 64},
                            AttnCase{1, 50, 12, 288, 256, 24}}) {
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.Dk));
    const Pair q = rand_pair({c.B, c.T, c.H, c.Dk}, 40), kv = rand_pair({c.B, c.T, c.Dk}, 41),
               dout = rand_pair({c.B, c.T, c.H, c.Dv}, 42);
    const Tensor idx = rand_indices(c.B, c.T, c.K, 43);
    const Tensor idx_g = idx.to(Device::CUDA);
    Tensor lse_c, lse_g = poisoned_gpu({c.B, c.H, c.T}, DType::F32);
    const Tensor out_c = ops::sparse_attention_forward(q.cpu, kv.cpu, c.Dv, idx, scale, &lse_c);
    const Tensor out_g = ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, &lse_g);
    // out: P and O rounded to bf16 (r = 2, bf16_tol 9.6e-3); lse stays f32: Dk-term dot products and a
    // K-term sum, 2 (Dk + K) 2^-24 <= 1e-4 relative.
    const double tol_out = bf16_tol(2), tol_f32 = 1e-4;
    EXPECT_TRUE(rel_close(out_g, out_c, tol_out)) << "out, T = " << c.T;
    EXPECT_TRUE(rel_close(lse_g, lse_c, tol_f32)) << "lse, T = " << c.T;
    {  // head-summed probabilities (the sparse indexer loss's target): same out and lse, psum f32 [B, T, K]
      Tensor lse_c2, ps_c, lse_g2, ps_g;
      ops::sparse_attention_forward(q.cpu, kv.cpu, c.Dv, idx, scale, &lse_c2, &ps_c);
      const Tensor out_g2 = ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, &lse_g2, &ps_g);
      ASSERT_EQ(ps_g.dtype(), DType::F32);
      ASSERT_EQ(ps_g.shape(), (Shape{c.B, c.T, c.K}));
      EXPECT_TRUE(rel_close(ps_g, ps_c, tol_f32)) << "probs_sum, T = " << c.T << " H = " << c.H;
      EXPECT_TRUE(rel_close(out_g2, out_c, tol_out)) << "out with probs_sum, T = " << c.T;
      const Tensor ps_h = ps_g.to(Device::CPU);
      for (int64_t i = 0; i < idx.numel(); ++i) {
        if (idx.data<int32_t>()[i] < 0) {
          ASSERT_EQ(ps_h.data<float>()[i], 0.f) << "slot " << i;
        }
      }
    }
    const ops::SparseAttentionGrads gc =
        ops::sparse_attention_backward(dout.cpu, q.cpu, kv.cpu, c.Dv, idx, out_c, lse_c, scale);
    const ops::SparseAttentionGrads gg =
        ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, out_g, lse_g, scale);
    // dq, dkv: P, O (in D = rowsum(dO o O)), dS and the output rounded to bf16 (r = 4); dS = P (dP - D) with
    // D the P-weighted mean of dP, a difference of two terms with independent errors of similar size:
    // kappa = sqrt 2. bf16_tol(4, sqrt 2) = 1.9e-2.
    const double tol_bwd = bf16_tol(4, std::sqrt(2.0));
    EXPECT_TRUE(rel_close(gg.dq, gc.dq, tol_bwd)) << "dq, T = " << c.T;
    EXPECT_TRUE(rel_close(gg.dkv, gc.dkv, tol_bwd)) << "dkv, T = " << c.T;
    {  // the backward's head sums: the forward's probs_sum (tol_f32; bit for bit within one family), same dq/dkv
      Tensor ps_c, ps_f;
      ops::sparse_attention_forward(q.cpu, kv.cpu, c.Dv, idx, scale, nullptr, &ps_c);
      ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, nullptr, &ps_f);
      const ops::SparseAttentionGrads gp =
          ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, out_g, lse_g, scale, true);
      ASSERT_EQ(gp.probs_sum.dtype(), DType::F32);
      ASSERT_EQ(gp.probs_sum.shape(), (Shape{c.B, c.T, c.K}));
      EXPECT_TRUE(rel_close(gp.probs_sum, ps_c, tol_f32)) << "backward probs_sum, T = " << c.T << " H = " << c.H;
      EXPECT_TRUE(rel_close(ps_f, ps_c, tol_f32)) << "forward probs_sum, T = " << c.T << " H = " << c.H;
      if (c.H == 16 && (c.Dk == 288 || c.Dk == 576)) {
        // Bit for bit only within one kernel family: by default the 16-head forward runs on mma.sync and its
        // backward on wgmma (different summation orders, within tol_f32 above), so both are forced to mma.sync.
        struct Env {
          Env() { setenv("DSA_SPARSE_ATTN_WGMMA", "0", 1); }
          ~Env() { unsetenv("DSA_SPARSE_ATTN_WGMMA"); }
        } env;
        Tensor ps_m;
        ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, nullptr, &ps_m);
        const ops::SparseAttentionGrads gpm =
            ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, out_g, lse_g, scale, true);
        const Tensor a = gpm.probs_sum.to(Device::CPU), b = ps_m.to(Device::CPU);
        EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.numel() * sizeof(float)), 0) << "bitwise (mma.sync), T = " << c.T;
      }
      EXPECT_TRUE(rel_close(gp.dq, gc.dq, tol_bwd)) << "dq with probs_sum, T = " << c.T;
      EXPECT_TRUE(rel_close(gp.dkv, gc.dkv, tol_bwd)) << "dkv with probs_sum, T = " << c.T;
    }
  }
}

// The wgmma kernels (DSA_SPARSE_ATTN_WGMMA=1: all of them, the 16-head forward too) against the CPU and
// against the mma.sync kernels on the same inputs: forward and backward with 64 heads per CTA where
// H % 64 == 0 (the backward at Dk 576; at 288 it stays mma.sync), else 16 with keys as M, with the head sums
// each returns. Indices:
// random (-1 anywhere) and causal prefixes (rows t < K hold slots 0 .. t only, so whole 64-slot blocks are
// empty and skipped); K below, at and off multiples of the 64-slot block; Dk % 64 != 0 (288) and == 0 (576).
TEST(GpuDsa, SparseAttentionWgmma) {
  DSA_REQUIRE_GPU();
  struct Env {  // the switch never outlives this test, even when an assertion throws
    ~Env() { unsetenv("DSA_SPARSE_ATTN_WGMMA"); }
  } env;
  for (const AttnCase& c : {AttnCase{1, 65, 128, 576, 512, 48}, AttnCase{2, 37, 64, 288, 256, 40},
                            AttnCase{1, 200, 64, 576, 512, 130}, AttnCase{1, 65, 16, 288, 256, 48},
                            AttnCase{2, 150, 16, 288, 256, 130}, AttnCase{1, 140, 32, 576, 512, 100},
                            AttnCase{1, 90, 16, 576, 512, 64}})
    for (const bool prefix : {false, true}) {
      const double scale = 1.0 / std::sqrt(static_cast<double>(c.Dk));
      const Pair q = rand_pair({c.B, c.T, c.H, c.Dk}, 50), kv = rand_pair({c.B, c.T, c.Dk}, 51),
                 dout = rand_pair({c.B, c.T, c.H, c.Dv}, 53);
      Tensor idx = rand_indices(c.B, c.T, c.K, 52);
      if (prefix)
        for (int64_t bt = 0; bt < c.B * c.T; ++bt)
          for (int64_t k = 0; k < c.K; ++k) {
            const int64_t t = bt % c.T;
            int32_t& v = idx.data<int32_t>()[bt * c.K + k];
            if (t < c.K) v = k <= t ? static_cast<int32_t>(k) : -1;
          }
      const Tensor idx_g = idx.to(Device::CUDA);
      const std::string what = "T = " + std::to_string(c.T) + " H = " + std::to_string(c.H) +
                               " Dk = " + std::to_string(c.Dk) + " K = " + std::to_string(c.K) +
                               (prefix ? " prefix" : " random");
      Tensor lse_c, lse_m, lse_w, ps_c, ps_w;
      const Tensor out_c = ops::sparse_attention_forward(q.cpu, kv.cpu, c.Dv, idx, scale, &lse_c, &ps_c);
      setenv("DSA_SPARSE_ATTN_WGMMA", "0", 1);
      const Tensor out_m = ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, &lse_m);
      const ops::SparseAttentionGrads gm =
          ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, out_m, lse_m, scale);
      setenv("DSA_SPARSE_ATTN_WGMMA", "1", 1);
      const Tensor out_w = ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, &lse_w, &ps_w);
      // The forward: P and O rounded to bf16 (r = 2); lse and the head sums f32. Against the mma.sync kernel
      // the two roundings are independent: kappa = sqrt 2.
      const double tol_out = bf16_tol(2), tol_f32 = 1e-4;
      EXPECT_TRUE(rel_close(out_w, out_c, tol_out)) << "out vs CPU, " << what;
      EXPECT_TRUE(rel_close(lse_w, lse_c, tol_f32)) << "lse vs CPU, " << what;
      EXPECT_TRUE(rel_close(out_w, out_m, bf16_tol(2, std::sqrt(2.0)))) << "out vs mma.sync, " << what;
      EXPECT_TRUE(rel_close(lse_w, lse_m, tol_f32)) << "lse vs mma.sync, " << what;
      EXPECT_TRUE(rel_close(ps_w, ps_c, tol_f32)) << "probs_sum after the wgmma forward, " << what;
      // The backward on the CPU's out and lse (the GPU's within the tolerances above): tolerances as in
      // SparseAttentionForwardBackward (r = 4, kappa = sqrt 2), and sqrt 2 more against the mma.sync kernel.
      const ops::SparseAttentionGrads gc =
          ops::sparse_attention_backward(dout.cpu, q.cpu, kv.cpu, c.Dv, idx, out_c, lse_c, scale, true);
      const ops::SparseAttentionGrads gw =
          ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, out_w, lse_w, scale, true);
      const double tol_bwd = bf16_tol(4, std::sqrt(2.0));
      EXPECT_TRUE(rel_close(gw.dq, gc.dq, tol_bwd)) << "dq vs CPU, " << what;
      EXPECT_TRUE(rel_close(gw.dkv, gc.dkv, tol_bwd)) << "dkv vs CPU, " << what;
      EXPECT_TRUE(rel_close(gw.probs_sum, ps_c, tol_f32)) << "backward probs_sum vs CPU, " << what;
      EXPECT_TRUE(rel_close(gw.dq, gm.dq, std::sqrt(2.0) * tol_bwd)) << "dq vs mma.sync, " << what;
      EXPECT_TRUE(rel_close(gw.dkv, gm.dkv, std::sqrt(2.0) * tol_bwd)) << "dkv vs mma.sync, " << what;
    }
  // A value the switch cannot honour is refused by name, not read as the default.
  const Pair q = rand_pair({1, 8, 16, 288}, 60), kv = rand_pair({1, 8, 288}, 61);
  const Tensor idx = rand_indices(1, 8, 4, 62).to(Device::CUDA);
  expect_refused_by_name("DSA_SPARSE_ATTN_WGMMA", [&] {
    Tensor lse;
    ops::sparse_attention_forward(q.gpu, kv.gpu, 256, idx, 0.06, &lse, nullptr);
  });
}

// The warp-specialized forward (the default at Dk 576 / Dv 512, H % 64 == 0: 64 heads a CTA, blocks of 64 slots
// taken in turn by two warpgroups) against the CPU and against the two-warpgroup kernel on the same inputs.
// Block counts 1 .. 5: K 300 has two whole pairs of blocks and one alone (the producer's and both consumers'
// steady state, the odd tail's hand-over), K 256 pairs only, K 48 one block at H = 128 (two head groups a
// token); random indices with every fifth row empty (nothing gathered: out 0, lse -inf), and causal prefixes
// (odd and even block counts).
TEST(GpuDsa, SparseAttentionForwardWs) {
  DSA_REQUIRE_GPU();
  struct Env {  // the switch never outlives this test, even when an assertion throws
    ~Env() { unsetenv("DSA_SPARSE_ATTN_FWD_WS"); }
  } env;
  for (const AttnCase& c : {AttnCase{1, 200, 64, 576, 512, 300}, AttnCase{2, 70, 64, 576, 512, 256},
                            AttnCase{1, 65, 128, 576, 512, 48}})
    for (const bool prefix : {false, true}) {
      const SparseInputs in = sparse_inputs(c, 70, prefix);
      const double scale = in.scale;
      const Pair &q = in.q, &kv = in.kv;
      const Tensor &idx = in.idx, &idx_g = in.idx_g;
      const std::string& what = in.what;
      Tensor lse_c, lse_o, lse_w;
      const Tensor out_c = ops::sparse_attention_forward(q.cpu, kv.cpu, c.Dv, idx, scale, &lse_c, nullptr);
      setenv("DSA_SPARSE_ATTN_FWD_WS", "0", 1);
      const Tensor out_o = ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, &lse_o, nullptr);
      setenv("DSA_SPARSE_ATTN_FWD_WS", "1", 1);
      const Tensor out_w = ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, &lse_w, nullptr);
      // Empty rows: lse -inf in all three, then 0 so that the norm-wise comparisons below take the rest.
      Tensor l_c = lse_c.to(DType::F32), l_o = lse_o.to(Device::CPU), l_w = lse_w.to(Device::CPU);
      for (int64_t i = 0; i < l_c.numel(); ++i) {
        if (!std::isinf(l_c.data<float>()[i])) continue;
        EXPECT_TRUE(std::isinf(l_w.data<float>()[i]) && std::isinf(l_o.data<float>()[i]))
            << "lse " << i << ", " << what;
        l_c.data<float>()[i] = l_o.data<float>()[i] = l_w.data<float>()[i] = 0.f;
      }
      // As SparseAttentionWgmma: P and O rounded to bf16 (r = 2), kappa = sqrt 2 between the two kernels.
      EXPECT_TRUE(rel_close(out_w, out_c, bf16_tol(2))) << "out vs CPU, " << what;
      EXPECT_TRUE(rel_close(l_w, l_c, 1e-4)) << "lse vs CPU, " << what;
      EXPECT_TRUE(rel_close(out_w, out_o, bf16_tol(2, std::sqrt(2.0)))) << "out vs two-warpgroup kernel, " << what;
      EXPECT_TRUE(rel_close(l_w, l_o, 1e-4)) << "lse vs two-warpgroup kernel, " << what;
    }
  // A value the switch cannot honour is refused by name, not read as the default.
  const Pair q = rand_pair({1, 8, 64, 576}, 73), kv = rand_pair({1, 8, 576}, 74);
  const Tensor idx = rand_indices(1, 8, 4, 75).to(Device::CUDA);
  expect_refused_by_name("DSA_SPARSE_ATTN_FWD_WS", [&] {
    Tensor lse;
    ops::sparse_attention_forward(q.gpu, kv.gpu, 512, idx, 0.04, &lse, nullptr);
  });
}

// The backward's split variant (DSA_SPARSE_ATTN_BWD_SPLIT=1: S on warpgroup 0 and dP on warpgroup 1 at m64n64,
// the halves crossed through shared memory; the dKV pieces 48 columns wide, two in flight) against the CPU
// and against the default kernel on the same inputs: K 48 (one block), 130 (a partial third), 300 (five, the
// last partial); H 64 and 128; random indices with every fifth row empty, and causal prefixes; with the head
// sums of P (probs) asked for.
TEST(GpuDsa, SparseAttentionBackwardSplit) {
  DSA_REQUIRE_GPU();
  struct Env {  // the switch never outlives this test, even when an assertion throws
    ~Env() { unsetenv("DSA_SPARSE_ATTN_BWD_SPLIT"); }
  } env;
  for (const AttnCase& c : {AttnCase{1, 65, 128, 576, 512, 48}, AttnCase{1, 200, 64, 576, 512, 130},
                            AttnCase{2, 90, 64, 576, 512, 300}})
    for (const bool prefix : {false, true}) {
      const SparseInputs in = sparse_inputs(c, 80, prefix);
      const double scale = in.scale;
      const Pair &q = in.q, &kv = in.kv, &dout = in.dout;
      const Tensor &idx = in.idx, &idx_g = in.idx_g;
      const std::string& what = in.what;
      Tensor lse_c, ps_c;
      const Tensor out_c = ops::sparse_attention_forward(q.cpu, kv.cpu, c.Dv, idx, scale, &lse_c, &ps_c);
      const Tensor out_g = out_c.to(DType::BF16).to(Device::CUDA), lse_g = lse_c.to(DType::F32).to(Device::CUDA);
      const ops::SparseAttentionGrads gc =
          ops::sparse_attention_backward(dout.cpu, q.cpu, kv.cpu, c.Dv, idx, out_c, lse_c, scale, true);
      setenv("DSA_SPARSE_ATTN_BWD_SPLIT", "0", 1);
      const ops::SparseAttentionGrads gd =
          ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, out_g, lse_g, scale, true);
      setenv("DSA_SPARSE_ATTN_BWD_SPLIT", "1", 1);
      const ops::SparseAttentionGrads gs =
          ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, out_g, lse_g, scale, true);
      // As SparseAttentionWgmma: r = 4, kappa = sqrt 2 against the CPU, sqrt 2 more between the two kernels.
      const double tol_bwd = bf16_tol(4, std::sqrt(2.0)), tol_f32 = 1e-4;
      EXPECT_TRUE(rel_close(gs.dq, gc.dq, tol_bwd)) << "dq vs CPU, " << what;
      EXPECT_TRUE(rel_close(gs.dkv, gc.dkv, tol_bwd)) << "dkv vs CPU, " << what;
      EXPECT_TRUE(rel_close(gs.probs_sum, ps_c, tol_f32)) << "probs_sum vs CPU, " << what;
      EXPECT_TRUE(rel_close(gs.dq, gd.dq, std::sqrt(2.0) * tol_bwd)) << "dq vs the default kernel, " << what;
      EXPECT_TRUE(rel_close(gs.dkv, gd.dkv, std::sqrt(2.0) * tol_bwd)) << "dkv vs the default kernel, " << what;
    }
  // A value the switch cannot honour is refused by name, not read as the default.
  const Pair q = rand_pair({1, 8, 64, 576}, 84), kv = rand_pair({1, 8, 576}, 85), dout = rand_pair({1, 8, 64, 512}, 86);
  const Tensor idx = rand_indices(1, 8, 4, 87).to(Device::CUDA);
  const Tensor lse = Tensor::zeros({1, 64, 8}, DType::F32).to(Device::CUDA);
  expect_refused_by_name("DSA_SPARSE_ATTN_BWD_SPLIT", [&] {
    ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, 512, idx, dout.gpu, lse, 0.04);
  });
}

// The mma.sync kernels' 16-head tiles with the whole-segment gather (DSA_SPARSE_ATTN_MMA_LINES=1: eight lanes a
// row, several passes) against the default one-pass gather and against the CPU, every kernel forced to
// mma.sync (DSA_SPARSE_ATTN_WGMMA=0). The shared-memory tiles are the same, so the forward, its head sums and
// dq agree with the one-pass gather's within what a different FMA contraction allows (derived below; on an H100
// they were bit for bit); dkv (f32 atomics in any order) within the atomics' order. H 16 and 32 (two head
// groups), Dk 288 (rows of 576 bytes: half of them start mid-line) and 576; random indices with every fifth row
// empty, and causal prefixes.
TEST(GpuDsa, SparseAttentionMmaLines) {
  DSA_REQUIRE_GPU();
  struct Env {  // the switches never outlive this test, even when an assertion throws
    Env() { setenv("DSA_SPARSE_ATTN_WGMMA", "0", 1); }
    ~Env() {
      unsetenv("DSA_SPARSE_ATTN_MMA_LINES");
      unsetenv("DSA_SPARSE_ATTN_WGMMA");
    }
  } env;
  for (const AttnCase& c : {AttnCase{2, 150, 16, 288, 256, 130}, AttnCase{1, 90, 16, 576, 512, 64},
                            AttnCase{1, 140, 32, 576, 512, 100}, AttnCase{1, 65, 32, 288, 256, 48}})
    for (const bool prefix : {false, true}) {
      const SparseInputs in = sparse_inputs(c, 90, prefix);
      const double scale = in.scale;
      const Pair &q = in.q, &kv = in.kv, &dout = in.dout;
      const Tensor &idx = in.idx, &idx_g = in.idx_g;
      const std::string& what = in.what;
      Tensor lse_c, ps_c;
      const Tensor out_c = ops::sparse_attention_forward(q.cpu, kv.cpu, c.Dv, idx, scale, &lse_c, &ps_c);
      const ops::SparseAttentionGrads gc =
          ops::sparse_attention_backward(dout.cpu, q.cpu, kv.cpu, c.Dv, idx, out_c, lse_c, scale, true);
      struct Run {
        Tensor out, lse, ps;
        ops::SparseAttentionGrads g;
      } run[2];
      for (int lines = 0; lines < 2; ++lines) {
        setenv("DSA_SPARSE_ATTN_MMA_LINES", lines ? "1" : "0", 1);
        Run& r = run[lines];
        r.out = ops::sparse_attention_forward(q.gpu, kv.gpu, c.Dv, idx_g, scale, &r.lse, &r.ps);
        r.g = ops::sparse_attention_backward(dout.gpu, q.gpu, kv.gpu, c.Dv, idx_g, r.out, r.lse, scale, true);
      }
      const Run &d = run[0], &l = run[1];
      // Empty rows: lse -inf in all three, then 0 so that the norm-wise comparisons take the rest.
      Tensor l_c = lse_c.to(DType::F32), l_l = l.lse.to(Device::CPU), l_d = d.lse.to(Device::CPU);
      for (int64_t i = 0; i < l_c.numel(); ++i) {
        if (!std::isinf(l_c.data<float>()[i])) continue;
        EXPECT_TRUE(std::isinf(l_l.data<float>()[i]) && std::isinf(l_d.data<float>()[i]))
            << "lse " << i << ", " << what;
        l_c.data<float>()[i] = l_l.data<float>()[i] = l_d.data<float>()[i] = 0.f;
      }
      // Against the one-pass gather: the same arithmetic on byte-identical tiles, in two kernel instantiations.
      // Their PTX leaves mul.f32 / add.f32 unrounded, which ptxas may contract into FMAs in each on its own: an f32
      // value then moves by a few units of 2^-24 per term, RMS sqrt(n) 2^-24 ~ 2e-6 over the n <= Dk + K ~ 1100
      // terms of a row (f32 outputs: 1e-5), and a bf16 output crosses a rounding boundary for ~2e-6 / 2^-8 ~ 5e-4
      // of the elements, one unit (2^-8) each: 2^-8 sqrt(1 / 256) = 2.4e-4 allows eight times that. A missed or
      // misplaced slot moves its row by ~1 / sqrt(K) (>= 3e-3 norm-wise at these sizes).
      const double tol_same_bf16 = std::ldexp(1.0, -8) / 16, tol_same_f32 = 1e-5;
      EXPECT_TRUE(rel_close(l.out, d.out, tol_same_bf16)) << "out vs the one-pass gather, " << what;
      EXPECT_TRUE(rel_close(l_l, l_d, tol_same_f32)) << "lse vs the one-pass gather, " << what;
      EXPECT_TRUE(rel_close(l.ps, d.ps, tol_same_f32)) << "forward probs_sum vs the one-pass gather, " << what;
      EXPECT_TRUE(rel_close(l.g.dq, d.g.dq, tol_same_bf16)) << "dq vs the one-pass gather, " << what;
      // Against the CPU as SparseAttentionWgmma.
      const double tol_bwd = bf16_tol(4, std::sqrt(2.0)), tol_f32 = 1e-4;
      EXPECT_TRUE(rel_close(l.out, out_c, bf16_tol(2))) << "out vs CPU, " << what;
      EXPECT_TRUE(rel_close(l_l, l_c, tol_f32)) << "lse vs CPU, " << what;
      EXPECT_TRUE(rel_close(l.ps, ps_c, tol_f32)) << "forward probs_sum vs CPU, " << what;
      EXPECT_TRUE(rel_close(l.g.dq, gc.dq, tol_bwd)) << "dq vs CPU, " << what;
      EXPECT_TRUE(rel_close(l.g.dkv, gc.dkv, tol_bwd)) << "dkv vs CPU, " << what;
      EXPECT_TRUE(rel_close(l.g.probs_sum, ps_c, tol_f32)) << "backward probs_sum vs CPU, " << what;
      // The same f32 sums in another order (~2^-24 each), of which the rare one that crosses a bf16 rounding
      // boundary moves by one unit (2^-8): far below 1e-3 norm-wise; a missed or misplaced row is not.
      EXPECT_TRUE(rel_close(l.g.dkv, d.g.dkv, 1e-3)) << "dkv vs the one-pass gather (atomics' order), " << what;
    }
  // A value the switch cannot honour is refused by name, not read as the default.
  const Pair q = rand_pair({1, 8, 16, 288}, 94), kv = rand_pair({1, 8, 288}, 95);
  const Tensor idx = rand_indices(1, 8, 4, 96).to(Device::CUDA);
  expect_refused_by_name("DSA_SPARSE_ATTN_MMA_LINES", [&] {
    Tensor lse;
    ops::sparse_attention_forward(q.gpu, kv.gpu, 256, idx, 0.06, &lse, nullptr);
  });
}

// --------------------------------------------------------------------------------- indexer losses

// lse [B, H, T] of dense causal attention (f64 loops), as f32.
Tensor dense_lse(const Tensor& q, const Tensor& k, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2);
  Tensor lse = Tensor::empty({B, H, T}, DType::F32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> s(static_cast<size_t>(t + 1));
        double m = -1e300;
        for (int64_t u = 0; u <= t; ++u) {
          double d = 0;
          for (int64_t i = 0; i < Dk; ++i)
            d += q.item(((b * T + t) * H + h) * Dk + i) * k.item(((b * T + u) * Hk + h / (H / Hk)) * Dk + i);
          s[u] = scale * d;
          m = std::max(m, s[u]);
        }
        double z = 0;
        for (double v : s) z += std::exp(v - m);
        lse.set_item((b * H + h) * T + t, m + std::log(z));
      }
  return lse;
}

// Indexer KL gradients: the target's probabilities and the indexer scores are rounded to bf16 before the
// softmax, dI = softmax(I) - p is rounded, and so are the products' outputs (r = 4, gpu_util.h); dI is a
// difference of two terms with independent errors of similar size: kappa = sqrt 2. bf16_tol = 1.9e-2.
const double kKlGradTol = bf16_tol(4, std::sqrt(2.0));

struct LossCase {
  int64_t B, T, H, Hk, Dk, Hi, D, block_rows;
};

TEST(GpuDsa, IndexerKlDenseAndRecall) {
  DSA_REQUIRE_GPU();
  // Cases: MHA-like heads, grouped keys with row chunks, unaligned head dims (scalar tile loads, 3 indexer
  // heads: query-head rows straddle CTAs), the bench-small MQA shape (absorbed MLA, Dk 288), and an odd
  // T of 7 key tiles in one chunk of 13 row blocks: the gradient pass splits the keys over 7 CTAs per
  // row block (one tile each; odd T takes the scalar dI stores).
  // Every case runs on the wgmma passes (sm_90a) and on the mma.sync ones (DSA_KL_WGMMA=0); the T = 1100
  // MHA case (16 heads of 96, the warm-up's form) takes whole key tiles below the diagonal (the unmasked
  // epilogue) and, at 300 rows a chunk, the dk kernel's row pieces.
  for (const char* wg : {"1", "0"})
  for (const LossCase& c : {LossCase{2, 37, 4, 4, 24, 4, 64, 0}, LossCase{2, 300, 4, 2, 32, 8, 128, 64},
                            LossCase{1, 70, 6, 3, 20, 3, 16, 0}, LossCase{1, 261, 16, 1, 288, 16, 64, 100},
                            LossCase{1, 777, 4, 2, 40, 5, 64, 0}, LossCase{1, 1100, 16, 16, 96, 16, 64, 300}}) {
    setenv("DSA_KL_WGMMA", wg, 1);
    SCOPED_TRACE(std::string("DSA_KL_WGMMA=") + wg);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.Dk));
    const Pair qm = rand_pair({c.B, c.T, c.H, c.Dk}, 50), km = rand_pair({c.B, c.T, c.Hk, c.Dk}, 51);
    const Pair q = rand_pair({c.B, c.T, c.Hi, c.D}, 52), k = rand_pair({c.B, c.T, c.D}, 53),
               w = rand_pair({c.B, c.T, c.Hi}, 54, 0.3);
    const Tensor lse = dense_lse(qm.cpu, km.cpu, scale);
    const Tensor lse_g = lse.to(Device::CUDA);
    for (bool fp8 : {false, true}) {
      ops::IndexerGrads gc, gg;
      const ops::IndexerLossResult rc =
          ops::indexer_kl_dense(qm.cpu, km.cpu, lse, scale, q.cpu, k.cpu, w.cpu, fp8, 0.5, &gc, c.block_rows);
      const ops::IndexerLossResult rg =
          ops::indexer_kl_dense(qm.gpu, km.gpu, lse_g, scale, q.gpu, k.gpu, w.gpu, fp8, 0.5, &gg, c.block_rows);
      EXPECT_EQ(rg.rows, rc.rows);
      EXPECT_NEAR(rg.loss_sum, rc.loss_sum, 2e-3 * std::fabs(rc.loss_sum) + 1e-4) << "T = " << c.T << " fp8 " << fp8;
      EXPECT_TRUE(rel_close(gg.dq, gc.dq, kKlGradTol)) << "dq T = " << c.T << " fp8 " << fp8;
      EXPECT_TRUE(rel_close(gg.dk, gc.dk, kKlGradTol)) << "dk T = " << c.T << " fp8 " << fp8;
      EXPECT_TRUE(rel_close(gg.dw, gc.dw, kKlGradTol)) << "dw T = " << c.T << " fp8 " << fp8;
      // The loss alone (the stats pass: Z from the computed target instead of H).
      const ops::IndexerLossResult rl =
          ops::indexer_kl_dense(qm.gpu, km.gpu, lse_g, scale, q.gpu, k.gpu, w.gpu, fp8, 0.5, nullptr, c.block_rows);
      EXPECT_NEAR(rl.loss_sum, rc.loss_sum, 2e-3 * std::fabs(rc.loss_sum) + 1e-4) << "loss only T = " << c.T;
    }
    const Tensor idx = rand_indices(c.B, c.T, 16, 55);
    const ops::IndexerRecall rc = ops::indexer_recall(qm.cpu, km.cpu, lse, scale, idx, c.block_rows);
    const ops::IndexerRecall rg = ops::indexer_recall(qm.gpu, km.gpu, lse_g, scale, idx.to(Device::CUDA), c.block_rows);
    EXPECT_EQ(rg.rows, rc.rows);
    EXPECT_NEAR(rg.recall_sum, rc.recall_sum, 1e-3 * rc.recall_sum) << "recall T = " << c.T;
  }
  unsetenv("DSA_KL_WGMMA");
}

TEST(GpuDsa, IndexerKlSparse) {
  DSA_REQUIRE_GPU();
  for (const LossCase& c : {LossCase{2, 37, 4, 1, 16, 4, 64, 0}, LossCase{2, 300, 16, 1, 288, 16, 64, 0},
                            LossCase{1, 45, 4, 1, 16, 3, 4, 0}, LossCase{1, 45, 4, 1, 16, 3, 8, 0}}) {
    const int64_t K = 24;
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.Dk));
    const Pair qm = rand_pair({c.B, c.T, c.H, c.Dk}, 60), kv = rand_pair({c.B, c.T, c.Dk}, 61);
    const Pair q = rand_pair({c.B, c.T, c.Hi, c.D}, 62), k = rand_pair({c.B, c.T, c.D}, 63),
               w = rand_pair({c.B, c.T, c.Hi}, 64, 0.3);
    Tensor idx = rand_indices(c.B, c.T, K, 65);
    for (int64_t k2 = 0; k2 < K; ++k2) idx.data<int32_t>()[((c.B - 1) * c.T + 5) * K + k2] = -1;  // an empty row
    Tensor lse;
    ops::sparse_attention_forward(qm.cpu, kv.cpu, c.Dk, idx, scale, &lse);
    const Tensor idx_g = idx.to(Device::CUDA), lse_g = lse.to(Device::CUDA);
    for (bool fp8 : {false, true}) {
      ops::IndexerGrads gc, gg;
      const ops::IndexerLossResult rc =
          ops::indexer_kl_sparse(qm.cpu, kv.cpu, lse, scale, idx, q.cpu, k.cpu, w.cpu, fp8, 0.5, &gc);
      const ops::IndexerLossResult rg =
          ops::indexer_kl_sparse(qm.gpu, kv.gpu, lse_g, scale, idx_g, q.gpu, k.gpu, w.gpu, fp8, 0.5, &gg);
      EXPECT_EQ(rg.rows, rc.rows);
      EXPECT_NEAR(rg.loss_sum, rc.loss_sum, 2e-3 * std::fabs(rc.loss_sum) + 1e-4) << "T = " << c.T << " fp8 " << fp8;
      EXPECT_TRUE(rel_close(gg.dq, gc.dq, kKlGradTol)) << "dq T = " << c.T << " fp8 " << fp8;
      EXPECT_TRUE(rel_close(gg.dk, gc.dk, kKlGradTol)) << "dk T = " << c.T << " fp8 " << fp8;
      EXPECT_TRUE(rel_close(gg.dw, gc.dw, kKlGradTol)) << "dw T = " << c.T << " fp8 " << fp8;
      // Target from the forward's head sums: the CPU's (f32 on the GPU: isolates the loss kernel) and the
      // GPU forward's own (fused path for Dv = 256 at Dk = 288).
      const int64_t dv = c.Dk == 288 ? 256 : c.Dk;
      Tensor lse2, ps_c, lse_g2, ps_g;
      ops::sparse_attention_forward(qm.cpu, kv.cpu, dv, idx, scale, &lse2, &ps_c);
      ops::sparse_attention_forward(qm.gpu, kv.gpu, dv, idx_g, scale, &lse_g2, &ps_g);
      for (const Tensor* ps : {&ps_c, &ps_g}) {
        ops::IndexerGrads gp;
        const Tensor psd = ps->device() == Device::CUDA ? *ps : ps->to(Device::CUDA);
        const ops::IndexerLossResult rp =
            ops::indexer_kl_sparse_from_probs(psd, idx_g, q.gpu, k.gpu, w.gpu, fp8, 0.5, &gp);
        const char* which = ps == &ps_c ? "cpu probs" : "gpu probs";
        EXPECT_EQ(rp.rows, rc.rows);
        EXPECT_NEAR(rp.loss_sum, rc.loss_sum, 2e-3 * std::fabs(rc.loss_sum) + 1e-4) << which << " fp8 " << fp8;
        EXPECT_TRUE(rel_close(gp.dq, gc.dq, kKlGradTol)) << "dq " << which << " T = " << c.T << " fp8 " << fp8;
        EXPECT_TRUE(rel_close(gp.dk, gc.dk, kKlGradTol)) << "dk " << which << " T = " << c.T << " fp8 " << fp8;
        EXPECT_TRUE(rel_close(gp.dw, gc.dw, kKlGradTol)) << "dw " << which << " T = " << c.T << " fp8 " << fp8;
      }
      {  // I from given slot scores (the top-k's, here the CPU scores gathered at idx): no rescoring
        Tensor qs = q.cpu, ks = k.cpu;
        if (fp8) ops::indexer_fp8_operands(q.cpu, k.cpu, &qs, &ks);
        const Tensor full = ops::indexer_scores_forward(qs, ks, w.cpu, 0, c.T);
        Tensor sc = Tensor::empty({c.B, c.T, K}, DType::F32);
        for (int64_t i = 0; i < idx.numel(); ++i) {
          const int32_t s = idx.data<int32_t>()[i];
          sc.data<float>()[i] = s >= 0 ? static_cast<float>(full.item((i / K) * c.T + s)) : -INFINITY;
        }
        const Tensor sc_g = sc.to(Device::CUDA);
        ops::IndexerGrads gs;
        const ops::IndexerLossResult rs =
            ops::indexer_kl_sparse_from_probs(ps_g, idx_g, q.gpu, k.gpu, w.gpu, fp8, 0.5, &gs, &sc_g);
        EXPECT_EQ(rs.rows, rc.rows);
        EXPECT_NEAR(rs.loss_sum, rc.loss_sum, 2e-3 * std::fabs(rc.loss_sum) + 1e-4) << "slot scores fp8 " << fp8;
        EXPECT_TRUE(rel_close(gs.dq, gc.dq, kKlGradTol)) << "dq slot scores T = " << c.T << " fp8 " << fp8;
        EXPECT_TRUE(rel_close(gs.dk, gc.dk, kKlGradTol)) << "dk slot scores T = " << c.T << " fp8 " << fp8;
        EXPECT_TRUE(rel_close(gs.dw, gc.dw, kKlGradTol)) << "dw slot scores T = " << c.T << " fp8 " << fp8;
      }
    }
  }
}

}  // namespace
}  // namespace dsa
