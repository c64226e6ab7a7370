// dsa-bench: training-step throughput per stage and per-kernel / per-op times.
//
//   dsa-bench train   [--config bench-small] [--seq-len 4096,16384] [--tokens 16384] [--stages dense,warmup,sparse]
//                     [--steps 5] [--warmup 2] [--recompute] [--topk-order score|index] [--json FILE]
//   dsa-bench kernels [--seq-len 8192] [--sparse-seq-len 4096] [--only NAME] [--json FILE]   production DSA shapes (SPEC.md §4)
//   dsa-bench ops     [--only SECTIONS] [--json FILE]   every op family, bench-small and production shapes
//                     (tools/dsa_bench/ops.cpp; the CPU in f32 at CPU-sized shapes when no GPU is present)
//   dsa-bench peak    bf16 GEMM ceiling (8192^3), used for MFU
//   (memory per rank before a run: `dsa-train RECIPE --dry-run`, trainer/memory_plan.h)
//
// Times: CUDA events on the op stream around each measured region (the steady clock on the CPU), warm-up
// first, the median of the repetitions (tools/dsa_bench/bench_util.h). FLOPs are the useful work, counted
// as documented in count_step_flops() below.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/device_memory.h"
#include "kernels/dsa_ops.h"
#include "kernels/ops.h"
#include "model/hf_config.h"
#include "model/model.h"
#include "model/profile.h"
#include "tools/dsa_bench/bench_util.h"

namespace dsa::bench {
void ops_bench(int argc, char** argv);  // tools/dsa_bench/ops.cpp
}  // namespace dsa::bench

using namespace dsa;
using namespace dsa::bench;

namespace {

// bf16 GEMM ceiling measured on this device (TFLOP/s).
double measure_peak(Device dev) {
  const int64_t n = dev == Device::CUDA ? 8192 : 1024;
  const DType dt = dev == Device::CUDA ? DType::BF16 : DType::F32;
  Tensor a = random_tensor({n, n}, dt, dev, 1), b = random_tensor({n, n}, dt, dev, 2);
  Tensor c = Tensor::empty({n, n}, dt, dev);
  const double s = time_median(dev, 3, 10, [&] { ops::gemm(a, false, b, true, c); });
  return 2.0 * n * n * n / s / 1e12;
}

// Useful FLOPs of one training step of a stage, per token (linear layers: 2 per multiply-add forward,
// twice that backward; attention counted causally; backward of attention 2.5x its forward).
struct StageFlops {
  double linear = 0, attention = 0, indexer = 0;
  double total() const { return linear + attention + indexer; }
};
StageFlops count_step_flops(const ModelConfig& c, const std::string& stage, int64_t T, int64_t tokens) {
  const double D = c.hidden_size, H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim,
               dv = c.v_head_dim, kvl = c.kv_lora_rank, ql = c.q_lora_rank, Hi = c.index_n_heads,
               di = c.index_head_dim;
  const bool train_main = stage != "warmup";
  const double mult = train_main ? 3.0 : 1.0;  // forward + backward (2x) of the main model, or forward only
  double per_token_params = c.vocab_size * D;   // lm head
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    per_token_params += D * ql + ql * H * (dn + dr) + D * (kvl + dr) + kvl * H * (dn + dv) + H * dv * D;
    if (c.is_moe_layer(l))
      per_token_params += c.n_routed_experts * D + (c.num_experts_per_tok + c.n_shared_experts) * 3 * D *
                                                        c.moe_intermediate_size;
    else
      per_token_params += 3 * D * c.intermediate_size;
  }
  StageFlops f;
  f.linear = 2.0 * per_token_params * mult * tokens;
  const double L = c.num_hidden_layers, seqs = static_cast<double>(tokens) / T;
  const double attn_mult = train_main ? 3.5 : 1.0;
  if (stage == "sparse") {
    const double K = std::min<double>(c.index_topk, T);
    f.attention = L * tokens * 2.0 * K * H * ((kvl + dr) + kvl) * attn_mult;
  } else {
    f.attention = L * seqs * 2.0 * (static_cast<double>(T) * T / 2) * H * ((dn + dr) + dv) * attn_mult;
  }
  // Indexer: projections (always forward; backward when it trains) and the causal scoring.
  const bool idx_train = stage != "dense";
  if (idx_train) {
    const double idx_params = ql * Hi * di + D * di + D * Hi;
    f.indexer = L * (2.0 * idx_params * 3 * tokens + seqs * 2.0 * (static_cast<double>(T) * T / 2) * Hi * di * 3);
  }
  return f;
}

