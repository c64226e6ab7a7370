// Where each stage of a recipe reads the run's data stream (the stream itself: data/mixture.h).
//
// The stages of a recipe, removed ones included (`remove: true` keeps a stage's place), read consecutive
// ranges of one stream: stage i reads steps * global_batch windows of seq_len tokens from where stage i-1
// ended, so the continued stages read tokens no earlier stage read, as continued pretraining does. The
// first stage starts at the stream's beginning or, when it starts from a checkpoint (init_from) that
// read the same stream, where that checkpoint left it. A stage with `data_stage: X` starts where X starts
// instead of at its own place (a dense-continued baseline reading the sparse stage's tokens: with the
// same steps, global_batch and seq_len it reads exactly X's windows).
//
// A stage's range is thus a function of the recipe chain's stages before it, not of what runs in this
// process: `--stage`, `--resume` and init_from do not move it, and an ablation recipe (`base:` the
// baseline, earlier stages removed, init_from a baseline checkpoint) reads in each stage exactly the
// batches of the baseline's stage of the same name. The trainer checks the position its starting
// checkpoint carries against the plan and says when they differ (docs/recipes.md, "Data").
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "data/mixture.h"
#include "trainer/recipe.h"

namespace dsa {

// The mixture a recipe's data section describes (sources, seed, packing mode).
MixtureConfig mixture_config(const Recipe& recipe);

class DataPlan {
 public:
  // Lays the planned stages out on `stream` (its position is used, then left where the plan ends).
  DataPlan(const Recipe& recipe, Mixture& stream);

  // The stream state (Mixture::state()) at the first window of the range stage `name` reads, following
  // its data_stage. Throws for a name outside the plan.
  const std::string& start_of(const std::string& name) const;
  int64_t start_sequence(const std::string& name) const;  // the same as a sequence count
  // "stage dense: sequences [0, 6400) x 256 tokens\n..." and the origin.
  std::string describe() const;
  const std::string& origin_note() const { return origin_note_; }

 private:
  struct Range {
    std::string state;
    int64_t begin = 0, end = 0, seq_len = 0;
    bool removed = false;
  };
  std::map<std::string, Range> own_;            // each planned stage's own range
  std::map<std::string, std::string> reads_;    // stage -> the stage whose range it reads
  std::vector<std::string> order_;
  std::string origin_note_;
};

}  // namespace dsa
