#include "model/params.h"

#include <cmath>

#include "kernels/ops.h"

namespace dsa {

const char* param_group_name(ParamGroup g) {
  switch (g) {
    case ParamGroup::Main: return "main";
    case ParamGroup::Indexer: return "indexer";
    case ParamGroup::Buffer: return "buffer";
  }
  return "?";
}

Param& ParamStore::add(const std::string& name, const Shape& shape, ParamGroup group, bool decay, DType dtype,
                       Device device) {
  DSA_CHECK(!has(name), "[params] duplicate parameter name ", name);
  Param p;
  p.name = name;
  p.value = Tensor::zeros(shape, dtype, device);
  if (group != ParamGroup::Buffer) p.grad = Tensor::zeros(shape, dtype, device);
  p.group = group;
  p.decay = decay;
  index_[name] = params_.size();
  params_.push_back(std::move(p));
  return params_.back();
}

Param& ParamStore::get(const std::string& name) {
  auto it = index_.find(name);
  DSA_CHECK(it != index_.end(), "[params] no parameter named ", name);
  return params_[it->second];
}

const Param& ParamStore::get(const std::string& name) const {
  auto it = index_.find(name);
  DSA_CHECK(it != index_.end(), "[params] no parameter named ", name);
  return params_[it->second];
}

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (const Param& p : params_) n += p.value.numel();
  return n;
}

void ParamStore::make_compute_copies(DType dtype, const std::vector<std::string>& keep_master_suffixes) {
  for (Param& p : params_) {
    if (p.group == ParamGroup::Buffer) continue;
    bool keep = false;
    for (const std::string& s : keep_master_suffixes)
      keep = keep || (p.name.size() >= s.size() && p.name.compare(p.name.size() - s.size(), s.size(), s) == 0);
    if (keep || p.value.dtype() == dtype) continue;
    p.compute = Tensor::empty(p.value.shape(), dtype, p.value.device());
  }
  refresh_compute();
}

void ParamStore::refresh_compute() {
  for (Param& p : params_)
    if (p.compute.defined()) ops::copy_cast_(p.compute, p.value);
}

void ParamStore::zero_grads() {
  for (Param& p : params_)
    if (p.grad.defined()) p.grad.zero_();
}

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

namespace {

// One decoder layer's tensors under model.layers.{l}. (the MTP layer's block too).
void add_layer(std::vector<ParamSpec>& ps, const ModelConfig& c, int64_t l) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads;
  auto mat = [&](const std::string& n, Shape s, ParamGroup g = ParamGroup::Main) { ps.push_back({n, s, g, true}); };
  auto vec = [&](const std::string& n, Shape s, ParamGroup g = ParamGroup::Main) { ps.push_back({n, s, g, false}); };
  const std::string p = layer_prefix(l);
  vec(p + "input_layernorm.weight", {D});
  vec(p + "post_attention_layernorm.weight", {D});
  const std::string a = p + "self_attn.";
  if (c.has_q_lora()) {
    mat(a + "q_a_proj.weight", {c.q_lora_rank, D});
    vec(a + "q_a_layernorm.weight", {c.q_lora_rank});
    mat(a + "q_b_proj.weight", {H * c.qk_head_dim(), c.q_lora_rank});
  } else {
    mat(a + "q_proj.weight", {H * c.qk_head_dim(), D});
  }
  mat(a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, D});
  vec(a + "kv_a_layernorm.weight", {c.kv_lora_rank});
  mat(a + "kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank});
  mat(a + "o_proj.weight", {D, H * c.v_head_dim});
  const std::string ix = a + "indexer.";
  // Without a query LoRA the indexer's query projection reads the normed hidden state (wq, [Hi*di, D]);
  // with one it reads the query latent c_q (wq_b, [Hi*di, q_lora_rank]), as DeepSeek-V3.2.
  if (c.has_q_lora())
    mat(ix + "wq_b.weight", {c.index_n_heads * c.index_head_dim, c.q_lora_rank}, ParamGroup::Indexer);
  else
    mat(ix + "wq.weight", {c.index_n_heads * c.index_head_dim, D}, ParamGroup::Indexer);
  mat(ix + "wk.weight", {c.index_head_dim, D}, ParamGroup::Indexer);
  vec(ix + "k_norm.weight", {c.index_head_dim}, ParamGroup::Indexer);
  vec(ix + "k_norm.bias", {c.index_head_dim}, ParamGroup::Indexer);
  mat(ix + "weights_proj.weight", {c.index_n_heads, D}, ParamGroup::Indexer);
  const std::string m = p + "mlp.";
  if (!c.is_moe_layer(l)) {
    mat(m + "gate_proj.weight", {c.intermediate_size, D});
    mat(m + "up_proj.weight", {c.intermediate_size, D});
    mat(m + "down_proj.weight", {D, c.intermediate_size});
    return;
  }
  const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
  mat(m + "gate.weight", {E, D});
  if (c.has_routing_bias()) vec(m + "gate.e_score_correction_bias", {E}, ParamGroup::Buffer);
  mat(m + "experts.gate_up_proj", {E, 2 * I, D});
  mat(m + "experts.down_proj", {E, D, I});
  if (c.n_shared_experts > 0) {
    const int64_t S = I * c.n_shared_experts;
    mat(m + "shared_experts.gate_proj.weight", {S, D});
    mat(m + "shared_experts.up_proj.weight", {S, D});
    mat(m + "shared_experts.down_proj.weight", {D, S});
  }
}

}  // namespace

