#include "trainer/memory_plan.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "kernels/device_memory.h"
#include "kernels/dsa_ops.h"
#include "model/model.h"
#include "model/params.h"
#include "trainer/dist.h"
#include "trainer/zero.h"

namespace dsa {

namespace {

bool trains(const StageSpec& st, const ModelConfig& cfg, const ParamSpec& s) { return stage_trains(st, cfg, s.name, s.group); }

struct StateBytes {
  int64_t parameters = 0, gradients = 0, optimizer = 0, in_flight = 0;
};

// Bytes the allocator counts for one tensor of `bytes`: the device caching allocator rounds up to 512 B
// below 1 MiB and to 2 MiB above (kernels/cuda/device_memory.cu); host tensors count their size.
int64_t alloc(int64_t bytes, bool gpu) {
  if (!gpu) return bytes;
  if (bytes < (int64_t(1) << 20)) return (std::max<int64_t>(bytes, 1) + 511) / 512 * 512;
  const int64_t m = int64_t(2) << 20;
  return (bytes + m - 1) / m * m;
}

// Parameters, gradients and AdamW moments of one rank, tensor by tensor as make_params (ZeRO off) or
// ZeroState (ZeRO on) allocate them.
StateBytes state_bytes(const ModelConfig& cfg, const StageSpec& st, const ParallelLayout& L) {
  StateBytes r;
  const bool gpu = L.gpu;
  const int64_t E = std::max<int64_t>(cfg.n_routed_experts, 1);
  std::vector<ParamSpec> specs = param_specs(cfg);
  auto held = [&](const ParamSpec& s) {
    const int64_t n = shape_numel(s.shape);
    return L.ep > 1 && is_routed_expert(s.name) ? n / E * (E / L.ep) : n;
  };
  const int64_t weight_bytes = gpu ? 2 : 4;
  std::vector<std::pair<std::string, int64_t>> list;
  std::vector<const ParamSpec*> listed;
  for (const ParamSpec& s : specs) {
    const int64_t n = held(s);
    if (s.group == ParamGroup::Buffer) {
      r.parameters += alloc(4 * n, gpu);
      continue;
    }
    const bool master_read = gpu && Model::reads_master(s.name);
    if (L.zero == 0 || master_read) {
      // Whole on this rank: f32 value (+ bf16 compute copy on the GPU), f32 gradient, moments if trained.
      r.parameters += alloc(4 * n, gpu) + (gpu && !master_read ? alloc(2 * n, gpu) : 0);
      r.gradients += alloc(4 * n, gpu);
      if (trains(st, cfg, s)) r.optimizer += 2 * alloc(4 * n, gpu);
      continue;
    }
    list.emplace_back(s.name, n);
    listed.push_back(&s);
  }
  if (L.zero == 0) return r;
  std::vector<int64_t> in_flight;
  for (const ZeroBucketShape& b : zero_buckets(list, L.ep > 1)) {
    const int64_t n = b.experts ? L.ranks / L.ep : L.ranks;
    const int64_t c = zero_chunk(b.total, n);
    bool t = false;
    for (size_t m : b.members) t = t || trains(st, cfg, *listed[m]);
    r.parameters += alloc(weight_bytes * n * c, gpu) + (gpu ? alloc(4 * c, gpu) : 0);
    if (L.zero == 1) r.gradients += alloc(4 * n * c, gpu);
    if (L.zero == 2 && t) {
      r.gradients += alloc(4 * c, gpu);
      in_flight.push_back(alloc(4 * n * c, gpu));
    }
    if (t) r.optimizer += 2 * alloc(4 * c, gpu);
  }
  // ZeRO-2: a bucket's full gradients live from its first gradient to the end of its reduce-scatter,
  // which overlaps the next bucket's backward: two at a time.
  std::sort(in_flight.rbegin(), in_flight.rend());
  for (size_t i = 0; i < in_flight.size() && i < 2; ++i) r.in_flight += in_flight[i];
  r.gradients += r.in_flight;
  return r;
}

// Shapes of one micro-batch and the element sizes of the backend.
struct Dims {
  int64_t B, T, N;       // sequences, tokens per sequence, tokens
  int64_t a;             // bytes of an activation (bf16 GPU, f32 CPU)
  int64_t D, H, dn, dr, dv, dk, kvl, ql, Hi, di, I, Im, E, Ke, S, V, K;
  int64_t ep;
};

constexpr int64_t f32 = 4, i32 = 4;

// Bytes of one layer's cache (Model::LayerCache) after its first forward pass, the layer's input
// (the previous layer's output) included.
int64_t layer_cache(const Dims& d, bool sparse, bool indexer, bool sparse_loss, bool probs_fwd, bool moe) {
  const int64_t N = d.N, a = d.a;
  int64_t b = N * d.D * a + N * f32 + N * d.D * a;  // x_in, attn_rstd, attn_in
  // MLA (model/mla.h): cq_pre, cq, cq_rstd, q, kva, ckv, ckv_rstd, kpe
  b += 2 * N * d.ql * a + N * f32 + N * d.H * d.dk * a + N * (d.kvl + d.dr) * a + N * d.kvl * a + N * f32 +
       N * d.dr * a;
  if (!sparse) {
    b += N * d.H * d.dk * a + 2 * N * d.H * d.dv * a + d.B * d.H * d.T * f32;  // k, v, attn (= o), lse
  } else {
    // q_abs, kv_lat, attn (latent), lse, o, the selection (and its scores for the sparse KL)
    b += N * d.H * (d.kvl + d.dr) * a + N * (d.kvl + d.dr) * a + N * d.H * d.kvl * a + d.B * d.H * d.T * f32 +
         N * d.H * d.dv * a + N * d.K * i32 + (sparse_loss ? N * d.K * f32 : 0) + (probs_fwd ? N * d.K * f32 : 0);
  }
  if (indexer) b += N * d.Hi * d.di * a + 2 * N * d.di * a + 2 * N * f32 + N * d.Hi * a;  // q, k_pre, k, stats, w
  b += 2 * N * d.D * a + N * f32;  // h_mid, ffn_in, ffn_rstd
  if (!moe) return b + 3 * N * d.I * a;  // gate, up, h
  const int64_t R = N * d.Ke;            // routed rows (no token dropping)
  // logits and scores (f32), experts, weights, permutation rows; xp, gu, h, yp; shared experts
  b += 2 * N * d.E * f32 + R * i32 + R * f32 + R * i32 + R * d.D * a + R * 3 * d.Im * a + R * d.D * a +
       3 * N * d.S * a;
  if (d.ep > 1) b += R * d.D * a;  // the received rows, expert-major (EpCache::xe)
  return b;
}

// NOTES: the transients below follow the model's code (model/mla.cpp, model/ffn.cpp, the kernels'
// Tensor::empty calls) term by term where a term is a whole activation, and leave out what is smaller
// than one [N] f32 row per head; the kernels' block-bounded workspaces are counted once, as workspace.
// Measured against dsa-bench's allocator peaks (docs/memory.md) the plan errs on the safe side by a few
// percent.

// Activation-shaped temporaries of one layer's forward beyond its cache.
int64_t forward_transient(const Dims& d, bool sparse, bool dense_kl, bool moe) {
  const int64_t N = d.N, a = d.a;
  const int64_t mla = sparse ? N * d.H * (d.dn + 2 * d.kvl + d.dr) * a   // q_nope^T, q_lat^T, concat
                             : N * d.H * (2 * d.dn + d.dv + d.dr) * a;  // kv_b output, narrow, repeated k_pe
  int64_t kl = dense_kl ? 2 * N * (d.Hi * d.di + d.di + d.Hi) * a + N * d.di * f32 + 3 * N * f32 : 0;
  // The dense KL under sparse attention rebuilds the dense attention (MHA form) for its target: the
  // query latent, q, the latent kv, k, v, the output and the dense forward's own temporaries.
  if (dense_kl && sparse)
    kl += N * (d.ql + 2 * (d.kvl + d.dr)) * a + N * d.H * (2 * d.dk + 2 * d.dv) * a +
          N * d.H * (2 * d.dn + d.dv + d.dr) * a + N * d.H * f32;
  const int64_t ffn = moe ? N * d.D * f32 + 2 * N * d.Ke * d.Im * a + N * d.D * a : N * d.D * a;
  return std::max({mla + N * d.D * a, kl, ffn});
}

// Temporaries of one layer's backward (its cache excluded): the residual gradient and the largest
// phase (the FFN's, then the attention's with the sparse KL in the backward).
int64_t backward_transient(const Dims& d, bool sparse, bool sparse_kl, bool moe) {
  const int64_t N = d.N, a = d.a, R = N * d.Ke;
  const int64_t ffn = moe ? R * (2 * d.D + 5 * d.Im) * a + 2 * N * d.E * f32 + 2 * N * d.D * f32 + 3 * N * d.S * a
                          : 3 * N * d.I * a + N * d.D * a;
  const int64_t mla = sparse ? N * d.H * (2 * d.dv + d.dk + 5 * d.kvl + d.dr) * a + N * (d.kvl + d.dr) * (a + f32) +
                                   N * d.K * f32
                             : N * d.H * (3 * d.dv + 3 * d.dk + d.dn) * a + N * d.H * d.dk * f32 + N * d.H * f32;
  const int64_t kl = sparse_kl ? 2 * N * (d.Hi * d.di + d.di + d.Hi) * a + N * d.di * f32 + 2 * N * f32 : 0;
  return 2 * N * d.D * a + std::max(ffn, mla + kl);
}

struct ActivationBytes {
  int64_t plain = 0, recompute = 0, workspace = 0;
};

ActivationBytes activation_bytes(const ModelConfig& c, const StageSpec& st, const ParallelLayout& L, int64_t mb) {
  Dims d;
  d.B = mb;
  d.T = st.seq_len;
  d.N = d.B * d.T;
  d.a = L.gpu ? 2 : 4;
  d.D = c.hidden_size;
  d.H = c.num_attention_heads;
  d.dn = c.qk_nope_head_dim;
  d.dr = c.qk_rope_head_dim;
  d.dv = c.v_head_dim;
  d.dk = c.qk_head_dim();
  d.kvl = c.kv_lora_rank;
  d.ql = c.q_lora_rank;
  d.Hi = c.index_n_heads;
  d.di = c.index_head_dim;
  d.I = c.intermediate_size;
  d.Im = c.moe_intermediate_size;
  d.E = c.n_routed_experts;
  d.Ke = c.num_experts_per_tok;
  d.S = c.moe_intermediate_size * c.n_shared_experts;
  d.V = c.vocab_size;
  d.K = std::min(st.topk > 0 ? st.topk : c.index_topk, d.T);
  d.ep = L.ep;
  const bool sparse = st.attention == Attention::sparse;
  const bool lm_backward = st.train_main;
  const bool indexer = sparse || st.indexer_loss != IndexerLoss::none;
  const bool sparse_loss = st.indexer_loss == IndexerLoss::sparse;
  const bool kl_in_backward = lm_backward && sparse_loss && st.detach_indexer_input;
  const bool dense_kl = st.indexer_loss == IndexerLoss::dense;
  const int64_t x = d.N * d.D * d.a;

  // Kernel workspaces (allocated and freed inside one op): the LM head's logits chunk (2 GiB of bf16
  // on the GPU, 64 MiB on the CPU), the top-k's and the dense KL's f32 score blocks (256 MiB; the GPU's
  // dense-KL gradient chunk keeps at least 32768 / Hi rows, ops::dense_kl_chunk_rows).
  const int64_t ce_budget = L.gpu ? (int64_t(2) << 30) : (int64_t(64) << 20);
  const int64_t ce_rows = std::clamp<int64_t>(ce_budget / (d.V * d.a), 1, d.N);
  const int64_t block_rows = std::clamp<int64_t>((int64_t(256) << 20) / std::max<int64_t>(d.B * d.T * 4, 1), 1, d.T);
  int64_t ws = ce_rows * d.V * d.a + (d.N + 2) * 8;
  if (sparse || dense_kl) ws = std::max(ws, d.B * block_rows * d.T * f32);
  if (dense_kl && L.gpu) ws = std::max(ws, d.B * ops::dense_kl_chunk_rows(d.B, d.T, c.index_n_heads) * d.T * f32);

  ActivationBytes r;
  r.workspace = ws;
  const int64_t head = 2 * x + d.N * f32 + (lm_backward ? x : 0);  // final h, hn, rstd, dhn
  if (!lm_backward) {
    // Nothing is kept across layers (the warm-up's KL and gradients run in each layer's forward).
    int64_t peak = x + head;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const bool moe = c.is_moe_layer(l);
      peak = std::max(peak, x + layer_cache(d, sparse, indexer, sparse_loss, true, moe) +
                                forward_transient(d, sparse, dense_kl, moe));
    }
    r.plain = r.recompute = peak;
    return r;
  }
  int64_t kept = 0, slim = 0, fwd = 0, fwd_rc = 0, bwd = 0, bwd_rc = 0;
  std::vector<int64_t> cache(c.num_hidden_layers), slims(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const bool moe = c.is_moe_layer(l);
    cache[l] = layer_cache(d, sparse, indexer, sparse_loss, !kl_in_backward, moe);
    slims[l] = x + (sparse ? d.N * d.K * i32 + (sparse_loss ? d.N * d.K * f32 : 0) : 0);
    const int64_t tf = forward_transient(d, sparse, dense_kl, moe);
    fwd = std::max(fwd, kept + cache[l] + tf);
    fwd_rc = std::max(fwd_rc, slim + cache[l] + tf);
    kept += cache[l];
    slim += slims[l];
  }
  // Backward, top layer first: the layers below still hold their caches (or slim inputs); with
  // recompute the layer's cache is rebuilt (its forward transient first).
  int64_t below = kept, below_rc = slim;
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    const bool moe = c.is_moe_layer(l);
    below -= cache[l];
    below_rc -= slims[l];
    const int64_t tb = backward_transient(d, sparse, kl_in_backward, moe);
    const int64_t tf = forward_transient(d, sparse, dense_kl, moe);
    bwd = std::max(bwd, x + below + cache[l] + tb);
    bwd_rc = std::max(bwd_rc, x + below_rc + cache[l] + std::max(tb, tf));
  }
  r.plain = std::max({fwd, kept + head, bwd});
  r.recompute = std::max({fwd_rc, slim + head, bwd_rc});
  return r;
}

}  // namespace

