#include "model/config.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

namespace dsa {

namespace {

[[noreturn]] void config_error(const std::string& source, const YAML::Node* node, const std::string& msg) {
  std::string where = source;
  if (node && node->Mark().line >= 0) where += ":" + std::to_string(node->Mark().line + 1);
  throw std::runtime_error("[config] " + where + ": " + msg);
}

template <class T>
T read_scalar(const YAML::Node& n, const std::string& source, const std::string& key, const char* expected) {
  if (!n.IsScalar()) config_error(source, &n, "key '" + key + "' must be " + expected);
  try {
    return n.as<T>();
  } catch (const YAML::Exception&) {
    config_error(source, &n, "key '" + key + "' must be " + expected + ", got '" + n.Scalar() + "'");
  }
}

}  // namespace

double ModelConfig::attention_scale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope_scaling.type == "yarn" && rope_scaling.mscale_all_dim != 0.0 && rope_scaling.factor > 1.0) {
    const double m = 0.1 * rope_scaling.mscale_all_dim * std::log(rope_scaling.factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

int64_t ModelConfig::parameter_count() const {
  const int64_t D = hidden_size, H = num_attention_heads;
  int64_t attn = D * q_lora_rank + q_lora_rank + q_lora_rank * H * qk_head_dim() +
                 D * (kv_lora_rank + qk_rope_head_dim) + kv_lora_rank +
                 kv_lora_rank * H * (qk_nope_head_dim + v_head_dim) + H * v_head_dim * D;
  int64_t indexer = q_lora_rank * index_n_heads * index_head_dim + D * index_head_dim + 2 * index_head_dim +
                    D * index_n_heads;
  int64_t dense_mlp = 3 * D * intermediate_size;
  int64_t moe = n_routed_experts * D + n_routed_experts * 3 * D * moe_intermediate_size +
                3 * D * moe_intermediate_size * n_shared_experts;
  int64_t total = vocab_size * D * (tie_word_embeddings ? 1 : 2) + D;
  for (int64_t l = 0; l < num_hidden_layers; ++l)
    total += 2 * D + attn + indexer + (is_moe_layer(l) ? moe : dense_mlp);
  return total;
}

void ModelConfig::validate(const std::string& source) const {
  auto bad = [&](const std::string& key, const std::string& msg) {
    throw std::runtime_error("[config] " + source + ": key '" + key + "' " + msg);
  };
  auto positive = [&](const char* key, int64_t v) {
    if (v <= 0) bad(key, "must be a positive integer, got " + std::to_string(v));
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("q_lora_rank", q_lora_rank);
  positive("kv_lora_rank", kv_lora_rank);
  positive("qk_nope_head_dim", qk_nope_head_dim);
  positive("qk_rope_head_dim", qk_rope_head_dim);
  positive("v_head_dim", v_head_dim);
  positive("max_position_embeddings", max_position_embeddings);
  if (qk_rope_head_dim % 2) bad("qk_rope_head_dim", "must be even (rotary pairs), got " + std::to_string(qk_rope_head_dim));
  if (first_k_dense_replace < 0 || first_k_dense_replace > num_hidden_layers)
    bad("first_k_dense_replace", "must be in [0, num_hidden_layers=" + std::to_string(num_hidden_layers) + "], got " +
                                     std::to_string(first_k_dense_replace));
  if (first_k_dense_replace > 0) positive("intermediate_size", intermediate_size);
  if (first_k_dense_replace < num_hidden_layers) {
    positive("n_routed_experts", n_routed_experts);
    positive("moe_intermediate_size", moe_intermediate_size);
    positive("num_experts_per_tok", num_experts_per_tok);
    positive("n_group", n_group);
    positive("topk_group", topk_group);
    if (n_routed_experts % n_group)
      bad("n_group", "must divide n_routed_experts=" + std::to_string(n_routed_experts) + ", got " +
                         std::to_string(n_group));
    if (topk_group > n_group)
      bad("topk_group", "must be <= n_group=" + std::to_string(n_group) + ", got " + std::to_string(topk_group));
    if (num_experts_per_tok > topk_group * (n_routed_experts / n_group))
      bad("num_experts_per_tok", "must be <= topk_group * experts per group = " +
                                     std::to_string(topk_group * (n_routed_experts / n_group)) + ", got " +
                                     std::to_string(num_experts_per_tok));
    if (n_shared_experts < 0) bad("n_shared_experts", "must be >= 0");
  }
  positive("index_n_heads", index_n_heads);
  positive("index_head_dim", index_head_dim);
  positive("index_topk", index_topk);
  if (qk_rope_head_dim > index_head_dim)
    bad("qk_rope_head_dim", "(" + std::to_string(qk_rope_head_dim) + ") must not exceed index_head_dim (" +
                                std::to_string(index_head_dim) + "): the indexer ropes its first rope dims");
  if (index_head_dim & (index_head_dim - 1))
    bad("index_head_dim", "must be a power of two (Hadamard rotation), got " + std::to_string(index_head_dim));
  if (!(rms_norm_eps > 0)) bad("rms_norm_eps", "must be > 0");
  if (!(rope_theta > 0)) bad("rope_theta", "must be > 0");
  if (!(routed_scaling_factor > 0)) bad("routed_scaling_factor", "must be > 0");
  if (!(initializer_range > 0)) bad("initializer_range", "must be > 0");
  if (rope_scaling.type != "none" && rope_scaling.type != "yarn")
    bad("rope_scaling.type", "must be 'yarn' (or absent), got '" + rope_scaling.type + "'");
  if (rope_scaling.type == "yarn" && !(rope_scaling.factor >= 1.0))
    bad("rope_scaling.factor", "must be >= 1 for yarn");
}

ModelConfig ModelConfig::from_yaml(const YAML::Node& node, const std::string& source, bool strict) {
  if (!node.IsMap()) config_error(source, &node, "the model configuration must be a mapping of keys");
  ModelConfig c;
  using Setter = std::function<void(const YAML::Node&, const std::string&)>;
  std::map<std::string, Setter> keys;
  auto int_key = [&](const char* k, int64_t* dst) {
    keys[k] = [=, &source](const YAML::Node& n, const std::string& key) {
      *dst = read_scalar<int64_t>(n, source, key, "an integer");
    };
  };
  auto dbl_key = [&](const char* k, double* dst) {
    keys[k] = [=, &source](const YAML::Node& n, const std::string& key) {
      *dst = read_scalar<double>(n, source, key, "a number");
    };
  };
  auto bool_key = [&](const char* k, bool* dst) {
    keys[k] = [=, &source](const YAML::Node& n, const std::string& key) {
      *dst = read_scalar<bool>(n, source, key, "true or false");
    };
  };
  int_key("vocab_size", &c.vocab_size);
  int_key("hidden_size", &c.hidden_size);
  int_key("num_hidden_layers", &c.num_hidden_layers);
  int_key("first_k_dense_replace", &c.first_k_dense_replace);
  int_key("num_attention_heads", &c.num_attention_heads);
  int_key("q_lora_rank", &c.q_lora_rank);
  int_key("kv_lora_rank", &c.kv_lora_rank);
  int_key("qk_nope_head_dim", &c.qk_nope_head_dim);
  int_key("qk_rope_head_dim", &c.qk_rope_head_dim);
  int_key("v_head_dim", &c.v_head_dim);
  int_key("intermediate_size", &c.intermediate_size);
  int_key("moe_intermediate_size", &c.moe_intermediate_size);
  int_key("n_routed_experts", &c.n_routed_experts);
  int_key("num_experts_per_tok", &c.num_experts_per_tok);
  int_key("n_group", &c.n_group);
  int_key("topk_group", &c.topk_group);
  int_key("n_shared_experts", &c.n_shared_experts);
  dbl_key("routed_scaling_factor", &c.routed_scaling_factor);
  bool_key("norm_topk_prob", &c.norm_topk_prob);
  dbl_key("rms_norm_eps", &c.rms_norm_eps);
  dbl_key("rope_theta", &c.rope_theta);
  int_key("max_position_embeddings", &c.max_position_embeddings);
  int_key("index_n_heads", &c.index_n_heads);
  int_key("index_head_dim", &c.index_head_dim);
  int_key("index_topk", &c.index_topk);
  bool_key("tie_word_embeddings", &c.tie_word_embeddings);
  dbl_key("initializer_range", &c.initializer_range);
  auto rope_map = [&c, &source](const YAML::Node& n, const std::string& key) {
    if (n.IsNull()) return;
    if (!n.IsMap()) config_error(source, &n, "key '" + key + "' must be a mapping (type, factor, ...) or null");
    for (const auto& kv : n) {
      const std::string k = kv.first.as<std::string>();
      const std::string full = key + "." + k;
      if (k == "type" || k == "rope_type") {
        c.rope_scaling.type = read_scalar<std::string>(kv.second, source, full, "a string");
        if (c.rope_scaling.type == "default") c.rope_scaling.type = "none";
      } else if (k == "factor") {
        c.rope_scaling.factor = read_scalar<double>(kv.second, source, full, "a number");
      } else if (k == "original_max_position_embeddings") {
        c.rope_scaling.original_max_position_embeddings = read_scalar<int64_t>(kv.second, source, full, "an integer");
      } else if (k == "beta_fast") {
        c.rope_scaling.beta_fast = read_scalar<double>(kv.second, source, full, "a number");
      } else if (k == "beta_slow") {
        c.rope_scaling.beta_slow = read_scalar<double>(kv.second, source, full, "a number");
      } else if (k == "mscale") {
        c.rope_scaling.mscale = read_scalar<double>(kv.second, source, full, "a number");
      } else if (k == "mscale_all_dim") {
        c.rope_scaling.mscale_all_dim = read_scalar<double>(kv.second, source, full, "a number");
      } else if (k == "rope_theta") {
        c.rope_theta = read_scalar<double>(kv.second, source, full, "a number");
      }
      // Other keys (e.g. transformers' "attention_factor" or "truncate") are ignored.
    }
  };
  keys["rope_scaling"] = rope_map;
  keys["rope_parameters"] = rope_map;  // transformers 5.x spelling

  // Keys of a Hugging Face config.json that this project reads no value from.
  static const std::set<std::string> hf_ignored = {
      "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map", "bos_token_id",
      "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "attention_dropout", "use_cache",
      "num_key_value_heads", "num_nextn_predict_layers", "topk_method", "scoring_func", "aux_loss_alpha",
      "seq_aux", "ep_size", "moe_layer_freq", "quantization_config", "pretraining_tp", "head_dim",
      "mlp_layer_types", "rope_interleave", "n_shared_experts_", "kv_lora_rank_", "output_router_logits",
      "router_aux_loss_coef", "num_local_experts"};
  for (const auto& kv : node) {
    const std::string k = kv.first.as<std::string>();
    auto it = keys.find(k);
    if (it != keys.end()) {
      it->second(kv.second, k);
    } else if (strict) {
      std::string allowed;
      for (const auto& [name, _] : keys) allowed += (allowed.empty() ? "" : ", ") + name;
      config_error(source, &kv.first, "unknown model key '" + k + "'; allowed keys: " + allowed);
    } else if (!hf_ignored.count(k)) {
      // Lenient (config.json): unknown keys are ignored silently; they are often framework metadata.
    }
  }
  static const char* required[] = {"vocab_size",       "hidden_size",      "num_hidden_layers", "num_attention_heads",
                                   "q_lora_rank",      "kv_lora_rank",     "qk_nope_head_dim",  "qk_rope_head_dim",
                                   "v_head_dim",       "index_n_heads",    "index_head_dim",    "index_topk"};
  for (const char* k : required)
    if (!node[k]) config_error(source, &node, std::string("missing required model key '") + k + "'");
  c.validate(source);
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  YAML::Node node;
  try {
    node = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw std::runtime_error("[config] " + path + ": cannot read the file");
  } catch (const YAML::Exception& e) {
    throw std::runtime_error("[config] " + path + ":" + std::to_string(e.mark.line + 1) + ": parse error: " + e.msg);
  }
  const bool is_json = path.size() >= 5 && path.substr(path.size() - 5) == ".json";
  return from_yaml(node, path, /*strict=*/!is_json);
}

namespace {
void emit_common(std::ostringstream& o, const ModelConfig& c, const char* sep, const char* q, bool json) {
  auto kv = [&](const char* k, const std::string& v) { o << "  " << q << k << q << ": " << v << sep << "\n"; };
  auto num = [](double v) {
    std::ostringstream s;
    s.precision(17);
    s << v;
    std::string r = s.str();
    if (r.find_first_of(".eE") == std::string::npos && r.find("inf") == std::string::npos) r += ".0";
    return r;
  };
  auto b = [](bool v) { return std::string(v ? "true" : "false"); };
  kv("vocab_size", std::to_string(c.vocab_size));
  kv("hidden_size", std::to_string(c.hidden_size));
  kv("num_hidden_layers", std::to_string(c.num_hidden_layers));
  kv("first_k_dense_replace", std::to_string(c.first_k_dense_replace));
  kv("num_attention_heads", std::to_string(c.num_attention_heads));
  kv("q_lora_rank", std::to_string(c.q_lora_rank));
  kv("kv_lora_rank", std::to_string(c.kv_lora_rank));
  kv("qk_nope_head_dim", std::to_string(c.qk_nope_head_dim));
  kv("qk_rope_head_dim", std::to_string(c.qk_rope_head_dim));
  kv("v_head_dim", std::to_string(c.v_head_dim));
  kv("intermediate_size", std::to_string(c.intermediate_size));
  kv("moe_intermediate_size", std::to_string(c.moe_intermediate_size));
  kv("n_routed_experts", std::to_string(c.n_routed_experts));
  kv("num_experts_per_tok", std::to_string(c.num_experts_per_tok));
  kv("n_group", std::to_string(c.n_group));
  kv("topk_group", std::to_string(c.topk_group));
  kv("n_shared_experts", std::to_string(c.n_shared_experts));
  kv("routed_scaling_factor", num(c.routed_scaling_factor));
  kv("norm_topk_prob", b(c.norm_topk_prob));
  kv("rms_norm_eps", num(c.rms_norm_eps));
  kv("rope_theta", num(c.rope_theta));
  kv("max_position_embeddings", std::to_string(c.max_position_embeddings));
  kv("index_n_heads", std::to_string(c.index_n_heads));
  kv("index_head_dim", std::to_string(c.index_head_dim));
  kv("index_topk", std::to_string(c.index_topk));
  kv("tie_word_embeddings", b(c.tie_word_embeddings));
  kv("initializer_range", num(c.initializer_range));
  if (c.rope_scaling.type == "yarn") {
    const RopeScaling& r = c.rope_scaling;
    std::ostringstream m;
    if (json)
      m << "{\"type\": \"yarn\", \"rope_type\": \"yarn\", \"factor\": " << num(r.factor)
        << ", \"original_max_position_embeddings\": " << r.original_max_position_embeddings
        << ", \"beta_fast\": " << num(r.beta_fast) << ", \"beta_slow\": " << num(r.beta_slow)
        << ", \"mscale\": " << num(r.mscale) << ", \"mscale_all_dim\": " << num(r.mscale_all_dim) << "}";
    else
      m << "{type: yarn, factor: " << num(r.factor)
        << ", original_max_position_embeddings: " << r.original_max_position_embeddings
        << ", beta_fast: " << num(r.beta_fast) << ", beta_slow: " << num(r.beta_slow) << ", mscale: " << num(r.mscale)
        << ", mscale_all_dim: " << num(r.mscale_all_dim) << "}";
    kv("rope_scaling", m.str());
  } else {
    kv("rope_scaling", "null");
  }
}
}  // namespace

std::string ModelConfig::to_hf_json() const {
  std::ostringstream o;
  o << "{\n";
  o << "  \"architectures\": [\"DeepseekV32ForCausalLM\"],\n";
  o << "  \"model_type\": \"deepseek_v32\",\n";
  o << "  \"hidden_act\": \"silu\",\n";
  o << "  \"attention_bias\": false,\n";
  o << "  \"num_key_value_heads\": " << num_attention_heads << ",\n";
  o << "  \"torch_dtype\": \"bfloat16\",\n";
  o << "  \"bos_token_id\": 0,\n  \"eos_token_id\": 1,\n";
  emit_common(o, *this, ",", "\"", true);
  o << "  \"num_nextn_predict_layers\": 0\n}\n";
  return o.str();
}

std::string ModelConfig::to_yaml() const {
  std::ostringstream o;
  emit_common(o, *this, "", "", false);
  std::string s = o.str();
  // YAML mapping at the top level: drop the two-space indent.
  std::string out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out += line.substr(2) + "\n";
  return out;
}

ModelConfig preset_config(const std::string& name) {
  ModelConfig c;
  if (name == "tiny") {
    c.vocab_size = 256;
    c.hidden_size = 32;
    c.num_hidden_layers = 2;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 2;
    c.q_lora_rank = 16;
    c.kv_lora_rank = 12;
    c.qk_nope_head_dim = 8;
    c.qk_rope_head_dim = 4;
    c.v_head_dim = 6;
    c.intermediate_size = 40;
    c.moe_intermediate_size = 12;
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 2;
    c.n_group = 4;
    c.topk_group = 2;
    c.n_shared_experts = 1;
    c.routed_scaling_factor = 2.5;
    c.index_n_heads = 2;
    c.index_head_dim = 8;
    c.index_topk = 4;
    c.max_position_embeddings = 4096;
  } else if (name == "bench-small") {
    c.vocab_size = 129280;
    c.hidden_size = 1024;
    c.num_hidden_layers = 8;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 16;
    c.q_lora_rank = 384;
    c.kv_lora_rank = 256;
    c.qk_nope_head_dim = 64;
    c.qk_rope_head_dim = 32;
    c.v_head_dim = 64;
    c.intermediate_size = 2816;
    c.moe_intermediate_size = 512;
    c.n_routed_experts = 16;
    c.num_experts_per_tok = 4;
    c.n_group = 4;
    c.topk_group = 2;
    c.n_shared_experts = 1;
    c.routed_scaling_factor = 2.5;
    c.index_n_heads = 16;
    c.index_head_dim = 64;
    c.index_topk = 512;
    c.max_position_embeddings = 65536;
  } else {
    throw std::runtime_error("[config] unknown preset '" + name + "' (known: tiny, bench-small)");
  }
  c.validate("preset " + name);
  return c;
}

}  // namespace dsa
