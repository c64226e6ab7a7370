// Parameters under their Hugging Face names (SPEC.md §3), with gradients and training groups.
//
// Per layer: MLA (q_a_proj/q_a_layernorm/q_b_proj, or q_proj without a query LoRA), the indexer
// (wq_b reading c_q, or wq reading the normed hidden state without a query LoRA), and the dense MLP or
// MoE (mlp.gate.e_score_correction_bias only with sigmoid routing). With num_nextn_predict_layers = 1
// the MTP layer follows at index num_hidden_layers: enorm, hnorm, eh_proj, shared_head.norm and a
// decoder layer; it shares model.embed_tokens and lm_head.
//
// Routed experts are stored fused, as transformers 5.x writes them:
//   model.layers.{i}.mlp.experts.gate_up_proj  [E, 2*moe_I, D]   (gate rows first, then up)
//   model.layers.{i}.mlp.experts.down_proj     [E, D, moe_I]
// The per-expert names of older checkpoints are mapped to these by the converter.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/tensor.h"
#include "model/config.h"

namespace dsa {

enum class ParamGroup : uint8_t {
  Main,     // everything trained by the LM loss
  Indexer,  // self_attn.indexer.*: trained by the indexer KL loss only
  Buffer,   // mlp.gate.e_score_correction_bias: set by the balancing rule, never by gradients
};
const char* param_group_name(ParamGroup g);

struct Param {
  std::string name;  // Hugging Face name, e.g. "model.layers.0.self_attn.q_a_proj.weight"
  Tensor value;      // master weights (f32, or f64 in gradient checks)
  Tensor grad;       // same shape as value; undefined for buffers
  Tensor compute;    // bf16 copy the GPU ops read (mixed precision); undefined on the CPU
  ParamGroup group = ParamGroup::Main;
  bool decay = true;  // weight decay applies (matrices: yes; norms, biases: no)
};

class ParamStore {
 public:
  Param& add(const std::string& name, const Shape& shape, ParamGroup group, bool decay, DType dtype, Device device);
  Param& get(const std::string& name);
  const Param& get(const std::string& name) const;
  bool has(const std::string& name) const { return index_.count(name) > 0; }
  Tensor& operator[](const std::string& name) { return get(name).value; }
  const Tensor& operator[](const std::string& name) const { return get(name).value; }
  Tensor& grad(const std::string& name) { return get(name).grad; }
  // The weight ops read: the bf16 compute copy where one exists (GPU), else the master value.
  const Tensor& w(const std::string& name) const {
    const Param& p = get(name);
    return p.compute.defined() ? p.compute : p.value;
  }
  // Mixed precision: give every trained tensor a compute copy of `dtype` (buffers and the names in
  // `keep_master` are read in their master precision), and refresh them after each optimizer step.
  void make_compute_copies(DType dtype, const std::vector<std::string>& keep_master_suffixes);
  void refresh_compute();
  std::vector<Param>& all() { return params_; }
  const std::vector<Param>& all() const { return params_; }
  size_t size() const { return params_.size(); }
  int64_t numel() const;
  void zero_grads();

 private:
  std::vector<Param> params_;
  std::unordered_map<std::string, size_t> index_;
};

// Every tensor of the model: name, shape, group, weight decay (nothing allocated).
struct ParamSpec {
  std::string name;
  Shape shape;
  ParamGroup group;
  bool decay;
};
std::vector<ParamSpec> param_specs(const ModelConfig& cfg);
// Every tensor of the model with its name, shape and group (values uninitialized).
ParamStore make_params(const ModelConfig& cfg, DType dtype = DType::F32, Device device = Device::CPU);
// Deterministic initialization from a seed, independent of the order of tensors: each tensor draws
// from its own stream seeded by (seed, name). Linear weights and embeddings ~ N(0, initializer_range);
// RMSNorm and LayerNorm weights 1; biases and the routing bias 0.
void init_params(ParamStore& params, const ModelConfig& cfg, uint64_t seed);
// Initialize only the tensors of one group (e.g. a fresh indexer for a checkpoint without one).
void init_params_group(ParamStore& params, const ModelConfig& cfg, uint64_t seed, ParamGroup group);

// Name helpers.
std::string layer_prefix(int64_t layer);  // "model.layers.{i}."
// A tensor of the MTP layer (model.layers.{num_hidden_layers}.*).
bool is_mtp_param(const ModelConfig& cfg, const std::string& name);

}  // namespace dsa
