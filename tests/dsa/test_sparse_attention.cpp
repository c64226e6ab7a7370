// Sparse MQA attention: equals dense causal attention when the index sets cover everything (outputs,
// lse and all gradients, random sizes); the absorbed MQA form over the latent rows equals the MHA form
// with per-head keys [k_nope_h | k_pe] masked to the same sets; finite differences with duplicated and
// -1 indices. The dense references are naive loops written here, themselves checked by finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>

#include "kernels/dsa_ops.h"
#include "tests/test_util.h"

using namespace dsa;
using dsa::testing::all_close;
using dsa::testing::dot;
using dsa::testing::grad_check;
using dsa::testing::randn;

namespace {
using MaskFn = std::function<bool(int64_t b, int64_t t, int64_t s)>;

// Naive masked attention in MHA/GQA form, f64: q [B,T,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv].
struct Naive {
  Tensor out, lse;     // [B,T,H,Dv], [B,H,T]
  Tensor dq, dk, dv;   // filled by backward()
};
Naive naive_forward(const Tensor& q, const Tensor& k, const Tensor& v, const MaskFn& mask, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2), Dv = v.size(3);
  Naive n{Tensor::zeros({B, T, H, Dv}, DType::F64), Tensor::empty({B, H, T}, DType::F64), {}, {}, {}};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / (H / Hk);
        std::vector<double> sc(static_cast<size_t>(T), -std::numeric_limits<double>::infinity());
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t s = 0; s < T; ++s) {
          if (!mask(b, t, s)) continue;
          double z = 0;
          for (int64_t i = 0; i < Dk; ++i) z += q.item(((b * T + t) * H + h) * Dk + i) * k.item(((b * T + s) * Hk + g) * Dk + i);
          sc[s] = scale * z;
          m = std::max(m, sc[s]);
        }
        double sum = 0;
        for (int64_t s = 0; s < T; ++s) sum += std::isinf(sc[s]) ? 0 : std::exp(sc[s] - m);
        n.lse.set_item((b * H + h) * T + t, m + std::log(sum));
        for (int64_t s = 0; s < T; ++s) {
          if (std::isinf(sc[s])) continue;
          const double p = std::exp(sc[s] - m) / sum;
          for (int64_t i = 0; i < Dv; ++i) {
            const int64_t o = ((b * T + t) * H + h) * Dv + i;
            n.out.set_item(o, n.out.item(o) + p * v.item(((b * T + s) * Hk + g) * Dv + i));
          }
        }
      }
  return n;
}

void naive_backward(Naive& n, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                    const MaskFn& mask, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2), Dv = v.size(3);
  n.dq = Tensor::zeros(q.shape(), DType::F64);
  n.dk = Tensor::zeros(k.shape(), DType::F64);
  n.dv = Tensor::zeros(v.shape(), DType::F64);
  auto add = [](Tensor& t, int64_t i, double x) { t.set_item(i, t.item(i) + x); };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / (H / Hk), qo = ((b * T + t) * H + h);
        double delta = 0;
        for (int64_t i = 0; i < Dv; ++i) delta += dout.item(qo * Dv + i) * n.out.item(qo * Dv + i);
        for (int64_t s = 0; s < T; ++s) {
          if (!mask(b, t, s)) continue;
          const int64_t ko = (b * T + s) * Hk + g;
          double z = 0, dp = 0;
          for (int64_t i = 0; i < Dk; ++i) z += q.item(qo * Dk + i) * k.item(ko * Dk + i);
          for (int64_t i = 0; i < Dv; ++i) dp += dout.item(qo * Dv + i) * v.item(ko * Dv + i);
          const double p = std::exp(scale * z - n.lse.item((b * H + h) * T + t)), ds = p * (dp - delta) * scale;
          for (int64_t i = 0; i < Dk; ++i) {
            add(n.dq, qo * Dk + i, ds * k.item(ko * Dk + i));
            add(n.dk, ko * Dk + i, ds * q.item(qo * Dk + i));
          }
          for (int64_t i = 0; i < Dv; ++i) add(n.dv, ko * Dv + i, p * dout.item(qo * Dv + i));
        }
      }
}

