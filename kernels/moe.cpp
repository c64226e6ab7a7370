// Mixture of experts, CPU reference: routing (DeepSeek-V3 / V3.2 sigmoid, group-limited, bias-corrected
// top-k), expert loads and the sequence-wise balance loss, token permutation by expert, weighted
// combine, and the grouped expert GEMM. Forward and backward side by side.
//
// Routing, per token (matches transformers' DeepseekV3TopkRouter, which DeepseekV32TopkRouter reuses):
//   s      = sigmoid(logits)                       [E]  computed in the logits' float type
//   c      = s + bias                               [E]  used for selection only
//   group  = sum of the top-2 c of each of n_group groups (a 1-expert group: its single c)
//   keep the topk_group best groups; experts outside them are masked to -inf
//   experts = the top_k best c among the kept groups, in descending c
//   weights = s[experts] / (sum s[experts] + 1e-20) if norm_topk_prob, then * routed_scaling_factor
//
// NOTES:
//  - Ties are broken deterministically, lower index first, for groups and for experts (torch.topk
//    leaves tie order unspecified). The selection is a K-pass linear scan with a strict '>' over
//    ascending indices, which gives exactly that order and needs no comparator (NaN scores fail loudly).
//  - Masking uses -inf as DeepSeek's reference inference code does. transformers 4.5x masks with 0.0,
//    which differs only when a kept expert's biased score c is negative (bias < -s), where 0.0 would
//    let a masked expert win; -inf never selects outside the kept groups.
//  - moe_permutation is a stable counting sort by expert: row order inside an expert is token order,
//    then slot order. The inverse map (n, k) -> row is rebuilt where needed (O(N*K), cheap).
//  - Per-expert GEMMs run in parallel over experts with single-threaded OpenBLAS when there are at
//    least as many experts as threads, else one after another with OpenBLAS's own threads.
#include "kernels/cpu_blas.h"
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cuda/ops_moe.h"
#include "kernels/op_util.h"
#include "kernels/ops.h"

namespace dsa::ops {
namespace {

using detail::BlasSerial;
using detail::gemm_rm;
using detail::on_cuda;

void cpu_only(const char* op, const Tensor& t) {
  if (t.device() == Device::CUDA) fail(strcat_("[", op, "] operands must all be on one device, got ", t.desc()));
}

// Calls f.template operator()<T>() with T = float or double after the dtype of t.
template <class F>
void dispatch_float(const Tensor& t, F&& f) {
  if (t.dtype() == DType::F32)
    f(float{});
  else
    f(double{});
}

// Index of the largest v[i] over i in [0, n) with allowed(i) and !taken[i]; ties -> lowest i; -1 if none.
template <class T, class Allowed>
int64_t argmax_first(const T* v, int64_t n, const std::vector<char>& taken, Allowed allowed) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (taken[i] || !allowed(i)) continue;
    if (best < 0 || v[i] > v[best]) best = i;
  }
  return best;
}

// Inverse of the permutation: where[n*K + k] = permuted row of (token n, slot k).
std::vector<int64_t> inverse_rows(const MoePermutation& p) {
  const int64_t M = p.rows.numel();
  const int32_t* rows = p.rows.data<int32_t>();
  std::vector<int64_t> where(static_cast<size_t>(M), -1);
  for (int64_t r = 0; r < M; ++r) where[rows[r]] = r;
  return where;
}

void check_permutation(const char* op, const MoePermutation& p, int64_t n_rows) {
  expect_dtype(op, "permutation rows", p.rows, DType::I32);
  DSA_CHECK(p.rows.numel() == n_rows, "[", op, "] permutation has ", p.rows.numel(), " rows, expected ", n_rows);
  DSA_CHECK(p.offsets.size() == p.counts.size() + 1 && p.offsets.back() == n_rows, "[", op,
            "] permutation counts/offsets do not cover ", n_rows, " rows");
}