bool MemoryPlan::fits() const { return capacity <= 0 || peak() <= capacity; }

int64_t MemoryPlan::peak() const {
  int64_t p = 0;
  for (const StagePlan& s : stages) p = std::max(p, s.total());
  return p;
}

std::string gib(int64_t bytes) {
  char b[32];
  if (bytes < (int64_t(1) << 30))
    std::snprintf(b, sizeof b, "%.2f MiB", static_cast<double>(bytes) / (1 << 20));
  else
    std::snprintf(b, sizeof b, "%.2f GiB", static_cast<double>(bytes) / (1 << 30));
  return b;
}

std::string MemoryPlan::table() const {
  std::ostringstream o;
  // GiB, or MiB for small models.
  const bool mib = std::max(peak(), capacity) < (int64_t(1) << 30);
  const double unit = mib ? double(1 << 20) : double(1 << 30);
  auto num = [&](int64_t v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.2f", static_cast<double>(v) / unit);
    return std::string(b);
  };
  o << "| " << (mib ? "MiB" : "GiB") << " per rank |";
  for (const StagePlan& s : stages) o << " " << s.stage << " |";
  o << "\n|---|";
  for (size_t i = 0; i < stages.size(); ++i) o << "---:|";
  o << "\n";
  auto row = [&](const char* name, auto get) {
    o << "| " << name << " |";
    for (const StagePlan& s : stages) o << " " << get(s) << " |";
    o << "\n";
  };
  row("tokens per micro-batch", [](const StagePlan& s) { return std::to_string(s.tokens); });
  row("parameters", [&](const StagePlan& s) { return num(s.parameters); });
  row("gradients", [&](const StagePlan& s) { return num(s.gradients); });
  row("optimizer state", [&](const StagePlan& s) { return num(s.optimizer); });
  row("activations", [&](const StagePlan& s) { return num(s.activations) + (s.recompute ? "" : " *"); });
  row("activations, recompute", [&](const StagePlan& s) { return num(s.activations_recompute) + (s.recompute ? " *" : ""); });
  row("workspace", [&](const StagePlan& s) { return num(s.workspace); });
  row("total (* used)", [&](const StagePlan& s) { return num(s.total()); });
  o << "| capacity |";
  for (size_t i = 0; i < stages.size(); ++i) o << " " << (capacity > 0 ? num(capacity) : std::string("?")) << " |";
  o << "\n";
  return o.str();
}