StepOptions stage_options(const std::string& stage, bool recompute) {
  StepOptions o;
  o.recompute = recompute;
  if (stage == "dense") return o;
  if (stage == "warmup") {
    o.indexer_loss = IndexerLossMode::Dense;
    o.train_main = false;
    o.train_indexer = true;
    return o;
  }
  o.attention = AttentionMode::Sparse;
  o.indexer_loss = IndexerLossMode::Sparse;
  o.train_indexer = true;
  return o;
}

void train_bench(int argc, char** argv) {
  std::string config = "bench-small", json_path;
  std::vector<int64_t> seq_lens = {4096, 16384};
  std::vector<std::string> stages = {"dense", "warmup", "sparse"};
  int64_t tokens = 16384;
  int steps = 5, warm = 2;
  bool recompute = false;
  ops::TopkOrder topk_order = ops::TopkOrder::kIndex;  // the trainer's default (StageSpec::topk_order)
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--config") config = next();
    else if (a == "--seq-len") seq_lens = parse_list(next());
    else if (a == "--tokens") tokens = std::stoll(next());
    else if (a == "--stages") stages = parse_names(next());
    else if (a == "--steps") steps = std::stoi(next());
    else if (a == "--warmup") warm = std::stoi(next());
    else if (a == "--recompute") recompute = true;
    else if (a == "--topk-order") {
      const std::string v = next();
      if (v != "score" && v != "index")
        throw std::runtime_error("[dsa-bench] --topk-order must be score or index, got '" + v + "'");
      topk_order = v == "index" ? ops::TopkOrder::kIndex : ops::TopkOrder::kScore;
    } else if (a == "--json") json_path = next();
    else throw std::runtime_error("[dsa-bench] unknown train option " + a);
  }
  const Device dev = bench_device();
  ModelConfig cfg = preset_config(config);
  const double peak = measure_peak(dev);
  std::printf("[bench] device %s, bf16 GEMM ceiling %.0f TFLOP/s, model %s (%.1fM parameters), top-k order %s\n",
              device_name(dev), peak, config.c_str(), cfg.parameter_count() / 1e6, ops::topk_order_name(topk_order));
  std::ofstream json;
  if (!json_path.empty()) json.open(json_path, std::ios::app);
  Model model(cfg, DType::F32, dev);
  init_params(model.params(), cfg, 1);
  model.params().refresh_compute();
  std::vector<Tensor> m1, m2;
  for (const Param& p : model.params().all()) {
    m1.push_back(Tensor::zeros(p.value.shape(), DType::F32, dev));
    m2.push_back(Tensor::zeros(p.value.shape(), DType::F32, dev));
  }
  std::printf("%-8s %7s %10s %12s %8s %10s %9s\n", "stage", "seq", "ms/step", "tokens/s", "MFU", "TFLOP/s", "peak GB");
  for (int64_t T : seq_lens) {
    const int64_t B = std::max<int64_t>(1, tokens / T);
    std::mt19937 rng(7);
    std::vector<int32_t> ids(B * T), tg(B * T);
    for (auto& v : ids) v = static_cast<int32_t>(rng() % cfg.vocab_size);
    for (size_t i = 0; i < ids.size(); ++i) tg[i] = i + 1 < ids.size() ? ids[i + 1] : -1;
    Tensor tid = Tensor::from_vector(ids, {B * T}), ttg = Tensor::from_vector(tg, {B * T});
    for (const std::string& stage : stages) {
      StepOptions o = stage_options(stage, recompute);
      o.topk_order = topk_order;
      o.lm_grad_scale = 1.0 / (B * T);
      o.indexer_grad_scale = 1.0 / (B * T * cfg.num_hidden_layers);
      if (dev == Device::CUDA) cuda::reset_peak();
      double ms = 0;
      std::string err;
      try {
        auto one = [&] {
          model.params().zero_grads();
          model.step(tid, ttg, B, T, o, true);
          ops::AdamWConfig ac;
          ac.lr = 1e-5;
          size_t i = 0;
          for (Param& p : model.params().all()) {
            const bool trained = (p.group == ParamGroup::Main && o.train_main) ||
                                 (p.group == ParamGroup::Indexer && o.train_indexer);
            if (trained) ops::adamw_step_(p.value, p.grad, m1[i], m2[i], ac, 1);
            ++i;
          }
          model.params().refresh_compute();
        };
        ms = 1e3 * time_median(dev, warm, steps, one);
        if (Profile::enabled()) {
          Profile::reset();
          one();
          std::printf("[profile] %s at %lld (one step, synchronized sections):\n%s", stage.c_str(),
                      static_cast<long long>(T), Profile::report().c_str());
        }
      } catch (const std::exception& e) {
        err = e.what();
      }
      const double peak_gb = dev == Device::CUDA ? cuda::allocator_stats().peak_in_use / 1e9 : 0;
      if (!err.empty()) {
        std::printf("%-8s %7lld %10s  failed: %s\n", stage.c_str(), static_cast<long long>(T), "-", err.c_str());
        if (json.is_open())
          json << "{\"bench\":\"train\",\"stage\":\"" << stage << "\",\"seq_len\":" << T
               << ",\"recompute\":" << (recompute ? "true" : "false") << ",\"error\":true}\n";
        continue;
      }
      const StageFlops f = count_step_flops(cfg, stage, T, B * T);
      const double tps = B * T / (ms / 1e3);
      const double tflops = f.total() / (ms / 1e3) / 1e12;
      std::printf("%-8s %7lld %10.1f %12.0f %7.1f%% %10.1f %9.1f\n", stage.c_str(), static_cast<long long>(T), ms, tps,
                  100 * tflops / peak, tflops, peak_gb);
      if (json.is_open())
        json << "{\"bench\":\"train\",\"stage\":\"" << stage << "\",\"seq_len\":" << T << ",\"tokens\":" << B * T
             << ",\"ms\":" << ms << ",\"tokens_per_s\":" << tps << ",\"tflops\":" << tflops
             << ",\"mfu\":" << tflops / peak << ",\"peak_gb\":" << peak_gb << ",\"peak_tflops\":" << peak
             << ",\"config\":\"" << config << "\",\"parameters\":" << model.params().numel()
             << ",\"recompute\":" << (recompute ? "true" : "false") << ",\"topk_order\":\""
             << ops::topk_order_name(topk_order) << "\"}\n";
    }
  }
}

