// Sparse MQA attention (CPU reference): each query attends over the latent rows [c_kv | k_pe] that its
// index list selects; every head shares the gathered rows (DeepSeek runs DSA in this absorbed form).
// Forward keeps each (query, head) row's log-sum-exp; the backward recomputes the probabilities from
// it and scatter-adds the key/value gradients back to the tokens they came from.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cuda/ops_dsa.h"
#include "kernels/dsa_cpu_util.h"
#include "kernels/dsa_ops.h"

namespace dsa::ops {

using detail::on_cuda;

namespace {
constexpr const char* kFwd = "sparse_attention_forward";
constexpr const char* kBwd = "sparse_attention_backward";

struct Dims {
  int64_t B, T, H, Dk, Dv, K;
};

Dims check_common(const char* op, const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices) {
  dsa_cpu::check_cpu_float(op, {{"q", &q}, {"kv", &kv}});
  expect_shape(op, "q", q, {-1, -1, -1, -1});
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3);
  expect_shape(op, "kv", kv, {B, T, Dk});
  DSA_CHECK(dv >= 1 && dv <= Dk, "[", op, "] dv must be in [1, ", Dk, "], got ", dv);
  dsa_cpu::check_indices(op, indices, B, T);
  return {B, T, H, Dk, dv, indices.size(2)};
}

template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The valid slots of one query, in slot order (duplicates kept: one softmax term per slot).
inline void valid_slots(const int32_t* idx, int64_t K, std::vector<int32_t>& out) {
  out.clear();
  for (int64_t k = 0; k < K; ++k)
    if (idx[k] >= 0) out.push_back(idx[k]);
}

template <class T>
void forward_impl(const Dims& d, const T* q, const T* kv, const int32_t* idx, T scale, T* out, T* lse, T* psum) {
#pragma omp parallel if(d.B * d.T * d.H * d.K * d.Dk > dsa_cpu::kOmpMinWork)
  {
    std::vector<int32_t> sl;
    std::vector<T> sc;  // [H, n] scores, then probabilities
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < d.B * d.T; ++bt) {
      const int64_t b = bt / d.T, t = bt % d.T;
      valid_slots(idx + bt * d.K, d.K, sl);
      const int64_t n = static_cast<int64_t>(sl.size());
      sc.resize(static_cast<size_t>(d.H * n));
      // Slot-major loops: one gathered latent row stays in cache while every head reads it.
      for (int64_t k = 0; k < n; ++k) {
        const T* v = kv + (b * d.T + sl[k]) * d.Dk;
        for (int64_t h = 0; h < d.H; ++h) sc[h * n + k] = scale * dot(q + (bt * d.H + h) * d.Dk, v, d.Dk);
      }
      for (int64_t h = 0; h < d.H; ++h) {
        T* sh = sc.data() + h * n;
        T m = -std::numeric_limits<T>::infinity(), sum = 0;
        for (int64_t k = 0; k < n; ++k) m = std::max(m, sh[k]);
        for (int64_t k = 0; k < n; ++k) sum += (sh[k] = std::exp(sh[k] - m));
        for (int64_t k = 0; k < n; ++k) sh[k] /= sum;
        if (lse) lse[(b * d.H + h) * d.T + t] = n > 0 ? m + std::log(sum) : -std::numeric_limits<T>::infinity();
      }
      if (psum) {  // head-summed probability of each slot; the j-th valid slot is the j-th entry of sc[h]
        T* ps = psum + bt * d.K;
        for (int64_t k = 0, j = 0; k < d.K; ++k) {
          T a = 0;
          if (idx[bt * d.K + k] >= 0) {
            for (int64_t h = 0; h < d.H; ++h) a += sc[h * n + j];
            ++j;
          }
          ps[k] = a;
        }
      }
      T* o = out + bt * d.H * d.Dv;
      std::fill(o, o + d.H * d.Dv, T(0));
      for (int64_t k = 0; k < n; ++k) {
        const T* v = kv + (b * d.T + sl[k]) * d.Dk;
        for (int64_t h = 0; h < d.H; ++h) {
          const T p = sc[h * n + k];
          T* oh = o + h * d.Dv;
#pragma omp simd
          for (int64_t i = 0; i < d.Dv; ++i) oh[i] += p * v[i];
        }
      }
    }
  }
}

