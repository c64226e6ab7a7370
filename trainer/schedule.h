// Learning-rate schedule of one stage: linear warm-up, then cosine decay to min_lr_ratio * lr or a
// constant lr.
//
// `step` is the 0-based index of the optimizer step about to be taken within the stage:
//   step < W (warm-up):   lr * (step + 1) / W                 (the first step already moves)
//   constant:             lr
//   cosine:               lr * (r + (1 - r) * (1 + cos(pi * p)) / 2),  p = (step - W) / (T - W - 1)
// with T = steps, W = warmup_steps, r = min_lr_ratio; p is clamped to [0, 1], so the last step
// (T - 1) runs at exactly r * lr, and a single post-warm-up step (T - W == 1) at lr.
#pragma once

#include <cstdint>

#include "trainer/recipe.h"

namespace dsa {

struct LrSchedule {
  Schedule kind = Schedule::cosine;
  int64_t total_steps = 1;
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.1;

  static LrSchedule of(const StageSpec& s) { return {s.schedule, s.steps, s.warmup_steps, s.min_lr_ratio}; }
  // Multiplier in (0, 1] applied to a group's peak lr at `step`.
  double factor(int64_t step) const;
  double lr(int64_t step, double peak) const { return peak * factor(step); }
};

}  // namespace dsa