template <class T>
void route_impl(const Tensor& logits, const Tensor& bias, const MoeRouteConfig& cfg, MoeRouting& r) {
  const int64_t N = logits.size(0), E = logits.size(1), G = cfg.n_group, gs = E / G, K = cfg.top_k;
  const T* x = logits.data<T>();
  std::vector<T> b(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) b[e] = T(bias.item(e));
  T* s = r.scores.data<T>();
  int32_t* ex = r.experts.data<int32_t>();
  T* w = r.weights.data<T>();
  const T scaling = T(cfg.routed_scaling_factor);
  int64_t bad = -1;
#pragma omp parallel
  {
    std::vector<T> c(static_cast<size_t>(E)), gscore(static_cast<size_t>(G));
    std::vector<char> gtaken(static_cast<size_t>(G)), etaken(static_cast<size_t>(E)), gkeep(static_cast<size_t>(G));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* sn = s + n * E;
      bool nan = false;
      for (int64_t e = 0; e < E; ++e) {
        sn[e] = T(1) / (T(1) + std::exp(-x[n * E + e]));
        c[e] = sn[e] + b[e];
        nan |= std::isnan(c[e]);
      }
      if (nan) {
#pragma omp critical(moe_route_bad)
        if (bad < 0 || n < bad) bad = n;
        continue;
      }
      for (int64_t g = 0; g < G; ++g) {  // sum of the top-2 biased scores of the group
        const T* cg = c.data() + g * gs;
        if (gs == 1) {
          gscore[g] = cg[0];
          continue;
        }
        T m1 = cg[0], m2 = cg[1];
        if (m2 > m1) std::swap(m1, m2);
        for (int64_t i = 2; i < gs; ++i) {
          if (cg[i] > m1) {
            m2 = m1;
            m1 = cg[i];
          } else if (cg[i] > m2) {
            m2 = cg[i];
          }
        }
        gscore[g] = m1 + m2;
      }
      std::fill(gtaken.begin(), gtaken.end(), 0);
      std::fill(gkeep.begin(), gkeep.end(), 0);
      for (int i = 0; i < cfg.topk_group; ++i) {
        const int64_t g = argmax_first(gscore.data(), G, gtaken, [](int64_t) { return true; });
        gtaken[g] = gkeep[g] = 1;
      }
      std::fill(etaken.begin(), etaken.end(), 0);
      T sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = argmax_first(c.data(), E, etaken, [&](int64_t i) { return gkeep[i / gs] != 0; });
        etaken[e] = 1;
        ex[n * K + k] = static_cast<int32_t>(e);
        w[n * K + k] = sn[e];
        sum += sn[e];
      }
      const T denom = cfg.norm_topk_prob ? sum + T(1e-20) : T(1);
      for (int64_t k = 0; k < K; ++k) w[n * K + k] = w[n * K + k] / denom * scaling;
    }
  }
  DSA_CHECK(bad < 0, "[moe_route] router logits or bias are NaN for token ", bad);
}

}  // namespace

// -------------------------------------------------------------------------------------- routing

MoeRouting moe_route(const Tensor& logits, const Tensor& bias, const MoeRouteConfig& cfg) {
  const char* op = "moe_route";
  expect_shape(op, "logits", logits, {-1, -1});
  const int64_t N = logits.size(0), E = logits.size(1);
  expect_float(op, "bias", bias);
  expect_shape(op, "bias", bias, {E});
  DSA_CHECK(cfg.n_group >= 1 && E % cfg.n_group == 0, "[moe_route] n_group (", cfg.n_group,
            ") must divide the number of experts (", E, ")");
  DSA_CHECK(cfg.topk_group >= 1 && cfg.topk_group <= cfg.n_group, "[moe_route] topk_group (", cfg.topk_group,
            ") must be in [1, n_group = ", cfg.n_group, "]");
  DSA_CHECK(cfg.top_k >= 1 && cfg.top_k <= cfg.topk_group * (E / cfg.n_group), "[moe_route] top_k (", cfg.top_k,
            ") must be in [1, topk_group * experts per group = ", cfg.topk_group * (E / cfg.n_group), "]");
  DSA_DISPATCH_CUDA(on_cuda(logits), op, cuda::moe_route(logits, bias, cfg));
  expect_float(op, "logits", logits);
  cpu_only(op, bias);
  MoeRouting r{Tensor::empty({N, E}, logits.dtype()), Tensor::empty({N, cfg.top_k}, DType::I32),
               Tensor::empty({N, cfg.top_k}, logits.dtype())};
  dispatch_float(logits, [&](auto tag) { route_impl<decltype(tag)>(logits, bias, cfg, r); });
  return r;
}