// Per row: a random permutation of the valid s (from `keep`), -1 slots sprinkled in, K slots.
Tensor random_indices(int64_t B, int64_t T, int64_t K, uint64_t seed, const MaskFn& keep) {
  std::mt19937_64 rng(seed);
  Tensor idx = Tensor::empty({B, T, K}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> row;
      for (int64_t s = 0; s <= t; ++s)
        if (keep(b, t, s)) row.push_back(static_cast<int32_t>(s));
      EXPECT_LE(static_cast<int64_t>(row.size()), K);
      row.resize(static_cast<size_t>(K), -1);
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), idx.data<int32_t>() + (b * T + t) * K);
    }
  return idx;
}

MaskFn membership(const Tensor& idx) {
  return [idx](int64_t b, int64_t t, int64_t s) {
    const int64_t T = idx.size(1), K = idx.size(2);
    for (int64_t k = 0; k < K; ++k)
      if (idx.data<int32_t>()[(b * T + t) * K + k] == s) return true;
    return false;
  };
}

// [B, T, D] -> [B, T, 1, D] copy of the first n dims.
Tensor heads1(const Tensor& x, int64_t n) {
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  Tensor y = Tensor::empty({B, T, 1, n}, DType::F64);
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t i = 0; i < n; ++i) y.set_item(r * n + i, x.item(r * D + i));
  return y;
}
}  // namespace

TEST(SparseAttention, NaiveReferenceBackwardMatchesFiniteDifferences) {
  Tensor q = randn({1, 5, 2, 3}, 1), k = randn({1, 5, 2, 3}, 2), v = randn({1, 5, 2, 2}, 3);
  const Tensor g = randn({1, 5, 2, 2}, 4);
  const MaskFn causal = [](int64_t, int64_t t, int64_t s) { return s <= t; };
  Naive n = naive_forward(q, k, v, causal, 0.7);
  naive_backward(n, g, q, k, v, causal, 0.7);
  auto loss = [&] { return dot(naive_forward(q, k, v, causal, 0.7).out, g); };
  EXPECT_TRUE(grad_check("q", q, n.dq, loss));
  EXPECT_TRUE(grad_check("k", k, n.dk, loss));
  EXPECT_TRUE(grad_check("v", v, n.dv, loss));
}

TEST(SparseAttention, EqualsDenseCausalWhenTheSetsCoverEverything) {
  std::mt19937_64 rng(123);
  for (int trial = 0; trial < 6; ++trial) {
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const int64_t B = pick(1, 2), T = pick(1, 12), H = pick(1, 4), Dv = pick(1, 6), Dk = Dv + pick(0, 4);
    const int64_t K = T + pick(0, 3);  // k >= L, extra slots are -1
    const double scale = 1.0 / std::sqrt(double(Dk));
    const Tensor q = randn({B, T, H, Dk}, 10 + trial), kv = randn({B, T, Dk}, 20 + trial);
    const Tensor g = randn({B, T, H, Dv}, 30 + trial);
    const MaskFn causal = [](int64_t, int64_t t, int64_t s) { return s <= t; };
    const Tensor idx = random_indices(B, T, K, 40 + trial, causal);

    Tensor lse;
    const Tensor out = ops::sparse_attention_forward(q, kv, Dv, idx, scale, &lse);
    const ops::SparseAttentionGrads sg = ops::sparse_attention_backward(g, q, kv, Dv, idx, out, lse, scale);

    const Tensor k1 = heads1(kv, Dk), v1 = heads1(kv, Dv);
    Naive n = naive_forward(q, k1, v1, causal, scale);
    naive_backward(n, g, q, k1, v1, causal, scale);
    Tensor dkv = Tensor::zeros(kv.shape(), DType::F64);  // the key and value halves of one latent row
    for (int64_t r = 0; r < B * T; ++r) {
      for (int64_t i = 0; i < Dk; ++i) dkv.set_item(r * Dk + i, n.dk.item(r * Dk + i));
      for (int64_t i = 0; i < Dv; ++i) dkv.set_item(r * Dk + i, dkv.item(r * Dk + i) + n.dv.item(r * Dv + i));
    }
    SCOPED_TRACE(::testing::Message() << "B " << B << " T " << T << " H " << H << " Dk " << Dk << " Dv " << Dv
                                      << " K " << K);
    EXPECT_TRUE(all_close(out, n.out, 1e-10, 1e-12));
    EXPECT_TRUE(all_close(lse, n.lse, 1e-10, 1e-12));
    EXPECT_TRUE(all_close(sg.dq, n.dq, 1e-9, 1e-12));
    EXPECT_TRUE(all_close(sg.dkv, dkv, 1e-9, 1e-12));
  }
}

