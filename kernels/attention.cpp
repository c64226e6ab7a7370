// Dense causal attention (MHA / GQA / MQA), CPU reference: forward and backward.
//
// Layouts (token-major, as everywhere in the op layer):
//   q    [B, T, H,  Dk]     k [B, T, Hk, Dk]     v [B, T, Hk, Dv]     out/dout [B, T, H, Dv]
//   lse  [B, H, T]          natural-log log-sum-exp of scale * q.k over s <= t
// Head h reads kv head g = h / (H / Hk).
//
// Algorithm: "strip" attention. A task owns one query block [t0, t1) of one (b, h); it computes the
// score strip S [t1 - t0, t1] = scale * Q_blk K[0:t1]^T with one GEMM, turns it into probabilities
// in place and multiplies by V with a second GEMM. Extra memory is O(kBlock * T) per thread; the
// [T, T] score matrix is never materialized. The backward recomputes P from lse:
//   dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO.
//
// NOTES:
//  - The backward runs in two phases so that every output element has exactly one writer (no atomics,
//    no per-thread copies of dK/dV, deterministic for any thread count): phase 1 owns query blocks and
//    writes dQ; phase 2 owns key blocks of one kv head, loops over the heads of its group and writes
//    dK and dV. The price is recomputing S and dP in both phases (7 GEMMs instead of 5).
//  - Tasks are independent GEMM calls on strided row blocks (leading dimension H*D), so OpenBLAS is
//    asked to stay single-threaded while OpenMP spreads the tasks (BlasSerial below); nested BLAS
//    threads on top of OpenMP threads only oversubscribe the cores.
//  - f32 inputs keep f32 GEMMs and exps; the row max / row sums / rowsum(dO*O) accumulate in double.
#include "kernels/cpu_blas.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/ops_attention.h"
#include "kernels/op_util.h"
#include "kernels/ops.h"

