// dsa-eval: does a converted model keep its quality at long context? Held-out loss by token position, the
// indexer's quality per layer and needle retrieval, at each context length, with dense and with top-k
// sparse attention on the same weights (eval/evaluate.h; definitions in eval/metrics.h).
//
//   dsa-eval CKPT --data SHARDS [--seq-len 4096,16384,65536] [--attention dense,sparse] [--topk K]
//            [--json F] [--plots DIR] [--tokenizer PATH] [--sequences N] [--needle-depths 0,0.25,...]
//            [--needle-trials N] [--indexer-rows N] [--indexer-sequences N] [--indexer-precision fp8|bf16]
//            [--device auto|cpu|cuda] [--time-limit S] [--seed S] [--label NAME] [--quiet]
//
// CKPT: a training checkpoint (file or checkpoint directory) or a Hugging Face directory (config.json and
// safetensors). SHARDS: a corpus directory; its val split is the held-out text. Contexts longer than
// the training length are evaluated and reported as extrapolation. k and the indexer's precision default
// to those of the checkpoint's stage (else the model's index_topk and fp8).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/doc_stream.h"
#include "data/tokenizer.h"
#include "eval/evaluate.h"
#include "kernels/device_memory.h"
#include "model/hf_io.h"
#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/recipe.h"

namespace fs = std::filesystem;
using namespace dsa;

namespace {

const char* kUsage =
    "usage: dsa-eval CKPT --data SHARDS [--seq-len 4096,16384] [--attention dense,sparse] [--topk K]\n"
    "                [--json FILE] [--plots DIR] [--tokenizer PATH] [--sequences N] [--needle-depths 0,0.25,0.5,0.75,1]\n"
    "                [--needle-trials N] [--indexer-rows N] [--indexer-sequences N] [--indexer-precision fp8|bf16]\n"
    "                [--device auto|cpu|cuda] [--time-limit S] [--seed S] [--label NAME] [--quiet]\n"
    "  CKPT   a training checkpoint (file or directory) or a Hugging Face directory\n"
    "  SHARDS a corpus directory (dsa-prep corpus); its val split is the held-out text\n";

struct Args {
  std::string ckpt, json, plots, tokenizer, device = "auto", label;
  eval::EvalConfig cfg;
  bool precision_given = false;  // --indexer-precision (else the checkpoint's stage's)
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');)
    if (!t.empty()) v.push_back(t);
  return v;
}

int64_t to_int(const std::string& flag, const std::string& v, int64_t min) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || x < min)
    throw std::runtime_error("[dsa-eval] " + flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'");
  return x;
}

double to_num(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw std::runtime_error("[dsa-eval] " + flag + " expects a number, got '" + v + "'");
  return x;
}