TEST(SparseAttention, GradientsWithDuplicatesAndMinusOneMatchFiniteDifferences) {
  const int64_t B = 2, T = 7, H = 3, Dk = 5, Dv = 3, K = 4;
  Tensor q = randn({B, T, H, Dk}, 50), kv = randn({B, T, Dk}, 51);
  const Tensor g = randn({B, T, H, Dv}, 52);
  std::mt19937_64 rng(53);
  Tensor idx = Tensor::empty({B, T, K}, DType::I32);
  for (int64_t r = 0; r < B * T; ++r) {
    const int64_t t = r % T;
    for (int64_t k = 0; k < K; ++k)  // -1 about a fifth of the time, duplicates likely
      idx.data<int32_t>()[r * K + k] =
          rng() % 5 == 0 ? -1 : static_cast<int32_t>(rng() % static_cast<uint64_t>(t + 1));
  }
  idx.data<int32_t>()[(1 * T + 6) * K + 0] = 2;  // a certain duplicate
  idx.data<int32_t>()[(1 * T + 6) * K + 1] = 2;
  const double scale = 0.45;
  Tensor lse;
  const Tensor out = ops::sparse_attention_forward(q, kv, Dv, idx, scale, &lse);
  const ops::SparseAttentionGrads sg = ops::sparse_attention_backward(g, q, kv, Dv, idx, out, lse, scale);
  auto loss = [&] {
    const Tensor o = ops::sparse_attention_forward(q, kv, Dv, idx, scale, nullptr);
    double l = 0;
    for (int64_t i = 0; i < o.numel(); ++i) l += o.item(i) * g.item(i);
    return l;
  };
  EXPECT_TRUE(grad_check("q", q, sg.dq, loss));
  EXPECT_TRUE(grad_check("kv", kv, sg.dkv, loss));

  // The backward's head-summed probabilities equal the forward's (duplicates: one term per slot, -1: 0),
  // and asking for them changes neither gradient.
  Tensor ps;
  ops::sparse_attention_forward(q, kv, Dv, idx, scale, nullptr, &ps);
  const ops::SparseAttentionGrads sp = ops::sparse_attention_backward(g, q, kv, Dv, idx, out, lse, scale, true);
  ASSERT_EQ(sp.probs_sum.shape(), ps.shape());
  for (int64_t i = 0; i < ps.numel(); ++i) EXPECT_NEAR(sp.probs_sum.item(i), ps.item(i), 1e-12) << "slot " << i;
  EXPECT_EQ(sp.probs_sum.item((1 * T + 6) * K + 0), sp.probs_sum.item((1 * T + 6) * K + 1));
  for (int64_t i = 0; i < sg.dq.numel(); ++i) ASSERT_EQ(sp.dq.item(i), sg.dq.item(i));
  for (int64_t i = 0; i < sg.dkv.numel(); ++i) ASSERT_EQ(sp.dkv.item(i), sg.dkv.item(i));
}