MemoryPlan plan_memory(const ModelConfig& cfg, const std::vector<StageSpec>& stages, const ParallelLayout& layout,
                       int64_t capacity) {
  DSA_CHECK(layout.ranks >= 1 && layout.ep >= 1 && layout.ranks % layout.ep == 0, "[memory] ep ", layout.ep,
            " does not divide ", layout.ranks, " ranks");
  DSA_CHECK(cfg.n_routed_experts == 0 || cfg.n_routed_experts % layout.ep == 0, "[memory] ep ", layout.ep,
            " does not divide n_routed_experts = ", cfg.n_routed_experts);
  MemoryPlan plan;
  plan.layout = layout;
  plan.capacity = capacity;
  const int64_t E = std::max<int64_t>(cfg.n_routed_experts, 1);
  for (const ParamSpec& s : param_specs(cfg)) {
    const int64_t n = shape_numel(s.shape);
    plan.params_total += n;
    plan.params_held += layout.ep > 1 && is_routed_expert(s.name) ? n / E * (E / layout.ep) : n;
  }
  for (const StageSpec& st : stages) {
    StagePlan p;
    p.stage = st.name;
    const int64_t mb = st.micro_batch(layout.ranks);
    p.tokens = mb * st.seq_len;
    p.seq_len = st.seq_len;
    const StateBytes sb = state_bytes(cfg, st, layout);
    p.parameters = sb.parameters;
    p.gradients = sb.gradients;
    p.optimizer = sb.optimizer;
    p.gradients_in_flight = sb.in_flight;
    const ActivationBytes ab = activation_bytes(cfg, st, layout, mb);
    p.activations = ab.plain;
    p.activations_recompute = ab.recompute;
    p.workspace = ab.workspace + (layout.gpu ? kContextReserve : 0);
    p.recompute = st.recompute;
    plan.stages.push_back(p);
  }
  return plan;
}

