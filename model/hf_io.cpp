#include "model/hf_io.h"

#include <sys/stat.h>

#include <nlohmann/json.hpp>

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

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DSA_CHECK(in.good(), "[hf_io] ", path, ": cannot read the file");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

void load_hf_tensors(const SafetensorsSet& set, const ModelConfig& cfg, const HfImportOptions& opt, ParamStore& params,
                     std::map<std::string, Tensor>* extra, std::vector<std::string>* warnings, bool* indexer_fresh) {
  const std::string src = set.source();
  const std::string cfg_src = "the config";
  std::set<std::string> used;

  // The indexer: all of it, none of it (fresh init), or an error naming the first missing tensor.
  size_t ix_have = 0, ix_total = 0;
  std::string ix_missing;
  for (const Param& p : params.all())
    if (p.group == ParamGroup::Indexer) {
      ++ix_total;
      if (set.has(p.name)) ++ix_have;
      else if (ix_missing.empty()) ix_missing = p.name;
    }
  const bool fresh = ix_total > 0 && ix_have == 0;
  if (ix_have > 0 && ix_have < ix_total)
    fail("[hf_io] " + src + ": missing indexer tensor '" + ix_missing + "' (" + std::to_string(ix_have) + " of " +
         std::to_string(ix_total) + " indexer tensors present)");
  if (indexer_fresh) *indexer_fresh = fresh;
  if (fresh) {
    init_params_group(params, cfg, opt.indexer_seed, ParamGroup::Indexer);
    if (warnings)
      warnings->push_back("no indexer tensors in " + src + ": the indexer is freshly initialized (seed " +
                          std::to_string(opt.indexer_seed) + ")");
  }

  const int64_t E = cfg.n_routed_experts, I = cfg.moe_intermediate_size, D = cfg.hidden_size;
  for (Param& p : params.all()) {
    if (p.group == ParamGroup::Indexer && fresh) continue;
    const Shape& want = p.value.shape();
    if (set.has(p.name)) {
      store(p, read_checked(set, p.name, want, cfg_src));
      used.insert(p.name);
      used.insert(p.name + "_scale_inv");
      continue;
    }
    // Per-expert layout of older checkpoints -> the fused tensors.
    const bool gate_up = ends_with(p.name, "mlp.experts.gate_up_proj");
    const bool down = ends_with(p.name, "mlp.experts.down_proj");
    if (gate_up || down) {
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
          if (!set.has(n)) fail("[hf_io] " + src + ": missing tensor '" + n + "' (expert " + std::to_string(e) + " of " +
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
      store(p, fused);
      continue;
    }
    fail("[hf_io] " + src + ": missing tensor '" + p.name + "', shape " + shape_str(want));
  }

  // What is left: MTP layers, stray scales, unknown tensors.
  int64_t n_mtp = opt.num_mtp_layers < 0 ? 0 : opt.num_mtp_layers;
  size_t dropped = 0;
  for (const std::string& name : set.names()) {
    if (used.count(name)) continue;
    const int64_t layer = layer_of(name);
    if (layer >= cfg.num_hidden_layers) {
      if (layer >= cfg.num_hidden_layers + std::max<int64_t>(n_mtp, 1) && opt.num_mtp_layers >= 0)
        fail("[hf_io] " + set.file_of(name).path() + ": tensor '" + name + "' belongs to layer " + std::to_string(layer) +
             " but the config has " + std::to_string(cfg.num_hidden_layers) + " layers and " + std::to_string(n_mtp) +
             " MTP layer(s)");
      if (opt.keep_mtp && extra) (*extra)[std::string(kMtpPrefix) + name] = set.read(name);
      else ++dropped;
      continue;
    }
    if (layer >= 0 && ends_with(name, "_scale_inv")) continue;  // scale of a tensor read above or skipped
    if (warnings) warnings->push_back("ignored tensor '" + name + "' of " + set.file_of(name).path() + ": not in the model");
  }
  if (dropped && warnings)
    warnings->push_back("dropped " + std::to_string(dropped) + " MTP tensors (use --keep-mtp to keep them)");
}

HfModel import_hf(const std::string& hf_dir, const HfImportOptions& opt_in) {
  HfModel m;
  const std::string cfg_path = hf_dir + "/config.json";
  m.cfg = ModelConfig::from_file(cfg_path);
  HfImportOptions opt = opt_in;
  if (opt.num_mtp_layers < 0) {
    nlohmann::json j = nlohmann::json::parse(read_text(cfg_path), nullptr, false);
    opt.num_mtp_layers = 0;
    if (j.is_object() && j.contains("num_nextn_predict_layers") && j["num_nextn_predict_layers"].is_number_integer())
      opt.num_mtp_layers = std::max<int64_t>(0, j["num_nextn_predict_layers"].get<int64_t>());
  }
  SafetensorsSet set(hf_dir);
  m.params = make_params(m.cfg, opt.dtype);
  load_hf_tensors(set, m.cfg, opt, m.params, &m.extra, &m.warnings, &m.indexer_fresh);
  return m;
}

std::string hf_config_json(const ModelConfig& cfg, DType dtype, int64_t num_mtp_layers) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(cfg.to_hf_json());
  const char* name = dtype == DType::F32 ? "float32" : "bfloat16";
  j["torch_dtype"] = name;
  j["dtype"] = name;
  j["num_nextn_predict_layers"] = num_mtp_layers;
  return j.dump(2) + "\n";
}