TEST(SparseAttention, MqaOverLatentRowsEqualsMhaWithPerHeadKeys) {
  // MLA sizes: nope Dn, rope R, kv_lora Dc, value head Dvh.
  const int64_t B = 2, T = 10, H = 3, Dn = 4, R = 2, Dc = 6, Dvh = 5, K = 4;
  const double scale = 1.0 / std::sqrt(double(Dn + R));
  const Tensor c_kv = randn({B, T, Dc}, 60), k_pe = randn({B, T, R}, 61);
  const Tensor q_nope = randn({B, T, H, Dn}, 62), q_pe = randn({B, T, H, R}, 63);
  const Tensor w_uk = randn({H, Dn, Dc}, 64, 0.5), w_uv = randn({H, Dvh, Dc}, 65, 0.5);
  std::mt19937_64 rng(66);
  const Tensor idx = random_indices(B, T, K, 67, [&](int64_t, int64_t t, int64_t s) {
    return s == t || (s < t && rng() % 4 == 0 && s + 2 >= t);  // at most 3 of s <= t: fits in K = 4
  });
  const MaskFn in_set = membership(idx);

  // MHA form: per-head keys [W_uk_h c_kv | k_pe], values W_uv_h c_kv, queries [q_nope | q_pe].
  Tensor q_mha = Tensor::empty({B, T, H, Dn + R}, DType::F64), k_mha = Tensor::empty({B, T, H, Dn + R}, DType::F64);
  Tensor v_mha = Tensor::empty({B, T, H, Dvh}, DType::F64);
  // MQA form: q_lat_h = [W_uk_h^T q_nope_h | q_pe_h], kv = [c_kv | k_pe].
  Tensor q_lat = Tensor::empty({B, T, H, Dc + R}, DType::F64), kv = Tensor::empty({B, T, Dc + R}, DType::F64);
  for (int64_t r = 0; r < B * T; ++r) {
    for (int64_t i = 0; i < Dc; ++i) kv.set_item(r * (Dc + R) + i, c_kv.item(r * Dc + i));
    for (int64_t i = 0; i < R; ++i) kv.set_item(r * (Dc + R) + Dc + i, k_pe.item(r * R + i));
    for (int64_t h = 0; h < H; ++h) {
      const int64_t rh = r * H + h;
      for (int64_t n = 0; n < Dn; ++n) {
        double kn = 0;
        for (int64_t c = 0; c < Dc; ++c) kn += w_uk.item((h * Dn + n) * Dc + c) * c_kv.item(r * Dc + c);
        k_mha.set_item(rh * (Dn + R) + n, kn);
        q_mha.set_item(rh * (Dn + R) + n, q_nope.item(rh * Dn + n));
      }
      for (int64_t i = 0; i < R; ++i) {
        k_mha.set_item(rh * (Dn + R) + Dn + i, k_pe.item(r * R + i));
        q_mha.set_item(rh * (Dn + R) + Dn + i, q_pe.item(rh * R + i));
        q_lat.set_item(rh * (Dc + R) + Dc + i, q_pe.item(rh * R + i));
      }
      for (int64_t e = 0; e < Dvh; ++e) {
        double vv = 0;
        for (int64_t c = 0; c < Dc; ++c) vv += w_uv.item((h * Dvh + e) * Dc + c) * c_kv.item(r * Dc + c);
        v_mha.set_item(rh * Dvh + e, vv);
      }
      for (int64_t c = 0; c < Dc; ++c) {
        double ql = 0;
        for (int64_t n = 0; n < Dn; ++n) ql += w_uk.item((h * Dn + n) * Dc + c) * q_nope.item(rh * Dn + n);
        q_lat.set_item(rh * (Dc + R) + c, ql);
      }
    }
  }
  const Tensor g = randn({B, T, H, Dvh}, 68);
  Naive mha = naive_forward(q_mha, k_mha, v_mha, in_set, scale);
  naive_backward(mha, g, q_mha, k_mha, v_mha, in_set, scale);

  Tensor lse;
  const Tensor o_lat = ops::sparse_attention_forward(q_lat, kv, Dc, idx, scale, &lse);  // [B,T,H,Dc]
  Tensor o = Tensor::zeros({B, T, H, Dvh}, DType::F64), g_lat = Tensor::zeros({B, T, H, Dc}, DType::F64);
  for (int64_t rh = 0; rh < B * T * H; ++rh) {
    const int64_t h = rh % H;
    for (int64_t e = 0; e < Dvh; ++e)
      for (int64_t c = 0; c < Dc; ++c) {
        const double w = w_uv.item((h * Dvh + e) * Dc + c);
        o.set_item(rh * Dvh + e, o.item(rh * Dvh + e) + w * o_lat.item(rh * Dc + c));
        g_lat.set_item(rh * Dc + c, g_lat.item(rh * Dc + c) + w * g.item(rh * Dvh + e));
      }
  }
  EXPECT_TRUE(all_close(o, mha.out, 1e-10, 1e-12));
  EXPECT_TRUE(all_close(lse, mha.lse, 1e-10, 1e-12));

  // Gradients agree too: dq_nope = W_uk dq_lat[:Dc], dq_pe = dq_lat[Dc:], dk_pe = dkv[Dc:] = sum_h dk_h[Dn:],
  // dc_kv = dkv[:Dc] = sum_h W_uk_h^T dk_nope_h + W_uv_h^T dv_h.
  const ops::SparseAttentionGrads sg = ops::sparse_attention_backward(g_lat, q_lat, kv, Dc, idx, o_lat, lse, scale);
  Tensor dq_mqa = Tensor::zeros(q_mha.shape(), DType::F64), dkv_mha = Tensor::zeros(kv.shape(), DType::F64);
  auto add = [](Tensor& t, int64_t i, double x) { t.set_item(i, t.item(i) + x); };
  for (int64_t r = 0; r < B * T; ++r)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t rh = r * H + h;
      for (int64_t n = 0; n < Dn; ++n)
        for (int64_t c = 0; c < Dc; ++c) {
          const double w = w_uk.item((h * Dn + n) * Dc + c);
          add(dq_mqa, rh * (Dn + R) + n, w * sg.dq.item(rh * (Dc + R) + c));
          add(dkv_mha, r * (Dc + R) + c, w * mha.dk.item(rh * (Dn + R) + n));
        }
      for (int64_t i = 0; i < R; ++i) {
        add(dq_mqa, rh * (Dn + R) + Dn + i, sg.dq.item(rh * (Dc + R) + Dc + i));
        add(dkv_mha, r * (Dc + R) + Dc + i, mha.dk.item(rh * (Dn + R) + Dn + i));
      }
      for (int64_t e = 0; e < Dvh; ++e)
        for (int64_t c = 0; c < Dc; ++c)
          add(dkv_mha, r * (Dc + R) + c, w_uv.item((h * Dvh + e) * Dc + c) * mha.dv.item(rh * Dvh + e));
    }
  EXPECT_TRUE(all_close(dq_mqa, mha.dq, 1e-9, 1e-12));
  EXPECT_TRUE(all_close(sg.dkv, dkv_mha, 1e-9, 1e-12));
}

