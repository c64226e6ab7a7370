// The project's model against transformers 5.17's DeepseekV32ForCausalLM on the same weights.
// Golden files: tests/golden/hf_tiny, made by tools/hf_reference.py (torch 2.11, transformers 5.17,
// float32 on the CPU): a tiny random model saved with save_pretrained, fixed tokens, and the logits,
// loss, per-layer outputs and the indexer's top-k selection of a dense run and a sparse run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "kernels/dsa_ops.h"
#include "model/hf_io.h"
#include "model/model.h"
#include "tests/test_util.h"

using namespace dsa;
using namespace dsa::testing;

namespace {

const std::string kGolden = std::string(DSA_SOURCE_DIR) + "/tests/golden/hf_tiny";

// Minimal .npy reader (version 1/2, little-endian, C order): f4, f8, i4, i8 -> f64 or i32 tensors.
Tensor read_npy(const std::string& path) {
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

double max_abs_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(a.item(i) - b.item(i)));
  return m;
}

struct Golden {
  HfModel hf;
  Tensor ids, targets;
  int64_t B = 0, T = 0;
  Golden() {
    HfImportOptions io;
    io.dtype = DType::F64;
    hf = import_hf(kGolden + "/model", io);
    Tensor tokens = read_npy(kGolden + "/tokens.npy");
    B = tokens.size(0);
    T = tokens.size(1);
    ids = tokens.view({B * T});
    // transformers' loss: mean over positions with a next token.
    targets = Tensor::empty({B * T}, DType::I32);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        targets.data<int32_t>()[b * T + t] = t + 1 < T ? ids.data<int32_t>()[b * T + t + 1] : -1;
  }
  std::unique_ptr<Model> model() const {
    auto m = std::make_unique<Model>(hf.cfg, DType::F64);
    for (Param& p : m->params().all()) p.value.copy_from(hf.params.get(p.name).value);
    return m;
  }
};

void compare_run(const std::string& run, StepOptions opts, double tol) {
  Golden g;
  auto m = g.model();
  Tensor logits;
  std::vector<Tensor> layers;
  opts.capture_logits = &logits;
  opts.capture_layer_outputs = &layers;
  StepStats s = m->step(g.ids, g.targets, g.B, g.T, opts, false);
  const double ref_loss = read_npy(kGolden + "/" + run + "/loss.npy").item(0);
  const double loss = s.lm_loss_sum / s.lm_tokens;
  EXPECT_NEAR(loss, ref_loss, tol) << run;
  const double dlogits = max_abs_diff(logits, read_npy(kGolden + "/" + run + "/logits.npy"));
  EXPECT_LT(dlogits, tol) << run << " logits";
  for (size_t l = 0; l < layers.size(); ++l)
    EXPECT_LT(max_abs_diff(layers[l], read_npy(kGolden + "/" + run + "/layer_" + std::to_string(l) + "_out.npy")),
              tol)
        << run << " layer " << l;
  std::printf("[golden] %s: loss %.9f vs transformers %.9f, max |dlogits| %.3g\n", run.c_str(), loss, ref_loss,
              dlogits);
}

}  // namespace

TEST(HfGolden, ImportedConfigMatches) {
  Golden g;
  EXPECT_EQ(g.hf.cfg.hidden_size, 32);
  EXPECT_EQ(g.hf.cfg.index_topk, 4);
  EXPECT_FALSE(g.hf.indexer_fresh);
}

TEST(HfGolden, DenseMatchesTransformersMHA) { compare_run("f32_dense", StepOptions{}, 2e-5); }

TEST(HfGolden, DenseMatchesTransformersMQA) {
  StepOptions o;
  o.form = MlaForm::MQA;
  compare_run("f32_dense", o, 2e-5);
}

TEST(HfGolden, SparseMatchesTransformersOnItsSelection) {
  // The sparse run on transformers' own top-k sets: the attention, MoE and head agree.
  Golden g;
  std::vector<Tensor> forced;
  for (int64_t l = 0; l < g.hf.cfg.num_hidden_layers; ++l)
    forced.push_back(read_npy(kGolden + "/f32_sparse/indexer_topk_layer" + std::to_string(l) + ".npy"));
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.forced_indices = &forced;
  compare_run("f32_sparse", o, 2e-5);
}

