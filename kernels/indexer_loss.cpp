// Indexer losses (CPU reference): KL(p_t || softmax(I_t)) per query row with the target p rebuilt from
// the main attention's per-head log-sum-exp, streamed by query-row blocks so that [H, T, T] (or even
// [B, T, T]) is never allocated; and the indexer's recall of the dense attention mass.
//
// Gradient: d KL / dI = softmax(I) - p (p sums to 1 over the row's support), then the scoring backward.
// NOTES: straight-through over FP8. With fp8 on, the forward I (the loss value and softmax(I)) is scored
// on the Hadamard-rotated, FP8-rounded operands, but dI is pushed back through the UNQUANTIZED q_I, k_I
// (the rounding is treated as identity; the Hadamard rotation cancels in exact arithmetic).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cuda/ops_dsa.h"
#include "kernels/dsa_cpu_util.h"
#include "kernels/dsa_ops.h"

namespace dsa::ops {

namespace {
using dsa_cpu::check_cpu_float;
using detail::on_cuda;

// Checks q_main [B, T, H, Dk], keys [B, T, Hk, Dk] (Hk | H), lse [B, H, T]; returns Hk.
int64_t check_main(const char* op, const Tensor& q, const Tensor& k, const Tensor& lse) {
  check_cpu_float(op, {{"q_main", &q}, {"k_main", &k}, {"lse_main", &lse}});
  expect_shape(op, "q_main", q, {-1, -1, -1, -1});
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3);
  expect_shape(op, "k_main", k, {B, T, -1, Dk});
  const int64_t Hk = k.size(2);
  DSA_CHECK(Hk >= 1 && H % Hk == 0, "[", op, "] key heads ", Hk, " must divide query heads ", H);
  expect_shape(op, "lse_main", lse, {B, H, T});
  return Hk;
}

void check_indexer(const char* op, const Tensor& q_main, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I) {
  check_cpu_float(op, {{"q_main", &q_main}, {"q_I", &q_I}, {"k_I", &k_I}, {"w_I", &w_I}});
  const int64_t B = q_main.size(0), T = q_main.size(1);
  expect_shape(op, "q_I", q_I, {B, T, -1, -1});
  expect_shape(op, "k_I", k_I, {B, T, q_I.size(3)});
  expect_shape(op, "w_I", w_I, {B, T, q_I.size(2)});
}

// P [B, R, T] for rows t0..t1-1: the head-summed main attention, L1-normalized over s <= t (0 beyond).
template <class T>
void dense_target_block(const Tensor& q, const Tensor& k, const Tensor& lse, double scale, int64_t t0, int64_t t1,
                        T* P) {
  const int64_t B = q.size(0), T_ = q.size(1), H = q.size(2), Dk = q.size(3), Hk = k.size(2), R = t1 - t0;
  const T* qp = q.data<T>();
  const T* kp = k.data<T>();
  const T* lp = lse.data<T>();
  std::fill(P, P + B * R * T_, T(0));
  std::vector<T> S(static_cast<size_t>(R * t1));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hk);
      dsa_cpu::gemm_rm(false, true, R, t1, Dk, scale, qp + ((b * T_ + t0) * H + h) * Dk, H * Dk,
                    kp + (b * T_ * Hk + hk) * Dk, Hk * Dk, 0.0, S.data(), t1);
#pragma omp parallel for schedule(static) if(R * t1 > dsa_cpu::kOmpMinWork)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = t0 + r;
        const T l = lp[(b * H + h) * T_ + t];
        T* pr = P + (b * R + r) * T_;
        const T* sr = S.data() + r * t1;
        for (int64_t s = 0; s <= t; ++s) pr[s] += std::exp(sr[s] - l);
      }
    }
#pragma omp parallel for schedule(static) if(B * R * T_ > dsa_cpu::kOmpMinWork)
  for (int64_t br = 0; br < B * R; ++br) {
    const int64_t t = t0 + br % R;
    T* pr = P + br * T_;
    T sum = 0;
    for (int64_t s = 0; s <= t; ++s) sum += pr[s];
    for (int64_t s = 0; s <= t; ++s) pr[s] /= sum;
  }
}

// KL(p || softmax(I)) over n entries; writes dI = gs * (softmax(I) - p) when dI is non-null.
template <class T>
double row_kl(const T* p, const T* I, int64_t n, double gs, T* dI) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t s = 0; s < n; ++s) m = std::max(m, I[s]);
  T z = 0;
  for (int64_t s = 0; s < n; ++s) z += std::exp(I[s] - m);
  const T log_z = m + std::log(z);
  double kl = 0;
  for (int64_t s = 0; s < n; ++s) {
    const T log_q = I[s] - log_z;
    if (p[s] > T(0)) kl += static_cast<double>(p[s] * (std::log(p[s]) - log_q));
    if (dI) dI[s] = static_cast<T>(gs) * (std::exp(log_q) - p[s]);
  }
  return kl;
}

