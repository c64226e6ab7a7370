// config.json files with the key sets of published DeepSeek-family releases (DeepSeek-V3 / V3.1,
// Moonlight-16B-A3B, DeepSeek-V2-Lite, DeepSeek-V2), at tiny sizes. Written key by key as those files
// have them, independently of the code under test (model/hf_config.cpp), so the importer meets what a
// user downloads: release-only keys (auto_map, ep_size, aux_loss_alpha, ...), null q_lora_rank, no
// index_* keys, quantization_config, rope_scaling in the old spelling.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "model/config.h"

namespace dsa::testing {

// Dimensions taken from `c`; the rest as the family's release has it.
inline nlohmann::ordered_json release_common(const ModelConfig& c) {
  nlohmann::ordered_json j;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["aux_loss_alpha"] = 0.001;
  j["ep_size"] = 1;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["hidden_act"] = "silu";
  j["hidden_size"] = c.hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = c.intermediate_size;
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["moe_layer_freq"] = 1;
  j["n_group"] = c.n_group;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_key_value_heads"] = c.num_attention_heads;
  j["pretraining_tp"] = 1;
  j["q_lora_rank"] = c.q_lora_rank > 0 ? nlohmann::ordered_json(c.q_lora_rank) : nlohmann::ordered_json(nullptr);
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["rms_norm_eps"] = 1e-06;
  j["rope_theta"] = 10000;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["seq_aux"] = true;
  j["tie_word_embeddings"] = false;
  j["topk_group"] = c.topk_group;
  j["torch_dtype"] = "bfloat16";
  j["use_cache"] = true;
  j["v_head_dim"] = c.v_head_dim;
  j["vocab_size"] = c.vocab_size;
  return j;
}

// DeepSeek-V3 / V3.1: sigmoid + noaux_tc, one MTP layer, FP8 weights, YaRN (factor 40 in the release;
// here the tiny model's own max_position_embeddings / 40).
inline std::string v3_release_config(const ModelConfig& c, bool fp8, int mtp_layers) {
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"},
                   {"AutoModel", "modeling_deepseek.DeepseekV3Model"},
                   {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV3ForCausalLM"}};
  j["bos_token_id"] = 0;
  j["eos_token_id"] = 1;
  j["model_type"] = "deepseek_v3";
  j["num_nextn_predict_layers"] = mtp_layers;
  j["scoring_func"] = "sigmoid";
  j["topk_method"] = "noaux_tc";
  j["transformers_version"] = "4.33.1";
  const nlohmann::ordered_json common = release_common(c);
  for (auto& [k, v] : common.items()) j[k] = v;
  j["rope_scaling"] = {{"beta_fast", 32},       {"beta_slow", 1},
                       {"factor", 40},          {"mscale", 1.0},
                       {"mscale_all_dim", 1.0}, {"original_max_position_embeddings", c.max_position_embeddings / 40},
                       {"type", "yarn"}};
  if (fp8)
    j["quantization_config"] = {
        {"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  return j.dump(2);
}

// DeepSeek-V3.2(-Exp): V3's keys plus the indexer's (no YaRN here: the tiny model's own rope).
inline std::string v32_release_config(const ModelConfig& c, int mtp_layers) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(v3_release_config(c, false, mtp_layers));
  j["architectures"] = {"DeepseekV32ForCausalLM"};
  j["model_type"] = "deepseek_v32";
  j["index_head_dim"] = c.index_head_dim;
  j["index_n_heads"] = c.index_n_heads;
  j["index_topk"] = c.index_topk;
  j["rope_scaling"] = nullptr;
  return j.dump(2);
}

// Moonlight-16B-A3B: the V3 architecture without a query LoRA, no expert groups, no YaRN.
inline std::string moonlight_release_config(const ModelConfig& c) {
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"},
                   {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV3ForCausalLM"}};
  j["bos_token_id"] = 163584;
  j["eos_token_id"] = 163585;
  j["model_type"] = "deepseek_v3";
  j["num_nextn_predict_layers"] = 0;
  j["scoring_func"] = "sigmoid";
  j["topk_method"] = "noaux_tc";
  j["transformers_version"] = "4.48.2";
  const nlohmann::ordered_json common = release_common(c);
  for (auto& [k, v] : common.items()) j[k] = v;
  j["rope_scaling"] = nullptr;
  return j.dump(2);
}

// DeepSeek-V2-Lite (topk_method greedy) and DeepSeek-V2 (group_limited_greedy): softmax routing, no
// correction bias, norm_topk_prob false.
inline std::string v2_release_config(const ModelConfig& c, const std::string& topk_method) {
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekV2ForCausalLM"};
  j["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV2Config"},
                   {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV2ForCausalLM"}};
  j["bos_token_id"] = 100000;
  j["eos_token_id"] = 100001;
  j["model_type"] = "deepseek_v2";
  j["scoring_func"] = "softmax";
  j["topk_method"] = topk_method;
  j["transformers_version"] = "4.39.3";
  const nlohmann::ordered_json common = release_common(c);
  for (auto& [k, v] : common.items()) j[k] = v;
  j["rope_scaling"] = nullptr;
  return j.dump(2);
}

}  // namespace dsa::testing
