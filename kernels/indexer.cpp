// Lightning indexer kernels (CPU reference): Hadamard rotation, FP8 e4m3 block quantization, the
// indexer scores I[t, s] = sum_j w[t, j] * D^-0.5 * relu(q[t, j] . k[s]) forward and backward for a
// block of query rows, and the causal top-k selection.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cuda/ops_dsa.h"
#include "kernels/dsa_cpu_util.h"
#include "kernels/dsa_ops.h"

namespace dsa::ops {

using dsa_cpu::check_cpu_float;
using detail::gemm_rm;
using detail::on_cuda;

// ---------------------------------------------------------------------------------------- hadamard

namespace {
template <class T>
void hadamard_rows(T* x, int64_t rows, int64_t d) {
  const T norm = T(1) / std::sqrt(T(d));
#pragma omp parallel for schedule(static) if(rows * d > dsa_cpu::kOmpMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    T* v = x + r * d;
    for (int64_t h = 1; h < d; h *= 2)
      for (int64_t i = 0; i < d; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const T a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
    for (int64_t j = 0; j < d; ++j) v[j] *= norm;
  }
}
}  // namespace

Tensor hadamard_transform(const Tensor& x) {
  DSA_DISPATCH_CUDA(on_cuda(x), "hadamard_transform", cuda::hadamard_transform(x));
  const DType dt = check_cpu_float("hadamard_transform", {{"x", &x}});
  DSA_CHECK(x.ndim() >= 1, "[hadamard_transform] x must have at least one dim, got ", x.desc());
  const int64_t d = x.size(-1);
  DSA_CHECK(d >= 1 && (d & (d - 1)) == 0, "[hadamard_transform] last dim must be a power of two, got ", x.desc());
  Tensor y = x.clone();
  const int64_t rows = x.numel() / d;
  if (dt == DType::F32)
    hadamard_rows(y.data<float>(), rows, d);
  else
    hadamard_rows(y.data<double>(), rows, d);
  return y;
}

// --------------------------------------------------------------------------------------------- fp8

// NOTES: the scale is 2^ceil(log2(amax * (1/448))) with the product rounded to f32 and the ceiling
// read from its bits (exponent, +1 when any mantissa bit is set), exactly like DeepSeek's
// fast_round_scale and the GPU kernels; computing log2f would differ near powers of two.
float fp8_block_scale(float amax) {
  const float a = amax < 1e-4f ? 1e-4f : amax;
  const uint32_t bits = f32_bits(a * (1.0f / kFp8E4M3Max));
  const int e = static_cast<int>((bits >> 23) & 0xffu) - 127 + ((bits & 0x7fffffu) != 0 ? 1 : 0);
  return std::ldexp(1.0f, e);
}

namespace {
// Calls f(row, block, begin, end, scale) for every block after computing its scale.
template <class T, class F>
void for_each_block(const T* x, int64_t n, int64_t d, int64_t block, F&& f) {
  const int64_t nb = (d + block - 1) / block;
#pragma omp parallel for schedule(static) if(n * d > dsa_cpu::kOmpMinWork)
  for (int64_t r = 0; r < n; ++r)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t begin = blk * block, end = std::min(d, begin + block);
      float amax = 0;
      for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[r * d + i])));
      f(r, blk, begin, end, fp8_block_scale(amax));
    }
}

void check_quant_input(const char* op, const Tensor& x, int64_t block) {
  check_cpu_float(op, {{"x", &x}});
  expect_shape(op, "x", x, {-1, -1});
  DSA_CHECK(block >= 1, "[", op, "] block must be >= 1, got ", block);
}

template <class T>
void quantize_codes(const Tensor& x, int64_t block, Fp8Blocks& q) {
  const int64_t n = x.size(0), d = x.size(1), nb = q.scales.size(1);
  fp8e4m3* codes = q.codes.data<fp8e4m3>();
  float* scales = q.scales.data<float>();
  const T* xp = x.data<T>();
  for_each_block(xp, n, d, block, [&](int64_t r, int64_t blk, int64_t begin, int64_t end, float s) {
    scales[r * nb + blk] = s;
    for (int64_t i = begin; i < end; ++i) codes[r * d + i] = f32_to_fp8e4m3(static_cast<float>(xp[r * d + i]) / s);
  });
}

