#include "model/config.h"
#include "model/hf_config.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

namespace dsa {

void config_error(const std::string& source, const YAML::Node* node, const std::string& msg) {
  std::string where = source;
  if (node && node->Mark().line >= 0) where += ":" + std::to_string(node->Mark().line + 1);
  throw std::runtime_error("[config] " + where + ": " + msg);
}

namespace {

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

namespace {

// Parameters of one decoder layer (attention, indexer, FFN, its two norms).
int64_t layer_parameters(const ModelConfig& c, int64_t layer) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, ql = c.q_lora_rank;
  const int64_t q_path = c.has_q_lora() ? D * ql + ql + ql * H * c.qk_head_dim() : D * H * c.qk_head_dim();
  const int64_t attn = q_path + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank +
                       c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D;
  const int64_t ix_q = (c.has_q_lora() ? ql : D) * c.index_n_heads * c.index_head_dim;
  const int64_t indexer = ix_q + D * c.index_head_dim + 2 * c.index_head_dim + D * c.index_n_heads;
  const int64_t dense_mlp = 3 * D * c.intermediate_size;
  const int64_t moe = c.n_routed_experts * D + (c.has_routing_bias() ? c.n_routed_experts : 0) +
                      c.n_routed_experts * 3 * D * c.moe_intermediate_size +
                      3 * D * c.moe_intermediate_size * c.n_shared_experts;
  return 2 * D + attn + indexer + (c.is_moe_layer(layer) ? moe : dense_mlp);
}

}  // namespace

int64_t ModelConfig::parameter_count() const {
  const int64_t D = hidden_size;
  int64_t total = vocab_size * D * (tie_word_embeddings ? 1 : 2) + D;
  for (int64_t l = 0; l < num_hidden_layers; ++l) total += layer_parameters(*this, l);
  // MTP layer: enorm, hnorm, eh_proj [D, 2D], shared_head.norm and a decoder layer (embedding and head shared).
  if (num_nextn_predict_layers > 0) total += 3 * D + 2 * D * D + layer_parameters(*this, mtp_layer());
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
  if (q_lora_rank < 0)
    bad("q_lora_rank", "must be a positive integer or null (no query LoRA), got " + std::to_string(q_lora_rank));
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
  if (scoring_func != "sigmoid" && scoring_func != "softmax")
    bad("scoring_func", "must be sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2), got '" + scoring_func + "'");
  const bool sigmoid = scoring_func == "sigmoid", greedy = topk_method == "greedy";
  if (sigmoid && topk_method != "noaux_tc")
    bad("topk_method", "must be noaux_tc with scoring_func sigmoid (DeepSeek-V3 routing), got '" + topk_method + "'");
  if (!sigmoid && topk_method != "greedy" && topk_method != "group_limited_greedy")
    bad("topk_method", "must be greedy or group_limited_greedy with scoring_func softmax (DeepSeek-V2 routing), got '" +
                           topk_method + "'");
  if (!sigmoid && norm_topk_prob)
    bad("norm_topk_prob", "true with scoring_func softmax is not supported: DeepSeek-V2's releases use false, and "
                          "DeepSeek's and transformers' code disagree on it (transformers ignores the key)");
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
    // greedy routing ignores the groups: any expert may be chosen.
    const int64_t reachable = greedy ? n_routed_experts : topk_group * (n_routed_experts / n_group);
    if (num_experts_per_tok > reachable)
      bad("num_experts_per_tok", std::string("must be <= ") +
                                     (greedy ? "n_routed_experts" : "topk_group * experts per group") + " = " +
                                     std::to_string(reachable) + ", got " + std::to_string(num_experts_per_tok));
    if (n_shared_experts < 0) bad("n_shared_experts", "must be >= 0");
  }
  if (num_nextn_predict_layers < 0 || num_nextn_predict_layers > 1)
    bad("num_nextn_predict_layers", "must be 0 or 1 (one MTP module, as every DeepSeek release has), got " +
                                        std::to_string(num_nextn_predict_layers));
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
    bad("rope_scaling.type", "must be 'yarn' or 'default' (or absent), got '" + rope_scaling.type + "'");
  if (rope_scaling.type == "yarn" && !(rope_scaling.factor >= 1.0))
    bad("rope_scaling.factor", "must be >= 1 for yarn");
  if (rope_scaling.attention_factor < 0) bad("rope_scaling.attention_factor", "must be > 0 (or absent)");
}

