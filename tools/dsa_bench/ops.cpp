// dsa-bench ops: per-op timings of the op layer (kernels/ops.h, kernels/dsa_ops.h). On a GPU: bf16 at the
// bench-small and production shapes (SPEC.md §4); without one: the CPU reference in f32 at CPU-sized
// shapes. One line per figure (median of the timed runs after warm-up, tools/dsa_bench/bench_util.h),
// with --json one {"bench":"ops", ...} line each.
//
//   dsa-bench ops [--only attention,gemm,indexer_kl,sparse_attention,indexer,moe] [--json FILE]
//
// Sections (the figures the GPU tests used to print under DSA_GPU_BENCH=1, and the CPU timing tests):
//   attention          dense attention forward / backward (FLOPs causal, T^2 / 2 pairs; backward 2.5x)
//   gemm               a square GEMM, bench-small's linear layers (fwd, dgrad, f32 wgrad), LM head + CE
//   indexer_kl         dense indexer KL (loss, loss + grads) and recall; indexer top-k, fp8 and bf16
//   sparse_attention   sparse MLA attention fwd / bwd; on the GPU the fused (mma), the wgmma
//                      (DSA_SPARSE_ATTN_WGMMA=1: 64 heads per CTA where H % 64 == 0 (the backward at Dk
//                      576 only), else 16 with keys as M) and the gather + cuBLASLt (gemm,
//                      DSA_SPARSE_ATTN_GEMM=1) paths; mma-1pass: the mma.sync kernels' 16-head tiles with the
//                      one-pass gather the whole-segment one replaced (DSA_SPARSE_ATTN_MMA_LINES=0)
//   indexer            the sparse stage's indexer route: scores, top-k (fp8 in both slot orders), sparse KL,
//                      probabilities pass
//   moe                grouped expert GEMM (fwd, bwd, host time of a call), routing and permutation ops
#include "kernels/ops.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/dsa_ops.h"
#include "tools/dsa_bench/bench_util.h"

namespace dsa::bench {
namespace {

// Where the section runs and where its figures go.
struct Ops {
  Device dev;
  DType dt;  // activations and weights: bf16 on the GPU, f32 on the CPU
  bool gpu;
  std::ofstream* json;