template <class T>
void quantize_roundtrip(const Tensor& x, int64_t block, Tensor& y, float* scales, int64_t nb) {
  const int64_t n = x.size(0), d = x.size(1);
  const T* xp = x.data<T>();
  T* yp = y.data<T>();
  for_each_block(xp, n, d, block, [&](int64_t r, int64_t blk, int64_t begin, int64_t end, float s) {
    if (scales) scales[r * nb + blk] = s;
    for (int64_t i = begin; i < end; ++i)
      yp[r * d + i] = static_cast<T>(round_fp8e4m3(static_cast<float>(xp[r * d + i]) / s) * s);
  });
}
}  // namespace

Fp8Blocks fp8_block_quantize_codes(const Tensor& x, int64_t block) {
  DSA_DISPATCH_CUDA(on_cuda(x), "fp8_block_quantize_codes", cuda::fp8_block_quantize_codes(x, block));
  check_quant_input("fp8_block_quantize_codes", x, block);
  const int64_t n = x.size(0), d = x.size(1), nb = (d + block - 1) / block;
  Fp8Blocks q{Tensor::empty({n, d}, DType::F8E4M3), Tensor::empty({n, nb}, DType::F32)};
  if (x.dtype() == DType::F32)
    quantize_codes<float>(x, block, q);
  else
    quantize_codes<double>(x, block, q);
  return q;
}

Tensor fp8_block_dequantize(const Fp8Blocks& q, int64_t block, DType dtype) {
  DSA_DISPATCH_CUDA(on_cuda(q.codes), "fp8_block_dequantize", cuda::fp8_block_dequantize(q, block, dtype));
  const char* op = "fp8_block_dequantize";
  expect_shape(op, "codes", q.codes, {-1, -1});
  expect_dtype(op, "codes", q.codes, DType::F8E4M3);
  DSA_CHECK(q.scales.is_cpu(), "[", op, "] operands are on different devices: codes is ", q.codes.desc(),
            " but scales is ", q.scales.desc());
  DSA_CHECK(block >= 1 && is_float(dtype), "[", op, "] needs block >= 1 and dtype f32/f64");
  const int64_t n = q.codes.size(0), d = q.codes.size(1), nb = (d + block - 1) / block;
  expect_shape(op, "scales", q.scales, {n, nb});
  expect_dtype(op, "scales", q.scales, DType::F32);
  Tensor y = Tensor::empty({n, d}, dtype);
  const fp8e4m3* c = q.codes.data<fp8e4m3>();
  const float* s = q.scales.data<float>();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < d; ++i) y.set_item(r * d + i, fp8e4m3_to_f32(c[r * d + i]) * s[r * nb + i / block]);
  return y;
}

Tensor fp8_block_quantize(const Tensor& x, int64_t block, Tensor* scales_out) {
  DSA_DISPATCH_CUDA(on_cuda(x), "fp8_block_quantize", cuda::fp8_block_quantize(x, block, scales_out));
  check_quant_input("fp8_block_quantize", x, block);
  const int64_t n = x.size(0), d = x.size(1), nb = (d + block - 1) / block;
  Tensor y = Tensor::empty({n, d}, x.dtype());
  float* scales = nullptr;
  if (scales_out) {
    *scales_out = Tensor::empty({n, nb}, DType::F32);
    scales = scales_out->data<float>();
  }
  if (x.dtype() == DType::F32)
    quantize_roundtrip<float>(x, block, y, scales, nb);
  else
    quantize_roundtrip<double>(x, block, y, scales, nb);
  return y;
}

namespace {
// Returns D after checking q_I [B, T, Hi, D], k_I [B, T, D], w_I [B, T, Hi].
int64_t check_indexer_operands(const char* op, const Tensor& q, const Tensor& k, const Tensor* w) {
  if (w)
    check_cpu_float(op, {{"q_I", &q}, {"k_I", &k}, {"w_I", w}});
  else
    check_cpu_float(op, {{"q_I", &q}, {"k_I", &k}});
  expect_shape(op, "q_I", q, {-1, -1, -1, -1});
  const int64_t B = q.size(0), T = q.size(1), Hi = q.size(2), D = q.size(3);
  expect_shape(op, "k_I", k, {B, T, D});
  if (w) expect_shape(op, "w_I", *w, {B, T, Hi});
  return D;
}
}  // namespace