Args parse(int argc, char** argv) {
  Args a;
  a.cfg.data.clear();
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("[dsa-eval] " + f + " needs a value");
      return argv[++i];
    };
    if (f == "--data") a.cfg.data = val();
    else if (f == "--seq-len") {
      a.cfg.seq_lens.clear();
      for (const std::string& s : split(val())) a.cfg.seq_lens.push_back(to_int(f, s, 2));
    } else if (f == "--attention") {
      a.cfg.modes.clear();
      for (const std::string& s : split(val())) {
        if (s != "dense" && s != "sparse")
          throw std::runtime_error("[dsa-eval] --attention takes dense and/or sparse, got '" + s + "'");
        a.cfg.modes.push_back(s == "dense" ? AttentionMode::Dense : AttentionMode::Sparse);
      }
    } else if (f == "--topk") a.cfg.topk = to_int(f, val(), 1);
    else if (f == "--json") a.json = val();
    else if (f == "--plots") a.plots = val();
    else if (f == "--tokenizer") a.tokenizer = val();
    else if (f == "--sequences") a.cfg.sequences = to_int(f, val(), 1);
    else if (f == "--needle-trials") a.cfg.needle_trials = to_int(f, val(), 0);
    else if (f == "--needle-depths") {
      a.cfg.depths.clear();
      for (const std::string& s : split(val())) {
        const double d = to_num(f, s);
        if (d < 0 || d > 1) throw std::runtime_error("[dsa-eval] --needle-depths are shares in [0, 1], got " + s);
        a.cfg.depths.push_back(d);
      }
    } else if (f == "--indexer-rows") a.cfg.quality_rows = to_int(f, val(), 0);
    else if (f == "--indexer-sequences") a.cfg.quality_sequences = to_int(f, val(), 0);
    else if (f == "--indexer-precision") {
      const std::string p = val();
      if (p != "fp8" && p != "bf16") throw std::runtime_error("[dsa-eval] --indexer-precision is fp8 or bf16, got '" + p + "'");
      a.cfg.fp8 = p == "fp8";
      a.precision_given = true;
    } else if (f == "--device") a.device = val();
    else if (f == "--time-limit") a.cfg.time_limit_s = to_num(f, val());
    else if (f == "--seed") a.cfg.seed = static_cast<uint64_t>(to_int(f, val(), 0));
    else if (f == "--label") a.label = val();
    else if (f == "--quiet") a.cfg.progress = false;
    else if (f == "-h" || f == "--help") {
      std::printf("%s", kUsage);
      std::exit(0);
    } else if (f.rfind("--", 0) == 0) throw std::runtime_error("[dsa-eval] unknown option " + f + "\n" + kUsage);
    else if (a.ckpt.empty()) a.ckpt = f;
    else throw std::runtime_error("[dsa-eval] unexpected argument '" + f + "'\n" + kUsage);
  }
  if (a.ckpt.empty()) throw std::runtime_error(std::string("[dsa-eval] no checkpoint given\n") + kUsage);
  if (a.cfg.data.empty()) throw std::runtime_error("[dsa-eval] --data SHARDS is required (a corpus directory with a val split)");
  if (a.cfg.seq_lens.empty() || a.cfg.modes.empty()) throw std::runtime_error("[dsa-eval] --seq-len and --attention need values");
  if (a.device != "auto" && a.device != "cpu" && a.device != "cuda")
    throw std::runtime_error("[dsa-eval] --device is auto, cpu or cuda, got '" + a.device + "'");
  return a;
}

struct Loaded {
  ModelConfig cfg;
  ParamStore params;            // CPU
  std::string tokenizer;        // from the checkpoint's recipe or the HF directory ("" if none)
  int64_t training_seq_len = 0; // the longest stage of the checkpoint's recipe up to its stage (0: unknown)
  int64_t topk = 0;             // the checkpoint's stage's keys per query (0: unknown)
  bool fp8 = true;              // the checkpoint's stage's indexer precision
  std::string what;
};