namespace {

bool splits(const std::vector<StageSpec>& stages, int64_t ranks) {
  for (const StageSpec& s : stages)
    if (s.global_batch % (ranks * s.grad_accum) != 0) return false;
  return true;
}

std::vector<int64_t> ep_choices(const ModelConfig& cfg, int64_t ranks) {
  std::vector<int64_t> out;
  for (int64_t ep = 1; ep <= ranks; ep *= 2)
    if (ranks % ep == 0 && (ep == 1 || (cfg.n_routed_experts > 0 && cfg.n_routed_experts % ep == 0))) out.push_back(ep);
  return out;
}

std::vector<StageSpec> with_recompute(std::vector<StageSpec> stages) {
  for (StageSpec& s : stages) s.recompute = true;
  return stages;
}

}  // namespace

int64_t comm_bytes(const ModelConfig& cfg, const StageSpec& st, const ParallelLayout& L) {
  const int64_t E = std::max<int64_t>(cfg.n_routed_experts, 1);
  double ne = 0, ex = 0;  // elements held: everything but the routed experts, and this rank's experts
  for (const ParamSpec& s : param_specs(cfg)) {
    if (s.group == ParamGroup::Buffer) continue;
    const double n = static_cast<double>(shape_numel(s.shape));
    if (is_routed_expert(s.name))
      ex += n / static_cast<double>(E) * static_cast<double>(E / L.ep);
    else
      ne += n;
  }
  const double n = static_cast<double>(L.ranks), nr = static_cast<double>(L.ranks / L.ep);
  const double part = (n - 1) / n, part_r = (nr - 1) / nr, wb = L.gpu ? 2 : 4;
  double bytes = 0;
  if (L.zero < 2)
    bytes += 4 * (ne * 2 * part + ex * 2 * part_r);  // ring all-reduce of f32 gradients
  else
    bytes += 4 * (ne * part + ex * part_r);  // reduce-scatter
  if (L.zero > 0) bytes += wb * (ne * part + ex * part_r);  // all-gather of the weights
  if (L.ep > 1) {
    // Token rows to the experts' ranks and back, in the forward and in the backward, per MoE layer.
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) moe_layers += cfg.is_moe_layer(l);
    const double rows = static_cast<double>(st.micro_batch(L.ranks) * st.seq_len * cfg.num_experts_per_tok);
    bytes += 4 * rows * static_cast<double>(cfg.hidden_size) * wb * static_cast<double>(moe_layers) *
             static_cast<double>(L.ep - 1) / static_cast<double>(L.ep);
  }
  return static_cast<int64_t>(bytes);
}

