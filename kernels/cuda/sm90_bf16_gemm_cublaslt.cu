// GEMM and linear layer on cuBLASLt: bf16 x bf16 -> bf16 / f32 and f32 x f32 -> f32, fp32 compute.
//
// NOTES: cuBLASLt is column-major. A row-major matrix [r, c] is the column-major matrix [c, r] with the
// same leading dim, so row-major C = op(A) op(B) is computed as the column-major
//   C^T [N, M] = op(B)^T [N, K] @ op(A)^T [K, M],
// i.e. cuBLASLt's "A" is our b (op = trans_b), its "B" is our a (op = trans_a), m' = N, n' = M.
// A matmul plan (descriptors + the heuristic's best algorithm) is cached per shape, dtypes, transposes,
// batch strides and pointer alignments, so the heuristic runs once per shape.
#include <cublasLt.h>

#include <array>
#include <map>
#include <mutex>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/cuda/ops_gemm.h"

namespace dsa::cuda {

namespace {

void lt_check(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    fail(strcat_("[gemm] ", what, " failed: ", cublasLtGetStatusString(st)));
}

cudaDataType_t lt_type(DType t) { return t == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F; }

// Largest power of two (<= 256) dividing the byte address and the batch stride in bytes.
int64_t alignment(const void* p, int64_t stride_bytes) {
  uint64_t v = reinterpret_cast<uintptr_t>(p) | static_cast<uint64_t>(stride_bytes) | 256u;
  return static_cast<int64_t>(v & (~v + 1));
}

// One column-major problem: D [m, n] = alpha opA(A) [m, k] opB(B) [k, n] + beta C, batched by strides.
struct Problem {
  DType ab = DType::BF16, c = DType::BF16;
  bool ta = false, tb = false;      // cuBLASLt's opA / opB
  int64_t m = 0, n = 0, k = 0;
  int64_t a_rows = 0, a_cols = 0;  // stored A (before op), ld = a_rows
  int64_t b_rows = 0, b_cols = 0;  // stored B, ld = b_rows
  int64_t batch = 1, sa = 0, sb = 0, sc = 0;  // element strides between batches (0 = shared)
  int64_t al_a = 256, al_b = 256, al_c = 256;
  std::array<int64_t, 16> key() const {
    return {static_cast<int64_t>(ab), static_cast<int64_t>(c), ta, tb, m, n, k, a_rows, b_rows, batch, sa, sb, sc,
            al_a, al_b, al_c};
  }
};

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;
};

cublasLtMatrixLayout_t make_layout(DType t, int64_t rows, int64_t cols, int64_t batch, int64_t stride) {
  cublasLtMatrixLayout_t l = nullptr;
  lt_check(cublasLtMatrixLayoutCreate(&l, lt_type(t), static_cast<uint64_t>(rows), static_cast<uint64_t>(cols),
                                      rows),
           "cublasLtMatrixLayoutCreate");
  if (batch > 1) {
    const int32_t bc = static_cast<int32_t>(batch);
    lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof(bc)), "layout batch");
    lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)),
             "layout stride");
  }
  return l;
}

// The cached plan of a problem (built with one heuristic query on first use).
const Plan& plan_for(const Problem& p) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 16>, Plan>* cache = new std::map<std::array<int64_t, 16>, Plan>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(p.key());
  if (it != cache->end()) return it->second;
  Plan pl;
  lt_check(cublasLtMatmulDescCreate(&pl.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t oa = p.ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = p.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(pl.op, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof(oa)), "desc transa");
  lt_check(cublasLtMatmulDescSetAttribute(pl.op, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof(ob)), "desc transb");
  pl.a = make_layout(p.ab, p.a_rows, p.a_cols, p.batch, p.sa);
  pl.b = make_layout(p.ab, p.b_rows, p.b_cols, p.batch, p.sb);
  pl.c = make_layout(p.c, p.m, p.n, p.batch, p.sc);
  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  size_t ws = 0;
  blaslt_workspace(&ws);
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
           "pref workspace");
  const uint32_t al[3] = {static_cast<uint32_t>(p.al_a), static_cast<uint32_t>(p.al_b), static_cast<uint32_t>(p.al_c)};
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4), "pref");
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4), "pref");
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4), "pref");
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2], 4), "pref");
  cublasLtMatmulHeuristicResult_t res{};
  int count = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(blaslt(), pl.op, pl.a, pl.b, pl.c, pl.c, pref, 1, &res, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  pl.found = st == CUBLAS_STATUS_SUCCESS && count > 0;
  if (pl.found) pl.algo = res.algo;
  return cache->emplace(p.key(), pl).first->second;
}

