// Model configuration: the Hugging Face DeepseekV32Config keys (SPEC.md §1), plus what the other
// DeepSeek-family releases add (SPEC.md §1b): no query LoRA, softmax routing (V2), rotate-half MLA
// RoPE, an MTP layer. Validated.
//
// Sources: a recipe's inline `model:` mapping or a YAML file (strict: unknown keys are errors, with
// file and line), or a Hugging Face config.json (model/hf_config.h: every key a DeepSeek release
// carries is read, checked or listed as metadata there). JSON is read through yaml-cpp, which parses
// it as YAML flow style, so both give line numbers in errors.
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
  double mscale = 0.0, mscale_all_dim = 0.0;  // 0 = absent (transformers tests their truthiness)
  double attention_factor = 0.0;  // > 0: multiplies cos/sin instead of the mscale ratio (transformers' key)
  bool truncate = true;           // floor/ceil the correction range (transformers' default)
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t first_k_dense_replace = 0;  // layers [0, k) use the dense SwiGLU MLP, the rest MoE
  int64_t num_attention_heads = 0;
  int64_t q_lora_rank = 0;  // 0 = none (config.json null): self_attn.q_proj reads the normed hidden state
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
  // Router: "sigmoid" scores with the selection-only e_score_correction_bias and topk_method
  // "noaux_tc" (group score = sum of the group's top 2), as DeepSeek-V3; or "softmax" scores without a
  // bias and topk_method "greedy" (no groups) or "group_limited_greedy" (group score = the group's max),
  // as DeepSeek-V2.
  std::string scoring_func = "sigmoid";
  std::string topk_method = "noaux_tc";
  bool rope_interleave = true;  // MLA RoPE on interleaved pairs (DeepSeek); false: rotate-half pairs
  int64_t num_nextn_predict_layers = 0;  // MTP layers (0 or 1), stored as layer num_hidden_layers
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
  bool has_q_lora() const { return q_lora_rank > 0; }
  bool has_routing_bias() const { return scoring_func == "sigmoid"; }
  // Layer index of the MTP layer (when num_nextn_predict_layers is 1), after the main layers.
  int64_t mtp_layer() const { return num_hidden_layers; }
  int64_t total_layers() const { return num_hidden_layers + num_nextn_predict_layers; }
  // Also true for the MTP layer (index num_hidden_layers) of a model with experts.
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense_replace && n_routed_experts > 0; }
  // Softmax scale of the main attention: qk_head_dim^-0.5, times mscale^2 under YaRN.
  double attention_scale() const;
  int64_t parameter_count() const;

  // Throws std::runtime_error naming the source, the key and what was expected.
  void validate(const std::string& source) const;

  // strict: this project's YAML keys; otherwise a Hugging Face config.json (read_hf_config, default
  // indexer dimensions where it has none).
  static ModelConfig from_yaml(const YAML::Node& node, const std::string& source, bool strict);
  static ModelConfig from_file(const std::string& path);  // config.json (lenient) or .yaml (strict)
  // Hugging Face config.json text for the transformers class that loads this model
  // (hf_export_class; model/hf_config.cpp).
  std::string to_hf_json() const;
  // Canonical YAML mapping of every key (saved with checkpoints). The keys added with the non-V3.2
  // families (scoring_func, topk_method, rope_interleave, num_nextn_predict_layers) are written only
  // when they differ from their defaults, so a V3.2-style model's YAML is what older builds wrote.
  std::string to_yaml() const;
};

// Throws "[config] SOURCE:LINE: msg" (the line of `node` when it has one).
[[noreturn]] void config_error(const std::string& source, const YAML::Node* node, const std::string& msg);

// Reads one model key shared by both sources (this project's YAML and config.json) into c; false when
// `key` is not one of them. Errors name the source, the line and the key.
bool read_model_key(ModelConfig& c, const std::string& key, const YAML::Node& value, const std::string& source);

// Named presets for tests, the quickstart and benchmarks: "tiny", "bench-small".
ModelConfig preset_config(const std::string& name);

}  // namespace dsa
