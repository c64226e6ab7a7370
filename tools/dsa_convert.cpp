// dsa-convert: Hugging Face safetensors <-> native HDF5 checkpoints.
//
//   dsa-convert import HF_DIR OUT [--keep-mtp] [--indexer-seed N]
//   dsa-convert export CKPT HF_DIR [--dtype bf16|f32] [--max-shard-size 5GB] [--per-expert]
//   dsa-convert init CONFIG OUT [--seed N]
//   dsa-convert reshard CKPT OUT --ranks M
//
// OUT ending in .h5 is written as that file; any other OUT is a checkpoint directory (ckpt-<step>.h5
// plus `latest`). CKPT is a file, a sharded checkpoint directory or a directory of checkpoints. `init`
// makes a randomly initialized checkpoint from a config.json or a YAML model mapping. `reshard` rewrites
// the per-rank data positions of a training checkpoint for a job of M ranks; it refuses when the position
// is not a multiple of the new global step. Tensors are stored independently of the layout (whole, or as
// pieces of the full tensors in a sharded checkpoint), so dp, ep and zero may change freely: a sharded
// checkpoint is resharded into OUT as a sharded checkpoint whose shard files are hard links of CKPT's
// (OUT ending in .h5: one file with every tensor assembled).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/hf_io.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_sharded.h"
#include "trainer/recipe.h"

using namespace dsa;

namespace {

int usage() {
  std::fprintf(stderr,
               "usage:\n"
               "  dsa-convert import HF_DIR OUT [--keep-mtp] [--indexer-seed N]\n"
               "  dsa-convert export CKPT HF_DIR [--dtype bf16|f32] [--max-shard-size SIZE] [--per-expert]\n"
               "  dsa-convert init CONFIG OUT [--seed N]\n"
               "  dsa-convert reshard CKPT OUT --ranks M\n"
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

void write_out(const std::string& out, const TrainState& st, const ParamStore& ps, const std::map<std::string, Tensor>& extra) {
  if (ends_with(out, ".h5")) {
    write_checkpoint_file(out, st, ps, extra);
    std::printf("wrote %s\n", out.c_str());
  } else {
    std::printf("wrote %s\n", save_checkpoint(out, st, ps, extra, 0).c_str());
  }
}

// The loader's position is the global window (loader.h), the same on every rank: M copies of it, once
// it is checked to sit on a step boundary of an M-rank job of the checkpoint's recipe.
void reshard_positions(const std::string& path, TrainState& st, int64_t ranks) {
  DSA_CHECK(!st.rank_data_states.empty() && !st.recipe_yaml.empty(), "[dsa-convert] reshard: ", path,
            " is not a training checkpoint (no recipe or data positions)");
  const std::string pos = st.rank_data_states.front();
  for (size_t r = 1; r < st.rank_data_states.size(); ++r)
    DSA_CHECK(st.rank_data_states[r] == pos, "[dsa-convert] reshard: ", path, ": rank ", r,
              "'s data position differs from rank 0's (", st.rank_data_states[r], " vs ", pos, ")");
  const Recipe recipe = parse_recipe(st.recipe_yaml, path + ":/meta/recipe_yaml");
  if (!pos.empty() && !st.stage.empty()) {
    const StageSpec& stage = recipe.stage(st.stage);
    const int64_t mb = stage.micro_batch(ranks);  // throws when global_batch does not split over M ranks
    const int64_t G = ranks * mb;                 // windows per micro-step of the M-rank job
    const int64_t window = nlohmann::json::parse(pos).at("window").get<int64_t>();
    DSA_CHECK(window % G == 0, "[dsa-convert] reshard: the data position of stage ", st.stage, " (window ", window,
              ") is not a multiple of ", ranks, " ranks x micro-batch ", mb, " = ", G,
              " windows; resume on the old rank count to a step boundary first");
  }
  if (recipe.parallel.ep > 1 && ranks % recipe.parallel.ep)
    std::fprintf(stderr, "[dsa-convert] warning: the checkpoint's recipe has parallelism.ep = %lld, which does not "
                 "divide %lld ranks: set parallelism.ep when resuming\n", static_cast<long long>(recipe.parallel.ep),
                 static_cast<long long>(ranks));
  std::printf("reshard %s: %zu -> %lld ranks at stage %s step %lld\n", path.c_str(), st.rank_data_states.size(),
              static_cast<long long>(ranks), st.stage.c_str(), static_cast<long long>(st.stage_step));
  st.rank_data_states.assign(static_cast<size_t>(ranks), pos);
}

int run(int argc, char** argv) {
  if (argc < 4) return usage();
  const std::string cmd = argv[1], a = argv[2], b = argv[3];
  std::vector<std::string> flags(argv + 4, argv + argc);
  auto value = [&](size_t& i) -> std::string {
    DSA_CHECK(i + 1 < flags.size(), "[dsa-convert] ", flags[i], " needs a value");
    return flags[++i];
  };
  if (cmd == "import") {
    HfImportOptions opt;
    for (size_t i = 0; i < flags.size(); ++i) {
      if (flags[i] == "--keep-mtp") opt.keep_mtp = true;
      else if (flags[i] == "--indexer-seed") opt.indexer_seed = parse_u64(value(i), "--indexer-seed");
      else return usage();
    }
    HfModel m = import_hf(a, opt);
    for (const std::string& w : m.warnings) std::fprintf(stderr, "[dsa-convert] warning: %s\n", w.c_str());
    TrainState st;
    st.model_config_yaml = m.cfg.to_yaml();
    st.rng_seed = opt.indexer_seed;
    write_out(b, st, m.params, m.extra);
    std::printf("%zu tensors, %lld parameters%s, %zu extra tensors\n", m.params.size(),
                static_cast<long long>(m.params.numel()), m.indexer_fresh ? " (fresh indexer)" : "", m.extra.size());
    return 0;
  }
  if (cmd == "export") {
    HfExportOptions opt;
    for (size_t i = 0; i < flags.size(); ++i) {
      if (flags[i] == "--dtype") {
        const std::string d = value(i);
        if (d == "bf16") opt.dtype = DType::BF16;
        else if (d == "f32") opt.dtype = DType::F32;
        else fail("[dsa-convert] --dtype must be bf16 or f32, got '" + d + "'");
      } else if (flags[i] == "--max-shard-size") {
        opt.max_shard_bytes = parse_size(value(i));
      } else if (flags[i] == "--per-expert") {
        opt.per_expert = true;
      } else {
        return usage();
      }
    }
    Checkpoint c = load_checkpoint(a, /*optimizer_state=*/false);
    export_hf(b, c.cfg, c.params, c.extra, opt);
    std::printf("exported %s (step %lld) to %s\n", c.path.c_str(), static_cast<long long>(c.state.step), b.c_str());
    return 0;
  }
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
