// Hugging Face config.json of the DeepSeek family <-> ModelConfig (SPEC.md §1b, §3).
//
// This is the one place that says what every key of a DeepSeek-family config.json does here
// (hf_config_keys(), printed by `dsa-convert config-keys`):
//   read      the value becomes part of the model (every value the model can honour; others refused)
//   checked   the model implements one value (or a set); any other value is refused by name
//   metadata  does not change the function (serving, tokenizer ids, training-only settings the recipe
//             owns, values transformers derives); ignored
// A key in none of the lists is reported back (HfConfigRead::notes) and ignored.
//
// Families: model_type deepseek_v2 (softmax routing, topk_method greedy by default), deepseek_v3,
// deepseek_v32, kimi_k2 (sigmoid routing with the correction bias). Configs without index_* keys
// (DeepSeek-V3 and older) get the indexer dimensions of IndexerDims (V3.2's unless overridden).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "model/config.h"

namespace YAML {
class Node;
}

namespace dsa {

struct IndexerDims {                                  // the lightning indexer of a model whose config.json has none
  int64_t n_heads = 64, head_dim = 128, topk = 2048;  // DeepSeek-V3.2's
};

struct HfConfigRead {
  ModelConfig cfg;
  std::string model_type;           // as written ("" when absent)
  bool indexer_from_config = true;  // false: no index_* keys, the dimensions came from IndexerDims
  int64_t fp8_block = 0;            // quantization_config's weight block size (128), 0 without one
  std::vector<std::string> notes;   // unknown keys ignored, family defaults taken
};

// Reads config.json (path) or its parsed node. Errors name the file, the line, the key and the value.
HfConfigRead read_hf_config(const std::string& path, const IndexerDims& indexer);
HfConfigRead read_hf_config_node(const YAML::Node& node, const std::string& source, const IndexerDims& indexer);

enum class HfKeyUse { Read, Checked, Metadata };
struct HfKeyRule {
  const char* key;
  HfKeyUse use;
  const char* what;  // for read/checked keys: what is implemented; for metadata: why it is ignored
};
const std::vector<HfKeyRule>& hf_config_keys();
std::string hf_config_key_table();  // the rules as a text table

// The transformers class an exported model is written for, and what it cannot load.
struct HfExportClass {
  std::string architecture;          // "DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"
  std::string model_type;            // "deepseek_v32", "deepseek_v3", "deepseek_v2"
  bool loads_indexer = false;        // false: transformers runs dense attention and ignores self_attn.indexer.*
  std::vector<std::string> caveats;  // where transformers' class differs from this model
};
// DeepseekV32ForCausalLM when it can hold the model (query LoRA, sigmoid routing, interleaved RoPE);
// otherwise the dense class of the family (V3: sigmoid routing, V2: softmax routing).
HfExportClass hf_export_class(const ModelConfig& cfg);

// config.json for hf_export_class(cfg): every key of ModelConfig (index_* included, so that
// `dsa-convert import` reads the indexer back), the weights' dtype, the MTP layer count and, with
// fp8, the quantization_config of DeepSeek's releases (e4m3, 128x128 blocks).
std::string hf_config_json(const ModelConfig& cfg, DType dtype, int64_t num_mtp_layers, bool fp8 = false);

}  // namespace dsa