TEST(HfGolden, TransformersSelectionIsATopkOfOurIndexerScores) {
  // transformers scores the indexer without Hadamard or FP8; ours (fp8 off) must rank keys the same.
  // Many scores tie (ReLU zeros), so the check is that transformers' set is *a* top-k of our scores.
  Golden g;
  auto m = g.model();
  std::vector<IndexerCache> idx;
  std::vector<Tensor> forced;  // transformers' sets, so every layer sees the inputs transformers saw
  for (int64_t l = 0; l < g.hf.cfg.num_hidden_layers; ++l)
    forced.push_back(read_npy(kGolden + "/f32_sparse/indexer_topk_layer" + std::to_string(l) + ".npy"));
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.forced_indices = &forced;
  o.fp8_indexer = false;
  o.capture_indexer = &idx;
  m->step(g.ids, g.targets, g.B, g.T, o, false);
  const ModelConfig& c = g.hf.cfg;
  ASSERT_EQ(idx.size(), static_cast<size_t>(c.num_hidden_layers));
  int rows = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    Tensor ref = read_npy(kGolden + "/f32_sparse/indexer_topk_layer" + std::to_string(l) + ".npy");
    const int64_t K = ref.size(2);
    Tensor scores = ops::indexer_scores_forward(idx[l].q.view({g.B, g.T, c.index_n_heads, c.index_head_dim}),
                                                idx[l].k.view({g.B, g.T, c.index_head_dim}),
                                                idx[l].w.view({g.B, g.T, c.index_n_heads}), 0, g.T);
    for (int64_t b = 0; b < g.B; ++b) {
      for (int64_t t = 0; t < g.T; ++t) {
        std::set<int> chosen;
        for (int64_t k = 0; k < K; ++k) {
          const int s = ref.data<int32_t>()[(b * g.T + t) * K + k];
          if (s >= 0) chosen.insert(s);
        }
        ASSERT_EQ(static_cast<int64_t>(chosen.size()), std::min<int64_t>(K, t + 1)) << "layer " << l << " row " << t;
        double min_in = INFINITY, max_out = -INFINITY;
        for (int64_t s = 0; s <= t; ++s) {
          const double v = scores.item((b * g.T + t) * g.T + s);
          if (chosen.count(static_cast<int>(s)))
            min_in = std::min(min_in, v);
          else
            max_out = std::max(max_out, v);
        }
        EXPECT_GE(min_in, max_out - 1e-6 * (1 + std::fabs(max_out))) << "layer " << l << " b " << b << " row " << t;
        ++rows;
      }
    }
  }
  EXPECT_EQ(rows, c.num_hidden_layers * g.B * g.T);
}

TEST(HfGolden, SparseOnTheBf16IndexersSelection) {
  // transformers in bf16 (weights and activations; its indexer scores in bf16): our f32 model on the
  // same selection agrees to bf16 precision.
  Golden g;
  std::vector<Tensor> forced;
  for (int64_t l = 0; l < g.hf.cfg.num_hidden_layers; ++l)
    forced.push_back(read_npy(kGolden + "/bf16_sparse/indexer_topk_layer" + std::to_string(l) + ".npy"));
  auto m = g.model();
  Tensor logits;
  StepOptions o;
  o.attention = AttentionMode::Sparse;
  o.forced_indices = &forced;
  o.capture_logits = &logits;
  StepStats s = m->step(g.ids, g.targets, g.B, g.T, o, false);
  const double ref = read_npy(kGolden + "/bf16_sparse/loss.npy").item(0);
  EXPECT_NEAR(s.lm_loss_sum / s.lm_tokens, ref, 2e-2);
  Tensor ref_logits = read_npy(kGolden + "/bf16_sparse/logits.npy");
  double num = 0, den = 0;
  for (int64_t i = 0; i < logits.numel(); ++i) {
    const double d = logits.item(i) - ref_logits.item(i);
    num += d * d;
    den += ref_logits.item(i) * ref_logits.item(i);
  }
  EXPECT_LT(std::sqrt(num / den), 2e-2);
  std::printf("[golden] bf16_sparse: loss %.6f vs transformers bf16 %.6f, relative logits error %.3g\n",
              s.lm_loss_sum / s.lm_tokens, ref, std::sqrt(num / den));
}