  // Seconds: the median of `reps` runs after `warm` (on the CPU 3 runs after 1: its shapes are small
  // but its kernels slow).
  double time(int warm, int reps, const std::function<void()>& f) const {
    return time_median(dev, gpu ? warm : 1, gpu ? reps : 3, f);
  }
  // One figure: the name, milliseconds and, when flop > 0, the rate (TFLOP/s on the GPU, GFLOP/s on the CPU).
  void report(const std::string& name, double s, double flop = 0) const {
    if (flop > 0)
      std::printf("%-96s %10.3f ms %8.2f %s\n", name.c_str(), 1e3 * s, flop / s * (gpu ? 1e-12 : 1e-9),
                  gpu ? "TFLOP/s" : "GFLOP/s");
    else
      std::printf("%-96s %10.3f ms\n", name.c_str(), 1e3 * s);
    std::fflush(stdout);
    if (json->is_open()) {
      *json << "{\"bench\":\"ops\",\"device\":\"" << device_name(dev) << "\",\"name\":\"" << name
            << "\",\"ms\":" << 1e3 * s;
      if (flop > 0) *json << ",\"tflops\":" << flop / s * 1e-12;
      *json << "}\n";
    }
  }
  Tensor uniform(const Shape& s, uint64_t seed, float a) const { return uniform_tensor(s, dt, dev, seed, a); }
  Tensor normal(const Shape& s, uint64_t seed, double sd = 1.0) const { return random_tensor(s, dt, dev, seed, sd); }
};

std::string dims(std::initializer_list<std::pair<const char*, int64_t>> kv) {
  std::string s;
  for (const auto& [k, v] : kv) s += std::string(s.empty() ? "" : " ") + k + "=" + std::to_string(v);
  return s;
}

// ------------------------------------------------------------------------------------ attention
void attention(const Ops& o) {
  struct Case {
    int64_t B, T, H, Hk, Dk, Dv;
  };
  const std::vector<Case> cases = o.gpu ? std::vector<Case>{{1, 16384, 16, 16, 96, 64}, {1, 8192, 128, 128, 192, 128}}
                                        : std::vector<Case>{{1, 1024, 16, 16, 96, 64}, {1, 1024, 16, 1, 288, 256}};
  for (const Case& c : cases) {
    const Tensor q = o.uniform({c.B, c.T, c.H, c.Dk}, 1, 1.f), k = o.uniform({c.B, c.T, c.Hk, c.Dk}, 2, 1.f);
    const Tensor v = o.uniform({c.B, c.T, c.Hk, c.Dv}, 3, 1.f), dout = o.uniform({c.B, c.T, c.H, c.Dv}, 4, 1.f);
    const double scale = 1.0 / std::sqrt(double(c.Dk));
    Tensor lse;
    const Tensor out = ops::attention_forward(q, k, v, scale, &lse);
    const double fwd = o.time(3, 7, [&] { ops::attention_forward(q, k, v, scale, &lse); });
    const double bwd = o.time(3, 5, [&] { ops::attention_backward(dout, q, k, v, out, lse, scale); });
    const double flop = 2.0 * c.B * c.H * (double(c.T) * c.T / 2) * (c.Dk + c.Dv);
    const std::string d = dims({{"B", c.B}, {"T", c.T}, {"H", c.H}, {"Hk", c.Hk}, {"Dk", c.Dk}, {"Dv", c.Dv}});
    o.report("attention fwd " + d, fwd, flop);
    o.report("attention bwd " + d, bwd, 2.5 * flop);
    o.report("attention fwd+bwd " + d, fwd + bwd, 3.5 * flop);
  }
}

// ------------------------------------------------------------------------- gemm, linear, lm head
void gemm(const Ops& o) {
  {
    const int64_t s = o.gpu ? 4096 : 1024;
    const Tensor a = o.normal({s, s}, 1), b = o.normal({s, s}, 2);
    Tensor c = Tensor::zeros({s, s}, o.dt, o.dev);
    o.report("gemm NT " + std::to_string(s) + "^3", o.time(3, 10, [&] { ops::gemm(a, false, b, true, c); }),
             2.0 * s * s * s);
  }
  struct Layer {
    const char* name;
    int64_t in, out;
  };
  const int64_t N = o.gpu ? 16384 : 1024, N_head = o.gpu ? 2048 : 64;  // tokens (bench-small step: 16384)
  for (const Layer& l : {Layer{"q_a", 1024, 384}, Layer{"q_b", 384, 1536}, Layer{"kv_a", 1024, 288},
                         Layer{"kv_b", 256, 2048}, Layer{"o", 1024, 1024}, Layer{"mlp up", 1024, 2816},
                         Layer{"mlp down", 2816, 1024}, Layer{"lm head", 1024, 129280}}) {
    const int64_t n = l.out > 100000 ? N_head : N;
    const Tensor x = o.normal({n, l.in}, 3), w = o.normal({l.out, l.in}, 4, 0.02), dy = o.normal({n, l.out}, 5);
    Tensor dw = Tensor::zeros({l.out, l.in}, DType::F32, o.dev);
    const double flop = 2.0 * n * l.in * l.out;
    const std::string d = std::string(l.name) + " " + dims({{"N", n}, {"in", l.in}, {"out", l.out}});
    o.report("linear fwd " + d, o.time(3, 10, [&] { ops::linear_forward(x, w); }), flop);
    o.report("linear dgrad " + d, o.time(3, 10, [&] { ops::linear_backward(dy, x, w, nullptr, true); }), flop);
    o.report("linear wgrad (f32 +=) " + d, o.time(3, 10, [&] { ops::linear_backward(dy, x, w, &dw, false); }), flop);
  }
  {
    const int64_t n = o.gpu ? 2048 : 64, d = o.gpu ? 1024 : 64, v = 129280;
    const Tensor x = o.normal({n, d}, 6), w = o.normal({v, d}, 7, 0.03);
    std::vector<int32_t> t(n);
    std::mt19937 rng(8);
    for (auto& id : t) id = static_cast<int32_t>(rng() % v);
    const Tensor tg = Tensor::from_vector(t, {n}).to(o.dev);
    Tensor dx = Tensor::empty({n, d}, o.dt, o.dev), dw = Tensor::zeros({v, d}, DType::F32, o.dev);
    const double flop = 2.0 * n * d * v;
    const std::string s = dims({{"N", n}, {"D", d}, {"V", v}});
    o.report("lm_head_cross_entropy fwd " + s,
             o.time(3, 5, [&] { ops::lm_head_cross_entropy(x, w, tg, 1.0 / n, nullptr, nullptr); }), flop);
    o.report("lm_head_cross_entropy fwd+bwd " + s,
             o.time(3, 5, [&] { ops::lm_head_cross_entropy(x, w, tg, 1.0 / n, &dx, &dw); }), 3 * flop);
  }
}

// --------------------------------------------------------------------- dense indexer KL and top-k
void indexer_kl(const Ops& o) {
  struct Case {
    int64_t T, H, Hk, Dk, Hi, D;  // main attention: MHA (Hk = H, the warm-up's form) or MQA (Hk = 1)
  };
  const std::vector<Case> cases = o.gpu ? std::vector<Case>{{16384, 16, 16, 96, 16, 64},
                                                            {16384, 16, 1, 288, 16, 64},
                                                            {4096, 128, 1, 576, 64, 128}}
                                        : std::vector<Case>{{1024, 16, 16, 96, 16, 64}, {1024, 16, 1, 288, 16, 64}};
  for (const Case& c : cases) {
    const Tensor qm = o.uniform({1, c.T, c.H, c.Dk}, 7, 0.05f), km = o.uniform({1, c.T, c.Hk, c.Dk}, 8, 1.f);
    const Tensor q = o.uniform({1, c.T, c.Hi, c.D}, 9, 1.f), k = o.uniform({1, c.T, c.D}, 10, 1.f),
                 w = o.uniform({1, c.T, c.Hi}, 11, 0.1f);
    Tensor lse_h = Tensor::empty({1, c.H, c.T}, DType::F32);  // a uniform attention row's lse
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t t = 0; t < c.T; ++t) lse_h.data<float>()[h * c.T + t] = std::log(static_cast<float>(t + 1));
    const Tensor lse = lse_h.to(o.dev);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.Dk)), tri = double(c.T) * (c.T + 1) / 2;
    const double f_main = 2.0 * tri * c.H * c.Dk, f_idx = 2.0 * tri * c.Hi * c.D;
    ops::IndexerGrads g;
    const Tensor idx = Tensor::zeros({1, c.T, 512}, DType::I32, o.dev);
    const std::string d = dims({{"T", c.T}, {"H", c.H}, {"Hk", c.Hk}, {"Dk", c.Dk}, {"Hi", c.Hi}, {"D", c.D}}) + " fp8";
    o.report("indexer_kl_dense loss " + d,
             o.time(3, 3, [&] { ops::indexer_kl_dense(qm, km, lse, scale, q, k, w, true, 1.0, nullptr); }),
             f_main + f_idx);
    o.report("indexer_kl_dense loss+grads " + d,
             o.time(3, 3, [&] { ops::indexer_kl_dense(qm, km, lse, scale, q, k, w, true, 1.0, &g); }),
             2 * f_main + 6 * f_idx);
    o.report("indexer_recall K=512 " + d, o.time(3, 3, [&] { ops::indexer_recall(qm, km, lse, scale, idx); }));
  }
  const int64_t Hi = o.gpu ? 64 : 16, D = o.gpu ? 128 : 64, K = o.gpu ? 2048 : 512;
  for (int64_t T : o.gpu ? std::vector<int64_t>{8192, 32768} : std::vector<int64_t>{1024, 2048}) {
    const Tensor q = o.uniform({1, T, Hi, D}, 1, 1.f), k = o.uniform({1, T, D}, 2, 1.f),
                 w = o.uniform({1, T, Hi}, 3, 0.1f);
    const double flop = double(T) * (T + 1) / 2 * Hi * D * 2;  // scoring
    for (bool fp8 : {true, false})
      o.report("indexer_topk " + dims({{"T", T}, {"Hi", Hi}, {"D", D}, {"K", K}}) + (fp8 ? " fp8" : " bf16"),
               o.time(3, 3, [&] { ops::indexer_topk(q, k, w, K, fp8); }), flop);
  }
}

