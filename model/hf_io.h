// Hugging Face checkpoints <-> ParamStore (SPEC.md §3).
//
// Import reads safetensors (one file or sharded) plus config.json. Accepted per tensor: F32, BF16, F16,
// F64, and F8_E4M3 with a "<name>_scale_inv" 128x128 block scale (dequantized). Routed experts may be
// fused (transformers 5.x: mlp.experts.gate_up_proj [E, 2I, D], mlp.experts.down_proj [E, D, I]) or
// per expert (mlp.experts.{e}.{gate,up,down}_proj.weight). A checkpoint without any indexer tensor
// (DeepSeek-V3) gets a freshly initialized indexer: the start of dense-to-sparse training. The MTP
// layers (model.layers.{L..L+n-1}.* for L = num_hidden_layers, n = num_nextn_predict_layers) are
// dropped, or with keep_mtp kept untouched as extra tensors "mtp/<hf name>" so export writes them back.
//
// Export writes V3.2 names (fused experts unless per_expert), bf16 (default) or f32, routing-bias
// buffers always f32, sharded with model.safetensors.index.json above max_shard_bytes, and a
// config.json for DeepseekV32ForCausalLM.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/params.h"
#include "model/safetensors.h"

namespace dsa {

// Key prefix of MTP tensors among a checkpoint's extra tensors.
inline constexpr const char* kMtpPrefix = "mtp/";

struct HfImportOptions {
  bool keep_mtp = false;
  int64_t num_mtp_layers = -1;  // -1: read num_nextn_predict_layers from config.json (0 if absent)
  uint64_t indexer_seed = 0x1d5eedull;  // seed of a fresh indexer
  DType dtype = DType::F32;  // master weights' type (F32; F64 in tests)
};

struct HfModel {
  ModelConfig cfg;
  ParamStore params;
  std::map<std::string, Tensor> extra;  // "mtp/<hf name>" -> tensor as stored (keep_mtp)
  std::vector<std::string> warnings;
  bool indexer_fresh = false;  // the indexer was initialized, not read
};

// hf_dir holds config.json and the safetensors file(s).
HfModel import_hf(const std::string& hf_dir, const HfImportOptions& opt = {});

// Fills every tensor of `params` (made by make_params(cfg)) from `set`. Shapes are checked against the
// config before any data is read; errors name the file and the tensor.
void load_hf_tensors(const SafetensorsSet& set, const ModelConfig& cfg, const HfImportOptions& opt, ParamStore& params,
                     std::map<std::string, Tensor>* extra, std::vector<std::string>* warnings, bool* indexer_fresh);

struct HfExportOptions {
  DType dtype = DType::BF16;  // BF16 or F32
  uint64_t max_shard_bytes = 5000000000ull;
  bool per_expert = false;  // mlp.experts.{e}.{gate,up,down}_proj.weight instead of the fused pair
};

// Writes config.json and the safetensors file(s) into hf_dir (created if needed). Extra tensors whose
// key starts with "mtp/" are written back under their HF names; other extras (optimizer state) are not.
void export_hf(const std::string& hf_dir, const ModelConfig& cfg, const ParamStore& params,
               const std::map<std::string, Tensor>& extra, const HfExportOptions& opt = {});

// The (name, tensor) list export_hf writes, in order.
std::vector<std::pair<std::string, Tensor>> hf_tensors_for_export(const ModelConfig& cfg, const ParamStore& params,
                                                                  const std::map<std::string, Tensor>& extra,
                                                                  const HfExportOptions& opt);

// config.json text: ModelConfig::to_hf_json() with the dtype and MTP layer count filled in.
std::string hf_config_json(const ModelConfig& cfg, DType dtype, int64_t num_mtp_layers);

}  // namespace dsa
