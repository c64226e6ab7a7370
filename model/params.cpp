#include "model/params.h"

#include <algorithm>
#include <cmath>
#include <string>

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
                       Device device, int64_t row0, int64_t rows, bool allocate) {
  DSA_CHECK(!has(name), "[params] duplicate parameter name ", name);
  DSA_CHECK(rows < 0 || (!shape.empty() && row0 >= 0 && row0 + rows <= shape[0]), "[params] ", name, ": rows [", row0,
            ", ", row0 + rows, ") outside ", shape_str(shape));
  Param p;
  p.name = name;
  p.full_shape = shape;
  p.shape = shape;
  if (rows >= 0) {
    p.shape[0] = rows;
    p.row0 = row0;
  }
  if (allocate) {
    p.value = Tensor::zeros(p.shape, dtype, device);
    if (group != ParamGroup::Buffer) p.grad = Tensor::zeros(p.shape, dtype, device);
  }
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

Tensor& ParamStore::grad(const std::string& name) {
  Param& p = get(name);
  if (!p.grad.defined() && grad_provider_ && p.group != ParamGroup::Buffer) grad_provider_(p);
  return p.grad;
}

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (const Param& p : params_) n += shape_numel(p.full_shape);
  return n;
}

void ParamStore::make_compute_copies(DType dtype, const std::vector<std::string>& keep_master_suffixes) {
  for (Param& p : params_) {
    if (p.group == ParamGroup::Buffer) continue;
    bool keep = false;
    for (const std::string& s : keep_master_suffixes)
      keep = keep || (p.name.size() >= s.size() && p.name.compare(p.name.size() - s.size(), s.size(), s) == 0);
    if (keep || !p.value.defined() || p.value.dtype() == dtype) continue;
    p.compute = Tensor::empty(p.shape, dtype, p.value.device());
  }
  refresh_compute();
}

void ParamStore::refresh_compute() {
  for (Param& p : params_)
    if (p.compute.defined() && p.value.defined()) ops::copy_cast_(p.compute, p.value);
}

void ParamStore::zero_grads() {
  for (Param& p : params_)
    if (p.grad.defined()) p.grad.zero_();
}

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

bool is_routed_expert(const std::string& name) {
  auto ends = [&](const char* suf) {
    const size_t n = std::char_traits<char>::length(suf);
    return name.size() >= n && name.compare(name.size() - n, n, suf) == 0;
  };
  return ends("mlp.experts.gate_up_proj") || ends("mlp.experts.down_proj");
}

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

ParamStore make_params(const ModelConfig& c, DType dt, Device dev, const ParamLayout& layout) {
  const int64_t E = c.n_routed_experts;
  const bool slice = layout.expert_end >= 0;
  DSA_CHECK(!slice || (0 <= layout.expert_begin && layout.expert_begin < layout.expert_end && layout.expert_end <= E),
            "[params] expert range [", layout.expert_begin, ", ", layout.expert_end, ") outside the ", E,
            " routed experts");
  ParamStore ps;
  for (const ParamSpec& s : param_specs(c)) {
    const bool buffer = s.group == ParamGroup::Buffer;
    // The routing bias is f32 whatever the weights are (selection is done in f32).
    const DType t = buffer ? DType::F32 : dt;
    const bool rows = slice && is_routed_expert(s.name);
    ps.add(s.name, s.shape, s.group, s.decay, t, dev, rows ? layout.expert_begin : 0,
           rows ? layout.expert_end - layout.expert_begin : -1, buffer || !layout.external_storage);
  }
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

// N(0, std) value of element i of a tensor's stream: Box-Muller on pair i / 2, whose uniforms are the
// splitmix64 outputs 2 (i / 2) + 1 and + 2 of the stream seeded by s0 (cos for even i, sin for odd).
// NOTES: splitmix64's state after k calls is s0 + k * gamma, so any element is computed directly and a
// rank can generate only the rows it holds, in parallel, with the values of a sequential pass.
double normal_at(uint64_t s0, int64_t i, double std) {
  uint64_t s = s0 + static_cast<uint64_t>(i / 2) * 2 * 0x9e3779b97f4a7c15ull;
  const double u1 = (static_cast<double>(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  const double u2 = static_cast<double>(splitmix64(s) >> 11) * (1.0 / 9007199254740992.0);
  const double r = std::sqrt(-2.0 * std::log(u1)) * std;
  return i % 2 == 0 ? r * std::cos(6.283185307179586 * u2) : r * std::sin(6.283185307179586 * u2);
}

template <class T>
void fill_normal(T* out, int64_t begin, int64_t n, uint64_t s0, double std) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(normal_at(s0, begin + k, std));
}

}  // namespace

Tensor initial_value(const Param& p, const ModelConfig& c, uint64_t seed, DType dtype) {
  Tensor host = Tensor::empty(p.shape, dtype);
  const bool is_norm = ends_with(p.name, "layernorm.weight") || ends_with(p.name, "norm.weight");
  if (p.group == ParamGroup::Buffer || ends_with(p.name, ".bias")) {
    host.zero_();
  } else if (is_norm) {
    host.fill_(1.0);
  } else {
    const int64_t row = p.shape.empty() ? 1 : host.numel() / std::max<int64_t>(p.shape[0], 1);
    const uint64_t s0 = seed ^ fnv1a(p.name);
    if (dtype == DType::F64)
      fill_normal(host.data<double>(), p.row0 * row, host.numel(), s0, c.initializer_range);
    else
      fill_normal(host.data<float>(), p.row0 * row, host.numel(), s0, c.initializer_range);
  }
  return host;
}

namespace {
void init_one(Param& p, const ModelConfig& c, uint64_t seed) {
  Tensor host = initial_value(p, c, seed, p.value.dtype() == DType::F64 ? DType::F64 : DType::F32);
  p.value.copy_from(host.dtype() == p.value.dtype() ? host : host.to(p.value.dtype()));
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