namespace dsa::ops {
namespace {

constexpr int64_t kBlock = 64;  // query rows (forward, backward phase 1) or key rows (phase 2) per task

using detail::BlasSerial;
using detail::gemm_rm;
using detail::on_cuda;

struct Dims {
  int64_t B, T, H, Hk, Dk, Dv, rep;  // rep = H / Hk heads per kv head
};

Dims check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  if (q.device() == Device::CUDA) {
    expect_dtype(op, "q", q, DType::BF16);
  } else {
    expect_float(op, "q", q);
  }
  expect_shape(op, "q", q, {-1, -1, -1, -1});
  Dims d{q.size(0), q.size(1), q.size(2), 0, q.size(3), 0, 0};
  expect_shape(op, "k", k, {d.B, d.T, -1, d.Dk});
  d.Hk = k.size(2);
  expect_shape(op, "v", v, {d.B, d.T, d.Hk, -1});
  d.Dv = v.size(3);
  expect_dtype(op, "k", k, q.dtype());
  expect_dtype(op, "v", v, q.dtype());
  expect_same_device(op, q, k);
  expect_same_device(op, q, v);
  DSA_CHECK(d.Hk > 0 && d.H % d.Hk == 0, "[", op, "] kv heads (", d.Hk, ") must divide query heads (", d.H,
            "), q ", q.desc(), ", k ", k.desc());
  DSA_CHECK(d.Dk > 0 && d.Dv > 0, "[", op, "] head dims must be positive, q ", q.desc(), ", v ", v.desc());
  d.rep = d.H / d.Hk;
  return d;
}

// Forward task (b, h, query block): out rows and lse for t in [t0, t1).
template <class T>
void forward_block(const Dims& d, const T* q, const T* k, const T* v, T scale, int64_t b, int64_t h, int64_t t0,
                   int64_t t1, T* S, T* out, T* lse) {
  const int64_t g = h / d.rep, nq = t1 - t0, L = t1;
  const T* Q = q + ((b * d.T + t0) * d.H + h) * d.Dk;   // rows stride H*Dk
  const T* K = k + (b * d.T * d.Hk + g) * d.Dk;         // rows stride Hk*Dk
  const T* V = v + (b * d.T * d.Hk + g) * d.Dv;         // rows stride Hk*Dv
  gemm_rm(false, true, nq, L, d.Dk, scale, Q, d.H * d.Dk, K, d.Hk * d.Dk, T(0), S, L);
  for (int64_t i = 0; i < nq; ++i) {
    T* row = S + i * L;
    const int64_t valid = t0 + i + 1;  // keys s <= t
    T m = row[0];
    for (int64_t j = 1; j < valid; ++j) m = std::max(m, row[j]);
    double l = 0;
    for (int64_t j = 0; j < valid; ++j) {
      row[j] = std::exp(row[j] - m);
      l += row[j];
    }
    const T inv = T(1.0 / l);
    for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
    for (int64_t j = valid; j < L; ++j) row[j] = T(0);
    lse[(b * d.H + h) * d.T + t0 + i] = T(double(m) + std::log(l));
  }
  T* O = out + ((b * d.T + t0) * d.H + h) * d.Dv;
  gemm_rm(false, false, nq, d.Dv, L, T(1), S, L, V, d.Hk * d.Dv, T(0), O, d.H * d.Dv);
}

template <class T>
void forward_impl(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out,
                  Tensor& lse) {
  const int64_t nqb = (d.T + kBlock - 1) / kBlock, tasks = d.B * d.H * nqb;
  const T* qp = q.data<T>();
  const T* kp = k.data<T>();
  const T* vp = v.data<T>();
  T* op = out.data<T>();
  T* lp = lse.data<T>();
  BlasSerial serial;
#pragma omp parallel
  {
    std::vector<T> S(static_cast<size_t>(kBlock * d.T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      // Largest (latest) query blocks first: better balance under the dynamic schedule.
      const int64_t qb = nqb - 1 - task % nqb, bh = task / nqb, b = bh / d.H, h = bh % d.H;
      const int64_t t0 = qb * kBlock, t1 = std::min(d.T, t0 + kBlock);
      forward_block<T>(d, qp, kp, vp, T(scale), b, h, t0, t1, S.data(), op, lp);
    }
  }
}

// Backward phase 1, task (b, h, query block): dq rows for t in [t0, t1).
template <class T>
void backward_q_block(const Dims& d, const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* D,
                      T scale, int64_t b, int64_t h, int64_t t0, int64_t t1, T* P, T* dP, T* dq) {
  const int64_t g = h / d.rep, nq = t1 - t0, L = t1;
  const T* Q = q + ((b * d.T + t0) * d.H + h) * d.Dk;
  const T* dO = dout + ((b * d.T + t0) * d.H + h) * d.Dv;
  const T* K = k + (b * d.T * d.Hk + g) * d.Dk;
  const T* V = v + (b * d.T * d.Hk + g) * d.Dv;
  const T* lrow = lse + (b * d.H + h) * d.T;
  const T* Drow = D + (b * d.H + h) * d.T;
  gemm_rm(false, true, nq, L, d.Dk, scale, Q, d.H * d.Dk, K, d.Hk * d.Dk, T(0), P, L);
  gemm_rm(false, true, nq, L, d.Dv, T(1), dO, d.H * d.Dv, V, d.Hk * d.Dv, T(0), dP, L);
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = t0 + i;
    const T l = lrow[t], Dt = Drow[t];
    T* p = P + i * L;
    T* dp = dP + i * L;
    for (int64_t j = 0; j <= t; ++j) dp[j] = std::exp(p[j] - l) * (dp[j] - Dt);  // dS
    for (int64_t j = t + 1; j < L; ++j) dp[j] = T(0);
  }
  gemm_rm(false, false, nq, d.Dk, L, scale, dP, L, K, d.Hk * d.Dk, T(0),
          dq + ((b * d.T + t0) * d.H + h) * d.Dk, d.H * d.Dk);
}

// Backward phase 2, task (b, g, key block): dk and dv rows for s in [s0, s1), summed over the heads of g.
template <class T>
void backward_kv_block(const Dims& d, const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* D,
                       T scale, int64_t b, int64_t g, int64_t s0, int64_t s1, T* P, T* dP, T* dk, T* dv) {
  const int64_t nk = s1 - s0, nq = d.T - s0;  // queries t in [s0, T) can see these keys
  const T* K = k + ((b * d.T + s0) * d.Hk + g) * d.Dk;
  const T* V = v + ((b * d.T + s0) * d.Hk + g) * d.Dv;
  T* dK = dk + ((b * d.T + s0) * d.Hk + g) * d.Dk;
  T* dV = dv + ((b * d.T + s0) * d.Hk + g) * d.Dv;
  for (int64_t r = 0; r < d.rep; ++r) {
    const int64_t h = g * d.rep + r;
    const T* Q = q + ((b * d.T + s0) * d.H + h) * d.Dk;
    const T* dO = dout + ((b * d.T + s0) * d.H + h) * d.Dv;
    const T* lrow = lse + (b * d.H + h) * d.T + s0;
    const T* Drow = D + (b * d.H + h) * d.T + s0;
    const T beta = r == 0 ? T(0) : T(1);
    // Transposed strips: row j = key s0 + j, column i = query s0 + i; causal: valid when i >= j.
    gemm_rm(false, true, nk, nq, d.Dk, scale, K, d.Hk * d.Dk, Q, d.H * d.Dk, T(0), P, nq);
    gemm_rm(false, true, nk, nq, d.Dv, T(1), V, d.Hk * d.Dv, dO, d.H * d.Dv, T(0), dP, nq);
    for (int64_t j = 0; j < nk; ++j) {
      T* p = P + j * nq;
      T* dp = dP + j * nq;
      for (int64_t i = 0; i < j; ++i) p[i] = dp[i] = T(0);
      for (int64_t i = j; i < nq; ++i) {
        p[i] = std::exp(p[i] - lrow[i]);
        dp[i] = p[i] * (dp[i] - Drow[i]);  // dS^T
      }
    }
    gemm_rm(false, false, nk, d.Dv, nq, T(1), P, nq, dO, d.H * d.Dv, beta, dV, d.Hk * d.Dv);
    gemm_rm(false, false, nk, d.Dk, nq, scale, dP, nq, Q, d.H * d.Dk, beta, dK, d.Hk * d.Dk);
  }
}

template <class T>
void backward_impl(const Dims& d, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& out, const Tensor& lse, double scale, AttentionGrads& g) {
  const T* qp = q.data<T>();
  const T* kp = k.data<T>();
  const T* vp = v.data<T>();
  const T* dop = dout.data<T>();
  const T* op = out.data<T>();
  const T* lp = lse.data<T>();
  // D[b, h, t] = rowsum(dO * O)
  std::vector<T> D(static_cast<size_t>(d.B * d.H * d.T));
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < d.B * d.T; ++bt) {
    const int64_t b = bt / d.T, t = bt % d.T;
    for (int64_t h = 0; h < d.H; ++h) {
      const T* x = dop + (bt * d.H + h) * d.Dv;
      const T* y = op + (bt * d.H + h) * d.Dv;
      double s = 0;
      for (int64_t i = 0; i < d.Dv; ++i) s += double(x[i]) * double(y[i]);
      D[(b * d.H + h) * d.T + t] = T(s);
    }
  }
  const int64_t nb = (d.T + kBlock - 1) / kBlock;
  T* dq = g.dq.data<T>();
  T* dk = g.dk.data<T>();
  T* dv = g.dv.data<T>();
  BlasSerial serial;
#pragma omp parallel
  {
    std::vector<T> P(static_cast<size_t>(kBlock * d.T)), dP(static_cast<size_t>(kBlock * d.T));
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < d.B * d.H * nb; ++task) {
      const int64_t qb = nb - 1 - task % nb, bh = task / nb, b = bh / d.H, h = bh % d.H;
      const int64_t t0 = qb * kBlock, t1 = std::min(d.T, t0 + kBlock);
      backward_q_block<T>(d, qp, kp, vp, dop, lp, D.data(), T(scale), b, h, t0, t1, P.data(), dP.data(), dq);
    }
    // Phase 2 writes dk/dv only, phase 1 wrote dq only: no barrier needed between them.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < d.B * d.Hk * nb; ++task) {
      const int64_t kb = task % nb, bg = task / nb, b = bg / d.Hk, gi = bg % d.Hk;  // early blocks cost most
      const int64_t s0 = kb * kBlock, s1 = std::min(d.T, s0 + kBlock);
      backward_kv_block<T>(d, qp, kp, vp, dop, lp, D.data(), T(scale), b, gi, s0, s1, P.data(), dP.data(), dk, dv);
    }
  }
}

}  // namespace

