// dsa-train: run a recipe's stages.
//
//   dsa-train RECIPE.yaml [key.path=value ...] [--stage NAME] [--resume] [--time-limit SECONDS]
//   dsa-train plot [args of tools/dsa_plot.py]
//   mpirun -np N dsa-train RECIPE.yaml ...        (data parallel: the recipe's batch is the global batch)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "trainer/dist.h"
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
               "  --dump-grads DIR    write every step's gradients (per rank and reduced) to DIR (tests, ep 1)\n");
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
