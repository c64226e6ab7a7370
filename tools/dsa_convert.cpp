// dsa-convert: Hugging Face safetensors <-> native HDF5 checkpoints.
//
//   dsa-convert import HF_DIR OUT [--index-n-heads N] [--index-head-dim D] [--index-topk K]
//                                 [--indexer-config FILE.yaml] [--indexer-seed N] [--drop-mtp]
//   dsa-convert export CKPT HF_DIR [--dtype bf16|f32] [--fp8] [--max-shard-size 5GB] [--per-expert]
//   dsa-convert init CONFIG OUT [--seed N]
//   dsa-convert reshard CKPT OUT --ranks M
//   dsa-convert config-keys
//
// import takes a DeepSeek-V2/V2-Lite/V3/V3.1/V3.2 or Moonlight-style release as published; a config.json
// without index_* keys gets the indexer dimensions of the flags or the YAML file (index_n_heads,
// index_head_dim, index_topk; default V3.2's 64 x 128, top-2048) and a freshly initialized indexer.
// config-keys prints what every config.json key does here (model/hf_config.h).
//
// OUT ending in .h5 is written as that file; any other OUT is a checkpoint directory (ckpt-<step>.h5
// plus `latest`). CKPT is a file, a sharded checkpoint directory or a directory of checkpoints. `init`
// makes a randomly initialized checkpoint from a config.json or a YAML model mapping. `reshard` rewrites
// the per-rank data positions of a training checkpoint for a job of M ranks (the data position is global).
// Tensors are stored independently of the layout (whole, or as pieces of the full tensors in a sharded
// checkpoint), so dp, ep and zero may change freely: a sharded checkpoint is resharded into OUT as a sharded
// checkpoint whose shard files are hard links of CKPT's (OUT ending in .h5: one file with every tensor
// assembled); it refuses when the stage's global batch does not split over M ranks.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "model/hf_io.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_sharded.h"
#include "trainer/recipe.h"

using namespace dsa;