template <class T>
IndexerLossResult kl_dense(const Tensor& q_main, const Tensor& k_main, const Tensor& lse, double scale,
                           const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, const Tensor& q_s, const Tensor& k_s,
                           double gs, IndexerGrads* grads, int64_t block_rows) {
  const int64_t B = q_main.size(0), T_ = q_main.size(1), H = q_main.size(2), Hi = q_I.size(2);
  const int64_t rb =
      block_rows > 0 ? std::min(block_rows, T_) : dsa_cpu::rows_per_block(T_, T_ * std::max({B, Hi, H}));
  std::vector<T> P(static_cast<size_t>(B * rb * T_));
  std::vector<double> row_loss(static_cast<size_t>(B * rb));
  IndexerLossResult res;
  for (int64_t t0 = 0; t0 < T_; t0 += rb) {
    const int64_t t1 = std::min(T_, t0 + rb), R = t1 - t0;
    dense_target_block<T>(q_main, k_main, lse, scale, t0, t1, P.data());
    const Tensor I = indexer_scores_forward(q_s, k_s, w_I, t0, t1);  // [B, R, T]
    Tensor dI;
    if (grads) dI = Tensor::zeros({B, R, T_}, q_I.dtype());
    T* dIp = grads ? dI.data<T>() : nullptr;
#pragma omp parallel for schedule(static) if(B * R * T_ > dsa_cpu::kOmpMinWork)
    for (int64_t br = 0; br < B * R; ++br) {
      const int64_t n = t0 + br % R + 1;
      row_loss[br] = row_kl(P.data() + br * T_, I.data<T>() + br * T_, n, gs, dIp ? dIp + br * T_ : nullptr);
    }
    for (int64_t br = 0; br < B * R; ++br) res.loss_sum += row_loss[br];
    res.rows += B * R;
    if (grads) indexer_scores_backward(dI, q_I, k_I, w_I, t0, &grads->dq, &grads->dk, &grads->dw);
  }
  return res;
}