bool choose_layout(const ModelConfig& cfg, const std::vector<StageSpec>& stages, int64_t ranks, bool gpu,
                   int64_t capacity, ParallelLayout* out, bool* recompute_all) {
  if (!splits(stages, ranks)) return false;
  for (bool rc : {false, true}) {
    bool found = false;
    int64_t best = 0;
    for (int64_t zero : {0, 1, 2})
      for (int64_t ep : ep_choices(cfg, ranks)) {
        const ParallelLayout L{ranks, ep, zero, gpu};
        if (!plan_memory(cfg, rc ? with_recompute(stages) : stages, L, capacity).fits()) continue;
        int64_t bytes = 0;
        for (const StageSpec& s : stages) bytes = std::max(bytes, comm_bytes(cfg, s, L));
        if (!found || bytes < best) {
          found = true;
          best = bytes;
          *out = L;
          *recompute_all = rc;
        }
      }
    if (found) return true;
  }
  return false;
}

std::vector<std::string> plan_suggestions(const ModelConfig& cfg, const std::vector<StageSpec>& stages,
                                          const ParallelLayout& layout, int64_t capacity) {
  std::vector<std::string> out;
  auto add = [&](const std::string& change, const MemoryPlan& p) {
    if (p.fits()) out.push_back(change + " (peak " + gib(p.peak()) + ")");
  };
  bool any_off = false;
  for (const StageSpec& s : stages) any_off = any_off || !s.recompute;
  if (any_off) add("stage_defaults.recompute=true", plan_memory(cfg, with_recompute(stages), layout, capacity));
  for (int64_t zero = layout.zero + 1; zero <= 2; ++zero) {
    ParallelLayout L = layout;
    L.zero = zero;
    add("parallelism.zero=" + std::to_string(zero), plan_memory(cfg, stages, L, capacity));
  }
  for (int64_t ep : ep_choices(cfg, layout.ranks)) {
    if (ep <= layout.ep) continue;
    ParallelLayout L = layout;
    L.ep = ep;
    add("parallelism.ep=" + std::to_string(ep), plan_memory(cfg, stages, L, capacity));
  }
  for (int64_t ranks = layout.ranks * 2; ranks <= 1024; ranks *= 2) {
    // global_batch grows to a sequence per rank where it does not split over the ranks.
    std::vector<StageSpec> wider = stages;
    bool grew = false;
    for (StageSpec& s : wider)
      if (s.global_batch % (ranks * s.grad_accum)) {
        s.global_batch = ranks * s.grad_accum;
        grew = true;
      }
    ParallelLayout L;
    bool rc = false;
    if (!choose_layout(cfg, wider, ranks, layout.gpu, capacity, &L, &rc)) continue;
    add(std::to_string(ranks) + " ranks with parallelism.zero=" + std::to_string(L.zero) + " parallelism.ep=" +
            std::to_string(L.ep) + (rc ? " stage_defaults.recompute=true" : "") +
            (grew ? " (global_batch " + std::to_string(wider.front().global_batch) + ")" : ""),
        plan_memory(cfg, rc ? with_recompute(wider) : wider, L, capacity));
    break;
  }
  std::vector<StageSpec> shorter = stages;
  for (int halvings = 1; halvings <= 6; ++halvings) {
    bool ok = true;
    for (StageSpec& s : shorter) {
      ok = ok && s.seq_len >= 2;
      s.seq_len /= 2;
    }
    if (!ok) break;
    const MemoryPlan p = plan_memory(cfg, shorter, layout, capacity);
    if (p.fits()) {
      add("seq_len / " + std::to_string(1 << halvings) + " (stage_defaults.seq_len=" +
              std::to_string(shorter.front().seq_len) + ")",
          p);
      break;
    }
  }
  return out;
}