void indexer_fp8_operands(const Tensor& q_I, const Tensor& k_I, Tensor* q_hat, Tensor* k_hat) {
  DSA_DISPATCH_CUDA(on_cuda(q_I), "indexer_fp8_operands", cuda::indexer_fp8_operands(q_I, k_I, q_hat, k_hat));
  const int64_t D = check_indexer_operands("indexer_fp8_operands", q_I, k_I, nullptr);
  DSA_CHECK(q_hat && k_hat, "[indexer_fp8_operands] q_hat and k_hat must be non-null");
  *q_hat = fp8_block_quantize(hadamard_transform(q_I).view({-1, D}), kFp8BlockSize, nullptr).view(q_I.shape());
  *k_hat = fp8_block_quantize(hadamard_transform(k_I).view({-1, D}), kFp8BlockSize, nullptr).view(k_I.shape());
}

// --------------------------------------------------------------------------------- indexer scoring

namespace {
constexpr const char* kScoresFwd = "indexer_scores_forward";
constexpr const char* kScoresBwd = "indexer_scores_backward";

// z [R*Hi, t1] = q[b, t0:t1] (as [R*Hi, D]) @ k[b, 0:t1]^T
template <class T>
void block_dots(const T* q, const T* k, int64_t b, int64_t T_, int64_t Hi, int64_t D, int64_t t0, int64_t t1,
                std::vector<T>& z) {
  const int64_t R = t1 - t0;
  z.assign(static_cast<size_t>(R * Hi * t1), T(0));
  gemm_rm(false, true, R * Hi, t1, D, 1.0, q + (b * T_ + t0) * Hi * D, D, k + b * T_ * D, D, 0.0, z.data(), t1);
}

template <class T>
void scores_forward(const Tensor& q, const Tensor& k, const Tensor& w, int64_t t0, int64_t t1, Tensor& out) {
  const int64_t B = q.size(0), T_ = q.size(1), Hi = q.size(2), D = q.size(3), R = t1 - t0;
  const T c = T(1) / std::sqrt(T(D));
  const T* wp = w.data<T>();
  T* o = out.data<T>();
  std::vector<T> z;
  for (int64_t b = 0; b < B; ++b) {
    block_dots(q.data<T>(), k.data<T>(), b, T_, Hi, D, t0, t1, z);
#pragma omp parallel for schedule(static) if(R * Hi * t1 > dsa_cpu::kOmpMinWork)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = t0 + r;
      T* row = o + (b * R + r) * T_;
      for (int64_t s = 0; s <= t; ++s) row[s] = T(0);
      for (int64_t j = 0; j < Hi; ++j) {
        const T wj = wp[(b * T_ + t) * Hi + j] * c;
        const T* zr = z.data() + (r * Hi + j) * t1;
        for (int64_t s = 0; s <= t; ++s) row[s] += wj * std::max(zr[s], T(0));
      }
      for (int64_t s = t + 1; s < T_; ++s) row[s] = -std::numeric_limits<T>::infinity();
    }
  }
}

template <class T>
void scores_backward(const Tensor& dI, const Tensor& q, const Tensor& k, const Tensor& w, int64_t t0, Tensor* dq,
                     Tensor* dk, Tensor* dw) {
  const int64_t B = q.size(0), T_ = q.size(1), Hi = q.size(2), D = q.size(3), R = dI.size(1), t1 = t0 + R;
  const T c = T(1) / std::sqrt(T(D));
  const T* wp = w.data<T>();
  const T* g = dI.data<T>();
  std::vector<T> z, gz;  // [R*Hi, t1]: dots, and dI/dz = dI * w * c * [z > 0]
  for (int64_t b = 0; b < B; ++b) {
    block_dots(q.data<T>(), k.data<T>(), b, T_, Hi, D, t0, t1, z);
    gz.assign(z.size(), T(0));
#pragma omp parallel for schedule(static) if(R * Hi * t1 > dsa_cpu::kOmpMinWork)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = t0 + r;
      const T* gr = g + (b * R + r) * T_;
      for (int64_t j = 0; j < Hi; ++j) {
        const T wj = wp[(b * T_ + t) * Hi + j] * c;
        const T* zr = z.data() + (r * Hi + j) * t1;
        T* gzr = gz.data() + (r * Hi + j) * t1;
        T acc = 0;
        for (int64_t s = 0; s <= t; ++s) {
          if (zr[s] > T(0)) {
            gzr[s] = gr[s] * wj;
            acc += gr[s] * zr[s];
          }
        }
        if (dw) dw->data<T>()[(b * T_ + t) * Hi + j] += acc * c;
      }
    }
    if (dq)
      gemm_rm(false, false, R * Hi, D, t1, 1.0, gz.data(), t1, k.data<T>() + b * T_ * D, D, 1.0,
           dq->data<T>() + (b * T_ + t0) * Hi * D, D);
    if (dk)
      gemm_rm(true, false, t1, D, R * Hi, 1.0, gz.data(), t1, q.data<T>() + (b * T_ + t0) * Hi * D, D, 1.0,
           dk->data<T>() + b * T_ * D, D);
  }
}
}  // namespace