// NOTES: the sparse loss works slot by slot (O(T * K * Hi * D)), with dk_I accumulated in one private
// buffer per thread and summed in thread order (deterministic for a given thread count).
// `target(bt, b, slot, sl, p)` fills the unnormalized target p[j] of the j-th valid slot (slot[j], key sl[j])
// of row bt; `work` sizes the OpenMP threshold.
template <class T, class Target>
IndexerLossResult kl_sparse_core(const Tensor& indices, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I,
                                 const Tensor& q_s, const Tensor& k_s, double gs, IndexerGrads* grads, int64_t work,
                                 const Target& target, const T* slot_scores = nullptr /*[B, T, K] or null*/) {
  const int64_t B = q_I.size(0), T_ = q_I.size(1);
  const int64_t Hi = q_I.size(2), D = q_I.size(3), K = indices.size(2);
  const T c = T(1) / std::sqrt(T(D));
  const T *qi = q_I.data<T>(), *ki = k_I.data<T>(), *wi = w_I.data<T>();
  const T *qs = q_s.data<T>(), *ks = k_s.data<T>();
  const int32_t* idx = indices.data<int32_t>();
  std::vector<double> row_loss(static_cast<size_t>(B * T_), 0.0);
  std::vector<char> counted(static_cast<size_t>(B * T_), 0);
  const int nthreads = omp_get_max_threads();
  std::vector<std::vector<T>> dk_part(static_cast<size_t>(nthreads));
#pragma omp parallel num_threads(nthreads) if(work > dsa_cpu::kOmpMinWork)
  {
    std::vector<T>& dk_acc = dk_part[static_cast<size_t>(omp_get_thread_num())];
    if (grads) dk_acc.assign(static_cast<size_t>(B * T_ * D), T(0));
    std::vector<int32_t> sl, slot;
    std::vector<T> p, I, dI;
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < B * T_; ++bt) {
      const int64_t b = bt / T_;
      sl.clear();
      slot.clear();
      for (int64_t k = 0; k < K; ++k)
        if (idx[bt * K + k] >= 0) {
          sl.push_back(idx[bt * K + k]);
          slot.push_back(static_cast<int32_t>(k));
        }
      const int64_t n = static_cast<int64_t>(sl.size());
      if (n == 0) continue;
      p.assign(sl.size(), T(0));
      I.assign(sl.size(), T(0));
      dI.assign(sl.size(), T(0));
      target(bt, b, slot, sl, p);
      T psum = 0;
      for (int64_t k = 0; k < n; ++k) psum += p[k];
      for (int64_t k = 0; k < n; ++k) p[k] /= psum;
      for (int64_t k = 0; k < n && slot_scores; ++k) I[k] = slot_scores[bt * K + slot[k]];
      for (int64_t k = 0; k < n && !slot_scores; ++k) {
        const T* kk = ks + (b * T_ + sl[k]) * D;
        for (int64_t j = 0; j < Hi; ++j) {
          T z = 0;
#pragma omp simd reduction(+ : z)
          for (int64_t i = 0; i < D; ++i) z += qs[(bt * Hi + j) * D + i] * kk[i];
          I[k] += wi[bt * Hi + j] * c * std::max(z, T(0));
        }
      }
      row_loss[bt] = row_kl(p.data(), I.data(), n, gs, grads ? dI.data() : nullptr);
      counted[bt] = 1;
      if (!grads) continue;
      T* dq = grads->dq.data<T>() + bt * Hi * D;
      T* dw = grads->dw.data<T>() + bt * Hi;
      for (int64_t k = 0; k < n; ++k) {
        const T* kk = ki + (b * T_ + sl[k]) * D;  // unquantized: straight-through
        T* dk = dk_acc.data() + (b * T_ + sl[k]) * D;
        for (int64_t j = 0; j < Hi; ++j) {
          const T* qj = qi + (bt * Hi + j) * D;
          T z = 0;
#pragma omp simd reduction(+ : z)
          for (int64_t i = 0; i < D; ++i) z += qj[i] * kk[i];
          if (z <= T(0)) continue;
          dw[j] += dI[k] * c * z;
          const T gz = dI[k] * wi[bt * Hi + j] * c;
          for (int64_t i = 0; i < D; ++i) {
            dq[j * D + i] += gz * kk[i];
            dk[i] += gz * qj[i];
          }
        }
      }
    }
  }
  if (grads) {
    T* dk = grads->dk.data<T>();
#pragma omp parallel for schedule(static) if(B * T_ * D > dsa_cpu::kOmpMinWork)
    for (int64_t i = 0; i < B * T_ * D; ++i) {
      T s = 0;
      for (const auto& part : dk_part)
        if (!part.empty()) s += part[static_cast<size_t>(i)];
      dk[i] += s;
    }
  }
  IndexerLossResult res;
  for (int64_t bt = 0; bt < B * T_; ++bt) {
    res.loss_sum += row_loss[bt];
    res.rows += counted[bt];
  }
  return res;
}

// Target from the main attention's scores rebuilt on the gathered rows: p[j] = sum_h exp(scale q_h . kv[sl[j]] - lse_h).
template <class T>
IndexerLossResult kl_sparse(const Tensor& q_main, const Tensor& kv, const Tensor& lse, double scale,
                            const Tensor& indices, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I,
                            const Tensor& q_s, const Tensor& k_s, double gs, IndexerGrads* grads) {
  const int64_t T_ = q_main.size(1), H = q_main.size(2), Dk = q_main.size(3);
  const T *qm = q_main.data<T>(), *kvp = kv.data<T>(), *lp = lse.data<T>();
  const int64_t work = q_main.size(0) * T_ * indices.size(2) * (H * Dk + q_I.size(2) * q_I.size(3));
  auto target = [&](int64_t bt, int64_t b, const std::vector<int32_t>&, const std::vector<int32_t>& sl,
                    std::vector<T>& p) {
    const int64_t n = static_cast<int64_t>(sl.size());
    for (int64_t h = 0; h < H; ++h) {
      const T l = lp[(b * H + h) * T_ + bt % T_];
      const T* qh = qm + (bt * H + h) * Dk;
      for (int64_t k = 0; k < n; ++k) {
        const T* v = kvp + (b * T_ + sl[k]) * Dk;
        T dotv = 0;
#pragma omp simd reduction(+ : dotv)
        for (int64_t i = 0; i < Dk; ++i) dotv += qh[i] * v[i];
        p[k] += std::exp(static_cast<T>(scale) * dotv - l);
      }
    }
  };
  return kl_sparse_core<T>(indices, q_I, k_I, w_I, q_s, k_s, gs, grads, work, target);
}