Loaded load(const std::string& path) {
  Loaded l;
  if (fs::is_directory(path) && fs::exists(fs::path(path) / "config.json")) {
    HfModel m = import_hf(path);
    l.cfg = m.cfg;
    l.params = std::move(m.params);
    if (fs::exists(fs::path(path) / "tokenizer.json")) l.tokenizer = (fs::path(path) / "tokenizer.json").string();
    l.what = "Hugging Face directory" + std::string(m.indexer_fresh ? " (no indexer weights: a fresh indexer)" : "");
    return l;
  }
  Checkpoint c = load_checkpoint(path);
  l.cfg = c.cfg;
  l.params = std::move(c.params);
  l.what = "checkpoint " + c.path + " (stage " + c.state.stage + ", step " + std::to_string(c.state.step) + ")";
  if (!c.state.recipe_yaml.empty()) {
    const Recipe r = parse_recipe(c.state.recipe_yaml, c.path + ":/meta/recipe_yaml");
    l.tokenizer = r.data.tokenizer;
    for (const StageSpec& s : r.planned) {
      l.training_seq_len = std::max(l.training_seq_len, s.seq_len);
      if (s.name != c.state.stage) continue;
      l.topk = s.topk;  // evaluated as the stage trained: its k and its scoring precision
      l.fp8 = s.indexer_precision == IndexerPrecision::fp8;
      break;
    }
  }
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse(argc, argv);
    Loaded l = load(a.ckpt);
    const bool cuda = a.device == "cuda" || (a.device == "auto" && cuda::available());
    if (cuda && !cuda::available()) throw std::runtime_error("[dsa-eval] --device cuda, but no CUDA device is visible");
    ModelConfig cfg = l.cfg;
    int64_t longest = 0;
    for (int64_t T : a.cfg.seq_lens) longest = std::max(longest, T);
    if (longest > cfg.max_position_embeddings) {
      // NOTES: RoPE tables extend to any position; max_position_embeddings only bounds them (YaRN reads
      // original_max_position_embeddings), so evaluating longer is extrapolation, reported as such.
      std::printf("[dsa-eval] --seq-len %lld is past the model's max_position_embeddings %lld: extrapolation\n",
                  static_cast<long long>(longest), static_cast<long long>(cfg.max_position_embeddings));
      cfg.max_position_embeddings = longest;
    }
    Model model(cfg, DType::F32, cuda ? Device::CUDA : Device::CPU);
    for (Param& p : model.params().all()) {
      const Tensor& src = l.params[p.name];
      p.value.copy_from(src.dtype() == p.value.dtype() ? src : src.to(p.value.dtype()));
    }
    model.params().refresh_compute();
    l.params = ParamStore();
    a.cfg.training_seq_len = l.training_seq_len;
    if (a.cfg.topk == 0) a.cfg.topk = l.topk;
    if (!a.precision_given) a.cfg.fp8 = l.fp8;
    DocStream(a.cfg.data, "val", 0, false).check_vocab(cfg.vocab_size);

    std::unique_ptr<Tokenizer> tok;
    std::unique_ptr<RetrievalFormat> fmt;
    if (a.cfg.needle_trials > 0) {
      const std::string tp = a.tokenizer.empty() ? l.tokenizer : a.tokenizer;
      if (tp.empty() || !fs::exists(tp))
        throw std::runtime_error("[dsa-eval] the needle test needs the tokenizer: " +
                                 (tp.empty() ? std::string("the checkpoint names none") : tp + " does not exist") +
                                 "; pass --tokenizer PATH, or --needle-trials 0");
      tok = std::make_unique<Tokenizer>(Tokenizer::from_file(tp));
      if (tok->vocab_size() > cfg.vocab_size)
        throw std::runtime_error("[dsa-eval] " + tp + ": tokenizer vocab " + std::to_string(tok->vocab_size()) +
                                 " > model vocab " + std::to_string(cfg.vocab_size));
      fmt = std::make_unique<RetrievalFormat>(*tok);
    }
    std::printf("[dsa-eval] %s: %.2fM parameters, %s, k = %lld, %s indexer scoring, training length %s\n",
                l.what.c_str(), model.params().numel() / 1e6, cuda ? "cuda" : "cpu",
                static_cast<long long>(a.cfg.topk > 0 ? a.cfg.topk : cfg.index_topk), a.cfg.fp8 ? "fp8" : "bf16",
                l.training_seq_len ? std::to_string(l.training_seq_len).c_str() : "unknown");
    std::fflush(stdout);
    const eval::EvalReport rep = eval::evaluate(model, fmt.get(), a.cfg);
    nlohmann::json j = eval::report_json(rep);
    j["checkpoint"] = a.ckpt;
    j["label"] = a.label.empty() ? fs::path(a.ckpt).filename().string() : a.label;
    j["device"] = cuda ? "cuda" : "cpu";
    j["parameters"] = model.params().numel();
    if (cuda) j["peak_mem_gb"] = static_cast<double>(cuda::allocator_stats().peak_in_use) / 1e9;
    std::printf("%s", eval::report_table(rep).c_str());
    std::string json_path = a.json;
    if (json_path.empty() && !a.plots.empty()) json_path = (fs::path(a.plots) / "eval.json").string();
    if (!json_path.empty()) {
      if (fs::path(json_path).has_parent_path()) fs::create_directories(fs::path(json_path).parent_path());
      const std::string tmp = json_path + ".tmp";
      std::ofstream(tmp) << j.dump(2) << "\n";
      fs::rename(tmp, json_path);
      std::printf("[dsa-eval] wrote %s\n", json_path.c_str());
    }
    std::fflush(stdout);
    if (!a.plots.empty()) {
      std::string out = "--out", dir = a.plots;
      char* args[] = {json_path.data(), out.data(), dir.data()};
      return run_python_tool("dsa_eval_report.py", 3, args);  // replaces this process
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
