#include "model/hf_io.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

namespace dsa {

namespace {

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
bool starts_with(const std::string& s, const std::string& pre) { return s.rfind(pre, 0) == 0; }

// Layer index of "model.layers.{i}.*", or -1.
int64_t layer_of(const std::string& name) {
  static const std::string pre = "model.layers.";
  if (!starts_with(name, pre)) return -1;
  size_t i = pre.size();
  int64_t v = 0;
  if (i >= name.size() || name[i] < '0' || name[i] > '9') return -1;
  for (; i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i) {
    v = v * 10 + (name[i] - '0');
    if (v > (int64_t{1} << 40)) return -1;
  }
  return (i < name.size() && name[i] == '.') ? v : -1;
}

// Checks the stored shape before reading, then returns the f32 values (FP8 dequantized).
Tensor read_checked(const SafetensorsSet& set, const std::string& name, const Shape& want, const std::string& cfg_src) {
  const StTensorInfo& info = set.info(name);
  if (info.shape != want)
    fail("[hf_io] " + set.file_of(name).path() + ": tensor '" + name + "' has shape " + shape_str(info.shape) + " but " +
         cfg_src + " needs " + shape_str(want));
  return set.read_f32(name);
}

void store(Param& p, const Tensor& f32) {
  if (p.value.dtype() == DType::F32 && p.value.is_cpu()) {
    p.value.copy_from(f32);
  } else {
    Tensor host = f32.to(p.value.dtype());
    p.value.copy_from(host);
  }
}


}  // namespace

namespace {

// Reads the fused experts tensor `p` from its per-expert pieces (older checkpoints, releases).
Tensor read_per_expert(const SafetensorsSet& set, const ModelConfig& cfg, const Param& p, std::set<std::string>& used) {
  const std::string src = set.source(), cfg_src = "the config";
  const int64_t E = cfg.n_routed_experts, I = cfg.moe_intermediate_size, D = cfg.hidden_size;
  const bool gate_up = ends_with(p.name, "mlp.experts.gate_up_proj");
  const Shape& want = p.value.shape();
  const std::string base = p.name.substr(0, p.name.size() - (gate_up ? strlen("gate_up_proj") : strlen("down_proj")));
  const std::string first = base + "0." + (gate_up ? "gate_proj" : "down_proj") + ".weight";
  if (!set.has(first))
    fail("[hf_io] " + src + ": missing tensor '" + p.name + "' (fused) or '" + first + "' (per expert), shape " +
         shape_str(want));
  Tensor fused = Tensor::empty(want, DType::F32);
  float* dst = fused.data<float>();
  for (int64_t e = 0; e < E; ++e) {
    const std::string pe = base + std::to_string(e) + ".";
    auto get = [&](const std::string& n, const Shape& s) {
      if (!set.has(n))
        fail("[hf_io] " + src + ": missing tensor '" + n + "' (expert " + std::to_string(e) + " of " +
             std::to_string(E) + ")");
      used.insert(n);
      used.insert(n + "_scale_inv");
      return read_checked(set, n, s, cfg_src);
    };
    if (gate_up) {
      Tensor g = get(pe + "gate_proj.weight", {I, D}), u = get(pe + "up_proj.weight", {I, D});
      std::memcpy(dst + e * 2 * I * D, g.data<float>(), sizeof(float) * I * D);
      std::memcpy(dst + e * 2 * I * D + I * D, u.data<float>(), sizeof(float) * I * D);
    } else {
      Tensor d = get(pe + "down_proj.weight", {D, I});
      std::memcpy(dst + e * D * I, d.data<float>(), sizeof(float) * D * I);
    }
  }
  return fused;
}

// The indexer of one group of layers (the main ones, or the MTP layer): every tensor present, none
// (fresh: true), or an error naming the first missing one.
bool indexer_is_fresh(const SafetensorsSet& set, const ParamStore& params, bool mtp, const ModelConfig& cfg) {
  size_t have = 0, total = 0;
  std::string missing;
  for (const Param& p : params.all()) {
    if (p.group != ParamGroup::Indexer || is_mtp_param(cfg, p.name) != mtp) continue;
    ++total;
    if (set.has(p.name)) ++have;
    else if (missing.empty()) missing = p.name;
  }
  if (have > 0 && have < total)
    fail("[hf_io] " + set.source() + ": missing indexer tensor '" + missing + "' (" + std::to_string(have) + " of " +
         std::to_string(total) + " indexer tensors" + (mtp ? " of the MTP layer" : "") + " present)");
  return total > 0 && have == 0;
}

// The MTP layer's copies of the shared embedding and head: checked, not stored.
void check_mtp_copies(const SafetensorsSet& set, const ModelConfig& cfg, const ParamStore& params,
                      std::set<std::string>& used, std::vector<std::string>* warnings) {
  const std::string p = layer_prefix(cfg.mtp_layer());
  const std::string head = cfg.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  for (const auto& [copy, shared] : {std::make_pair(p + "embed_tokens.weight", std::string("model.embed_tokens.weight")),
                                     std::make_pair(p + "shared_head.head.weight", head)}) {
    if (!set.has(copy)) continue;
    used.insert(copy);
    used.insert(copy + "_scale_inv");
    const Tensor& mine = params[shared];
    Tensor theirs = read_checked(set, copy, mine.shape(), "the config");
    double diff = 0;
    for (int64_t i = 0; i < mine.numel(); ++i) diff = std::max(diff, std::fabs(mine.item(i) - theirs.item(i)));
    if (diff > 0 && warnings)
      warnings->push_back("'" + copy + "' differs from '" + shared + "' (max |difference| " + std::to_string(diff) +
                          "): the MTP layer uses the shared '" + shared + "', as the DeepSeek-V3 report has it, and "
                          "export writes that copy back");
  }
}

}  // namespace

void load_hf_tensors(const SafetensorsSet& set, const ModelConfig& cfg, const HfImportOptions& opt, ParamStore& params,
                     std::vector<std::string>* warnings, bool* indexer_fresh) {
  const std::string src = set.source();
  const std::string cfg_src = "the config";
  std::set<std::string> used;

  const bool fresh = indexer_is_fresh(set, params, false, cfg);
  const bool mtp_fresh = cfg.num_nextn_predict_layers > 0 && indexer_is_fresh(set, params, true, cfg);
  if (indexer_fresh) *indexer_fresh = fresh;
  if (fresh || mtp_fresh) {
    ParamStore fresh_ix = make_params(cfg);
    init_params_group(fresh_ix, cfg, opt.indexer_seed, ParamGroup::Indexer);
    for (Param& p : params.all())
      if (p.group == ParamGroup::Indexer && (is_mtp_param(cfg, p.name) ? mtp_fresh : fresh))
        store(p, fresh_ix.get(p.name).value);
    if (warnings)
      warnings->push_back(std::string("no indexer tensors ") +
                          (fresh && (mtp_fresh || cfg.num_nextn_predict_layers == 0) ? ""
                           : fresh                                                  ? "for the main layers "
                                                                                    : "for the MTP layer ") +
                          "in " + src + ": the indexer (" + std::to_string(cfg.index_n_heads) + " heads x " +
                          std::to_string(cfg.index_head_dim) + ", top-" + std::to_string(cfg.index_topk) +
                          ") is freshly initialized (seed " + std::to_string(opt.indexer_seed) + ")");
  }

  for (Param& p : params.all()) {
    if (p.group == ParamGroup::Indexer && (is_mtp_param(cfg, p.name) ? mtp_fresh : fresh)) continue;
    if (set.has(p.name)) {
      store(p, read_checked(set, p.name, p.value.shape(), cfg_src));
      used.insert(p.name);
      used.insert(p.name + "_scale_inv");
      continue;
    }
    if (ends_with(p.name, "mlp.experts.gate_up_proj") || ends_with(p.name, "mlp.experts.down_proj")) {
      store(p, read_per_expert(set, cfg, p, used));
      continue;
    }
    std::string hint;
    if (is_mtp_param(cfg, p.name))
      hint = " (config.json has num_nextn_predict_layers = 1; --drop-mtp imports without the MTP layer)";
    fail("[hf_io] " + src + ": missing tensor '" + p.name + "', shape " + shape_str(p.value.shape()) + hint);
  }
  if (cfg.num_nextn_predict_layers > 0) check_mtp_copies(set, cfg, params, used, warnings);

  // What is left: a dropped MTP layer, stray scales, unknown tensors.
  const int64_t mtp_layer = cfg.num_hidden_layers;  // where an MTP layer would be
  size_t dropped = 0;
  for (const std::string& name : set.names()) {
    if (used.count(name)) continue;
    const int64_t layer = layer_of(name);
    if (layer > mtp_layer || (layer == mtp_layer && !opt.drop_mtp))
      fail("[hf_io] " + set.file_of(name).path() + ": tensor '" + name + "' belongs to layer " + std::to_string(layer) +
           " but the config has " + std::to_string(cfg.num_hidden_layers) + " layers and " +
           std::to_string(cfg.num_nextn_predict_layers) + " MTP layer(s)");
    if (layer == mtp_layer) {
      ++dropped;
      continue;
    }
    if (layer >= 0 && ends_with(name, "_scale_inv")) continue;  // scale of a tensor read above
    if (warnings) warnings->push_back("ignored tensor '" + name + "' of " + set.file_of(name).path() + ": not in the model");
  }
  if (dropped && warnings)
    warnings->push_back("dropped " + std::to_string(dropped) + " MTP tensors (model.layers." + std::to_string(mtp_layer) +
                        ".*, --drop-mtp)");
}

HfModel import_hf(const std::string& hf_dir, const HfImportOptions& opt) {
  HfModel m;
  HfConfigRead r = read_hf_config(hf_dir + "/config.json", opt.indexer);
  m.cfg = r.cfg;
  m.warnings = r.notes;
  m.indexer_dims_from_options = !r.indexer_from_config;
  if (opt.drop_mtp) m.cfg.num_nextn_predict_layers = 0;
  SafetensorsSet set(hf_dir);
  m.params = make_params(m.cfg, opt.dtype);
  load_hf_tensors(set, m.cfg, opt, m.params, &m.warnings, &m.indexer_fresh);
  return m;
}

bool stored_fp8_in_release(const std::string& name, const Tensor& t) {
  if (t.ndim() != 2 || !starts_with(name, "model.layers.") || !ends_with(name, ".weight")) return false;
  for (const char* skip : {"norm", "mlp.gate.weight", "eh_proj", "shared_head", "embed_tokens", "weights_proj"})
    if (name.find(skip) != std::string::npos) return false;
  return true;
}

std::vector<std::pair<std::string, Tensor>> hf_tensors_for_export(const ModelConfig& cfg, const ParamStore& params,
                                                                  const std::map<std::string, Tensor>& extra,
                                                                  const HfExportOptions& opt) {
  DSA_CHECK(opt.dtype == DType::BF16 || opt.dtype == DType::F32, "[hf_io] export dtype must be bf16 or f32, got ",
            dtype_name(opt.dtype));
  std::vector<std::pair<std::string, Tensor>> out;
  auto host_f32 = [](const Tensor& t) {
    Tensor h = t.is_cpu() ? t : t.to(Device::CPU);
    return h.dtype() == DType::F32 ? h : h.to(DType::F32);
  };
  // One tensor as it is written: FP8 + scale in the release format, else the export dtype.
  auto emit = [&](const std::string& name, const Tensor& value, DType dt) {
    if (opt.fp8 && stored_fp8_in_release(name, value)) {
      auto [q, s] = quant_fp8_blocks(host_f32(value).clone(), 128);
      out.emplace_back(name, q);
      out.emplace_back(name + "_scale_inv", s);
      return;
    }
    Tensor h = value.is_cpu() ? value : value.to(Device::CPU);
    out.emplace_back(name, h.dtype() == dt ? h : h.to(dt));
  };
  const bool per_expert = opt.per_expert || opt.fp8;
  const int64_t E = cfg.n_routed_experts, I = cfg.moe_intermediate_size, D = cfg.hidden_size;
  for (const Param& p : params.all()) {
    const DType dt = p.group == ParamGroup::Buffer ? DType::F32 : opt.dtype;
    const bool gate_up = ends_with(p.name, "mlp.experts.gate_up_proj"), down = ends_with(p.name, "mlp.experts.down_proj");
    if (per_expert && (gate_up || down)) {
      const std::string base = p.name.substr(0, p.name.size() - (gate_up ? strlen("gate_up_proj") : strlen("down_proj")));
      Tensor v = host_f32(p.value);
      for (int64_t e = 0; e < E; ++e) {
        const std::string pe = base + std::to_string(e) + ".";
        Tensor ve = v.row(e);  // [2I, D] or [D, I]
        if (gate_up) {
          emit(pe + "gate_proj.weight", ve.slice_rows(0, I).clone(), dt);
          emit(pe + "up_proj.weight", ve.slice_rows(I, 2 * I).clone(), dt);
        } else {
          emit(pe + "down_proj.weight", ve.view({D, I}).clone(), dt);
        }
      }
      continue;
    }
    emit(p.name, p.value, dt);
  }
  if (cfg.num_nextn_predict_layers > 0) {  // the MTP layer's copies of the shared embedding and head
    const std::string pre = layer_prefix(cfg.mtp_layer());
    const std::string head = cfg.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    emit(pre + "embed_tokens.weight", params["model.embed_tokens.weight"], opt.dtype);
    emit(pre + "shared_head.head.weight", params[head], opt.dtype);
  }
  for (const auto& [key, t] : extra)
    if (starts_with(key, kMtpPrefix)) out.emplace_back(key.substr(strlen(kMtpPrefix)), t.is_cpu() ? t : t.to(Device::CPU));
  return out;
}

HfExportReport export_hf(const std::string& hf_dir, const ModelConfig& cfg, const ParamStore& params,
                         const std::map<std::string, Tensor>& extra, const HfExportOptions& opt) {
  HfExportReport rep;
  auto tensors = hf_tensors_for_export(cfg, params, extra, opt);
  for (const auto& kv : tensors)
    if (ends_with(kv.first, "_scale_inv")) ++rep.fp8_tensors;
  std::set<int64_t> mtp_layers;
  if (cfg.num_nextn_predict_layers > 0) mtp_layers.insert(cfg.mtp_layer());
  for (const auto& kv : extra)
    if (starts_with(kv.first, kMtpPrefix)) mtp_layers.insert(layer_of(kv.first.substr(strlen(kMtpPrefix))));
  rep.files = write_safetensors_sharded(hf_dir, tensors, opt.max_shard_bytes, {{"format", "pt"}});
  rep.cls = hf_export_class(cfg);
  const std::string path = hf_dir + "/config.json";
  std::ofstream out(path + ".tmp");
  out << hf_config_json(cfg, opt.dtype, static_cast<int64_t>(mtp_layers.size()), opt.fp8);
  out.close();
  DSA_CHECK(out.good() && std::rename((path + ".tmp").c_str(), path.c_str()) == 0, "[hf_io] ", path,
            ": cannot write config.json");
  return rep;
}

}  // namespace dsa