void kernel_bench(int argc, char** argv) {
  std::string json_path, only;  // only: run the rows whose group name contains it
  int64_t T = 8192, Ts = 4096;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else if (a == "--seq-len" && i + 1 < argc) T = std::stoll(argv[++i]);
    else if (a == "--sparse-seq-len" && i + 1 < argc) Ts = std::stoll(argv[++i]);
    else throw std::runtime_error("[dsa-bench] unknown kernels option " + a);
  }
  const Device dev = bench_device();
  const DType dt = dev == Device::CUDA ? DType::BF16 : DType::F32;
  std::ofstream json;
  if (!json_path.empty()) json.open(json_path, std::ios::app);
  auto report = [&](const std::string& name, double s, double flops) {
    std::printf("%-34s %10.3f ms %10.1f TFLOP/s\n", name.c_str(), 1e3 * s, flops / s / 1e12);
    if (json.is_open())
      json << "{\"bench\":\"kernel\",\"name\":\"" << name << "\",\"ms\":" << 1e3 * s
           << ",\"tflops\":" << flops / s / 1e12 << "}\n";
  };
  bool matched = false;
  auto guarded = [&](const std::string& name, const std::function<void()>& f) {
    if (!only.empty() && name.find(only) == std::string::npos) return;
    matched = true;
    try {
      f();
    } catch (const std::exception& e) {
      std::printf("%-34s failed: %s\n", name.c_str(), e.what());
    }
  };
  const int64_t H = 128, dqk = 192, dv = 128, Hi = 64, di = 128, K = 2048, kvl = 512, dr = 64;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dqk));
  // Dense attention on the default backend (cuDNN's fused attention where the build has it), then on the
  // own kernels: the peer rows (SDPA) carry the default names.
  const std::string cudnn_version = ops::attention_cudnn_info().version;
  std::printf("dense attention backend: %s\n",
              cudnn_version.empty() ? "own kernels (no cuDNN in the build)" : ("cuDNN " + cudnn_version).c_str());
  for (const bool own : {false, true}) {
    if (own && cudnn_version.empty()) break;
    const std::string tag = own ? ", own kernel" : "";
    guarded("dense attention fwd (MHA 192/128" + tag + ")", [&] {
      struct Scope {  // the switch as it was, also when the body throws
        bool prev = ops::attention_cudnn_enabled();
        ~Scope() { ops::set_attention_cudnn(prev); }
      } scope;
      ops::set_attention_cudnn(!own && scope.prev);
      Tensor q = random_tensor({1, T, H, dqk}, dt, dev, 1), k = random_tensor({1, T, H, dqk}, dt, dev, 2),
             v = random_tensor({1, T, H, dv}, dt, dev, 3);
      Tensor lse;
      const double flops = 2.0 * H * (static_cast<double>(T) * T / 2) * (dqk + dv);
      Tensor o;
      report("dense attention fwd (MHA 192/128" + tag + ")",
             time_median(dev, 2, 5, [&] { o = ops::attention_forward(q, k, v, scale, &lse); }), flops);
      Tensor dout = random_tensor({1, T, H, dv}, dt, dev, 4);
      report("dense attention bwd (MHA 192/128" + tag + ")",
             time_median(dev, 1, 3, [&] { ops::attention_backward(dout, q, k, v, o, lse, scale); }), 2.5 * flops);
    });
  }
  for (int64_t TT : {T, 4 * T}) {
    const std::string name = "indexer top-k fp8 (T=" + std::to_string(TT) + ")";
    guarded(name, [&] {
      Tensor q = random_tensor({1, TT, Hi, di}, dt, dev, 5), k = random_tensor({1, TT, di}, dt, dev, 6),
             w = random_tensor({1, TT, Hi}, dt, dev, 7, 0.1);
      const double flops = 2.0 * Hi * di * (static_cast<double>(TT) * TT / 2);
      // Slots by score (the op's default order) and by index (the trainer's: no sort of the winners).
      report(name, time_median(dev, 1, 3, [&] { ops::indexer_topk(q, k, w, K, true); }), flops);
      report("indexer top-k fp8 (T=" + std::to_string(TT) + ", index order)",
             time_median(dev, 1, 3, [&] { ops::indexer_topk(q, k, w, K, true, 0, nullptr, ops::TopkOrder::kIndex); }),
             flops);
      // The selection alone, on the same rows' scores (all T rows in one block, as indexer_topk streams
      // them at T <= 8K; at 32K it streams row blocks of the same total): scoring = the rest.
      // indexer_scores_forward is the differentiable bf16 scoring (the warm-up's and the backward's), not
      // the FP8 one inside indexer_topk: its own row.
      Tensor S = ops::indexer_scores_forward(q, k, w, 0, TT);
      report("indexer scoring bf16 (T=" + std::to_string(TT) + ")",
             time_median(dev, 1, 3, [&] { S = ops::indexer_scores_forward(q, k, w, 0, TT); }), flops);
      report("indexer selection only (T=" + std::to_string(TT) + ")",
             time_median(dev, 1, 3, [&] { ops::topk_causal(S, 0, K); }), 0.0);
      report("indexer selection only (T=" + std::to_string(TT) + ", index order)",
             time_median(dev, 1, 3, [&] { ops::topk_causal(S, 0, K, ops::TopkOrder::kIndex); }), 0.0);
    });
  }
  guarded("sparse MLA attention fwd", [&] {
    const int64_t T = Ts;
    Tensor q = random_tensor({1, T, H, kvl + dr}, dt, dev, 8), kv = random_tensor({1, T, kvl + dr}, dt, dev, 9);
    // Random causal sets: each row takes min(K, t+1) distinct earlier tokens.
    std::vector<int32_t> idx(T * K, -1);
    std::mt19937 rng(3);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = std::min<int64_t>(K, t + 1);
      if (t + 1 <= K) {
        for (int64_t s = 0; s < n; ++s) idx[t * K + s] = static_cast<int32_t>(s);
      } else {
        for (int64_t s = 0; s < n; ++s) idx[t * K + s] = static_cast<int32_t>(rng() % (t + 1));
      }
    }
    Tensor ind = Tensor::from_vector(idx, {1, T, K}).to(dev);
    // NOTES: every slot counted, also the causal prefix's -1 slots (rows t < K hold t + 1); the wgmma kernels
    // skip the 64-slot blocks with no valid slot: at T 4096, K 2048 they execute 75.8% of this count.
    const double flops = 2.0 * T * K * H * ((kvl + dr) + kvl);
    Tensor lse, o;
    const double sm = 1.0 / std::sqrt(192.0);
    report("sparse MLA attention fwd", time_median(dev, 1, 3, [&] {
             o = ops::sparse_attention_forward(q, kv, kvl, ind, sm, &lse);
           }), flops);
    Tensor dout = random_tensor({1, T, H, kvl}, dt, dev, 10);
    report("sparse MLA attention bwd", time_median(dev, 1, 3, [&] {
             ops::sparse_attention_backward(dout, q, kv, kvl, ind, o, lse, sm);
           }), 2.5 * flops);
    if (dev == Device::CUDA) {  // the two-warpgroup forward the warp-specialized one replaced (=0), same inputs
      const ScopedEnv ws("DSA_SPARSE_ATTN_FWD_WS", "0");
      report("sparse MLA attention fwd (2wg)", time_median(dev, 1, 3, [&] {
               o = ops::sparse_attention_forward(q, kv, kvl, ind, sm, &lse);
             }), flops);
    }
    if (dev == Device::CUDA) {  // the backward's split variant (DSA_SPARSE_ATTN_BWD_SPLIT=1, opt-in), same inputs
      const ScopedEnv split("DSA_SPARSE_ATTN_BWD_SPLIT", "1");
      report("sparse MLA attention bwd (split)", time_median(dev, 1, 3, [&] {
               ops::sparse_attention_backward(dout, q, kv, kvl, ind, o, lse, sm);
             }), 2.5 * flops);
    }
    if (dev == Device::CUDA) {  // the mma.sync kernels the wgmma ones replaced (DSA_SPARSE_ATTN_WGMMA=0), same inputs
      const ScopedEnv mma("DSA_SPARSE_ATTN_WGMMA", "0");
      report("sparse MLA attention fwd (mma.sync)", time_median(dev, 1, 3, [&] {
               o = ops::sparse_attention_forward(q, kv, kvl, ind, sm, &lse);
             }), flops);
      report("sparse MLA attention bwd (mma.sync)", time_median(dev, 1, 3, [&] {
               ops::sparse_attention_backward(dout, q, kv, kvl, ind, o, lse, sm);
             }), 2.5 * flops);
    }
    // Every slot valid (tokens of the whole sequence at random, as FlashMLA's benchmark draws them): the kernels
    // execute the whole count, the rate like for like with the peers' figures.
    for (int32_t& v : idx) v = static_cast<int32_t>(rng() % T);
    ind = Tensor::from_vector(idx, {1, T, K}).to(dev);
    report("sparse MLA fwd all-valid", time_median(dev, 1, 3, [&] {
             o = ops::sparse_attention_forward(q, kv, kvl, ind, sm, &lse);
           }), flops);
    report("sparse MLA bwd all-valid", time_median(dev, 1, 3, [&] {
             ops::sparse_attention_backward(dout, q, kv, kvl, ind, o, lse, sm);
           }), 2.5 * flops);
    if (dev == Device::CUDA) {
      const ScopedEnv split("DSA_SPARSE_ATTN_BWD_SPLIT", "1");
      report("sparse MLA bwd (split) all-valid", time_median(dev, 1, 3, [&] {
               ops::sparse_attention_backward(dout, q, kv, kvl, ind, o, lse, sm);
             }), 2.5 * flops);
    }
    if (dev == Device::CUDA) {
      const ScopedEnv ws("DSA_SPARSE_ATTN_FWD_WS", "0");
      report("sparse MLA fwd (2wg) all-valid", time_median(dev, 1, 3, [&] {
               o = ops::sparse_attention_forward(q, kv, kvl, ind, sm, &lse);
             }), flops);
    }
  });
  if (!only.empty() && !matched)
    throw std::runtime_error("[dsa-bench] kernels --only '" + only +
                             "' matches no row group (dense attention, indexer top-k fp8, sparse MLA attention)");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0) {
    std::fprintf(stderr,
                 "usage: dsa-bench train|kernels|ops|peak [options]  (see the header of tools/dsa_bench.cpp)\n");
    return argc < 2 ? 2 : 0;
  }
  try {
    const std::string cmd = argv[1];
    if (cmd == "train")
      train_bench(argc - 2, argv + 2);
    else if (cmd == "kernels")
      kernel_bench(argc - 2, argv + 2);
    else if (cmd == "ops")
      ops_bench(argc - 2, argv + 2);
    else if (cmd == "peak")
      std::printf("bf16 GEMM ceiling: %.1f TFLOP/s\n", measure_peak(bench_device()));
    else
      throw std::runtime_error("[dsa-bench] unknown command " + cmd + " (train, kernels, ops, peak)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