TEST(SparseAttention, EmptyRowsF32AndIndexErrors) {
  const int64_t B = 1, T = 6, H = 2, Dk = 4, Dv = 3, K = 3;
  const Tensor q = randn({B, T, H, Dk}, 70), kv = randn({B, T, Dk}, 71);
  Tensor idx = Tensor::from_vector(std::vector<int32_t>{0, -1, -1, -1, -1, -1, 2, 0, -1,  //
                                                        3, 3, 1, 4, -1, 0, 5, 4, 3},
                                   {B, T, K});
  Tensor lse;
  const Tensor out = ops::sparse_attention_forward(q, kv, Dv, idx, 0.5, &lse);
  for (int64_t h = 0; h < H; ++h) {
    EXPECT_TRUE(std::isinf(lse.item(h * T + 1)) && lse.item(h * T + 1) < 0);  // row t = 1 has no valid slot
    for (int64_t i = 0; i < Dv; ++i) EXPECT_EQ(out.item((1 * H + h) * Dv + i), 0.0);
    // Row t = 0 attends to itself only: out = v_0, lse = scale * q.k_0.
    for (int64_t i = 0; i < Dv; ++i) EXPECT_NEAR(out.item(h * Dv + i), kv.item(i), 1e-12);
  }
  const ops::SparseAttentionGrads sg =
      ops::sparse_attention_backward(randn({B, T, H, Dv}, 72), q, kv, Dv, idx, out, lse, 0.5);
  for (int64_t i = 0; i < H * Dk; ++i) EXPECT_EQ(sg.dq.item(1 * H * Dk + i), 0.0);
  // f32 agrees with f64.
  Tensor lse32;
  const Tensor out32 = ops::sparse_attention_forward(q.to(DType::F32), kv.to(DType::F32), Dv, idx, 0.5, &lse32);
  EXPECT_TRUE(all_close(out32, out, 1e-5, 1e-6));
  // A future token or an out-of-range index is an error naming the op.
  idx.data<int32_t>()[2 * K] = 3;
  try {
    ops::sparse_attention_forward(q, kv, Dv, idx, 0.5, nullptr);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("[sparse_attention_forward] indices[0, 2, 0] = 3", 0), 0u) << e.what();
  }
  EXPECT_THROW(ops::sparse_attention_forward(q, kv, Dk + 1, Tensor::zeros({B, T, K}, DType::I32), 0.5, nullptr),
               std::runtime_error);
}