namespace {

int usage() {
  std::fprintf(stderr,
               "usage:\n"
               "  dsa-convert import HF_DIR OUT [--index-n-heads N] [--index-head-dim D] [--index-topk K]\n"
               "                    [--indexer-config FILE.yaml] [--indexer-seed N] [--drop-mtp]\n"
               "  dsa-convert export CKPT HF_DIR [--dtype bf16|f32] [--fp8] [--max-shard-size SIZE] [--per-expert]\n"
               "  dsa-convert init CONFIG OUT [--seed N]\n"
               "  dsa-convert reshard CKPT OUT --ranks M\n"
               "  dsa-convert config-keys\n"
               "OUT ending in .h5 is one file; otherwise a checkpoint directory. SIZE: bytes, or with KB/MB/GB.\n");
  return 2;
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

uint64_t parse_size(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  std::string unit = end ? end : "";
  double mul = 1;
  if (unit == "" || unit == "B") mul = 1;
  else if (unit == "KB") mul = 1e3;
  else if (unit == "MB") mul = 1e6;
  else if (unit == "GB") mul = 1e9;
  else if (unit == "KiB") mul = 1024.0;
  else if (unit == "MiB") mul = 1024.0 * 1024;
  else if (unit == "GiB") mul = 1024.0 * 1024 * 1024;
  else fail("[dsa-convert] bad size '" + s + "' (want e.g. 5GB, 500MB, 1000000)");
  DSA_CHECK(v > 0, "[dsa-convert] size must be positive, got '", s, "'");
  return static_cast<uint64_t>(v * mul);
}

uint64_t parse_u64(const std::string& s, const char* what) {
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s.c_str(), &end, 0);
  DSA_CHECK(end && *end == 0 && !s.empty(), "[dsa-convert] ", what, " must be an integer, got '", s, "'");
  return v;
}

void write_out(const std::string& out, const TrainState& st, const ParamStore& ps,
               const std::map<std::string, Tensor>& extra);

// The indexer overlay: a YAML mapping of index_n_heads, index_head_dim, index_topk (any subset).
void read_indexer_overlay(const std::string& path, IndexerDims* dims) {
  YAML::Node n;
  try {
    n = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    fail("[dsa-convert] " + path + ": cannot read the YAML file (" + e.what() + ")");
  }
  DSA_CHECK(n.IsMap(), "[dsa-convert] ", path, ": want a mapping of index_n_heads, index_head_dim, index_topk");
  for (const auto& kv : n) {
    const std::string k = kv.first.as<std::string>();
    int64_t* dst = k == "index_n_heads" ? &dims->n_heads : k == "index_head_dim" ? &dims->head_dim
                 : k == "index_topk"    ? &dims->topk    : nullptr;
    if (!dst)
      fail("[dsa-convert] " + path + ":" + std::to_string(kv.first.Mark().line + 1) + ": key '" + k +
           "' is not an indexer dimension (allowed: index_n_heads, index_head_dim, index_topk)");
    *dst = static_cast<int64_t>(parse_u64(kv.second.Scalar(), k.c_str()));
  }
}

int import_cmd(const std::string& hf_dir, const std::string& out, const std::vector<std::string>& flags) {
  HfImportOptions opt;
  std::string overlay;
  int64_t n_heads = 0, head_dim = 0, topk = 0;
  for (size_t i = 0; i < flags.size(); ++i) {
    auto value = [&]() -> std::string {
      DSA_CHECK(i + 1 < flags.size(), "[dsa-convert] ", flags[i], " needs a value");
      return flags[++i];
    };
    if (flags[i] == "--drop-mtp") opt.drop_mtp = true;
    else if (flags[i] == "--indexer-seed") opt.indexer_seed = parse_u64(value(), "--indexer-seed");
    else if (flags[i] == "--indexer-config") overlay = value();
    else if (flags[i] == "--index-n-heads") n_heads = static_cast<int64_t>(parse_u64(value(), "--index-n-heads"));
    else if (flags[i] == "--index-head-dim") head_dim = static_cast<int64_t>(parse_u64(value(), "--index-head-dim"));
    else if (flags[i] == "--index-topk") topk = static_cast<int64_t>(parse_u64(value(), "--index-topk"));
    else return usage();
  }
  if (!overlay.empty()) read_indexer_overlay(overlay, &opt.indexer);
  if (n_heads) opt.indexer.n_heads = n_heads;
  if (head_dim) opt.indexer.head_dim = head_dim;
  if (topk) opt.indexer.topk = topk;
  const bool dims_given = !overlay.empty() || n_heads || head_dim || topk;
  // Refused before any tensor is read: indexer dimensions for a config that defines its own.
  const HfConfigRead probe = read_hf_config(hf_dir + "/config.json", opt.indexer);
  DSA_CHECK(!(dims_given && probe.indexer_from_config), "[dsa-convert] ", hf_dir, "/config.json defines the indexer (",
            "index_n_heads ", probe.cfg.index_n_heads, ", index_head_dim ", probe.cfg.index_head_dim, ", index_topk ",
            probe.cfg.index_topk, "): --index-* and --indexer-config apply to configs without index_* keys");
  HfModel m = import_hf(hf_dir, opt);
  for (const std::string& w : m.warnings) std::fprintf(stderr, "[dsa-convert] note: %s\n", w.c_str());
  const ModelConfig& c = m.cfg;
  std::printf("[dsa-convert] model: %s routing (%s), %s, %s MLA RoPE, %lld layers%s\n", c.scoring_func.c_str(),
              c.topk_method.c_str(),
              c.has_q_lora() ? ("query LoRA " + std::to_string(c.q_lora_rank)).c_str() : "no query LoRA (q_proj)",
              c.rope_interleave ? "interleaved" : "rotate-half", static_cast<long long>(c.num_hidden_layers),
              c.num_nextn_predict_layers ? " + 1 MTP layer" : "");
  std::printf("[dsa-convert] indexer: %lld heads x %lld, top-%lld (%s), %s\n", static_cast<long long>(c.index_n_heads),
              static_cast<long long>(c.index_head_dim), static_cast<long long>(c.index_topk),
              m.indexer_dims_from_options ? (dims_given ? "from the flags" : "V3.2's defaults: config.json has none")
                                          : "from config.json",
              m.indexer_fresh ? "freshly initialized" : "read from the checkpoint");
  TrainState st;
  st.model_config_yaml = c.to_yaml();
  st.rng_seed = opt.indexer_seed;
  write_out(out, st, m.params, m.extra);
  std::printf("%zu tensors, %lld parameters%s\n", m.params.size(), static_cast<long long>(m.params.numel()),
              m.indexer_fresh ? " (fresh indexer)" : "");
  return 0;
}

int export_cmd(const std::string& ckpt, const std::string& hf_dir, const std::vector<std::string>& flags) {
  HfExportOptions opt;
  for (size_t i = 0; i < flags.size(); ++i) {
    auto value = [&]() -> std::string {
      DSA_CHECK(i + 1 < flags.size(), "[dsa-convert] ", flags[i], " needs a value");
      return flags[++i];
    };
    if (flags[i] == "--dtype") {
      const std::string d = value();
      if (d == "bf16") opt.dtype = DType::BF16;
      else if (d == "f32") opt.dtype = DType::F32;
      else fail("[dsa-convert] --dtype must be bf16 or f32, got '" + d + "'");
    } else if (flags[i] == "--max-shard-size") {
      opt.max_shard_bytes = parse_size(value());
    } else if (flags[i] == "--per-expert") {
      opt.per_expert = true;
    } else if (flags[i] == "--fp8") {
      opt.fp8 = true;
    } else {
      return usage();
    }
  }
  Checkpoint c = load_checkpoint(ckpt, /*optimizer_state=*/false);
  const HfExportReport r = export_hf(hf_dir, c.cfg, c.params, c.extra, opt);
  std::printf("exported %s (step %lld) to %s: %zu file(s)\n", c.path.c_str(), static_cast<long long>(c.state.step),
              hf_dir.c_str(), r.files.size());
  if (opt.dtype == DType::BF16)
    std::printf("[dsa-convert] weights: bf16 (the f32 master weights rounded to bfloat16; --dtype f32 writes them "
                "exactly)\n");
  else
    std::printf("[dsa-convert] weights: f32 (the master weights exactly)\n");
  if (opt.fp8)
    std::printf("[dsa-convert] fp8: %lld tensors as F8_E4M3 with 128x128 weight_scale_inv, per-expert names "
                "(DeepSeek's release format; transformers loads it only with its FP8 support)\n",
                static_cast<long long>(r.fp8_tensors));
  std::printf("[dsa-convert] config.json: %s (model_type %s)%s\n", r.cls.architecture.c_str(), r.cls.model_type.c_str(),
              r.cls.loads_indexer ? ", sparse attention with the indexer" : "");
  for (const std::string& w : r.cls.caveats) std::printf("[dsa-convert] note: %s\n", w.c_str());
  return 0;
}

void write_out(const std::string& out, const TrainState& st, const ParamStore& ps, const std::map<std::string, Tensor>& extra) {
  if (ends_with(out, ".h5")) {
    write_checkpoint_file(out, st, ps, extra);
    std::printf("wrote %s\n", out.c_str());
  } else {
    std::printf("wrote %s\n", save_checkpoint(out, st, ps, extra, 0).c_str());
  }
}

// The data position is global (data/mixture.h), the same on every rank and valid on any rank count: M
// copies of it, once the checkpoint's stage is checked to split over M ranks.
void reshard_positions(const std::string& path, TrainState& st, int64_t ranks) {
  DSA_CHECK(!st.rank_data_states.empty() && !st.recipe_yaml.empty(), "[dsa-convert] reshard: ", path,
            " is not a training checkpoint (no recipe or data positions)");
  const std::string pos = st.rank_data_states.front();
  for (size_t r = 1; r < st.rank_data_states.size(); ++r)
    DSA_CHECK(st.rank_data_states[r] == pos, "[dsa-convert] reshard: ", path, ": rank ", r,
              "'s data position differs from rank 0's (", st.rank_data_states[r], " vs ", pos, ")");
  const Recipe recipe = parse_recipe(st.recipe_yaml, path + ":/meta/recipe_yaml");
  if (!st.stage.empty()) recipe.stage(st.stage).micro_batch(ranks);  // throws when global_batch does not split
  if (recipe.parallel.ep > 1 && ranks % recipe.parallel.ep)
    std::fprintf(stderr, "[dsa-convert] warning: the checkpoint's recipe has parallelism.ep = %lld, which does not "
                 "divide %lld ranks: set parallelism.ep when resuming\n", static_cast<long long>(recipe.parallel.ep),
                 static_cast<long long>(ranks));
  std::printf("reshard %s: %zu -> %lld ranks at stage %s step %lld\n", path.c_str(), st.rank_data_states.size(),
              static_cast<long long>(ranks), st.stage.c_str(), static_cast<long long>(st.stage_step));
  st.rank_data_states.assign(static_cast<size_t>(ranks), pos);
}

int run(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "config-keys") {
    std::printf("%s", hf_config_key_table().c_str());
    return 0;
  }
  if (argc < 4) return usage();
  const std::string cmd = argv[1], a = argv[2], b = argv[3];
  std::vector<std::string> flags(argv + 4, argv + argc);
  auto value = [&](size_t& i) -> std::string {
    DSA_CHECK(i + 1 < flags.size(), "[dsa-convert] ", flags[i], " needs a value");
    return flags[++i];
  };
  if (cmd == "import") return import_cmd(a, b, flags);
  if (cmd == "export") return export_cmd(a, b, flags);
  if (cmd == "init") {
    uint64_t seed = 0;
    for (size_t i = 0; i < flags.size(); ++i) {
      if (flags[i] == "--seed") seed = parse_u64(value(i), "--seed");
      else return usage();
    }
    ModelConfig cfg = ModelConfig::from_file(a);
    ParamStore ps = make_params(cfg);
    init_params(ps, cfg, seed);
    TrainState st;
    st.model_config_yaml = cfg.to_yaml();
    st.rng_seed = seed;
    write_out(b, st, ps, {});
    return 0;
  }
  if (cmd == "reshard") {
    int64_t ranks = 0;
    for (size_t i = 0; i < flags.size(); ++i) {
      if (flags[i] == "--ranks") ranks = static_cast<int64_t>(parse_u64(value(i), "--ranks"));
      else return usage();
    }
    DSA_CHECK(ranks >= 1, "[dsa-convert] reshard needs --ranks M (M >= 1)");
    const std::string path = resolve_checkpoint(a);
    if (is_sharded_checkpoint(path) && !ends_with(b, ".h5")) {
      TrainState st = CheckpointSource(path).state();
      reshard_positions(path, st, ranks);
      std::printf("wrote %s\n", relink_sharded_checkpoint(path, b, st).c_str());
      return 0;
    }
    Checkpoint c = load_checkpoint(path);
    TrainState st = c.state;
    reshard_positions(c.path, st, ranks);
    write_out(b, st, c.params, c.extra);
    return 0;
  }
  return usage();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