Tensor indexer_scores_forward(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t t0, int64_t t1) {
  DSA_DISPATCH_CUDA(on_cuda(q_I), kScoresFwd, cuda::indexer_scores_forward(q_I, k_I, w_I, t0, t1));
  check_indexer_operands(kScoresFwd, q_I, k_I, &w_I);
  const int64_t B = q_I.size(0), T = q_I.size(1);
  DSA_CHECK(0 <= t0 && t0 <= t1 && t1 <= T, "[", kScoresFwd, "] rows [", t0, ", ", t1, ") out of range for T = ", T);
  Tensor out = Tensor::empty({B, t1 - t0, T}, q_I.dtype());
  if (q_I.dtype() == DType::F32)
    scores_forward<float>(q_I, k_I, w_I, t0, t1, out);
  else
    scores_forward<double>(q_I, k_I, w_I, t0, t1, out);
  return out;
}

void indexer_scores_backward(const Tensor& dI, const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t t0,
                             Tensor* dq_I, Tensor* dk_I, Tensor* dw_I) {
  // No CUDA kernel: the GPU losses run the scoring backward inside their own fused kernels.
  DSA_CHECK(!on_cuda(q_I), "[", kScoresBwd, "] runs on the CPU only (the GPU indexer losses fuse it), got q_I ",
            q_I.desc());
  check_indexer_operands(kScoresBwd, q_I, k_I, &w_I);
  check_cpu_float(kScoresBwd, {{"q_I", &q_I}, {"dI", &dI}});
  const int64_t B = q_I.size(0), T = q_I.size(1);
  expect_shape(kScoresBwd, "dI", dI, {B, -1, T});
  DSA_CHECK(0 <= t0 && t0 + dI.size(1) <= T, "[", kScoresBwd, "] rows [", t0, ", ", t0 + dI.size(1),
            ") out of range for T = ", T);
  const Tensor* outs[3] = {dq_I, dk_I, dw_I};
  const Tensor* ins[3] = {&q_I, &k_I, &w_I};
  const char* names[3] = {"dq_I", "dk_I", "dw_I"};
  for (int i = 0; i < 3; ++i)
    if (outs[i]) {
      check_cpu_float(kScoresBwd, {{"q_I", &q_I}, {names[i], outs[i]}});
      expect_shape(kScoresBwd, names[i], *outs[i], ins[i]->shape());
    }
  if (q_I.dtype() == DType::F32)
    scores_backward<float>(dI, q_I, k_I, w_I, t0, dq_I, dk_I, dw_I);
  else
    scores_backward<double>(dI, q_I, k_I, w_I, t0, dq_I, dk_I, dw_I);
}

// ------------------------------------------------------------------------------------------- top-k

