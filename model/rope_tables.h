// Rotary tables for MLA and the indexer (one table, qk_rope_head_dim wide), with YaRN scaling
// computed exactly as transformers 5.17's `_compute_yarn_parameters` does.
#pragma once

#include <vector>

#include "kernels/tensor.h"
#include "model/config.h"

namespace dsa {

struct RopeTables {
  std::vector<double> inv_freq;  // [R/2]
  double attention_factor = 1.0; // multiplies cos and sin (YaRN; 1 otherwise)
  Tensor cos, sin;               // [P, R/2] in the compute dtype, already times attention_factor
};

// Tables for positions [0, max_positions).
RopeTables make_rope_tables(const ModelConfig& cfg, int64_t max_positions, DType dtype, Device device);

}  // namespace dsa
