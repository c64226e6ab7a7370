#include "model/hf_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

namespace dsa {

namespace {

using Use = HfKeyUse;

// NOTES: the rules below are the documentation as well as the code: `dsa-convert config-keys` prints
// them. Read keys go through read_model_key (model/config.cpp); checked keys are tested in
// check_key below after the read keys, because some checks compare against them.
const std::vector<HfKeyRule> kRules = {
    // Read: they define the model.
    {"vocab_size", Use::Read, "embedding and head rows"},
    {"hidden_size", Use::Read, "model width D"},
    {"num_hidden_layers", Use::Read, "decoder layers (the MTP layer comes after them)"},
    {"first_k_dense_replace", Use::Read, "layers [0, k) use the dense MLP, the rest MoE"},
    {"num_attention_heads", Use::Read, "MLA heads"},
    {"q_lora_rank", Use::Read, "query LoRA rank; null: a direct self_attn.q_proj (the indexer then has its own wq)"},
    {"kv_lora_rank", Use::Read, "MLA key/value latent"},
    {"qk_nope_head_dim", Use::Read, "per-head query/key dims without RoPE"},
    {"qk_rope_head_dim", Use::Read, "per-head query/key dims with RoPE (shared key k_pe)"},
    {"v_head_dim", Use::Read, "per-head value dims"},
    {"intermediate_size", Use::Read, "dense MLP width"},
    {"moe_intermediate_size", Use::Read, "routed and shared expert width"},
    {"n_routed_experts", Use::Read, "routed experts (null: a dense model)"},
    {"num_experts_per_tok", Use::Read, "experts per token"},
    {"n_group", Use::Read, "expert groups (null: 1)"},
    {"topk_group", Use::Read, "groups kept per token (null: 1)"},
    {"n_shared_experts", Use::Read, "shared experts (null: 0)"},
    {"routed_scaling_factor", Use::Read, "multiplies the routed experts' weights"},
    {"norm_topk_prob", Use::Read, "renormalize the chosen experts' weights (sigmoid routing; softmax: false only)"},
    {"scoring_func", Use::Read, "sigmoid (V3 family) or softmax (V2)"},
    {"topk_method", Use::Read,
     "noaux_tc (sigmoid + correction bias, group score = top-2 sum), greedy or "
     "group_limited_greedy (softmax; group score = the group's max)"},
    {"rope_interleave", Use::Read, "MLA RoPE on interleaved pairs (true) or rotate-half pairs (false)"},
    {"num_nextn_predict_layers", Use::Read, "MTP layers: 0 or 1 (layer num_hidden_layers)"},
    {"rms_norm_eps", Use::Read, "RMSNorm epsilon"},
    {"rope_theta", Use::Read, "RoPE base"},
    {"rope_scaling", Use::Read,
     "null/default or yarn (factor, original_max_position_embeddings, beta_fast, "
     "beta_slow, mscale, mscale_all_dim, attention_factor, truncate)"},
    {"rope_parameters", Use::Read, "transformers 5 spelling of rope_scaling (+ rope_theta)"},
    {"max_position_embeddings", Use::Read, "longest sequence"},
    {"index_n_heads", Use::Read, "indexer heads (absent: --index-n-heads, default 64)"},
    {"index_head_dim", Use::Read, "indexer head dim (absent: --index-head-dim, default 128)"},
    {"index_topk", Use::Read, "keys per query under sparse attention (absent: --index-topk, default 2048)"},
    {"tie_word_embeddings", Use::Read, "lm_head shares the embedding"},
    {"initializer_range", Use::Read, "std of freshly initialized tensors (a new indexer)"},
    // Checked: one value (or a set) is implemented.
    {"model_type", Use::Checked, "deepseek_v2, deepseek_v3, deepseek_v32 or kimi_k2 (sets the family defaults)"},
    {"hidden_act", Use::Checked, "silu"},
    {"attention_bias", Use::Checked, "false"},
    {"mlp_bias", Use::Checked, "false"},
    {"attention_dropout", Use::Checked, "0 (no dropout)"},
    {"num_key_value_heads", Use::Checked, "null or num_attention_heads (MLA expands every head)"},
    {"moe_layer_freq", Use::Checked, "1 (every layer from first_k_dense_replace on is MoE)"},
    {"mlp_layer_types", Use::Checked, "first_k_dense_replace x dense, then sparse"},
    {"layer_types", Use::Checked, "full_attention or deepseek_sparse_attention per layer"},
    {"num_local_experts", Use::Checked, "equal to n_routed_experts (transformers' alias)"},
    {"num_experts", Use::Checked, "equal to n_routed_experts (transformers' alias)"},
    {"quantization_config", Use::Checked, "fp8 e4m3 with weight_block_size [128, 128] (dequantized on import)"},
    // Metadata: no effect on the function.
    {"architectures", Use::Metadata, "the class name; model_type decides"},
    {"auto_map", Use::Metadata, "remote code pointers"},
    {"torch_dtype", Use::Metadata, "storage dtype; each tensor's own dtype is read"},
    {"dtype", Use::Metadata, "storage dtype; each tensor's own dtype is read"},
    {"transformers_version", Use::Metadata, "writer version"},
    {"_name_or_path", Use::Metadata, "writer path"},
    {"bos_token_id", Use::Metadata, "tokenizer ids (the data pipeline frames documents)"},
    {"eos_token_id", Use::Metadata, "tokenizer ids"},
    {"pad_token_id", Use::Metadata, "tokenizer ids"},
    {"use_cache", Use::Metadata, "inference KV cache"},
    {"ep_size", Use::Metadata, "serving expert parallelism (recipe: parallelism.ep)"},
    {"pretraining_tp", Use::Metadata, "tensor-parallel slicing of the original training; same function"},
    {"aux_loss_alpha", Use::Metadata, "training setting (recipe: stages.*.seq_balance_loss_alpha)"},
    {"seq_aux", Use::Metadata, "training setting (recipe: stages.*.seq_aux)"},
    {"output_router_logits", Use::Metadata, "transformers output option"},
    {"router_aux_loss_coef", Use::Metadata, "transformers training option (recipe owns the balance loss)"},
    {"head_dim", Use::Metadata, "derived by transformers (= qk_rope_head_dim)"},
    {"qk_head_dim", Use::Metadata, "derived by transformers (= qk_nope_head_dim + qk_rope_head_dim)"},
    {"experts_implementation", Use::Metadata, "transformers kernel choice"},
};

const HfKeyRule* rule_of(const std::string& key) {
  for (const HfKeyRule& r : kRules)
    if (key == r.key) return &r;
  return nullptr;
}

std::string scalar_text(const YAML::Node& n) {
  if (n.IsNull()) return "null";
  if (n.IsScalar()) return n.Scalar();
  YAML::Emitter e;
  e << YAML::Flow << n;
  return e.c_str();
}

// Refuses a checked key's value, naming the key, the value and what is implemented.
[[noreturn]] void refuse(const std::string& src, const YAML::Node& n, const std::string& key, const std::string& want) {
  config_error(src, &n,
               "key '" + key + "' = " + scalar_text(n) + " is not implemented (this project implements: " + want + ")");
}

bool is_false_or_null(const YAML::Node& n) { return n.IsNull() || (n.IsScalar() && (n.Scalar() == "false")); }

// n is a number equal to v (false for anything else, never a throw).
bool number_is(const YAML::Node& n, double v) {
  if (!n.IsScalar()) return false;
  try {
    return n.as<double>() == v;
  } catch (const YAML::Exception&) {
    return false;
  }
}

void check_key(const std::string& key, const YAML::Node& n, const ModelConfig& c, const std::string& src,
               HfConfigRead& out) {
  const std::string want = rule_of(key)->what;
  if (key == "hidden_act") {
    if (!(n.IsScalar() && n.Scalar() == "silu")) refuse(src, n, key, want);
  } else if (key == "attention_bias" || key == "mlp_bias") {
    if (!is_false_or_null(n)) refuse(src, n, key, want);
  } else if (key == "attention_dropout") {
    if (!n.IsNull() && !number_is(n, 0.0)) refuse(src, n, key, want);
  } else if (key == "num_key_value_heads") {
    if (!n.IsNull() && !number_is(n, static_cast<double>(c.num_attention_heads))) refuse(src, n, key, want);
  } else if (key == "moe_layer_freq") {
    if (!number_is(n, 1.0)) refuse(src, n, key, want);
  } else if (key == "num_local_experts" || key == "num_experts") {
    if (!n.IsNull() && !number_is(n, static_cast<double>(c.n_routed_experts)))
      refuse(src, n, key, "n_routed_experts = " + std::to_string(c.n_routed_experts));
  } else if (key == "mlp_layer_types") {
    if (n.IsNull()) return;
    bool ok = n.IsSequence() && static_cast<int64_t>(n.size()) == c.num_hidden_layers;
    for (size_t i = 0; ok && i < n.size(); ++i)
      ok = n[i].IsScalar() && n[i].Scalar() == (static_cast<int64_t>(i) < c.first_k_dense_replace ? "dense" : "sparse");
    if (!ok)
      refuse(src, n, key,
             std::to_string(c.first_k_dense_replace) + " x dense, then sparse, for " +
                 std::to_string(c.num_hidden_layers) + " layers");
  } else if (key == "layer_types") {
    if (n.IsNull()) return;
    bool ok = n.IsSequence();
    for (size_t i = 0; ok && i < n.size(); ++i)
      ok = n[i].IsScalar() && (n[i].Scalar() == "full_attention" || n[i].Scalar() == "deepseek_sparse_attention");
    if (!ok) refuse(src, n, key, want);
  } else if (key == "quantization_config") {
    if (n.IsNull()) return;
    if (!n.IsMap()) refuse(src, n, key, want);
    const std::string method = n["quant_method"] ? scalar_text(n["quant_method"]) : "fp8";
    const std::string fmt = n["fmt"] ? scalar_text(n["fmt"]) : "e4m3";
    const YAML::Node b = n["weight_block_size"];
    const bool blocks = b && b.IsSequence() && b.size() == 2 && number_is(b[0], 128) && number_is(b[1], 128);
    if (method != "fp8" || fmt != "e4m3" || !blocks) refuse(src, n, key, want);
    out.fp8_block = 128;
  } else if (key == "model_type") {
    // Checked (and used for the defaults) before the other keys; see read_hf_config_node.
  }
}

}  // namespace

const std::vector<HfKeyRule>& hf_config_keys() { return kRules; }

std::string hf_config_key_table() {
  std::ostringstream o;
  const char* names[] = {"read", "checked", "metadata"};
  for (const HfKeyRule& r : kRules) {
    std::string k = r.key;
    k.resize(std::max<size_t>(k.size(), 26), ' ');
    o << k << " " << names[static_cast<int>(r.use)]
      << (r.use == Use::Checked ? "   "
          : r.use == Use::Read  ? "      "
                                : "  ")
      << r.what << "\n";
  }
  o << "(any other key: ignored, and named on import)\n";
  return o.str();
}

HfConfigRead read_hf_config_node(const YAML::Node& node, const std::string& src, const IndexerDims& indexer) {
  if (!node.IsMap()) config_error(src, &node, "a config.json must hold a JSON object of keys");
  HfConfigRead out;
  ModelConfig& c = out.cfg;
  // The family's defaults first (the values its transformers class assumes for an absent key).
  if (const YAML::Node mt = node["model_type"]) {
    out.model_type = scalar_text(mt);
    static const std::set<std::string> known = {"deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2"};
    if (!known.count(out.model_type)) refuse(src, mt, "model_type", rule_of("model_type")->what);
  }
  const bool v2 = out.model_type == "deepseek_v2";
  if (v2) {
    c.scoring_func = "softmax";
    c.topk_method = "greedy";
    c.norm_topk_prob = false;
  }
  std::vector<std::pair<std::string, YAML::Node>> checked;
  for (const auto& kv : node) {
    const std::string k = kv.first.as<std::string>();
    if (read_model_key(c, k, kv.second, src)) continue;
    const HfKeyRule* r = rule_of(k);
    if (!r) {
      out.notes.push_back("ignored unknown config key '" + k + "' = " + scalar_text(kv.second));
    } else if (r->use == Use::Checked) {
      checked.emplace_back(k, kv.second);
    }
  }
  static const char* required[] = {"vocab_size",          "hidden_size",      "num_hidden_layers",
                                   "num_attention_heads", "q_lora_rank",      "kv_lora_rank",
                                   "qk_nope_head_dim",    "qk_rope_head_dim", "v_head_dim"};
  for (const char* k : required)
    if (!node[k]) config_error(src, &node, std::string("missing required model key '") + k + "'");
  for (const auto& [k, v] : checked) check_key(k, v, c, src, out);
  // The family's routing: DeepSeek-V2 releases route with softmax, the V3 family with sigmoid + bias.
  if (v2 && c.scoring_func != "softmax")
    config_error(src, &node,
                 "key 'scoring_func' = " + c.scoring_func +
                     " with model_type deepseek_v2: DeepSeek-V2 routes with softmax (implemented: softmax)");
  if (!out.model_type.empty() && !v2 && c.scoring_func != "sigmoid")
    config_error(src, &node,
                 "key 'scoring_func' = " + c.scoring_func + " with model_type " + out.model_type +
                     ": the V3 family routes with sigmoid and a correction bias (implemented: sigmoid)");
  // The indexer: all three keys, or none (dimensions from `indexer`).
  const char* ix[] = {"index_n_heads", "index_head_dim", "index_topk"};
  int have = 0;
  for (const char* k : ix) have += node[k] ? 1 : 0;
  if (have == 0) {
    out.indexer_from_config = false;
    c.index_n_heads = indexer.n_heads;
    c.index_head_dim = indexer.head_dim;
    c.index_topk = indexer.topk;
  } else if (have < 3) {
    for (const char* k : ix)
      if (!node[k])
        config_error(src, &node,
                     std::string("missing indexer key '") + k + "' (the config has " +
                         "some index_* keys; give all three or none)");
  }
  c.validate(src);
  return out;
}

HfConfigRead read_hf_config(const std::string& path, const IndexerDims& indexer) {
  YAML::Node node;
  try {
    node = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw std::runtime_error("[config] " + path + ": cannot read the file");
  } catch (const YAML::Exception& e) {
    throw std::runtime_error("[config] " + path + ":" + std::to_string(e.mark.line + 1) + ": parse error: " + e.msg);
  }
  return read_hf_config_node(node, path, indexer);
}

HfExportClass hf_export_class(const ModelConfig& c) {
  HfExportClass e;
  if (c.scoring_func == "softmax") {
    e.architecture = "DeepseekV2ForCausalLM";
    e.model_type = "deepseek_v2";
  } else if (c.has_q_lora() && c.rope_interleave) {
    e.architecture = "DeepseekV32ForCausalLM";
    e.model_type = "deepseek_v32";
    e.loads_indexer = true;
  } else {
    e.architecture = "DeepseekV3ForCausalLM";
    e.model_type = "deepseek_v3";
  }
  if (!e.loads_indexer) {
    std::string why = c.scoring_func == "softmax" ? "softmax routing"
                      : !c.has_q_lora()           ? "no query LoRA"
                                                  : "rotate-half MLA RoPE";
    e.caveats.push_back("transformers has no sparse-attention class for this model (" + why + "): " + e.architecture +
                        " runs dense attention and ignores self_attn.indexer.* (kept in the files "
                        "for dsa-convert import)");
  }
  if (c.scoring_func == "softmax" && c.rope_scaling.type == "yarn" && c.rope_scaling.mscale_all_dim != 0.0)
    e.caveats.push_back(
        "transformers' DeepseekV2 leaves YaRN's mscale_all_dim out of the attention scale (DeepSeek's "
        "own V2 code and this project apply it): its logits differ from this model's");
  if (c.num_nextn_predict_layers > 0)
    e.caveats.push_back("transformers has no MTP module: it ignores model.layers." + std::to_string(c.mtp_layer()) +
                        ".* (kept for serving engines and dsa-convert import)");
  return e;
}

std::string hf_config_json(const ModelConfig& c, DType dtype, int64_t num_mtp_layers, bool fp8) {
  const HfExportClass e = hf_export_class(c);
  nlohmann::ordered_json j;
  j["architectures"] = {e.architecture};
  j["model_type"] = e.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_attention_heads;
  j["q_lora_rank"] = c.has_q_lora() ? nlohmann::ordered_json(c.q_lora_rank) : nlohmann::ordered_json(nullptr);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["n_routed_experts"] = c.n_routed_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["n_group"] = c.n_group;
  j["topk_group"] = c.topk_group;
  j["n_shared_experts"] = c.n_shared_experts;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["scoring_func"] = c.scoring_func;
  j["topk_method"] = c.topk_method;
  j["rope_interleave"] = c.rope_interleave;
  j["num_nextn_predict_layers"] = num_mtp_layers;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.type == "yarn") {
    const RopeScaling& r = c.rope_scaling;
    nlohmann::ordered_json y;
    y["type"] = "yarn";
    y["rope_type"] = "yarn";
    y["factor"] = r.factor;
    y["original_max_position_embeddings"] = r.original_max_position_embeddings;
    y["beta_fast"] = r.beta_fast;
    y["beta_slow"] = r.beta_slow;
    y["mscale"] = r.mscale;
    y["mscale_all_dim"] = r.mscale_all_dim;
    if (r.attention_factor > 0) y["attention_factor"] = r.attention_factor;
    if (!r.truncate) y["truncate"] = false;
    j["rope_scaling"] = y;
    nlohmann::ordered_json rp = y;  // transformers 5's spelling, with the base
    rp.erase("type");
    rp["rope_theta"] = c.rope_theta;
    j["rope_parameters"] = rp;
  } else {
    j["rope_scaling"] = nullptr;
    j["rope_parameters"] = {{"rope_theta", c.rope_theta}, {"rope_type", "default"}};
  }
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["index_n_heads"] = c.index_n_heads;
  j["index_head_dim"] = c.index_head_dim;
  j["index_topk"] = c.index_topk;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["initializer_range"] = c.initializer_range;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  const char* dt = dtype == DType::F32 ? "float32" : "bfloat16";
  j["torch_dtype"] = dt;
  j["dtype"] = dt;
  j["bos_token_id"] = 0;
  j["eos_token_id"] = 1;
  if (fp8) {
    nlohmann::ordered_json q;
    q["activation_scheme"] = "dynamic";
    q["fmt"] = "e4m3";
    q["quant_method"] = "fp8";
    q["weight_block_size"] = {128, 128};
    j["quantization_config"] = q;
  }
  return j.dump(2) + "\n";
}

std::string ModelConfig::to_hf_json() const { return hf_config_json(*this, DType::BF16, num_nextn_predict_layers); }

}  // namespace dsa
