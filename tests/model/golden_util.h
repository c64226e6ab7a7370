// Golden sets of tools/hf_reference.py (tests/golden/<set>/): transformers' own classes on tiny random
// models. A set is imported through the real `dsa-convert import` (the binary, as a user runs it) and
// run by this project's model in f64; the helpers here read the .npy outputs and the manifest.
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "model/model.h"
#include "tests/ckpt/ckpt_util.h"
#include "trainer/checkpoint.h"

namespace dsa::testing {

inline const std::string kGoldenDir = std::string(DSA_SOURCE_DIR) + "/tests/golden/";

inline bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// Minimal .npy reader (version 1/2, little-endian, C order): f4, f8, i4, i8 -> f64 or i32 tensors.
inline Tensor read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("[npy] cannot open " + path);
  char magic[6];
  f.read(magic, 6);
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error("[npy] " + path + ": not an .npy file");
  uint8_t ver[2];
  f.read(reinterpret_cast<char*>(ver), 2);
  uint32_t hlen = 0;
  if (ver[0] == 1) {
    uint16_t h16;
    f.read(reinterpret_cast<char*>(&h16), 2);
    hlen = h16;
  } else {
    f.read(reinterpret_cast<char*>(&hlen), 4);
  }
  std::string header(hlen, '\0');
  f.read(header.data(), hlen);
  auto field = [&](const std::string& key) {
    const size_t p = header.find("'" + key + "'");
    if (p == std::string::npos) throw std::runtime_error("[npy] " + path + ": no " + key);
    return header.substr(header.find(':', p) + 1);
  };
  const std::string descr = field("descr");
  const std::string type = descr.substr(descr.find('\'') + 1, 3);
  if (field("fortran_order").find("False") == std::string::npos)
    throw std::runtime_error("[npy] " + path + ": Fortran order");
  std::string shape_s = field("shape");
  shape_s = shape_s.substr(shape_s.find('(') + 1, shape_s.find(')') - shape_s.find('(') - 1);
  Shape shape;
  std::stringstream ss(shape_s);
  for (std::string tok; std::getline(ss, tok, ',');)
    if (tok.find_first_of("0123456789") != std::string::npos) shape.push_back(std::stoll(tok));
  const int64_t n = shape_numel(shape);
  if (type == "<f4" || type == "<f8") {
    Tensor t = Tensor::empty(shape, DType::F64);
    for (int64_t i = 0; i < n; ++i) {
      if (type == "<f4") {
        float v;
        f.read(reinterpret_cast<char*>(&v), 4);
        t.data<double>()[i] = v;
      } else {
        f.read(reinterpret_cast<char*>(t.data<double>() + i), 8);
      }
    }
    return t;
  }
  if (type == "<i4" || type == "<i8") {
    Tensor t = Tensor::empty(shape, DType::I32);
    for (int64_t i = 0; i < n; ++i) {
      int64_t v = 0;
      f.read(reinterpret_cast<char*>(&v), type == "<i4" ? 4 : 8);
      if (type == "<i4") v = static_cast<int32_t>(v);
      t.data<int32_t>()[i] = static_cast<int32_t>(v);
    }
    return t;
  }
  throw std::runtime_error("[npy] " + path + ": unsupported dtype " + descr);
}

inline double max_abs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::fabs(t.item(i)));
  return m;
}

// max |a - b| over the first `rows` rows of each sequence: a [B*T, C] (ours), b [B, rows, C] (golden).
inline double max_abs_diff_rows(const Tensor& a, const Tensor& b, int64_t B, int64_t T, int64_t rows) {
  const int64_t C = b.numel() / (B * rows);
  double m = 0;
  for (int64_t s = 0; s < B; ++s)
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t c = 0; c < C; ++c)
        m = std::max(m, std::fabs(a.item((s * T + t) * C + c) - b.item((s * rows + t) * C + c)));
  return m;
}

// One golden set: its manifest, tokens, and the model imported by dsa-convert.
struct GoldenSet {
  std::string name, dir;
  nlohmann::json manifest;
  Tensor ids, targets;  // [B*T] i32; targets: the next token, -1 at each sequence's end
  int64_t B = 0, T = 0;
  Checkpoint ckpt;   // what `dsa-convert import` wrote
  bool v32 = false;  // the golden class has an indexer (its selection is the sparse runs')
  bool mtp = false;

  static bool present(const std::string& name) { return file_exists(kGoldenDir + name + "/manifest.json"); }

  // `import_dir`: the set's model/ (default) or another folder of it (release_fp8).
  GoldenSet(const std::string& set, const ScratchDir& scratch, const std::string& import_dir = "model") : name(set) {
    dir = kGoldenDir + set;
    std::ifstream mf(dir + "/manifest.json");
    manifest = nlohmann::json::parse(mf);
    v32 = manifest.at("class") == "DeepseekV32ForCausalLM";
    mtp = manifest.contains("mtp_layer");
    Tensor tokens = read_npy(dir + "/tokens.npy");
    B = tokens.size(0);
    T = tokens.size(1);
    ids = tokens.view({B * T});
    targets = Tensor::empty({B * T}, DType::I32);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        targets.data<int32_t>()[b * T + t] = t + 1 < T ? ids.data<int32_t>()[b * T + t + 1] : -1;
    // The real import path: the dsa-convert binary. Sets without an indexer get one of 3 heads x 8,
    // top-k = the sparse runs' k (it is never used for selection here: the runs force the selection).
    const std::string out = scratch / (set + "_" + std::to_string(std::hash<std::string>()(import_dir)) + ".h5");
    std::string cmd = std::string(DSA_BINARY_DIR) + "/bin/dsa-convert import " + dir + "/" + import_dir + " " + out;
    if (!v32) cmd += " --index-n-heads 3 --index-head-dim 8 --index-topk 5";
    cmd += " > " + out + ".log 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      std::ifstream log(out + ".log");
      std::stringstream s;
      s << log.rdbuf();
      throw std::runtime_error("dsa-convert import failed: " + cmd + "\n" + s.str());
    }
    ckpt = load_checkpoint(out);
  }
  std::unique_ptr<Model> model() const {
    auto m = std::make_unique<Model>(ckpt.cfg, DType::F64);
    for (Param& p : m->params().all()) p.value.copy_from(ckpt.params.get(p.name).value.to(p.value.dtype()));
    return m;
  }
  std::string run_file(const std::string& run, const std::string& file) const {
    return dir + "/" + run + "/" + file + ".npy";
  }
  bool has_run(const std::string& run) const { return manifest.at("runs").contains(run); }
  // The run includes the MTP layer's outputs (not every run of an MTP set does).
  bool run_has_mtp(const std::string& run) const { return mtp && file_exists(run_file(run, "mtp_logits")); }
  // The selection of a sparse run, one tensor per layer (the MTP layer last, when the run has it).
  std::vector<Tensor> selection(const std::string& run) const {
    std::vector<Tensor> sel;
    for (int64_t l = 0; l < ckpt.cfg.num_hidden_layers; ++l)
      sel.push_back(read_npy(run_file(run, "indexer_topk_layer" + std::to_string(l))));
    if (run_has_mtp(run)) sel.push_back(read_npy(run_file(run, "mtp_indexer_topk")));
    return sel;
  }
};

}  // namespace dsa::testing