ParallelLayout recipe_layout(const Recipe& recipe, int64_t ranks, bool gpu) {
  ParallelLayout L;
  L.ranks = recipe.parallel.dp > 0 ? recipe.parallel.dp : ranks;
  L.ep = recipe.parallel.ep;
  L.zero = recipe.parallel.zero;
  L.gpu = gpu;
  return L;
}

std::string memory_report(const ModelConfig& cfg, const std::vector<StageSpec>& stages, const MemoryPlan& plan) {
  const ParallelLayout& L = plan.layout;
  std::ostringstream o;
  auto count = [](int64_t n) {
    char b[32];
    if (n >= 1000000000)
      std::snprintf(b, sizeof b, "%.2fB", static_cast<double>(n) / 1e9);
    else
      std::snprintf(b, sizeof b, "%.2fM", static_cast<double>(n) / 1e6);
    return std::string(b);
  };
  char head[256];
  std::snprintf(head, sizeof head, "[memory] plan per rank: %s parameters (%s held by a rank), %lld %s rank%s, ep %lld, zero %lld\n",
                count(plan.params_total).c_str(), count(plan.params_held).c_str(), static_cast<long long>(L.ranks),
                L.gpu ? "GPU" : "CPU", L.ranks > 1 ? "s" : "", static_cast<long long>(L.ep),
                static_cast<long long>(L.zero));
  o << head << plan.table();
  if (plan.capacity <= 0) {
    o << "[memory] capacity unknown: no verdict\n";
    return o.str();
  }
  for (const StagePlan& s : plan.stages)
    if (s.total() > plan.capacity)
      o << "[memory] stage " << s.stage << " does not fit: " << gib(s.total()) << " per rank, the "
        << (L.gpu ? "GPU has " : "host has ") << gib(plan.capacity) << "\n";
  if (plan.fits()) {
    o << "[memory] fits: peak " << gib(plan.peak()) << " of " << gib(plan.capacity) << "\n";
    return o.str();
  }
  const std::vector<std::string> fixes = plan_suggestions(cfg, stages, L, plan.capacity);
  if (fixes.empty()) o << "[memory] nothing tried fits (recompute, zero, ep, up to 1024 ranks, seq_len / 64)\n";
  for (const std::string& f : fixes) o << "[memory] would fit with " << f << "\n";
  return o.str();
}