// Causal index lists [1, T, K]: rows t < K take 0..t (then -1), later rows K random earlier tokens.
Tensor causal_indices(int64_t T, int64_t K, Device dev) {
  Tensor idx = Tensor::empty({1, T, K}, DType::I32);
  std::mt19937_64 rng(9);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k)
      idx.data<int32_t>()[t * K + k] =
          t + 1 <= K ? (k <= t ? static_cast<int32_t>(k) : -1) : static_cast<int32_t>(rng() % (t + 1));
  return idx.to(dev);
}

// ------------------------------------------------------------------------------ sparse attention
void sparse_attention(const Ops& o) {
  struct Case {
    int64_t T, H, Dk, Dv, K;
  };
  const std::vector<Case> cases = o.gpu ? std::vector<Case>{{4096, 128, 576, 512, 2048}, {16384, 16, 288, 256, 512}}
                                        : std::vector<Case>{{1024, 16, 288, 256, 512}};
  const std::vector<std::string> paths =
      o.gpu ? std::vector<std::string>{"mma", "mma-1pass", "wgmma", "gemm"} : std::vector<std::string>{"cpu"};
  struct Unset {  // the forced path never outlives this section, even when it throws
    ~Unset() {
      unsetenv("DSA_SPARSE_ATTN_GEMM");
      unsetenv("DSA_SPARSE_ATTN_WGMMA");
      unsetenv("DSA_SPARSE_ATTN_MMA_LINES");
    }
  } unset;
  for (const Case& c : cases)
    for (const std::string& path : paths) {
      if (o.gpu) {  // read at each call
        setenv("DSA_SPARSE_ATTN_GEMM", path == "gemm" ? "1" : "0", 1);
        setenv("DSA_SPARSE_ATTN_WGMMA", path == "wgmma" ? "1" : "0", 1);
        setenv("DSA_SPARSE_ATTN_MMA_LINES", path == "mma-1pass" ? "0" : "1", 1);
      }
      const Tensor q = o.uniform({1, c.T, c.H, c.Dk}, 4, 0.05f), kv = o.uniform({1, c.T, c.Dk}, 5, 1.f),
                   dout = o.uniform({1, c.T, c.H, c.Dv}, 6, 1.f);
      const Tensor idx = causal_indices(c.T, c.K, o.dev);
      const double scale = 1.0 / std::sqrt(192.0);
      Tensor lse, out;
      const double fwd_flop = 2.0 * c.T * c.H * c.K * (c.Dk + c.Dv), bwd_flop = 2 * fwd_flop;
      const double fwd = o.time(3, 3, [&] { out = ops::sparse_attention_forward(q, kv, c.Dv, idx, scale, &lse); });
      const double bwd = o.time(3, 3, [&] { ops::sparse_attention_backward(dout, q, kv, c.Dv, idx, out, lse, scale); });
      const std::string d = path + " " + dims({{"T", c.T}, {"H", c.H}, {"Dk", c.Dk}, {"Dv", c.Dv}, {"K", c.K}});
      o.report("sparse_attention fwd " + d, fwd, fwd_flop);
      o.report("sparse_attention bwd " + d, bwd, bwd_flop);
      o.report("sparse_attention fwd+bwd " + d, fwd + bwd, fwd_flop + bwd_flop);
    }
}