Tensor moe_route_backward(const Tensor& dweights, const MoeRouting& r, const MoeRouteConfig& cfg) {
  const char* op = "moe_route_backward";
  expect_float(op, "scores", r.scores);
  expect_shape(op, "scores", r.scores, {-1, -1});
  const int64_t N = r.scores.size(0), E = r.scores.size(1), K = cfg.top_k;
  expect_shape(op, "experts", r.experts, {N, K});
  expect_dtype(op, "experts", r.experts, DType::I32);
  expect_shape(op, "dweights", dweights, {N, K});
  expect_dtype(op, "dweights", dweights, r.scores.dtype());
  DSA_DISPATCH_CUDA(on_cuda(dweights), op, cuda::moe_route_backward(dweights, r, cfg));
  cpu_only(op, r.scores);
  Tensor dlogits = Tensor::zeros({N, E}, r.scores.dtype());
  dispatch_float(dweights, [&](auto tag) {
    using T = decltype(tag);
    const T* dw = dweights.data<T>();
    const T* s = r.scores.data<T>();
    const int32_t* ex = r.experts.data<int32_t>();
    T* dl = dlogits.data<T>();
    const T c = T(cfg.routed_scaling_factor);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      // w_k = c s_k / Z, Z = sum_j s_j + 1e-20  =>  ds_j = c (dw_j - sum_k dw_k w_k / c) / Z
      T Z = 1, proj = 0;
      if (cfg.norm_topk_prob) {
        T sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += s[n * E + ex[n * K + k]];
        Z = sum + T(1e-20);
        for (int64_t k = 0; k < K; ++k) proj += dw[n * K + k] * s[n * E + ex[n * K + k]];
        proj /= Z;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = ex[n * K + k];
        const T se = s[n * E + e];
        const T ds = c * (dw[n * K + k] - proj) / Z;
        dl[n * E + e] = ds * se * (T(1) - se);
      }
    }
  });
  return dlogits;
}

Tensor moe_scores_backward(const Tensor& dscores, const MoeRouting& r) {
  const char* op = "moe_scores_backward";
  expect_shape(op, "dscores", dscores, r.scores.shape());
  expect_dtype(op, "dscores", dscores, r.scores.dtype());
  DSA_DISPATCH_CUDA(on_cuda(dscores), op, cuda::moe_scores_backward(dscores, r));
  cpu_only(op, r.scores);
  Tensor dlogits = Tensor::empty(r.scores.shape(), r.scores.dtype());
  dispatch_float(dscores, [&](auto tag) {
    using T = decltype(tag);
    const T* ds = dscores.data<T>();
    const T* s = r.scores.data<T>();
    T* dl = dlogits.data<T>();
    const int64_t n = dscores.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) dl[i] = ds[i] * s[i] * (T(1) - s[i]);
  });
  return dlogits;
}

Tensor moe_expert_load(const MoeRouting& r, int64_t n_experts) {
  const char* op = "moe_expert_load";
  expect_dtype(op, "experts", r.experts, DType::I32);
  DSA_DISPATCH_CUDA(on_cuda(r.experts), op, cuda::moe_expert_load(r, n_experts));
  std::vector<int64_t> count(static_cast<size_t>(n_experts), 0);
  const int32_t* ex = r.experts.data<int32_t>();
  for (int64_t i = 0; i < r.experts.numel(); ++i) {
    DSA_CHECK(ex[i] >= 0 && ex[i] < n_experts, "[moe_expert_load] expert id ", ex[i], " out of range [0, ",
              n_experts, ")");
    ++count[ex[i]];
  }
  Tensor load = Tensor::empty({n_experts}, DType::F32);
  for (int64_t e = 0; e < n_experts; ++e) load.data<float>()[e] = static_cast<float>(count[e]);
  return load;
}

