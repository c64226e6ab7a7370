// Hugging Face checkpoints <-> ParamStore (SPEC.md §1b, §3).
//
// Import reads config.json (model/hf_config.h: every key read, checked or metadata) and the
// safetensors (one file or sharded). Accepted per tensor: F32, BF16, F16, F64, and F8_E4M3 with a
// "<name>_scale_inv" 128x128 block scale (dequantized). Routed experts may be fused (transformers 5.x:
// mlp.experts.gate_up_proj [E, 2I, D], mlp.experts.down_proj [E, D, I]) or per expert
// (mlp.experts.{e}.{gate,up,down}_proj.weight). The indexer of the main layers (and, separately, of
// the MTP layer) is read whole or, when none of its tensors exist (DeepSeek-V3 and older, V2), freshly
// initialized: the start of dense-to-sparse training. The MTP layer (model.layers.{L}.*, L =
// num_hidden_layers, when num_nextn_predict_layers is 1) is part of the model; its embed_tokens and
// shared_head.head copies are checked against the shared embedding and head.
//
// Export writes the names and config.json of the transformers class that loads the model
// (hf_export_class): bf16 (default) or f32 weights, routing-bias buffers always f32, sharded with
// model.safetensors.index.json above max_shard_bytes; with fp8 the release format (the decoder layers'
// linear weights in F8_E4M3 with 128x128 weight_scale_inv, per-expert names).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/hf_config.h"
#include "model/params.h"
#include "model/safetensors.h"

namespace dsa {

// Key prefix of MTP tensors among the extra tensors of checkpoints written by older builds
// (`--keep-mtp`); export still writes them back.
inline constexpr const char* kMtpPrefix = "mtp/";

struct HfImportOptions {
  IndexerDims indexer;        // dimensions of a fresh indexer when config.json has no index_* keys
  bool drop_mtp = false;      // leave the MTP layer out (num_nextn_predict_layers becomes 0)
  uint64_t indexer_seed = 0x1d5eedull;  // seed of a fresh indexer
  DType dtype = DType::F32;   // master weights' type (F32; F64 in tests)
};

struct HfModel {
  ModelConfig cfg;
  ParamStore params;
  std::map<std::string, Tensor> extra;  // empty on import (kept for the checkpoint API)
  std::vector<std::string> warnings;    // what was defaulted, initialized, dropped or ignored
  bool indexer_fresh = false;           // the main layers' indexer was initialized, not read
  bool indexer_dims_from_options = false;  // config.json had no index_* keys
};

// hf_dir holds config.json and the safetensors file(s).
HfModel import_hf(const std::string& hf_dir, const HfImportOptions& opt = {});

// Fills every tensor of `params` (made by make_params(cfg)) from `set`. Shapes are checked against the
// config before any data is read; errors name the file and the tensor.
void load_hf_tensors(const SafetensorsSet& set, const ModelConfig& cfg, const HfImportOptions& opt, ParamStore& params,
                     std::vector<std::string>* warnings, bool* indexer_fresh);

struct HfExportOptions {
  DType dtype = DType::BF16;  // BF16 or F32 (the tensors FP8 leaves unquantized, with fp8)
  uint64_t max_shard_bytes = 5000000000ull;
  bool per_expert = false;  // mlp.experts.{e}.{gate,up,down}_proj.weight instead of the fused pair
  bool fp8 = false;         // DeepSeek's release format (implies per_expert)
};

struct HfExportReport {
  HfExportClass cls;               // the transformers class config.json names
  std::vector<std::string> files;  // safetensors files written
  int64_t fp8_tensors = 0;         // tensors written as F8_E4M3 + weight_scale_inv
};

// Writes config.json and the safetensors file(s) into hf_dir (created if needed). Extra tensors whose
// key starts with "mtp/" (older checkpoints) are written back under their HF names; other extras
// (optimizer state) are not.
HfExportReport export_hf(const std::string& hf_dir, const ModelConfig& cfg, const ParamStore& params,
                         const std::map<std::string, Tensor>& extra, const HfExportOptions& opt = {});

// The (name, tensor) list export_hf writes, in order.
std::vector<std::pair<std::string, Tensor>> hf_tensors_for_export(const ModelConfig& cfg, const ParamStore& params,
                                                                  const std::map<std::string, Tensor>& extra,
                                                                  const HfExportOptions& opt);

// The tensors DeepSeek's releases store in FP8: the decoder layers' 2-D linear weights, except the
// router, the indexer's weights_proj and the MTP glue (eh_proj); never norms, embeddings or the head.
bool stored_fp8_in_release(const std::string& name, const Tensor& t);

}  // namespace dsa