// ------------------------------------------------------------ the sparse stage's indexer route
// Scoring and selection timed apart, then the sparse KL: recomputing the main attention's probabilities
// (indexer_kl_sparse) or reading the head sums the sparse attention returns (the model's route).
void indexer(const Ops& o) {
  struct TopkCase {
    const char* name;
    int64_t T, Hi, D, K;
  };
  const std::vector<TopkCase> topk_cases =
      o.gpu ? std::vector<TopkCase>{{"bench-small", 16384, 16, 64, 512}, {"production", 8192, 64, 128, 2048}}
            : std::vector<TopkCase>{{"bench-small", 1024, 16, 64, 512}};
  for (const TopkCase& c : topk_cases) {
    const Tensor q = o.uniform({1, c.T, c.Hi, c.D}, 1, 1.f), k = o.uniform({1, c.T, c.D}, 2, 1.f),
                 w = o.uniform({1, c.T, c.Hi}, 3, 0.1f);
    const std::string d = std::string(c.name) + " " + dims({{"T", c.T}, {"Hi", c.Hi}, {"D", c.D}, {"K", c.K}});
    Tensor scores;
    o.report(std::string("indexer_scores_forward (") + dtype_name(o.dt) + ", fill incl.) " + d,
             o.time(3, 3, [&] { scores = ops::indexer_scores_forward(q, k, w, 0, c.T); }));
    o.report("topk_causal " + d, o.time(3, 3, [&] { ops::topk_causal(scores, 0, c.K); }));
    scores = Tensor();
    o.report("indexer_topk fp8 " + d, o.time(3, 3, [&] { ops::indexer_topk(q, k, w, c.K, true); }));
    o.report("indexer_topk fp8 index order " + d, o.time(3, 3, [&] {
               ops::indexer_topk(q, k, w, c.K, true, 0, nullptr, ops::TopkOrder::kIndex);
             }));
    o.report("indexer_topk bf16 " + d, o.time(3, 3, [&] { ops::indexer_topk(q, k, w, c.K, false); }));
  }
  struct Case {
    const char* name;
    int64_t T, H, Dk, Hi, D, K;
  };
  const std::vector<Case> cases = o.gpu ? std::vector<Case>{{"bench-small", 16384, 16, 288, 16, 64, 512},
                                                            {"production", 4096, 128, 576, 64, 128, 2048}}
                                        : std::vector<Case>{{"bench-small", 1024, 16, 288, 16, 64, 512}};
  for (const Case& c : cases) {
    const Tensor qm = o.uniform({1, c.T, c.H, c.Dk}, 4, 0.05f), kv = o.uniform({1, c.T, c.Dk}, 5, 1.f);
    const Tensor q = o.uniform({1, c.T, c.Hi, c.D}, 6, 1.f), k = o.uniform({1, c.T, c.D}, 7, 1.f),
                 w = o.uniform({1, c.T, c.Hi}, 8, 0.1f);
    Tensor slot_scores, lse;
    const Tensor idx = ops::indexer_topk(q, k, w, c.K, true, 0, &slot_scores);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.Dk));
    const int64_t dv = c.Dk == 576 ? 512 : c.Dk - 32;  // the fused path's value width
    const std::string d =
        std::string(c.name) + " " + dims({{"T", c.T}, {"H", c.H}, {"Dk", c.Dk}, {"Hi", c.Hi}, {"D", c.D}, {"K", c.K}});
    ops::sparse_attention_forward(qm, kv, c.Dk - 32, idx, scale, &lse);
    ops::IndexerGrads g;
    o.report("indexer_kl_sparse fwd " + d,
             o.time(3, 3, [&] { ops::indexer_kl_sparse(qm, kv, lse, scale, idx, q, k, w, true, 1e-3, nullptr); }));
    o.report("indexer_kl_sparse fwd+bwd " + d,
             o.time(3, 3, [&] { ops::indexer_kl_sparse(qm, kv, lse, scale, idx, q, k, w, true, 1e-3, &g); }));
    Tensor ps;
    const std::string a = d + " Dv=" + std::to_string(dv);
    o.report("sparse_attention_forward " + a,
             o.time(3, 3, [&] { ops::sparse_attention_forward(qm, kv, dv, idx, scale, &lse); }));
    o.report("sparse_attention_forward with probs_sum " + a,
             o.time(3, 3, [&] { ops::sparse_attention_forward(qm, kv, dv, idx, scale, &lse, &ps); }));
    const Tensor dout = o.uniform({1, c.T, c.H, dv}, 9, 0.05f);
    const Tensor out = ops::sparse_attention_forward(qm, kv, dv, idx, scale, &lse);
    o.report("sparse_attention_backward " + a,
             o.time(3, 3, [&] { ops::sparse_attention_backward(dout, qm, kv, dv, idx, out, lse, scale); }));
    o.report("sparse_attention_backward with probs_sum " + a,
             o.time(3, 3, [&] { ops::sparse_attention_backward(dout, qm, kv, dv, idx, out, lse, scale, true); }));
    o.report("indexer_kl_sparse_from_probs fwd " + d,
             o.time(3, 3, [&] { ops::indexer_kl_sparse_from_probs(ps, idx, q, k, w, true, 1e-3, nullptr); }));
    o.report("indexer_kl_sparse_from_probs fwd+bwd " + d,
             o.time(3, 3, [&] { ops::indexer_kl_sparse_from_probs(ps, idx, q, k, w, true, 1e-3, &g); }));
    o.report("indexer_kl_sparse_from_probs fwd+bwd, the top-k's slot scores " + d,
             o.time(3, 3, [&] { ops::indexer_kl_sparse_from_probs(ps, idx, q, k, w, true, 1e-3, &g, &slot_scores); }));
  }
}