// Target from the forward's head-summed probabilities: p[j] = probs_sum[bt, ks[j]].
template <class T>
IndexerLossResult kl_sparse_probs(const Tensor& probs_sum, const Tensor& indices, const Tensor& q_I, const Tensor& k_I,
                                  const Tensor& w_I, const Tensor& q_s, const Tensor& k_s, double gs,
                                  IndexerGrads* grads, const Tensor* slot_scores) {
  const int64_t K = indices.size(2);
  const T* ps = probs_sum.data<T>();
  const int64_t work = q_I.size(0) * q_I.size(1) * K * q_I.size(2) * q_I.size(3);
  auto target = [&](int64_t bt, int64_t, const std::vector<int32_t>& ks, const std::vector<int32_t>&,
                    std::vector<T>& p) {
    for (size_t j = 0; j < ks.size(); ++j) p[j] = ps[bt * K + ks[j]];
  };
  return kl_sparse_core<T>(indices, q_I, k_I, w_I, q_s, k_s, gs, grads, work, target,
                           slot_scores ? slot_scores->data<T>() : nullptr);
}

void init_grads(IndexerGrads* g, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I) {
  if (!g) return;
  g->dq = Tensor::zeros(q_I.shape(), q_I.dtype());
  g->dk = Tensor::zeros(k_I.shape(), k_I.dtype());
  g->dw = Tensor::zeros(w_I.shape(), w_I.dtype());
}
}  // namespace

int64_t dense_kl_chunk_rows(int64_t B, int64_t T, int64_t Hi) {
  const int64_t budget_rows = (int64_t(256) << 20) / std::max<int64_t>(B * T * 4, 1);
  const int64_t fill_rows = (32768 + std::max<int64_t>(Hi, 1) - 1) / std::max<int64_t>(Hi, 1);
  return std::clamp<int64_t>(std::max(budget_rows, fill_rows), 1, std::max<int64_t>(T, 1));
}

IndexerLossResult indexer_kl_dense(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main, double scale,
                                   const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, bool fp8,
                                   double grad_scale, IndexerGrads* grads, int64_t block_rows) {
  const char* op = "indexer_kl_dense";
  DSA_DISPATCH_CUDA(
      on_cuda(q_main), op,
      cuda::indexer_kl_dense(q_main, k_main, lse_main, scale, q_I, k_I, w_I, fp8, grad_scale, grads, block_rows));
  check_main(op, q_main, k_main, lse_main);
  DSA_CHECK(block_rows >= 0, "[", op, "] block_rows must be >= 0, got ", block_rows);
  check_indexer(op, q_main, q_I, k_I, w_I);
  Tensor q_s = q_I, k_s = k_I;
  if (fp8) indexer_fp8_operands(q_I, k_I, &q_s, &k_s);
  init_grads(grads, q_I, k_I, w_I);
  if (q_I.dtype() == DType::F32)
    return kl_dense<float>(q_main, k_main, lse_main, scale, q_I, k_I, w_I, q_s, k_s, grad_scale, grads,
                           block_rows);
  return kl_dense<double>(q_main, k_main, lse_main, scale, q_I, k_I, w_I, q_s, k_s, grad_scale, grads, block_rows);
}

IndexerLossResult indexer_kl_sparse(const Tensor& q_main, const Tensor& kv, const Tensor& lse_sparse, double scale,
                                    const Tensor& indices, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I,
                                    bool fp8, double grad_scale, IndexerGrads* grads) {
  const char* op = "indexer_kl_sparse";
  DSA_DISPATCH_CUDA(
      on_cuda(q_main), op,
      cuda::indexer_kl_sparse(q_main, kv, lse_sparse, scale, indices, q_I, k_I, w_I, fp8, grad_scale, grads));
  check_cpu_float(op, {{"q_main", &q_main}, {"kv", &kv}, {"lse_sparse", &lse_sparse}});
  expect_shape(op, "q_main", q_main, {-1, -1, -1, -1});
  const int64_t B = q_main.size(0), T = q_main.size(1), H = q_main.size(2);
  expect_shape(op, "kv", kv, {B, T, q_main.size(3)});
  expect_shape(op, "lse_sparse", lse_sparse, {B, H, T});
  dsa_cpu::check_indices(op, indices, B, T);
  check_indexer(op, q_main, q_I, k_I, w_I);
  Tensor q_s = q_I, k_s = k_I;
  if (fp8) indexer_fp8_operands(q_I, k_I, &q_s, &k_s);
  init_grads(grads, q_I, k_I, w_I);
  if (q_I.dtype() == DType::F32)
    return kl_sparse<float>(q_main, kv, lse_sparse, scale, indices, q_I, k_I, w_I, q_s, k_s, grad_scale, grads);
  return kl_sparse<double>(q_main, kv, lse_sparse, scale, indices, q_I, k_I, w_I, q_s, k_s, grad_scale, grads);
}