void run_plan(const Plan& pl, const void* a, const void* b, void* c, float alpha, float beta) {
  size_t ws = 0;
  void* wp = blaslt_workspace(&ws);
  lt_check(cublasLtMatmul(blaslt(), pl.op, &alpha, a, pl.a, b, pl.b, &beta, c, pl.c, c, pl.c, &pl.algo, wp, ws,
                          stream()),
           "cublasLtMatmul");
}

}  // namespace

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta) {
  const char* op = "gemm";
  expect_cuda(op, "a", a);
  expect_cuda(op, "b", b);
  expect_cuda(op, "c", c);
  const bool ok_dt = (a.dtype() == DType::BF16 && b.dtype() == DType::BF16 &&
                      (c.dtype() == DType::BF16 || c.dtype() == DType::F32)) ||
                     (a.dtype() == DType::F32 && b.dtype() == DType::F32 && c.dtype() == DType::F32);
  DSA_CHECK(ok_dt, "[", op, "] unsupported dtypes on the GPU: a ", a.desc(), ", b ", b.desc(), ", c ", c.desc(),
            " (supported: bf16 x bf16 -> bf16 or f32, f32 x f32 -> f32)");
  DSA_CHECK(c.ndim() == 2 || c.ndim() == 3, "[", op, "] c must be 2-D or 3-D, got ", c.desc());
  const bool batched = c.ndim() == 3;
  const int64_t batch = batched ? c.size(0) : 1;
  for (const Tensor* t : {&a, &b})
    DSA_CHECK(t->ndim() == 2 || (batched && t->ndim() == 3 && t->size(0) == batch), "[", op, "] ",
              t == &a ? "a" : "b", " must be 2-D", batched ? strcat_(" or [", batch, ", ., .]") : "", ", got ",
              t->desc(), " with c ", c.desc());
  const int64_t m = trans_a ? a.size(-1) : a.size(-2), ka = trans_a ? a.size(-2) : a.size(-1);
  const int64_t kb = trans_b ? b.size(-1) : b.size(-2), n = trans_b ? b.size(-2) : b.size(-1);
  DSA_CHECK(ka == kb && c.size(-2) == m && c.size(-1) == n, "[", op, "] shapes do not chain: a ", a.desc(),
            trans_a ? "^T" : "", " @ b ", b.desc(), trans_b ? "^T" : "", " into c ", c.desc());
  DSA_CHECK(m < (1ll << 31) && n < (1ll << 31) && ka < (1ll << 31), "[", op, "] dimensions exceed int32 range");
  if (m * n * batch == 0) return;
  if (ka == 0) {  // empty sum: c = beta c (beta = 0 overwrites, so NaN garbage never survives)
    if (beta == 0.0)
      c.zero_();
    else
      scale_(c, beta);
    return;
  }
  int64_t sa = a.ndim() == 3 ? a.size(1) * a.size(2) : 0;  // batch strides in elements (0 = shared)
  int64_t sb = b.ndim() == 3 ? b.size(1) * b.size(2) : 0;
  int64_t rows_a = a.size(-2), bt = batch;
  // NOTES: a batched, untransposed a with a shared b is one 2-D GEMM over [batch * M, K] rows.
  if (batched && sa != 0 && sb == 0 && !trans_a) {
    rows_a = batch * a.size(-2);
    bt = 1;
    sa = 0;
  }
  const int64_t mm = bt == 1 && batched ? batch * m : m;  // rows of C in the problem
  Problem p;
  p.ab = a.dtype();
  p.c = c.dtype();
  p.ta = trans_b;
  p.tb = trans_a;
  p.m = n;
  p.n = mm;
  p.k = ka;
  p.a_rows = b.size(-1);
  p.a_cols = b.size(-2);
  p.b_rows = a.size(-1);
  p.b_cols = rows_a;
  p.batch = bt;
  p.sa = sb;
  p.sb = sa;
  p.sc = bt > 1 ? m * n : 0;
  const int64_t es = dtype_size(a.dtype()), esc = dtype_size(c.dtype());
  p.al_a = alignment(b.raw(), p.sa * es);
  p.al_b = alignment(a.raw(), p.sb * es);
  p.al_c = alignment(c.raw(), p.sc * esc);
  const float fa = static_cast<float>(alpha), fb = static_cast<float>(beta);
  const Plan& pl = plan_for(p);
  if (pl.found) {
    run_plan(pl, b.raw(), a.raw(), c.raw(), fa, fb);
    return;
  }
  // NOTES: no algorithm for a batched problem (e.g. a shared operand with batch stride 0): one 2-D
  // GEMM per batch entry instead.
  DSA_CHECK(bt > 1, "[", op, "] cuBLASLt found no algorithm for a ", a.desc(), trans_a ? "^T" : "", " @ b ",
            b.desc(), trans_b ? "^T" : "", " into c ", c.desc());
  for (int64_t i = 0; i < bt; ++i) {
    const Tensor ai = a.ndim() == 3 ? a.row(i) : a, bi = b.ndim() == 3 ? b.row(i) : b;
    Tensor ci = c.row(i);
    gemm(ai, trans_a, bi, trans_b, ci, alpha, beta);
  }
}

