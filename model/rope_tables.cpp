#include "model/rope_tables.h"

#include <algorithm>
#include <cmath>

namespace dsa {

namespace {

double yarn_get_mscale(double scale, double mscale) { return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

// Dimension index at which a frequency completes `num_rotations` turns over the original context.
double correction_dim(double num_rotations, double dim, double base, double max_pos) {
  return (dim * std::log(max_pos / (num_rotations * 2.0 * M_PI))) / (2.0 * std::log(base));
}

}  // namespace

RopeTables make_rope_tables(const ModelConfig& c, int64_t max_positions, DType dtype, Device device) {
  RopeTables t;
  const int64_t dim = c.qk_rope_head_dim, half = dim / 2;
  const double base = c.rope_theta;
  t.inv_freq.resize(half);
  // NOTES: transformers computes inv_freq in float32; we round each value to float so positions
  // times frequencies match its tables to the last bit where the products are exact.
  for (int64_t i = 0; i < half; ++i) {
    const float pos_freq = static_cast<float>(std::pow(base, static_cast<double>(2 * i) / dim));
    t.inv_freq[i] = static_cast<float>(1.0 / pos_freq);
  }
  if (c.rope_scaling.type == "yarn") {
    const RopeScaling& r = c.rope_scaling;
    const double factor = r.factor;
    // An absent (or zero) mscale or mscale_all_dim falls back to get_mscale(factor), as in transformers.
    if (r.attention_factor > 0)
      t.attention_factor = r.attention_factor;
    else if (r.mscale != 0.0 && r.mscale_all_dim != 0.0)
      t.attention_factor = yarn_get_mscale(factor, r.mscale) / yarn_get_mscale(factor, r.mscale_all_dim);
    else
      t.attention_factor = yarn_get_mscale(factor, 1.0);
    double low = correction_dim(r.beta_fast, dim, base, r.original_max_position_embeddings);
    double high = correction_dim(r.beta_slow, dim, base, r.original_max_position_embeddings);
    if (r.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      const float pos_freq = static_cast<float>(std::pow(base, static_cast<double>(2 * i) / dim));
      const float extrap = 1.0f / pos_freq;
      const float interp = 1.0f / (static_cast<float>(factor) * pos_freq);
      const float ramp = std::clamp(static_cast<float>((static_cast<double>(i) - low) / (high - low)), 0.0f, 1.0f);
      const float extrap_factor = 1.0f - ramp;
      t.inv_freq[i] = interp * (1.0f - extrap_factor) + extrap * extrap_factor;
    }
  }
  Tensor cs = Tensor::empty({max_positions, half}, dtype);
  Tensor sn = Tensor::empty({max_positions, half}, dtype);
  for (int64_t p = 0; p < max_positions; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      // f32 angle as transformers forms it (inv_freq[f32] * position[f32]), then cos/sin.
      const float angle = static_cast<float>(t.inv_freq[i]) * static_cast<float>(p);
      const double a = dtype == DType::F64 ? t.inv_freq[i] * static_cast<double>(p) : static_cast<double>(angle);
      cs.set_item(p * half + i, std::cos(a) * t.attention_factor);
      sn.set_item(p * half + i, std::sin(a) * t.attention_factor);
    }
  }
  t.cos = cs.to(device);
  t.sin = sn.to(device);
  return t;
}

}  // namespace dsa