bool read_model_key(ModelConfig& c, const std::string& key, const YAML::Node& n, const std::string& source) {
  auto integer = [&](int64_t* dst) { *dst = read_scalar<int64_t>(n, source, key, "an integer"); };
  // null: "none" for q_lora_rank (no query LoRA), 0 for the expert counts of a dense model, 1 for groups.
  auto integer_or_null = [&](int64_t* dst, int64_t null_value) {
    *dst = n.IsNull() ? null_value : read_scalar<int64_t>(n, source, key, "an integer or null");
  };
  auto number = [&](double* dst) { *dst = read_scalar<double>(n, source, key, "a number"); };
  auto boolean = [&](bool* dst) { *dst = read_scalar<bool>(n, source, key, "true or false"); };
  auto text = [&](std::string* dst) { *dst = read_scalar<std::string>(n, source, key, "a string"); };
  if (key == "vocab_size") integer(&c.vocab_size);
  else if (key == "hidden_size") integer(&c.hidden_size);
  else if (key == "num_hidden_layers") integer(&c.num_hidden_layers);
  else if (key == "first_k_dense_replace") integer(&c.first_k_dense_replace);
  else if (key == "num_attention_heads") integer(&c.num_attention_heads);
  else if (key == "q_lora_rank") {
    integer_or_null(&c.q_lora_rank, 0);
    if (!n.IsNull() && c.q_lora_rank <= 0)
      config_error(source, &n, "key 'q_lora_rank' must be a positive integer or null (no query LoRA), got " +
                                   std::to_string(c.q_lora_rank));
  }
  else if (key == "kv_lora_rank") integer(&c.kv_lora_rank);
  else if (key == "qk_nope_head_dim") integer(&c.qk_nope_head_dim);
  else if (key == "qk_rope_head_dim") integer(&c.qk_rope_head_dim);
  else if (key == "v_head_dim") integer(&c.v_head_dim);
  else if (key == "intermediate_size") integer(&c.intermediate_size);
  else if (key == "moe_intermediate_size") integer_or_null(&c.moe_intermediate_size, 0);
  else if (key == "n_routed_experts") integer_or_null(&c.n_routed_experts, 0);
  else if (key == "num_experts_per_tok") integer_or_null(&c.num_experts_per_tok, 0);
  else if (key == "n_group") integer_or_null(&c.n_group, 1);
  else if (key == "topk_group") integer_or_null(&c.topk_group, 1);
  else if (key == "n_shared_experts") integer_or_null(&c.n_shared_experts, 0);
  else if (key == "routed_scaling_factor") number(&c.routed_scaling_factor);
  else if (key == "norm_topk_prob") boolean(&c.norm_topk_prob);
  else if (key == "scoring_func") text(&c.scoring_func);
  else if (key == "topk_method") text(&c.topk_method);
  else if (key == "rope_interleave") boolean(&c.rope_interleave);
  else if (key == "num_nextn_predict_layers") integer(&c.num_nextn_predict_layers);
  else if (key == "rms_norm_eps") number(&c.rms_norm_eps);
  else if (key == "rope_theta") number(&c.rope_theta);
  else if (key == "max_position_embeddings") integer(&c.max_position_embeddings);
  else if (key == "index_n_heads") integer(&c.index_n_heads);
  else if (key == "index_head_dim") integer(&c.index_head_dim);
  else if (key == "index_topk") integer(&c.index_topk);
  else if (key == "tie_word_embeddings") boolean(&c.tie_word_embeddings);
  else if (key == "initializer_range") number(&c.initializer_range);
  else if (key == "rope_scaling" || key == "rope_parameters") {  // rope_parameters: transformers 5.x spelling
    if (n.IsNull()) return true;
    if (!n.IsMap()) config_error(source, &n, "key '" + key + "' must be a mapping (type, factor, ...) or null");
    RopeScaling& r = c.rope_scaling;
    for (const auto& kv : n) {
      const std::string k = kv.first.as<std::string>();
      const std::string full = key + "." + k;
      const YAML::Node& v = kv.second;
      auto num = [&](double* dst) { *dst = read_scalar<double>(v, source, full, "a number"); };
      if (k == "type" || k == "rope_type") {
        r.type = read_scalar<std::string>(v, source, full, "a string");
        if (r.type == "default") r.type = "none";
      } else if (k == "factor") num(&r.factor);
      else if (k == "original_max_position_embeddings")
        r.original_max_position_embeddings = read_scalar<int64_t>(v, source, full, "an integer");
      else if (k == "beta_fast") num(&r.beta_fast);
      else if (k == "beta_slow") num(&r.beta_slow);
      else if (k == "mscale") num(&r.mscale);
      else if (k == "mscale_all_dim") num(&r.mscale_all_dim);
      else if (k == "attention_factor") num(&r.attention_factor);
      else if (k == "truncate") r.truncate = read_scalar<bool>(v, source, full, "true or false");
      else if (k == "rope_theta") c.rope_theta = read_scalar<double>(v, source, full, "a number");
      else
        config_error(source, &kv.first,
                     "key '" + full + "' is not understood (known: type/rope_type, factor, "
                     "original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, "
                     "attention_factor, truncate, rope_theta)");
    }
  } else {
    return false;
  }
  return true;
}