namespace {
template <class T>
void topk_rows(const T* scores, int64_t B, int64_t R, int64_t T_, int64_t t0, int64_t K, TopkOrder order,
               int32_t* out) {
#pragma omp parallel if(B * R * T_ > dsa_cpu::kOmpMinWork)
  {
    std::vector<int32_t> cand;
#pragma omp for schedule(static)
    for (int64_t br = 0; br < B * R; ++br) {
      const int64_t t = t0 + br % R;
      const T* row = scores + br * T_;
      // NaN ranks below -inf so that the order stays a strict weak ordering.
      auto key = [&](int32_t s) { return std::isnan(row[s]) ? -std::numeric_limits<T>::max() * 2 : row[s]; };
      auto better = [&](int32_t a, int32_t b) {
        const T ka = key(a), kb = key(b);
        return ka > kb || (ka == kb && a < b);
      };
      const int64_t n = t + 1, kk = std::min(n, K);
      cand.resize(static_cast<size_t>(n));
      for (int64_t s = 0; s < n; ++s) cand[s] = static_cast<int32_t>(s);
      if (kk < n) std::nth_element(cand.begin(), cand.begin() + (kk - 1), cand.end(), better);
      if (order == TopkOrder::kScore) std::sort(cand.begin(), cand.begin() + kk, better);
      else std::sort(cand.begin(), cand.begin() + kk);
      int32_t* o = out + br * K;
      for (int64_t i = 0; i < K; ++i) o[i] = i < kk ? cand[i] : -1;
    }
  }
}
}  // namespace

const char* topk_order_name(TopkOrder o) { return o == TopkOrder::kScore ? "score" : "index"; }

Tensor topk_causal(const Tensor& scores, int64_t t0, int64_t topk, TopkOrder order) {
  DSA_DISPATCH_CUDA(on_cuda(scores), "topk_causal", cuda::topk_causal(scores, t0, topk, order));
  const char* op = "topk_causal";
  check_cpu_float(op, {{"scores", &scores}});
  expect_shape(op, "scores", scores, {-1, -1, -1});
  const int64_t B = scores.size(0), R = scores.size(1), T = scores.size(2);
  DSA_CHECK(topk >= 1, "[", op, "] topk must be >= 1, got ", topk);
  DSA_CHECK(t0 >= 0 && t0 + R <= T, "[", op, "] rows [", t0, ", ", t0 + R, ") out of range for T = ", T);
  Tensor out = Tensor::empty({B, R, topk}, DType::I32);
  if (scores.dtype() == DType::F32)
    topk_rows(scores.data<float>(), B, R, T, t0, topk, order, out.data<int32_t>());
  else
    topk_rows(scores.data<double>(), B, R, T, t0, topk, order, out.data<int32_t>());
  return out;
}

Tensor indexer_topk(const Tensor& q_I, const Tensor& k_I, const Tensor& w_I, int64_t topk, bool fp8,
                    int64_t block_rows, Tensor* scores_out, TopkOrder order) {
  const char* op = "indexer_topk";
  DSA_DISPATCH_CUDA(on_cuda(q_I), op, cuda::indexer_topk(q_I, k_I, w_I, topk, fp8, block_rows, scores_out, order));
  check_indexer_operands(op, q_I, k_I, &w_I);
  DSA_CHECK(topk >= 1, "[", op, "] topk must be >= 1, got ", topk);
  const int64_t B = q_I.size(0), T = q_I.size(1), Hi = q_I.size(2);
  Tensor q = q_I, k = k_I;
  if (fp8) indexer_fp8_operands(q_I, k_I, &q, &k);
  Tensor out = Tensor::empty({B, T, topk}, DType::I32);
  DSA_CHECK(block_rows >= 0, "[", op, "] block_rows must be >= 0, got ", block_rows);
  const int64_t rb = block_rows > 0 ? block_rows : dsa_cpu::rows_per_block(T, T * std::max(B, Hi));
  Tensor vals;
  if (scores_out) vals = Tensor::empty({B, T, topk}, q_I.dtype());
  for (int64_t t0 = 0; t0 < T; t0 += rb) {
    const int64_t t1 = std::min(T, t0 + rb), R = t1 - t0;
    const Tensor S = indexer_scores_forward(q, k, w_I, t0, t1);  // [B, R, T]
    const Tensor idx = topk_causal(S, t0, topk, order);            // [B, R, K]
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(idx.data<int32_t>() + b * R * topk, R * topk, out.data<int32_t>() + (b * T + t0) * topk);
      if (!scores_out) continue;
      for (int64_t i = 0; i < R * topk; ++i) {
        const int32_t s = idx.data<int32_t>()[b * R * topk + i];
        const double v = s >= 0 ? S.item((b * R + i / topk) * T + s) : -std::numeric_limits<double>::infinity();
        vals.set_item((b * T + t0) * topk + i, v);
      }
    }
  }
  if (scores_out) *scores_out = vals;
  return out;
}

}  // namespace dsa::ops