// ------------------------------------------------------------------------------------------- moe
void moe(const Ops& o) {
  const int64_t N = o.gpu ? 4096 : 2048, E = 16, D = 1024, I = 512;  // bench-small experts
  ops::MoeRouteConfig cfg;
  cfg.n_group = 4;
  cfg.topk_group = 2;
  cfg.top_k = 4;
  cfg.routed_scaling_factor = 2.5;
  const int K = cfg.top_k;
  const Tensor logits = random_tensor({N, E}, DType::F32, o.dev, 130);
  const Tensor bias = Tensor::zeros({E}, DType::F32, o.dev);
  const ops::MoeRouting r = ops::moe_route(logits, bias, cfg);
  const ops::MoePermutation p = ops::moe_permutation(r.experts, E);
  const Tensor x = o.normal({N, D}, 131), xp = ops::moe_permute(x, p, K);
  const int64_t M = N * K;
  for (const auto& [in, out] : {std::pair<int64_t, int64_t>{D, I}, {I, D}}) {
    const Tensor a = in == D ? xp : o.normal({M, in}, 132);
    const Tensor w = o.normal({E, out, in}, 133, 0.03), dy = o.normal({M, out}, 134);
    Tensor dw = Tensor::zeros({E, out, in}, DType::F32, o.dev);
    const double flop = 2.0 * double(M) * double(in) * double(out);
    const std::string d = dims({{"M", M}, {"in", in}, {"out", out}, {"E", E}});
    o.report("grouped_linear fwd " + d, o.time(3, 10, [&] { ops::grouped_linear_forward(a, w, p); }), flop);
    o.report("grouped_linear bwd (dx+dw) " + d, o.time(3, 10, [&] { ops::grouped_linear_backward(dy, a, w, p, &dw); }),
             2 * flop);
    o.report("grouped_linear bwd dx only " + d,
             o.time(3, 10, [&] { ops::grouped_linear_backward(dy, a, w, p, nullptr); }), flop);
    if (o.gpu) {  // launch + descriptors + cached heuristic, the GPU idle before
      cuda::synchronize();
      const auto h0 = std::chrono::steady_clock::now();
      ops::grouped_linear_forward(a, w, p);
      const double host = std::chrono::duration<double>(std::chrono::steady_clock::now() - h0).count();
      cuda::synchronize();
      o.report("grouped_linear host time of one fwd call " + d, host);
    }
  }
  const Tensor yp = o.normal({M, D}, 135), dyb = o.normal({N, D}, 136);
  const std::string d = dims({{"N", N}, {"D", D}, {"E", E}, {"K", K}});
  o.report("moe_route " + d, o.time(3, 10, [&] { ops::moe_route(logits, bias, cfg); }));
  o.report("moe_permutation (incl. sync) " + d, o.time(3, 10, [&] { ops::moe_permutation(r.experts, E); }));
  o.report("moe_permute " + d, o.time(3, 10, [&] { ops::moe_permute(x, p, K); }));
  o.report("moe_permute_backward " + d, o.time(3, 10, [&] { ops::moe_permute_backward(yp, p, N, K); }));
  o.report("moe_combine " + d, o.time(3, 10, [&] { ops::moe_combine(yp, r.weights, p); }));
  Tensor g1, g2;
  o.report("moe_combine_backward " + d,
           o.time(3, 10, [&] { ops::moe_combine_backward(dyb, yp, r.weights, p, &g1, &g2); }));
}

}  // namespace