double moe_seq_balance_loss(const MoeRouting& r, int64_t n_experts, int64_t batch, int64_t seq, double alpha,
                            Tensor* dscores) {
  const char* op = "moe_seq_balance_loss";
  const int64_t E = n_experts, K = r.experts.size(1);
  expect_shape(op, "scores", r.scores, {batch * seq, E});
  expect_shape(op, "experts", r.experts, {batch * seq, K});
  if (dscores) {
    expect_shape(op, "dscores", *dscores, {batch * seq, E});
    expect_dtype(op, "dscores", *dscores, r.scores.dtype());
  }
  DSA_DISPATCH_CUDA(on_cuda(r.scores), op, cuda::moe_seq_balance_loss(r, n_experts, batch, seq, alpha, dscores));
  cpu_only(op, r.experts);
  if (dscores) cpu_only(op, *dscores);
  const int32_t* ids = r.experts.data<int32_t>();
  for (int64_t i = 0; i < r.experts.numel(); ++i)  // checked here: no throwing inside the parallel loop
    DSA_CHECK(ids[i] >= 0 && ids[i] < E, "[moe_seq_balance_loss] expert id ", ids[i], " out of range [0, ", E, ")");
  std::vector<double> seq_loss(static_cast<size_t>(batch), 0.0);
  dispatch_float(r.scores, [&](auto tag) {
    using T = decltype(tag);
    const T* s = r.scores.data<T>();
    const int32_t* ex = r.experts.data<int32_t>();
    T* ds = dscores ? dscores->data<T>() : nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<double> f(static_cast<size_t>(E), 0.0), P(static_cast<size_t>(E), 0.0), g(static_cast<size_t>(E));
      for (int64_t t = b * seq; t < (b + 1) * seq; ++t)
        for (int64_t k = 0; k < K; ++k) {
          f[ex[t * K + k]] += double(E) / double(K * seq);
        }
      for (int64_t t = b * seq; t < (b + 1) * seq; ++t) {
        double Z = 0;
        for (int64_t e = 0; e < E; ++e) Z += s[t * E + e];
        for (int64_t e = 0; e < E; ++e) P[e] += s[t * E + e] / Z / double(seq);
      }
      double L = 0;
      for (int64_t e = 0; e < E; ++e) L += f[e] * P[e];
      seq_loss[b] = alpha * L;
      if (!ds) continue;
      // dL/ds'_{t,i} = g_i = alpha f_i / (T * batch);  ds_{t,j} = (g_j - sum_i g_i s'_{t,i}) / Z_t
      for (int64_t e = 0; e < E; ++e) g[e] = alpha * f[e] / double(seq * batch);
      for (int64_t t = b * seq; t < (b + 1) * seq; ++t) {
        double Z = 0, gs = 0;
        for (int64_t e = 0; e < E; ++e) Z += s[t * E + e];
        for (int64_t e = 0; e < E; ++e) gs += g[e] * s[t * E + e] / Z;
        for (int64_t e = 0; e < E; ++e) ds[t * E + e] += T((g[e] - gs) / Z);
      }
    }
  });
  double loss = 0;
  for (double l : seq_loss) loss += l;
  return batch > 0 ? loss / double(batch) : 0.0;
}

// ---------------------------------------------------------------------------------- permutation

MoePermutation moe_permutation(const Tensor& experts, int64_t n_experts) {
  const char* op = "moe_permutation";
  expect_dtype(op, "experts", experts, DType::I32);
  expect_shape(op, "experts", experts, {-1, -1});
  DSA_DISPATCH_CUDA(on_cuda(experts), op, cuda::moe_permutation(experts, n_experts));
  const int64_t M = experts.numel();
  const int32_t* ex = experts.data<int32_t>();
  MoePermutation p;
  p.counts.assign(static_cast<size_t>(n_experts), 0);
  for (int64_t i = 0; i < M; ++i) {
    DSA_CHECK(ex[i] >= 0 && ex[i] < n_experts, "[moe_permutation] expert id ", ex[i], " at flat index ", i,
              " out of range [0, ", n_experts, ")");
    ++p.counts[ex[i]];
  }
  p.offsets.assign(static_cast<size_t>(n_experts + 1), 0);
  for (int64_t e = 0; e < n_experts; ++e) p.offsets[e + 1] = p.offsets[e] + p.counts[e];
  p.rows = Tensor::empty({M}, DType::I32);
  int32_t* rows = p.rows.data<int32_t>();
  std::vector<int64_t> next(p.offsets.begin(), p.offsets.end() - 1);
  for (int64_t i = 0; i < M; ++i) rows[next[ex[i]]++] = static_cast<int32_t>(i);  // i = n*K + k, ascending
  return p;
}

