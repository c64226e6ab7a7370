// dsa-train: run a recipe's stages.
//
//   dsa-train RECIPE.yaml [key.path=value ...] [--stage NAME] [--resume] [--time-limit SECONDS]
//   dsa-train RECIPE.yaml [key.path=value ...] --dry-run [--ranks N] [--device-memory SIZE]
//             [--choose-layout] [--fit-layers]
//   dsa-train plot [args of tools/dsa_plot.py]
//   mpirun -np N dsa-train RECIPE.yaml ...        (data parallel: the recipe's batch is the global batch)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/device_memory.h"
#include "trainer/dist.h"
#include "trainer/memory_plan.h"
#include "trainer/metrics.h"
#include "trainer/recipe.h"
#include "trainer/trainer.h"

namespace {

void usage() {
  std::fprintf(stderr,
               "usage: dsa-train RECIPE.yaml [key.path=value ...] [--stage NAME] [--resume] [--time-limit SECONDS]\n"
               "       dsa-train plot RUN_DIR|metrics.jsonl [...] [--out DIR]\n"
               "  --stage NAME        run one stage, from the previous stage's final checkpoint or its init_from\n"
               "  --resume            continue from the newest checkpoint in checkpoint.dir\n"
               "  --time-limit S      checkpoint and exit 0 after S seconds (resume with --resume)\n"
               "  --max-steps N       checkpoint and exit 0 after N optimizer steps (tests)\n"
               "  --dump-grads DIR    write every step's gradients (per rank and reduced) to DIR (tests, ep 1)\n"
               "  --dry-run           print the memory plan and exit (0: every stage fits, 1: one does not)\n"
               "    --ranks N           plan for N ranks (default: parallelism.dp, else the job's ranks)\n"
               "    --device-memory S   one rank's memory, e.g. 141GB (default: the GPU's, or the host's)\n"
               "    --choose-layout     print the layout the plan chooses for those ranks\n"
               "    --fit-layers        print the largest num_hidden_layers that fits (same widths)\n");
}

struct DryRun {
  bool on = false, choose = false, fit_layers = false;
  int64_t ranks = 0;
  int64_t memory = 0;
};

int64_t parse_bytes(const std::string& s) {
  size_t end = 0;
  const double v = std::stod(s, &end);
  const std::string unit = s.substr(end);
  double mul = 1;
  if (unit == "GB") mul = 1e9;
  else if (unit == "GiB") mul = 1073741824.0;
  else if (unit == "MB") mul = 1e6;
  else if (unit == "MiB") mul = 1048576.0;
  else if (!unit.empty() && unit != "B") throw std::runtime_error("[dsa-train] bad size '" + s + "' (e.g. 141GB, 80GiB)");
  if (!(v > 0)) throw std::runtime_error("[dsa-train] size must be positive, got '" + s + "'");
  return static_cast<int64_t>(v * mul);
}

// --dry-run: the memory plan alone (nothing is allocated on the device). Returns the exit code.
int dry_run(const dsa::Recipe& recipe, const DryRun& d) {
  using namespace dsa;
  const bool gpu = recipe.device == RunDevice::cuda || (recipe.device == RunDevice::auto_ && cuda::available());
  const int64_t ranks = d.ranks > 0 ? d.ranks : (recipe.parallel.dp > 0 ? recipe.parallel.dp : Dist::world());
  const int64_t capacity = d.memory > 0 ? d.memory : rank_capacity(gpu, d.ranks > 0 ? 1 : Dist::local_size());
  Recipe r = recipe;
  r.parallel.dp = ranks;
  const MemoryPlan plan = plan_memory(r.model, r.stages, recipe_layout(r, ranks, gpu), capacity);
  std::printf("%s", memory_report(r.model, r.stages, plan).c_str());
  if (d.choose) {
    ParallelLayout L;
    bool rc = false;
    if (choose_layout(r.model, r.stages, ranks, gpu, capacity, &L, &rc)) {
      std::vector<StageSpec> stages = r.stages;
      for (StageSpec& s : stages) s.recompute = s.recompute || rc;
      std::printf("[memory] the plan's layout for %lld ranks: parallelism.dp=%lld parallelism.ep=%lld "
                  "parallelism.zero=%lld%s\n%s",
                  static_cast<long long>(ranks), static_cast<long long>(L.ranks), static_cast<long long>(L.ep),
                  static_cast<long long>(L.zero), rc ? " stage_defaults.recompute=true" : "",
                  plan_memory(r.model, stages, L, capacity).table().c_str());
    } else {
      std::printf("[memory] no layout of %lld ranks fits\n", static_cast<long long>(ranks));
    }
  }
  if (d.fit_layers) {
    // The largest member of the recipe's shape family (its widths, fewer layers) that fits, with the
    // stages' recompute setting and with recompute on.
    for (bool rc : {false, true}) {
      std::vector<StageSpec> stages = r.stages;
      for (StageSpec& s : stages) s.recompute = s.recompute || rc;
      int64_t best = 0;
      for (int64_t n = std::max<int64_t>(1, r.model.first_k_dense_replace); n <= r.model.num_hidden_layers; ++n) {
        ModelConfig c = r.model;
        c.num_hidden_layers = n;
        if (plan_memory(c, stages, recipe_layout(r, ranks, gpu), capacity).fits()) best = n;
      }
      std::printf("[memory] largest fitting%s: model.num_hidden_layers=%lld (of at most %lld)\n",
                  rc ? " with recompute" : "", static_cast<long long>(best),
                  static_cast<long long>(r.model.num_hidden_layers));
    }
  }
  return plan.fits() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "plot") == 0) return dsa::run_plot_command(argc - 2, argv + 2);
  if (argc < 2 || std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "--help") == 0) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  dsa::Dist::init(&argc, &argv);
  std::string recipe_path;
  std::vector<std::string> overrides;
  dsa::TrainOptions opts;
  DryRun dry;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&](const char* flag) -> std::string {
        if (i + 1 >= argc) throw std::runtime_error(std::string("[dsa-train] ") + flag + " needs a value");
        return argv[++i];
      };
      if (a == "--stage") {
        opts.only_stage = value("--stage");
      } else if (a == "--resume") {
        opts.resume = true;
      } else if (a == "--time-limit") {
        opts.time_limit_s = std::stod(value("--time-limit"));
      } else if (a == "--max-steps") {
        opts.max_steps = std::stoll(value("--max-steps"));
      } else if (a == "--dry-run") {
        dry.on = true;
      } else if (a == "--ranks") {
        dry.ranks = std::stoll(value("--ranks"));
        if (dry.ranks < 1) throw std::runtime_error("[dsa-train] --ranks must be >= 1");
      } else if (a == "--device-memory") {
        dry.memory = parse_bytes(value("--device-memory"));
      } else if (a == "--choose-layout") {
        dry.choose = true;
      } else if (a == "--fit-layers") {
        dry.fit_layers = true;
      } else if (a == "--dump-grads") {
        opts.dump_grads_dir = value("--dump-grads");
      } else if (a.rfind("--", 0) == 0) {
        throw std::runtime_error("[dsa-train] unknown option " + a + " (see --help)");
      } else if (a.find('=') != std::string::npos) {
        overrides.push_back(a);
      } else if (recipe_path.empty()) {
        recipe_path = a;
      } else {
        throw std::runtime_error("[dsa-train] unexpected argument '" + a + "' (overrides are key.path=value)");
      }
    }
    if (recipe_path.empty()) throw std::runtime_error("[dsa-train] no recipe given (see --help)");
    // Test hook: DSA_TEST_RANK_OVERRIDE="R:key.path=value" adds an override on rank R only (the start-up
    // agreement check must catch it).
    if (const char* h = std::getenv("DSA_TEST_RANK_OVERRIDE")) {
      const std::string hook = h;
      const size_t colon = hook.find(':');
      if (colon != std::string::npos && std::stoi(hook.substr(0, colon)) == dsa::Dist::rank())
        overrides.push_back(hook.substr(colon + 1));
    }
    dsa::Recipe recipe = dsa::load_recipe(recipe_path, overrides);
    if (!opts.only_stage.empty()) recipe.stage_index(opts.only_stage);  // fails early on a bad name
    if ((dry.ranks || dry.memory || dry.choose || dry.fit_layers) && !dry.on)
      throw std::runtime_error("[dsa-train] --ranks, --device-memory, --choose-layout and --fit-layers go with --dry-run");
    if (dry.on) {
      const int code = dry_run(recipe, dry);
      dsa::Dist::finalize();
      return code;
    }
    dsa::install_stop_handlers();
    dsa::Trainer trainer(recipe, opts);
    dsa::TrainReport report = trainer.run();
    const int code = report.outcome == dsa::TrainOutcome::NonFinite ? 3 : 0;
    dsa::Dist::finalize();
    return code;
  } catch (const std::exception& e) {
    if (dsa::Dist::world() > 1) dsa::Dist::abort_job(e.what());
    std::fprintf(stderr, "%s\n", e.what());
    dsa::Dist::finalize();
    return 1;
  }
}