void ops_bench(int argc, char** argv) {
  std::string json_path;
  const std::vector<std::pair<std::string, void (*)(const Ops&)>> sections = {
      {"attention", attention}, {"gemm", gemm}, {"indexer_kl", indexer_kl}, {"sparse_attention", sparse_attention},
      {"indexer", indexer},     {"moe", moe}};
  std::vector<std::string> only;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc)
      json_path = argv[++i];
    else if (a == "--only" && i + 1 < argc)
      only = parse_names(argv[++i]);
    else
      throw std::runtime_error("[dsa-bench] unknown ops option " + a + " (--only SECTIONS, --json FILE)");
  }
  for (const std::string& s : only) {
    bool known = false;
    for (const auto& sec : sections) known |= sec.first == s;
    if (!known)
      throw std::runtime_error("[dsa-bench] unknown ops section " + s +
                               " (attention, gemm, indexer_kl, sparse_attention, indexer, moe)");
  }
  std::ofstream json;
  if (!json_path.empty()) json.open(json_path, std::ios::app);
  const Device dev = bench_device();
  const Ops o{dev, dev == Device::CUDA ? DType::BF16 : DType::F32, dev == Device::CUDA, &json};
  std::printf("[bench] ops on %s (%s)\n", device_name(dev),
              o.gpu ? "bf16, bench-small and production shapes" : "f32, CPU-sized shapes");
  std::string failed;
  for (const auto& [name, run] : sections) {
    if (!only.empty() && std::find(only.begin(), only.end(), name) == only.end()) continue;
    try {
      run(o);
    } catch (const std::exception& e) {  // one failing section (e.g. out of memory) leaves the others
      std::printf("%-96s failed: %s\n", name.c_str(), e.what());
      failed += (failed.empty() ? "" : ", ") + name;
    }
  }
  if (!failed.empty()) throw std::runtime_error("[dsa-bench] ops sections failed: " + failed);
}

}  // namespace dsa::bench