Tensor moe_permute(const Tensor& x, const MoePermutation& p, int64_t top_k) {
  const char* op = "moe_permute";
  expect_shape(op, "x", x, {-1, -1});
  const int64_t N = x.size(0), M = N * top_k;
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::moe_permute(x, p, top_k));
  cpu_only(op, p.rows);
  check_permutation(op, p, M);
  Tensor xp = Tensor::empty({M, x.size(1)}, x.dtype());
  const size_t row_bytes = static_cast<size_t>(x.size(1)) * dtype_size(x.dtype());
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(xp.raw());
  const int32_t* rows = p.rows.data<int32_t>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < M; ++r) std::memcpy(dst + r * row_bytes, src + (rows[r] / top_k) * row_bytes, row_bytes);
  return xp;
}

Tensor moe_permute_backward(const Tensor& dxp, const MoePermutation& p, int64_t n_tokens, int64_t top_k) {
  const char* op = "moe_permute_backward";
  expect_shape(op, "dxp", dxp, {n_tokens * top_k, -1});
  DSA_DISPATCH_CUDA(on_cuda(dxp), op, cuda::moe_permute_backward(dxp, p, n_tokens, top_k));
  expect_float(op, "dxp", dxp);
  cpu_only(op, p.rows);
  check_permutation(op, p, n_tokens * top_k);
  const int64_t D = dxp.size(1);
  Tensor dx = Tensor::empty({n_tokens, D}, dxp.dtype());
  const std::vector<int64_t> where = inverse_rows(p);
  dispatch_float(dxp, [&](auto tag) {
    using T = decltype(tag);
    const T* g = dxp.data<T>();
    T* o = dx.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_tokens; ++n) {
      T* on = o + n * D;
      std::fill(on, on + D, T(0));
      for (int64_t k = 0; k < top_k; ++k) {
        const T* gr = g + where[n * top_k + k] * D;
        for (int64_t i = 0; i < D; ++i) on[i] += gr[i];
      }
    }
  });
  return dx;
}

// -------------------------------------------------------------------------------------- combine

Tensor moe_combine(const Tensor& yp, const Tensor& weights, const MoePermutation& p) {
  const char* op = "moe_combine";
  expect_float(op, "weights", weights);
  expect_shape(op, "weights", weights, {-1, -1});
  const int64_t N = weights.size(0), K = weights.size(1);
  expect_shape(op, "yp", yp, {N * K, -1});
  DSA_DISPATCH_CUDA(on_cuda(yp), op, cuda::moe_combine(yp, weights, p));
  expect_dtype(op, "yp", yp, weights.dtype());
  cpu_only(op, weights);
  cpu_only(op, p.rows);
  check_permutation(op, p, N * K);
  const int64_t D = yp.size(1);
  Tensor y = Tensor::empty({N, D}, yp.dtype());
  const std::vector<int64_t> where = inverse_rows(p);
  dispatch_float(yp, [&](auto tag) {
    using T = decltype(tag);
    const T* src = yp.data<T>();
    const T* w = weights.data<T>();
    T* o = y.data<T>();
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      T* on = o + n * D;
      std::fill(on, on + D, T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T wk = w[n * K + k];
        const T* yr = src + where[n * K + k] * D;
        for (int64_t i = 0; i < D; ++i) on[i] += wk * yr[i];
      }
    }
  });
  return y;
}