ModelConfig ModelConfig::from_yaml(const YAML::Node& node, const std::string& source, bool strict) {
  if (!strict) return read_hf_config_node(node, source, IndexerDims{}).cfg;
  if (!node.IsMap()) config_error(source, &node, "the model configuration must be a mapping of keys");
  static const char* known[] = {
      "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "num_attention_heads",
      "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
      "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
      "n_shared_experts", "routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method",
      "rope_interleave", "num_nextn_predict_layers", "rms_norm_eps", "rope_theta", "max_position_embeddings",
      "index_n_heads", "index_head_dim", "index_topk", "tie_word_embeddings", "initializer_range",
      "rope_scaling", "rope_parameters"};
  ModelConfig c;
  for (const auto& kv : node) {
    const std::string k = kv.first.as<std::string>();
    if (read_model_key(c, k, kv.second, source)) continue;
    std::set<std::string> sorted(std::begin(known), std::end(known));
    std::string allowed;
    for (const auto& name : sorted) allowed += (allowed.empty() ? "" : ", ") + name;
    config_error(source, &kv.first, "unknown model key '" + k + "'; allowed keys: " + allowed);
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
  const bool is_json = path.size() >= 5 && path.substr(path.size() - 5) == ".json";
  if (is_json) return read_hf_config(path, IndexerDims{}).cfg;
  YAML::Node node;
  try {
    node = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw std::runtime_error("[config] " + path + ": cannot read the file");
  } catch (const YAML::Exception& e) {
    throw std::runtime_error("[config] " + path + ":" + std::to_string(e.mark.line + 1) + ": parse error: " + e.msg);
  }
  return from_yaml(node, path, /*strict=*/true);
}

std::string ModelConfig::to_yaml() const {
  std::ostringstream o;
  auto kv = [&](const char* k, const std::string& v) { o << k << ": " << v << "\n"; };
  auto num = [](double v) {
    std::ostringstream s;
    s.precision(17);
    s << v;
    std::string r = s.str();
    if (r.find_first_of(".eE") == std::string::npos && r.find("inf") == std::string::npos) r += ".0";
    return r;
  };
  auto b = [](bool v) { return std::string(v ? "true" : "false"); };
  auto i = [](int64_t v) { return std::to_string(v); };
  kv("vocab_size", i(vocab_size));
  kv("hidden_size", i(hidden_size));
  kv("num_hidden_layers", i(num_hidden_layers));
  kv("first_k_dense_replace", i(first_k_dense_replace));
  kv("num_attention_heads", i(num_attention_heads));
  kv("q_lora_rank", has_q_lora() ? i(q_lora_rank) : "null");
  kv("kv_lora_rank", i(kv_lora_rank));
  kv("qk_nope_head_dim", i(qk_nope_head_dim));
  kv("qk_rope_head_dim", i(qk_rope_head_dim));
  kv("v_head_dim", i(v_head_dim));
  kv("intermediate_size", i(intermediate_size));
  kv("moe_intermediate_size", i(moe_intermediate_size));
  kv("n_routed_experts", i(n_routed_experts));
  kv("num_experts_per_tok", i(num_experts_per_tok));
  kv("n_group", i(n_group));
  kv("topk_group", i(topk_group));
  kv("n_shared_experts", i(n_shared_experts));
  kv("routed_scaling_factor", num(routed_scaling_factor));
  kv("norm_topk_prob", b(norm_topk_prob));
  // Written only when not the default (see the header): V3.2-style YAML stays as older builds wrote it.
  const ModelConfig d;
  if (scoring_func != d.scoring_func) kv("scoring_func", scoring_func);
  if (topk_method != d.topk_method) kv("topk_method", topk_method);
  if (rope_interleave != d.rope_interleave) kv("rope_interleave", b(rope_interleave));
  if (num_nextn_predict_layers != d.num_nextn_predict_layers) kv("num_nextn_predict_layers", i(num_nextn_predict_layers));
  kv("rms_norm_eps", num(rms_norm_eps));
  kv("rope_theta", num(rope_theta));
  kv("max_position_embeddings", i(max_position_embeddings));
  kv("index_n_heads", i(index_n_heads));
  kv("index_head_dim", i(index_head_dim));
  kv("index_topk", i(index_topk));
  kv("tie_word_embeddings", b(tie_word_embeddings));
  kv("initializer_range", num(initializer_range));
  if (rope_scaling.type == "yarn") {
    const RopeScaling& r = rope_scaling;
    std::ostringstream m;
    m << "{type: yarn, factor: " << num(r.factor) << ", original_max_position_embeddings: "
      << r.original_max_position_embeddings << ", beta_fast: " << num(r.beta_fast) << ", beta_slow: "
      << num(r.beta_slow) << ", mscale: " << num(r.mscale) << ", mscale_all_dim: " << num(r.mscale_all_dim);
    if (r.attention_factor > 0) m << ", attention_factor: " << num(r.attention_factor);
    if (!r.truncate) m << ", truncate: false";
    m << "}";
    kv("rope_scaling", m.str());
  } else {
    kv("rope_scaling", "null");
  }
  return o.str();
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
    c.max_position_embeddings = 131072;  // dsa-bench's long-context rows reach 128K
  } else {
    throw std::runtime_error("[config] unknown preset '" + name + "' (known: tiny, bench-small)");
  }
  c.validate("preset " + name);
  return c;
}

}  // namespace dsa