bool is_mtp_param(const ModelConfig& c, const std::string& name) {
  return c.num_nextn_predict_layers > 0 && name.rfind(layer_prefix(c.mtp_layer()), 0) == 0;
}

std::vector<ParamSpec> param_specs(const ModelConfig& c) {
  std::vector<ParamSpec> ps;
  const int64_t D = c.hidden_size;
  ps.push_back({"model.embed_tokens.weight", {c.vocab_size, D}, ParamGroup::Main, true});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) add_layer(ps, c, l);
  ps.push_back({"model.norm.weight", {D}, ParamGroup::Main, false});
  if (!c.tie_word_embeddings) ps.push_back({"lm_head.weight", {c.vocab_size, D}, ParamGroup::Main, true});
  if (c.num_nextn_predict_layers > 0) {
    // MTP (DeepSeek-V3 report, release names): h' = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)]), a
    // decoder layer, then shared_head.norm and the model's lm_head. The embedding and the head are the
    // main model's (shared); export writes copies as model.layers.{L}.embed_tokens / shared_head.head.
    const std::string p = layer_prefix(c.mtp_layer());
    ps.push_back({p + "enorm.weight", {D}, ParamGroup::Main, false});
    ps.push_back({p + "hnorm.weight", {D}, ParamGroup::Main, false});
    ps.push_back({p + "eh_proj.weight", {D, 2 * D}, ParamGroup::Main, true});
    ps.push_back({p + "shared_head.norm.weight", {D}, ParamGroup::Main, false});
    add_layer(ps, c, c.mtp_layer());
  }
  return ps;
}

ParamStore make_params(const ModelConfig& c, DType dt, Device dev) {
  ParamStore ps;
  // Buffers (the routing bias) stay f32 whatever the master type.
  for (const ParamSpec& s : param_specs(c))
    ps.add(s.name, s.shape, s.group, s.decay, s.group == ParamGroup::Buffer ? DType::F32 : dt, dev);
  return ps;
}

namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void init_one(Param& p, const ModelConfig& c, uint64_t seed) {
  Tensor host = Tensor::empty(p.value.shape(), p.value.dtype());
  const int64_t n = host.numel();
  const bool is_norm = ends_with(p.name, "layernorm.weight") || ends_with(p.name, "norm.weight");
  if (p.group == ParamGroup::Buffer || ends_with(p.name, ".bias")) {
    host.zero_();
  } else if (is_norm) {
    host.fill_(1.0);
  } else {
    // Box-Muller on a splitmix64 stream: portable and independent of the standard library.
    uint64_t s = seed ^ fnv1a(p.name);
    for (int64_t i = 0; i < n; i += 2) {
      const double u1 = (static_cast<double>(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
      const double u2 = static_cast<double>(splitmix64(s) >> 11) * (1.0 / 9007199254740992.0);
      const double r = std::sqrt(-2.0 * std::log(u1)) * c.initializer_range;
      host.set_item(i, r * std::cos(6.283185307179586 * u2));
      if (i + 1 < n) host.set_item(i + 1, r * std::sin(6.283185307179586 * u2));
    }
  }
  p.value.copy_from(host);
}

}  // namespace

void init_params(ParamStore& ps, const ModelConfig& c, uint64_t seed) {
  for (Param& p : ps.all()) init_one(p, c, seed);
}

void init_params_group(ParamStore& ps, const ModelConfig& c, uint64_t seed, ParamGroup group) {
  for (Param& p : ps.all())
    if (p.group == group) init_one(p, c, seed);
}

}  // namespace dsa