void moe_combine_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const MoePermutation& p,
                          Tensor* dyp, Tensor* dweights) {
  const char* op = "moe_combine_backward";
  expect_float(op, "weights", weights);
  expect_shape(op, "weights", weights, {-1, -1});
  const int64_t N = weights.size(0), K = weights.size(1);
  expect_shape(op, "yp", yp, {N * K, -1});
  const int64_t D = yp.size(1);
  expect_shape(op, "dy", dy, {N, D});
  DSA_DISPATCH_CUDA(on_cuda(dy), op, cuda::moe_combine_backward(dy, yp, weights, p, dyp, dweights));
  expect_dtype(op, "yp", yp, weights.dtype());
  expect_dtype(op, "dy", dy, weights.dtype());
  cpu_only(op, yp);
  cpu_only(op, weights);
  cpu_only(op, p.rows);
  check_permutation(op, p, N * K);
  const std::vector<int64_t> where = inverse_rows(p);
  if (dyp) *dyp = Tensor::empty({N * K, D}, dy.dtype());
  if (dweights) *dweights = Tensor::empty({N, K}, dy.dtype());
  dispatch_float(dy, [&](auto tag) {
    using T = decltype(tag);
    const T* g = dy.data<T>();
    const T* src = yp.data<T>();
    const T* w = weights.data<T>();
    T* gyp = dyp ? dyp->data<T>() : nullptr;
    T* gw = dweights ? dweights->data<T>() : nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* gn = g + n * D;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = where[n * K + k];
        if (gyp) {
          const T wk = w[n * K + k];
          for (int64_t i = 0; i < D; ++i) gyp[r * D + i] = wk * gn[i];
        }
        if (gw) {
          double acc = 0;
          for (int64_t i = 0; i < D; ++i) acc += double(gn[i]) * double(src[r * D + i]);
          gw[n * K + k] = T(acc);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------- grouped linear

namespace {
// Runs body(e) for every expert with rows, in parallel over experts when there are enough of them.
template <class F>
void for_each_expert(const MoePermutation& p, F&& body) {
  const int64_t E = static_cast<int64_t>(p.counts.size());
  if (E >= omp_get_max_threads()) {
    BlasSerial serial;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < E; ++e)
      if (p.counts[e] > 0) body(e);
  } else {
    for (int64_t e = 0; e < E; ++e)
      if (p.counts[e] > 0) body(e);
  }
}
}  // namespace

Tensor grouped_linear_forward(const Tensor& xp, const Tensor& w, const MoePermutation& p) {
  const char* op = "grouped_linear_forward";
  expect_shape(op, "xp", xp, {-1, -1});
  const int64_t E = static_cast<int64_t>(p.counts.size()), in = xp.size(1);
  expect_shape(op, "w", w, {E, -1, in});
  DSA_DISPATCH_CUDA(on_cuda(xp), op, cuda::grouped_linear_forward(xp, w, p));
  expect_float(op, "xp", xp);
  expect_dtype(op, "w", w, xp.dtype());
  cpu_only(op, w);
  check_permutation(op, p, xp.size(0));
  const int64_t out = w.size(1);
  Tensor y = Tensor::empty({xp.size(0), out}, xp.dtype());
  dispatch_float(xp, [&](auto tag) {
    using T = decltype(tag);
    const T* x = xp.data<T>();
    const T* wp = w.data<T>();
    T* yp = y.data<T>();
    for_each_expert(p, [&](int64_t e) {
      const int64_t r0 = p.offsets[e];
      gemm_rm(false, true, p.counts[e], out, in, T(1), x + r0 * in, in, wp + e * out * in, in, T(0), yp + r0 * out,
              out);
    });
  });
  return y;
}

Tensor grouped_linear_backward(const Tensor& dy, const Tensor& xp, const Tensor& w, const MoePermutation& p,
                               Tensor* dw) {
  const char* op = "grouped_linear_backward";
  expect_shape(op, "xp", xp, {-1, -1});
  const int64_t E = static_cast<int64_t>(p.counts.size()), M = xp.size(0), in = xp.size(1);
  expect_shape(op, "w", w, {E, -1, in});
  const int64_t out = w.size(1);
  expect_shape(op, "dy", dy, {M, out});
  if (dw) expect_shape(op, "dw", *dw, w.shape());
  DSA_DISPATCH_CUDA(on_cuda(xp), op, cuda::grouped_linear_backward(dy, xp, w, p, dw));
  expect_float(op, "xp", xp);
  expect_dtype(op, "w", w, xp.dtype());
  expect_dtype(op, "dy", dy, xp.dtype());
  cpu_only(op, w);
  cpu_only(op, dy);
  check_permutation(op, p, M);
  if (dw) {
    expect_dtype(op, "dw", *dw, w.dtype());
    cpu_only(op, *dw);
  }
  Tensor dx = Tensor::empty({M, in}, xp.dtype());
  dispatch_float(xp, [&](auto tag) {
    using T = decltype(tag);
    const T* g = dy.data<T>();
    const T* x = xp.data<T>();
    const T* wp = w.data<T>();
    T* gx = dx.data<T>();
    T* gw = dw ? dw->data<T>() : nullptr;
    for_each_expert(p, [&](int64_t e) {
      const int64_t r0 = p.offsets[e], c = p.counts[e];
      gemm_rm(false, false, c, in, out, T(1), g + r0 * out, out, wp + e * out * in, in, T(0), gx + r0 * in, in);
      if (gw) gemm_rm(true, false, out, in, c, T(1), g + r0 * out, out, x + r0 * in, in, T(1), gw + e * out * in, in);
    });
  });
  return dx;
}

}  // namespace dsa::ops