std::vector<std::pair<std::string, Tensor>> hf_tensors_for_export(const ModelConfig& cfg, const ParamStore& params,
                                                                  const std::map<std::string, Tensor>& extra,
                                                                  const HfExportOptions& opt) {
  DSA_CHECK(opt.dtype == DType::BF16 || opt.dtype == DType::F32, "[hf_io] export dtype must be bf16 or f32, got ",
            dtype_name(opt.dtype));
  std::vector<std::pair<std::string, Tensor>> out;
  auto conv = [&](const Tensor& t, DType dt) {
    Tensor host = t.is_cpu() ? t : t.to(Device::CPU);
    return host.dtype() == dt ? host : host.to(dt);
  };
  const int64_t E = cfg.n_routed_experts, I = cfg.moe_intermediate_size, D = cfg.hidden_size;
  for (const Param& p : params.all()) {
    const DType dt = p.group == ParamGroup::Buffer ? DType::F32 : opt.dtype;
    const bool gate_up = ends_with(p.name, "mlp.experts.gate_up_proj"), down = ends_with(p.name, "mlp.experts.down_proj");
    if (opt.per_expert && (gate_up || down)) {
      const std::string base = p.name.substr(0, p.name.size() - (gate_up ? strlen("gate_up_proj") : strlen("down_proj")));
      Tensor v = conv(p.value, dt);
      for (int64_t e = 0; e < E; ++e) {
        const std::string pe = base + std::to_string(e) + ".";
        Tensor ve = v.row(e);  // [2I, D] or [D, I]
        if (gate_up) {
          out.emplace_back(pe + "gate_proj.weight", ve.slice_rows(0, I).clone());
          out.emplace_back(pe + "up_proj.weight", ve.slice_rows(I, 2 * I).clone());
        } else {
          out.emplace_back(pe + "down_proj.weight", ve.view({D, I}).clone());
        }
      }
      continue;
    }
    out.emplace_back(p.name, conv(p.value, dt));
  }
  for (const auto& [key, t] : extra)
    if (starts_with(key, kMtpPrefix)) out.emplace_back(key.substr(strlen(kMtpPrefix)), conv(t, t.dtype()));
  return out;
}

void export_hf(const std::string& hf_dir, const ModelConfig& cfg, const ParamStore& params,
               const std::map<std::string, Tensor>& extra, const HfExportOptions& opt) {
  auto tensors = hf_tensors_for_export(cfg, params, extra, opt);
  std::set<int64_t> mtp_layers;
  for (const auto& kv : extra)
    if (starts_with(kv.first, kMtpPrefix)) mtp_layers.insert(layer_of(kv.first.substr(strlen(kMtpPrefix))));
  write_safetensors_sharded(hf_dir, tensors, opt.max_shard_bytes, {{"format", "pt"}});
  const std::string path = hf_dir + "/config.json";
  std::ofstream out(path + ".tmp");
  out << hf_config_json(cfg, opt.dtype, static_cast<int64_t>(mtp_layers.size()));
  out.close();
  DSA_CHECK(out.good() && std::rename((path + ".tmp").c_str(), path.c_str()) == 0, "[hf_io] ", path,
            ": cannot write config.json");
}

}  // namespace dsa