int64_t rank_capacity(bool gpu, int ranks_per_node) {
  if (gpu) return static_cast<int64_t>(cuda::device_memory().total);
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return 0;
  return static_cast<int64_t>(pages) * page / std::max(ranks_per_node, 1);
}

}  // namespace dsa

namespace dsa {

namespace {
int64_t allocated(bool gpu, bool peak) {
  if (gpu) {
    const cuda::AllocatorStats st = cuda::allocator_stats();
    return static_cast<int64_t>(peak ? st.peak_in_use : st.in_use);
  }
  const HostMemoryStats st = host_memory_stats();
  return static_cast<int64_t>(peak ? st.peak_in_use : st.in_use);
}

std::string error_pct(int64_t plan, int64_t measured) {
  char b[32];
  std::snprintf(b, sizeof b, "%+.1f%%", measured > 0 ? 100.0 * (static_cast<double>(plan) - measured) / measured : 0.0);
  return b;
}
}  // namespace

void report_state_memory(const StagePlan& plan, bool gpu) {
  const int64_t measured = allocated(gpu, false);
  const int64_t planned = plan.state() - plan.gradients_in_flight;
  const char* every = std::getenv("DSA_REPORT_RANK_MEMORY");
  if (Dist::is_root() || (every && std::string(every) == "1"))
    std::printf("[memory] rank %d stage %s: state allocated %lld bytes, plan %lld (parameters %lld, gradients %lld, "
                "optimizer %lld)\n",
                Dist::rank(), plan.stage.c_str(), static_cast<long long>(measured), static_cast<long long>(planned),
                static_cast<long long>(plan.parameters), static_cast<long long>(plan.gradients - plan.gradients_in_flight),
                static_cast<long long>(plan.optimizer));
  std::fflush(stdout);
  if (gpu)
    cuda::reset_peak();
  else
    reset_host_peak();
}

void report_peak_memory(const StagePlan& plan, bool gpu) {
  const int64_t measured = allocated(gpu, true);
  // The allocator does not see the GPU's context reserve.
  const int64_t planned = plan.total() - (gpu ? kContextReserve : 0);
  if (!Dist::is_root()) return;
  std::string device;
  if (gpu) {
    const cuda::DeviceMemory m = cuda::device_memory();
    const cuda::AllocatorStats st = cuda::allocator_stats();
    device = ", allocator reserved " + gib(static_cast<int64_t>(st.reserved)) + ", device used " +
             gib(static_cast<int64_t>(m.total - m.free)) + " of " + gib(static_cast<int64_t>(m.total));
  }
  std::printf("[memory] stage %s: peak allocated %s (%lld bytes), plan %s (%lld bytes), plan error %s%s\n",
              plan.stage.c_str(), gib(measured).c_str(), static_cast<long long>(measured), gib(planned).c_str(),
              static_cast<long long>(planned), error_pct(planned, measured).c_str(), device.c_str());
  std::fflush(stdout);
}

}  // namespace dsa
