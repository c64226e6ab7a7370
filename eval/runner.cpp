// Model passes for dsa-eval (see runner.h).
#include "eval/runner.h"

#include "kernels/ops.h"
#include "model/mla.h"

namespace dsa::eval {

namespace {

Tensor cpu_f32(const Tensor& t) {
  Tensor c = t.to(Device::CPU);
  return c.dtype() == DType::F32 ? c : c.to(DType::F32);
}

}  // namespace

StepOptions Runner::step_options(const PassOptions& o) const {
  StepOptions so;
  so.attention = o.attention;
  so.form = MlaForm::MHA;
  so.topk = topk(o);
  so.indexer_loss = IndexerLossMode::None;
  so.fp8_indexer = o.fp8;
  so.train_main = false;
  so.train_indexer = false;
  so.compute_recall = o.quality_rows > 0;  // dense attention: the indexer and its top-k run too
  return so;
}

const Tensor& Runner::lm_head() const {
  const ModelConfig& c = m_.config();
  return m_.params().w(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
}

const Tensor& Runner::positions(int64_t T) {
  if (rope_T_ != T) {
    const Device d = m_.device();
    rope_ = make_rope_tables(m_.config(), T, d == Device::CUDA ? DType::F32 : m_.dtype(), d);
    std::vector<int32_t> p(static_cast<size_t>(T));
    for (int64_t i = 0; i < T; ++i) p[i] = static_cast<int32_t>(i);
    positions_ = Tensor::from_vector(p, {T}).to(d);
    rope_T_ = T;
  }
  return positions_;
}

// The indexer figures of layer l: the layer's dense attention rebuilt from its input (the queries and
// keys the dense target needs), against the indexer operands and selection the pass produced.
Quality Runner::layer_quality(int64_t l, const Tensor& x_in, int64_t T, const IndexerCache& ic, const Tensor& indices,
                              const PassOptions& o) {
  const ModelConfig& cfg = m_.config();
  const ParamStore& ps = m_.params();
  const std::string p = layer_prefix(l);
  const Tensor attn_in = ops::rmsnorm_forward(x_in, ps.w(p + "input_layernorm.weight"), cfg.rms_norm_eps, nullptr);
  const Tensor& pos = positions(T);  // (re)builds rope_ for T
  MlaCache c;
  mla_prepare(ps, p, cfg, attn_in, c);
  mla_forward(ps, p, cfg, rope_, pos, 1, T, attn_in, MlaForm::MHA, nullptr, c);
  const int64_t H = cfg.num_attention_heads, dk = cfg.qk_head_dim(), Hi = cfg.index_n_heads, di = cfg.index_head_dim;
  const std::vector<int64_t> rows = quality_rows(T, topk(o), o.quality_rows);
  return indexer_quality(cpu_f32(c.q).view({T, H, dk}), cpu_f32(c.k).view({T, H, dk}), cfg.attention_scale(),
                         cpu_f32(ic.q).view({T, Hi, di}), cpu_f32(ic.k).view({T, di}), cpu_f32(ic.w).view({T, Hi}),
                         o.fp8, indices.to(Device::CPU).view({T, -1}), rows);
}

PassResult Runner::pass(const std::vector<int32_t>& inputs, const std::vector<int32_t>& targets, const PassOptions& o) {
  const int64_t T = static_cast<int64_t>(inputs.size());
  DSA_CHECK(T > 0 && targets.size() == inputs.size(), "[eval] a pass needs inputs and targets of one length");
  const ModelConfig& cfg = m_.config();
  StepOptions so = step_options(o);
  std::vector<Tensor> outs, indices;
  std::vector<IndexerCache> ic;
  so.capture_layer_outputs = &outs;
  if (o.quality_rows > 0) {
    so.capture_indices = &indices;
    so.capture_indexer = &ic;
  }
  const Tensor ids = Tensor::from_vector(inputs, {T}), tg = Tensor::from_vector(targets, {T});
  const StepStats st = m_.step(ids, tg, 1, T, so, false);
  PassResult r;
  r.loss_sum = st.lm_loss_sum;
  r.tokens = st.lm_tokens;
  r.model_recall_sum = st.recall_sum;
  r.model_recall_rows = st.recall_rows;
  // Loss by position: the final norm and the LM head over each bucket's rows.
  const Tensor hn = ops::rmsnorm_forward(outs.back(), m_.params().w("model.norm.weight"), cfg.rms_norm_eps, nullptr);
  const Tensor tg_d = tg.to(m_.device());
  r.buckets = position_buckets(T);
  for (Bucket& b : r.buckets) {
    const ops::CrossEntropyResult ce = ops::lm_head_cross_entropy(hn.slice_rows(b.begin, b.end), lm_head(),
                                                                  tg_d.slice_rows(b.begin, b.end), 1.0, nullptr, nullptr);
    b.loss_sum = ce.loss_sum;
    b.tokens = ce.count;
  }
  if (o.quality_rows > 0) {
    DSA_CHECK(indices.size() == static_cast<size_t>(cfg.num_hidden_layers) && ic.size() == indices.size(),
              "[eval] the pass captured no indexer selection");
    const Tensor emb = ops::embedding_forward(ids.to(m_.device()), m_.params().w("model.embed_tokens.weight"));
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
      r.layers.push_back(layer_quality(l, l == 0 ? emb : outs[l - 1], T, ic[l], indices[l], o));
  }
  return r;
}

NextTokenFn Runner::next_token(const PassOptions& o) {
  return [this, o](const std::vector<int32_t>& inputs, const std::vector<int64_t>& pos) {
    const int64_t T = static_cast<int64_t>(inputs.size());
    StepOptions so = step_options(o);
    so.compute_recall = false;
    std::vector<Tensor> outs;
    so.capture_layer_outputs = &outs;
    const std::vector<int32_t> none(inputs.size(), -1);
    m_.step(Tensor::from_vector(inputs, {T}), Tensor::from_vector(none, {T}), 1, T, so, false);
    std::vector<int32_t> out;
    for (int64_t p : pos) {
      DSA_CHECK(p >= 0 && p < T, "[eval] next-token position ", p, " outside [0, ", T, ")");
      const Tensor h = ops::rmsnorm_forward(outs.back().slice_rows(p, p + 1), m_.params().w("model.norm.weight"),
                                            m_.config().rms_norm_eps, nullptr);
      const Tensor logits = cpu_f32(ops::linear_forward(h, lm_head()));  // [1, V]
      const float* v = logits.data<float>();
      int64_t best = 0;
      for (int64_t i = 1; i < logits.numel(); ++i)
        if (v[i] > v[best]) best = i;  // ties: the lower id
      out.push_back(static_cast<int32_t>(best));
    }
    return out;
  };
}

}  // namespace dsa::eval