Tensor linear_forward(const Tensor& x, const Tensor& w) {
  const char* op = "linear_forward";
  expect_gpu_float(op, "x", x);
  expect_cuda(op, "w", w);
  DSA_CHECK(w.dtype() == x.dtype(), "[", op, "] w must be ", dtype_name(x.dtype()), " like x, got ", w.desc());
  expect_shape(op, "w", w, {-1, -1});
  DSA_CHECK(x.ndim() >= 1 && x.size(-1) == w.size(1), "[", op, "] x must have shape [-1, ", w.size(1), "], got ",
            x.desc(), " (w ", w.desc(), ")");
  Shape ys = x.shape();
  ys.back() = w.size(0);
  Tensor y = Tensor::empty(ys, x.dtype(), Device::CUDA);
  Tensor y2 = y.view({-1, w.size(0)});
  gemm(x.view({-1, w.size(1)}), false, w, true, y2, 1.0, 0.0);
  return y;
}

Tensor linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dw, bool need_dx) {
  const char* op = "linear_backward";
  expect_gpu_float(op, "x", x);
  expect_cuda(op, "w", w);
  expect_cuda(op, "dy", dy);
  DSA_CHECK(w.dtype() == x.dtype() && dy.dtype() == x.dtype(), "[", op, "] x, w and dy must share a dtype, got x ",
            x.desc(), ", w ", w.desc(), ", dy ", dy.desc());
  expect_shape(op, "w", w, {-1, -1});
  const int64_t out = w.size(0), in = w.size(1);
  DSA_CHECK(x.ndim() >= 1 && x.size(-1) == in, "[", op, "] x must have shape [-1, ", in, "], got ", x.desc());
  Shape ys = x.shape();
  ys.back() = out;
  DSA_CHECK(dy.shape() == ys, "[", op, "] dy must have shape ", ys, ", got ", dy.desc());
  const Tensor x2 = x.view({-1, in}), dy2 = dy.view({-1, out});
  if (dw) {
    Tensor& g = accum_arg(op, "dw", dw, w.shape(), DType::F32);
    gemm(dy2, true, x2, false, g, 1.0, 1.0);
  }
  if (!need_dx) return Tensor();
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), Device::CUDA);
  Tensor dx2 = dx.view({-1, in});
  gemm(dy2, false, w, false, dx2, 1.0, 0.0);
  return dx;
}

}  // namespace dsa::cuda
