#include "trainer/schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace dsa {

double LrSchedule::factor(int64_t step) const {
  if (step < 0 || total_steps <= 0 || warmup_steps < 0)
    throw std::runtime_error("[schedule] step " + std::to_string(step) + " with total_steps " +
                             std::to_string(total_steps) + ", warmup_steps " + std::to_string(warmup_steps));
  if (step < warmup_steps) return static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (kind == Schedule::constant) return 1.0;
  const int64_t span = total_steps - warmup_steps - 1;  // steps after the first post-warm-up one
  if (span <= 0) return 1.0;
  const double p = std::clamp(static_cast<double>(step - warmup_steps) / static_cast<double>(span), 0.0, 1.0);
  return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + std::cos(M_PI * p));
}

}  // namespace dsa