namespace {
bool& cudnn_switch() {
  static bool on = [] {
    const char* e = std::getenv("DSA_ATTN_CUDNN");
    return !(e && std::string(e) == "0");
  }();
  return on;
}
}  // namespace

void set_attention_cudnn(bool enabled) { cudnn_switch() = enabled; }
bool attention_cudnn_enabled() { return cudnn_switch(); }

AttentionCudnnInfo attention_cudnn_info() {
  AttentionCudnnInfo info;
#if DSA_HAVE_CUDA
  info.version = cuda::attention_cudnn_version();
  cuda::attention_cudnn_calls(&info.forward_calls, &info.backward_calls);
#endif
  return info;
}

Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor* lse_out) {
  const char* op = "attention_forward";
  const Dims d = check_inputs(op, q, k, v);
  DSA_DISPATCH_CUDA(on_cuda(q), op, cuda::attention_forward(q, k, v, scale, lse_out));
  Tensor out = Tensor::empty({d.B, d.T, d.H, d.Dv}, q.dtype());
  Tensor lse = Tensor::empty({d.B, d.H, d.T}, q.dtype());
  if (q.dtype() == DType::F32)
    forward_impl<float>(d, q, k, v, scale, out, lse);
  else
    forward_impl<double>(d, q, k, v, scale, out, lse);
  if (lse_out) *lse_out = lse;
  return out;
}

AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, double scale) {
  const char* op = "attention_backward";
  const Dims d = check_inputs(op, q, k, v);
  expect_shape(op, "dout", dout, {d.B, d.T, d.H, d.Dv});
  expect_shape(op, "out", out, {d.B, d.T, d.H, d.Dv});
  expect_shape(op, "lse", lse, {d.B, d.H, d.T});
  expect_dtype(op, "dout", dout, q.dtype());
  expect_dtype(op, "out", out, q.dtype());
  expect_same_device(op, q, dout);
  expect_same_device(op, q, out);
  expect_same_device(op, q, lse);
  expect_dtype(op, "lse", lse, on_cuda(q) ? DType::F32 : q.dtype());  // GPU: bf16 activations, f32 row statistics
  DSA_DISPATCH_CUDA(on_cuda(q), op, cuda::attention_backward(dout, q, k, v, out, lse, scale));
  AttentionGrads g{Tensor::empty(q.shape(), q.dtype()), Tensor::empty(k.shape(), q.dtype()),
                   Tensor::empty(v.shape(), q.dtype())};
  if (q.dtype() == DType::F32)
    backward_impl<float>(d, dout, q, k, v, out, lse, scale, g);
  else
    backward_impl<double>(d, dout, q, k, v, out, lse, scale, g);
  return g;
}

}  // namespace dsa::ops
