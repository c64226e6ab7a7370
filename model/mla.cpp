#include "model/mla.h"

#include "kernels/dsa_ops.h"
#include "kernels/layout_ops.h"
#include "kernels/ops.h"
#include "model/profile.h"

namespace dsa {

namespace {

constexpr double kLatentNormEps = 1e-6;  // q_a_layernorm and kv_a_layernorm use RMSNorm's default eps

struct Dims {
  int64_t N, D, H, dn, dr, dv, dk, kvl, ql;
};
Dims dims_of(const ModelConfig& c, int64_t N) {
  return Dims{N, c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
              c.qk_head_dim(), c.kv_lora_rank, c.q_lora_rank};
}

// MLA's RoPE pairing: DeepSeek's interleaved pairs, or rotate-half with rope_interleave false.
ops::RopeStyle mla_rope(const ModelConfig& c) {
  return c.rope_interleave ? ops::RopeStyle::Interleaved : ops::RopeStyle::RotateHalf;
}

}  // namespace

void mla_prepare(const ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const Tensor& x,
                 MlaCache& c) {
  expect_shape("mla", "x", x, {-1, cfg.hidden_size});
  const std::string a = prefix + "self_attn.";
  c = MlaCache{};
  c.x = x;
  if (!cfg.has_q_lora()) return;  // the query comes straight from x (q_proj) in mla_forward
  c.cq_pre = ops::linear_forward(x, ps.w(a + "q_a_proj.weight"));
  c.cq = ops::rmsnorm_forward(c.cq_pre, ps.w(a + "q_a_layernorm.weight"), kLatentNormEps, &c.cq_rstd);
}

Tensor mla_forward(const ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                   const Tensor& positions, int64_t B, int64_t T, const Tensor& x, MlaForm form,
                   const Tensor* sparse_indices, MlaCache& c) {
  const Dims d = dims_of(cfg, B * T);
  expect_shape("mla", "x", x, {d.N, d.D});
  DSA_CHECK(c.x.defined() && c.x.same_storage(x), "[mla] mla_prepare must run on the same input first");
  DSA_CHECK(!sparse_indices || form == MlaForm::MQA, "[mla] sparse attention runs in the MQA (absorbed) form");
  const std::string a = prefix + "self_attn.";
  c.B = B;
  c.T = T;
  c.form = form;
  c.sparse = sparse_indices != nullptr;

  // Query path: c_q (low rank, normed, from mla_prepare) -> per-head [nope | rope]; without a query
  // LoRA, x -> q_proj -> per-head [nope | rope].
  c.q = (cfg.has_q_lora() ? ops::linear_forward(c.cq, ps.w(a + "q_b_proj.weight"))
                          : ops::linear_forward(x, ps.w(a + "q_proj.weight")))
            .view({d.N, d.H, d.dk});
  ops::rope_forward_(c.q, positions, rope.cos, rope.sin, d.dn, mla_rope(cfg));

  // Key/value latent: x -> [c_kv | k_pe]; c_kv normed, k_pe roped (one per token, shared by heads).
  c.kva = ops::linear_forward(x, ps.w(a + "kv_a_proj_with_mqa.weight"));
  c.ckv = ops::rmsnorm_forward(ops::narrow(c.kva, 1, 0, d.kvl), ps.w(a + "kv_a_layernorm.weight"), kLatentNormEps,
                               &c.ckv_rstd);
  c.kpe = ops::narrow(c.kva, 1, d.kvl, d.kvl + d.dr).view({d.N, 1, d.dr});
  ops::rope_forward_(c.kpe, positions, rope.cos, rope.sin, 0, mla_rope(cfg));

  const double scale = cfg.attention_scale();
  const Tensor& w_kvb = ps.w(a + "kv_b_proj.weight");  // [H*(dn+dv), kvl]
  if (form == MlaForm::MHA) {
    Tensor kvb = ops::linear_forward(c.ckv, w_kvb).view({d.N, d.H, d.dn + d.dv});
    Tensor k = Tensor::zeros({d.N, d.H, d.dk}, x.dtype(), x.device());
    ops::narrow_accumulate_(k, ops::narrow(kvb, 2, 0, d.dn), 2, 0);
    ops::narrow_accumulate_(k, ops::repeat_dim1(c.kpe, d.H), 2, d.dn);
    c.k = k.view({B, T, d.H, d.dk});
    c.v = ops::narrow(kvb, 2, d.dn, d.dn + d.dv).view({B, T, d.H, d.dv});
    {
      ProfileScope ps_("attention");
      c.attn = ops::attention_forward(c.q.view({B, T, d.H, d.dk}), c.k, c.v, scale, &c.lse);
    }
    c.o = c.attn.view({d.N, d.H * d.dv});
  } else {
    // Absorb W_uk into the query: q_lat_h = q_nope_h @ W_uk_h, W_uk_h = kv_b_proj rows of head h's keys.
    Tensor w3 = w_kvb.view({d.H, d.dn + d.dv, d.kvl});
    Tensor w_uk = ops::narrow(w3, 1, 0, d.dn);           // [H, dn, kvl]
    Tensor w_uv = ops::narrow(w3, 1, d.dn, d.dn + d.dv); // [H, dv, kvl]
    Tensor qn_t = ops::transpose01(ops::narrow(c.q, 2, 0, d.dn));  // [H, N, dn]
    Tensor ql_t = Tensor::empty({d.H, d.N, d.kvl}, x.dtype(), x.device());
    ops::gemm(qn_t, false, w_uk, false, ql_t);
    c.q_abs = ops::concat_last(ops::transpose01(ql_t), ops::narrow(c.q, 2, d.dn, d.dk)).view({B, T, d.H, d.kvl + d.dr});
    c.kv_lat = ops::concat_last(c.ckv, c.kpe.view({d.N, d.dr})).view({B, T, d.kvl + d.dr});
    if (c.sparse) {
      ProfileScope ps_("attention");
      c.indices = *sparse_indices;
      c.attn = ops::sparse_attention_forward(c.q_abs, c.kv_lat, d.kvl, c.indices, scale, &c.lse,
                                             c.probs_in_forward ? &c.probs_sum : nullptr);
    } else {
      ProfileScope ps_("attention");
      c.attn = ops::attention_forward(c.q_abs, c.kv_lat.view({B, T, 1, d.kvl + d.dr}), c.ckv.view({B, T, 1, d.kvl}),
                                      scale, &c.lse);
    }
    // Un-absorb the values: o_h = o_lat_h @ W_uv_h^T.
    Tensor ol_t = ops::transpose01(c.attn.view({d.N, d.H, d.kvl}));  // [H, N, kvl]
    Tensor o_t = Tensor::empty({d.H, d.N, d.dv}, x.dtype(), x.device());
    ops::gemm(ol_t, false, w_uv, true, o_t);
    c.o = ops::transpose01(o_t).view({d.N, d.H * d.dv});
  }
  return ops::linear_forward(c.o, ps.w(a + "o_proj.weight"));
}

Tensor mla_backward(ParamStore& ps, const std::string& prefix, const ModelConfig& cfg, const RopeTables& rope,
                    const Tensor& positions, const Tensor& dout, const MlaCache& c, const Tensor* dcq_extra,
                    Tensor* probs_sum_out) {
  const int64_t B = c.B, T = c.T;
  const Dims d = dims_of(cfg, B * T);
  expect_shape("mla_backward", "dout", dout, {d.N, d.D});
  const std::string a = prefix + "self_attn.";
  const double scale = cfg.attention_scale();
  const DType dt = dout.dtype();
  const Device dev = dout.device();

  Tensor d_o = ops::linear_backward(dout, c.o, ps.w(a + "o_proj.weight"), &ps.grad(a + "o_proj.weight"));
  const Tensor& w_kvb = ps.w(a + "kv_b_proj.weight");
  Tensor& dw_kvb = ps.grad(a + "kv_b_proj.weight");
  Tensor dq = Tensor::zeros({d.N, d.H, d.dk}, dt, dev);  // gradient at q after rope
  Tensor dckv, dkpe;                                       // [N, kvl], [N, 1, dr]

  if (c.form == MlaForm::MHA) {
    ops::AttentionGrads g;
    {
      ProfileScope ps_("attention");
      g = ops::attention_backward(d_o.view({B, T, d.H, d.dv}), c.q.view({B, T, d.H, d.dk}), c.k, c.v, c.attn, c.lse,
                                  scale);
    }
    ops::add_(dq, g.dq.view({d.N, d.H, d.dk}));
    Tensor dk = g.dk.view({d.N, d.H, d.dk});
    Tensor dkvb = Tensor::zeros({d.N, d.H, d.dn + d.dv}, dt, dev);
    ops::narrow_accumulate_(dkvb, ops::narrow(dk, 2, 0, d.dn), 2, 0);
    ops::narrow_accumulate_(dkvb, g.dv.view({d.N, d.H, d.dv}), 2, d.dn);
    dkpe = ops::sum_dim1(ops::narrow(dk, 2, d.dn, d.dk));
    dckv = ops::linear_backward(dkvb.view({d.N, d.H * (d.dn + d.dv)}), c.ckv, w_kvb, &dw_kvb);
  } else {
    Tensor w3 = w_kvb.view({d.H, d.dn + d.dv, d.kvl});
    Tensor w_uk = ops::narrow(w3, 1, 0, d.dn);
    Tensor w_uv = ops::narrow(w3, 1, d.dn, d.dn + d.dv);
    Tensor dw3 = dw_kvb.view({d.H, d.dn + d.dv, d.kvl});
    // o = o_lat W_uv^T per head.
    Tensor do_t = ops::transpose01(d_o.view({d.N, d.H, d.dv}));  // [H, N, dv]
    Tensor ol_t = ops::transpose01(c.attn.view({d.N, d.H, d.kvl}));
    Tensor dol_t = Tensor::empty({d.H, d.N, d.kvl}, dt, dev);
    ops::gemm(do_t, false, w_uv, false, dol_t);
    Tensor dw_uv = Tensor::empty({d.H, d.dv, d.kvl}, dw_kvb.dtype(), dev);  // weight grads: master precision
    ops::gemm(do_t, true, ol_t, false, dw_uv);
    ops::narrow_accumulate_(dw3, dw_uv, 1, d.dn);
    Tensor dattn = ops::transpose01(dol_t).view({B, T, d.H, d.kvl});
    Tensor dq_abs, dkv_lat;  // [B, T, H, kvl+dr], [B, T, kvl+dr] (value gradient folded in)
    if (c.sparse) {
      ProfileScope ps_("attention");
      ops::SparseAttentionGrads g = ops::sparse_attention_backward(dattn, c.q_abs, c.kv_lat, d.kvl, c.indices, c.attn,
                                                                   c.lse, scale, probs_sum_out != nullptr);
      dq_abs = g.dq;
      dkv_lat = g.dkv;
      if (probs_sum_out) *probs_sum_out = g.probs_sum;
    } else {
      ProfileScope ps_("attention");
      ops::AttentionGrads g = ops::attention_backward(dattn, c.q_abs, c.kv_lat.view({B, T, 1, d.kvl + d.dr}),
                                                      c.ckv.view({B, T, 1, d.kvl}), c.attn, c.lse, scale);
      dq_abs = g.dq;
      dkv_lat = g.dk.view({B, T, d.kvl + d.dr});
      Tensor dkv_flat = dkv_lat.view({d.N, d.kvl + d.dr});
      ops::narrow_accumulate_(dkv_flat, g.dv.view({d.N, d.kvl}), 1, 0);
    }
    Tensor dkv_flat = dkv_lat.view({d.N, d.kvl + d.dr});
    dckv = ops::narrow(dkv_flat, 1, 0, d.kvl);
    dkpe = ops::narrow(dkv_flat, 1, d.kvl, d.kvl + d.dr).view({d.N, 1, d.dr});
    // q_abs = [q_nope W_uk | q_pe]
    Tensor dqa = dq_abs.view({d.N, d.H, d.kvl + d.dr});
    Tensor dql_t = ops::transpose01(ops::narrow(dqa, 2, 0, d.kvl));  // [H, N, kvl]
    Tensor qn_t = ops::transpose01(ops::narrow(c.q, 2, 0, d.dn));    // [H, N, dn]
    Tensor dqn_t = Tensor::empty({d.H, d.N, d.dn}, dt, dev);
    ops::gemm(dql_t, false, w_uk, true, dqn_t);
    Tensor dw_uk = Tensor::empty({d.H, d.dn, d.kvl}, dw_kvb.dtype(), dev);
    ops::gemm(qn_t, true, dql_t, false, dw_uk);
    ops::narrow_accumulate_(dw3, dw_uk, 1, 0);
    ops::narrow_accumulate_(dq, ops::transpose01(dqn_t), 2, 0);
    ops::narrow_accumulate_(dq, ops::narrow(dqa, 2, d.kvl, d.kvl + d.dr), 2, d.dn);
  }

  // Query path back to x.
  ops::rope_backward_(dq, positions, rope.cos, rope.sin, d.dn, mla_rope(cfg));
  Tensor dx;
  if (cfg.has_q_lora()) {
    Tensor dcq = ops::linear_backward(dq.view({d.N, d.H * d.dk}), c.cq, ps.w(a + "q_b_proj.weight"),
                                      &ps.grad(a + "q_b_proj.weight"));
    if (dcq_extra) ops::add_(dcq, *dcq_extra);
    Tensor dcq_pre = ops::rmsnorm_backward(dcq, c.cq_pre, ps.w(a + "q_a_layernorm.weight"), c.cq_rstd,
                                           &ps.grad(a + "q_a_layernorm.weight"));
    dx = ops::linear_backward(dcq_pre, c.x, ps.w(a + "q_a_proj.weight"), &ps.grad(a + "q_a_proj.weight"));
  } else {
    DSA_CHECK(!dcq_extra, "[mla] a query-latent gradient for a model without a query LoRA");
    dx = ops::linear_backward(dq.view({d.N, d.H * d.dk}), c.x, ps.w(a + "q_proj.weight"), &ps.grad(a + "q_proj.weight"));
  }

  // Latent path back to x.
  ops::rope_backward_(dkpe, positions, rope.cos, rope.sin, 0, mla_rope(cfg));
  Tensor dkva = Tensor::zeros({d.N, d.kvl + d.dr}, dt, dev);
  ops::narrow_accumulate_(dkva,
                          ops::rmsnorm_backward(dckv, ops::narrow(c.kva, 1, 0, d.kvl), ps.w(a + "kv_a_layernorm.weight"),
                                                c.ckv_rstd, &ps.grad(a + "kv_a_layernorm.weight")),
                          1, 0);
  ops::narrow_accumulate_(dkva, dkpe.view({d.N, d.dr}), 1, d.kvl);
  ops::add_(dx, ops::linear_backward(dkva, c.x, ps.w(a + "kv_a_proj_with_mqa.weight"),
                                     &ps.grad(a + "kv_a_proj_with_mqa.weight")));
  return dx;
}

}  // namespace dsa