IndexerLossResult indexer_kl_sparse_from_probs(const Tensor& probs_sum, const Tensor& indices, const Tensor& q_I,
                                               const Tensor& k_I, const Tensor& w_I, bool fp8, double grad_scale,
                                               IndexerGrads* grads, const Tensor* slot_scores) {
  const char* op = "indexer_kl_sparse_from_probs";
  DSA_DISPATCH_CUDA(
      on_cuda(q_I), op,
      cuda::indexer_kl_sparse_from_probs(probs_sum, indices, q_I, k_I, w_I, fp8, grad_scale, grads, slot_scores));
  check_cpu_float(op, {{"q_I", &q_I}, {"probs_sum", &probs_sum}, {"k_I", &k_I}, {"w_I", &w_I}});
  expect_shape(op, "q_I", q_I, {-1, -1, -1, -1});
  const int64_t B = q_I.size(0), T = q_I.size(1);
  dsa_cpu::check_indices(op, indices, B, T);
  expect_shape(op, "probs_sum", probs_sum, {B, T, indices.size(2)});
  check_indexer(op, q_I, q_I, k_I, w_I);
  if (slot_scores) {
    expect_shape(op, "slot_scores", *slot_scores, {B, T, indices.size(2)});
    expect_dtype(op, "slot_scores", *slot_scores, q_I.dtype());
  }
  Tensor q_s = q_I, k_s = k_I;
  if (fp8) indexer_fp8_operands(q_I, k_I, &q_s, &k_s);
  init_grads(grads, q_I, k_I, w_I);
  if (q_I.dtype() == DType::F32)
    return kl_sparse_probs<float>(probs_sum, indices, q_I, k_I, w_I, q_s, k_s, grad_scale, grads, slot_scores);
  return kl_sparse_probs<double>(probs_sum, indices, q_I, k_I, w_I, q_s, k_s, grad_scale, grads, slot_scores);
}

namespace {
template <class T>
IndexerRecall recall_impl(const Tensor& q, const Tensor& k, const Tensor& lse, double scale, const Tensor& indices,
                          int64_t block_rows) {
  const int64_t B = q.size(0), T_ = q.size(1), H = q.size(2), K = indices.size(2);
  const int64_t rb = block_rows > 0 ? std::min(block_rows, T_) : dsa_cpu::rows_per_block(T_, T_ * std::max(B, H));
  std::vector<T> P(static_cast<size_t>(B * rb * T_));
  std::vector<double> row(static_cast<size_t>(B * rb));
  const int32_t* idx = indices.data<int32_t>();
  IndexerRecall res;
  for (int64_t t0 = 0; t0 < T_; t0 += rb) {
    const int64_t t1 = std::min(T_, t0 + rb), R = t1 - t0;
    dense_target_block<T>(q, k, lse, scale, t0, t1, P.data());
#pragma omp parallel if(B * R * (K + T_) > dsa_cpu::kOmpMinWork)
    {
      std::vector<int32_t> sl;
#pragma omp for schedule(static)
      for (int64_t br = 0; br < B * R; ++br) {
        const int64_t b = br / R, t = t0 + br % R;
        const int32_t* ir = idx + (b * T_ + t) * K;
        sl.assign(ir, ir + K);
        std::sort(sl.begin(), sl.end());
        sl.erase(std::unique(sl.begin(), sl.end()), sl.end());  // each token's mass counts once
        double m = 0;
        for (int32_t s : sl)
          if (s >= 0) m += static_cast<double>(P[static_cast<size_t>(br * T_ + s)]);
        row[br] = m;
      }
    }
    for (int64_t br = 0; br < B * R; ++br) res.recall_sum += row[br];
    res.rows += B * R;
  }
  return res;
}
}  // namespace

IndexerRecall indexer_recall(const Tensor& q_main, const Tensor& k_main, const Tensor& lse_main, double scale,
                             const Tensor& indices, int64_t block_rows) {
  const char* op = "indexer_recall";
  DSA_DISPATCH_CUDA(on_cuda(q_main), op, cuda::indexer_recall(q_main, k_main, lse_main, scale, indices, block_rows));
  check_main(op, q_main, k_main, lse_main);
  DSA_CHECK(block_rows >= 0, "[", op, "] block_rows must be >= 0, got ", block_rows);
  dsa_cpu::check_indices(op, indices, q_main.size(0), q_main.size(1));
  if (q_main.dtype() == DType::F32) return recall_impl<float>(q_main, k_main, lse_main, scale, indices, block_rows);
  return recall_impl<double>(q_main, k_main, lse_main, scale, indices, block_rows);
}

}  // namespace dsa::ops