// NOTES: dkv is accumulated in one private [B, T, Dk] buffer per thread (a row is selected by many
// queries, possibly twice by one), then the buffers are summed in thread order: deterministic for a
// given thread count, no atomics.
template <class T>
void backward_impl(const Dims& d, const T* dout, const T* q, const T* kv, const int32_t* idx, const T* out,
                   const T* lse, T scale, T* dq, T* dkv, T* psum) {
  const int64_t kv_elems = d.B * d.T * d.Dk;
  const int nthreads = omp_get_max_threads();
  std::vector<std::vector<T>> partial(static_cast<size_t>(nthreads));
#pragma omp parallel num_threads(nthreads) if(d.B * d.T * d.H * d.K * d.Dk > dsa_cpu::kOmpMinWork)
  {
    const int tid = omp_get_thread_num();
    std::vector<T>& acc = partial[static_cast<size_t>(tid)];
    acc.assign(static_cast<size_t>(kv_elems), T(0));
    std::vector<T> delta, lrow;  // [H]: sum_k p_k dp_k = dout . out, and the row's lse
#pragma omp for schedule(static)
    for (int64_t bt = 0; bt < d.B * d.T; ++bt) {
      const int64_t b = bt / d.T, t = bt % d.T;
      std::fill(dq + bt * d.H * d.Dk, dq + (bt + 1) * d.H * d.Dk, T(0));
      if (psum) std::fill(psum + bt * d.K, psum + (bt + 1) * d.K, T(0));
      delta.resize(static_cast<size_t>(d.H));
      lrow.resize(static_cast<size_t>(d.H));
      for (int64_t h = 0; h < d.H; ++h) {
        delta[h] = dot(dout + (bt * d.H + h) * d.Dv, out + (bt * d.H + h) * d.Dv, d.Dv);
        lrow[h] = lse[(b * d.H + h) * d.T + t];
      }
      for (int64_t k = 0; k < d.K; ++k) {  // slot-major, as in the forward
        const int32_t s = idx[bt * d.K + k];
        if (s < 0) continue;
        const T* v = kv + (b * d.T + s) * d.Dk;
        T* a = acc.data() + (b * d.T + s) * d.Dk;
        for (int64_t h = 0; h < d.H; ++h) {
          if (!std::isfinite(lrow[h])) continue;
          const T* qh = q + (bt * d.H + h) * d.Dk;
          const T* gh = dout + (bt * d.H + h) * d.Dv;
          T* dqh = dq + (bt * d.H + h) * d.Dk;
          const T p = std::exp(scale * dot(qh, v, d.Dk) - lrow[h]);
          if (psum) psum[bt * d.K + k] += p;
          const T ds = p * (dot(gh, v, d.Dv) - delta[h]) * scale;
#pragma omp simd
          for (int64_t i = 0; i < d.Dk; ++i) {
            dqh[i] += ds * v[i];
            a[i] += ds * qh[i];
          }
#pragma omp simd
          for (int64_t i = 0; i < d.Dv; ++i) a[i] += p * gh[i];
        }
      }
    }
  }
#pragma omp parallel for schedule(static) if(kv_elems * nthreads > dsa_cpu::kOmpMinWork)
  for (int64_t i = 0; i < kv_elems; ++i) {
    T s = 0;
    for (int th = 0; th < nthreads; ++th)
      if (!partial[static_cast<size_t>(th)].empty()) s += partial[static_cast<size_t>(th)][static_cast<size_t>(i)];
    dkv[i] = s;
  }
}
}  // namespace

Tensor sparse_attention_forward(const Tensor& q, const Tensor& kv, int64_t dv, const Tensor& indices, double scale,
                                Tensor* lse_out, Tensor* probs_sum_out) {
  DSA_DISPATCH_CUDA(on_cuda(q), kFwd,
                    cuda::sparse_attention_forward(q, kv, dv, indices, scale, lse_out, probs_sum_out));
  const Dims d = check_common(kFwd, q, kv, dv, indices);
  Tensor out = Tensor::empty({d.B, d.T, d.H, d.Dv}, q.dtype());
  Tensor lse, psum;
  if (lse_out) lse = Tensor::empty({d.B, d.H, d.T}, q.dtype());
  if (probs_sum_out) psum = Tensor::empty({d.B, d.T, d.K}, q.dtype());
  if (q.dtype() == DType::F32)
    forward_impl<float>(d, q.data<float>(), kv.data<float>(), indices.data<int32_t>(), static_cast<float>(scale),
                        out.data<float>(), lse_out ? lse.data<float>() : nullptr,
                        probs_sum_out ? psum.data<float>() : nullptr);
  else
    forward_impl<double>(d, q.data<double>(), kv.data<double>(), indices.data<int32_t>(), scale, out.data<double>(),
                         lse_out ? lse.data<double>() : nullptr, probs_sum_out ? psum.data<double>() : nullptr);
  if (lse_out) *lse_out = lse;
  if (probs_sum_out) *probs_sum_out = psum;
  return out;
}

SparseAttentionGrads sparse_attention_backward(const Tensor& dout, const Tensor& q, const Tensor& kv, int64_t dv,
                                               const Tensor& indices, const Tensor& out, const Tensor& lse,
                                               double scale, bool probs_sum) {
  DSA_DISPATCH_CUDA(on_cuda(q), kBwd,
                    cuda::sparse_attention_backward(dout, q, kv, dv, indices, out, lse, scale, probs_sum));
  const Dims d = check_common(kBwd, q, kv, dv, indices);
  dsa_cpu::check_cpu_float(kBwd, {{"q", &q}, {"dout", &dout}, {"out", &out}, {"lse", &lse}});
  expect_shape(kBwd, "dout", dout, {d.B, d.T, d.H, d.Dv});
  expect_shape(kBwd, "out", out, {d.B, d.T, d.H, d.Dv});
  expect_shape(kBwd, "lse", lse, {d.B, d.H, d.T});
  SparseAttentionGrads g{Tensor::empty(q.shape(), q.dtype()), Tensor::empty(kv.shape(), q.dtype()), Tensor()};
  if (probs_sum) g.probs_sum = Tensor::empty({d.B, d.T, d.K}, q.dtype());
  if (q.dtype() == DType::F32)
    backward_impl<float>(d, dout.data<float>(), q.data<float>(), kv.data<float>(), indices.data<int32_t>(),
                         out.data<float>(), lse.data<float>(), static_cast<float>(scale), g.dq.data<float>(),
                         g.dkv.data<float>(), probs_sum ? g.probs_sum.data<float>() : nullptr);
  else
    backward_impl<double>(d, dout.data<double>(), q.data<double>(), kv.data<double>(), indices.data<int32_t>(),
                          out.data<double>(), lse.data<double>(), scale, g.dq.data<double>(), g.dkv.data<double>(),
                          probs_sum ? g.probs_sum.data<double>() : nullptr);
  return g;
}

}  // namespace dsa::ops
