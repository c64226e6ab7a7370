// Model configuration: the Hugging Face DeepseekV32Config keys (SPEC.md §1), validated.
//
// Sources: a recipe's inline `model:` mapping (strict: unknown keys are errors, with file and line),
// or a Hugging Face config.json (lenient: keys this project does not use are ignored). JSON is read
// through yaml-cpp, which parses it as YAML flow style, so both give line numbers in errors.
#pragma once

#include <cstdint>
#include <string>

namespace YAML {
class Node;
}

namespace dsa {

struct RopeScaling {
  std::string type = "none";  // "none" or "yarn"
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 1.0, mscale_all_dim = 0.0;
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t first_k_dense_replace = 0;  // layers [0, k) use the dense SwiGLU MLP, the rest MoE
  int64_t num_attention_heads = 0;
  int64_t q_lora_rank = 0;
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t intermediate_size = 0;      // dense MLP
  int64_t moe_intermediate_size = 0;  // each routed and shared expert
  int64_t n_routed_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t n_shared_experts = 0;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 4096;
  int64_t index_n_heads = 0;
  int64_t index_head_dim = 0;
  int64_t index_topk = 0;
  bool tie_word_embeddings = false;
  double initializer_range = 0.006;  // DeepSeek's init std

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense_replace && n_routed_experts > 0; }
  // Softmax scale of the main attention: qk_head_dim^-0.5, times mscale^2 under YaRN.
  double attention_scale() const;
  int64_t parameter_count() const;

  // Throws std::runtime_error naming the source, the key and what was expected.
  void validate(const std::string& source) const;

  static ModelConfig from_yaml(const YAML::Node& node, const std::string& source, bool strict);
  static ModelConfig from_file(const std::string& path);  // config.json (lenient) or .yaml (strict)
  // Hugging Face config.json text for DeepseekV32ForCausalLM (model_type deepseek_v32).
  std::string to_hf_json() const;
  // Canonical YAML mapping of every key (saved with checkpoints).
  std::string to_yaml() const;
};

// Named presets for tests, the quickstart and benchmarks: "tiny", "bench-small".
ModelConfig preset_config(const std::string& name);

}  // namespace dsa
