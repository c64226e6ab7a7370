// LM head fused with softmax cross-entropy on the GPU, chunked over tokens.
//
// Per chunk of c tokens: logits [c, V] bf16 = x_c @ w^T (cuBLASLt, bf16 operands, f32 accumulation),
// then one block per row: an online max / sum-exp pass over the row in f32 (thread-local (max, sum)
// pairs merged across the block), the row's loss = lse - logit[target] into loss [N] f64, and a second
// pass overwriting the row in place with
//   dlogits [c, V] bf16 = grad_scale * (softmax - onehot(target))   (zero rows for ignored targets),
// then dx_c = dlogits @ w (bf16) and dw += dlogits^T x_c (f32 C, beta = 1). At the end one block sums
// loss [N] in a fixed order and counts the targets; that pair is the call's only device->host copy.
//
// NOTES:
// - The logits are stored in bf16, as transformers' peer (a bf16 model) computes them, and the loss and
//   softmax run in f32 from there: the LM head is bound by memory traffic besides its three GEMMs, and
//   bf16 halves the logits' write and two reads. The dlogits reuse the buffer (written after the row's
//   last read by the same thread).
// - The buffer is capped at 2 GiB (chunk = 8305 rows at V = 129280): the weight-gradient GEMM, whose
//   inner dimension is the chunk, reads and writes the f32 dw [V, D] once per chunk, so longer chunks
//   mean fewer passes over it.
// - Targets are not range-checked on the host (that would need another copy): a target outside
//   [-1, V) gives a NaN loss, so the caller sees it.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_gemm.h"
#include "kernels/cuda/ops_train.h"

namespace dsa::cuda {

namespace {

constexpr size_t kChunkBytes = size_t(2) << 30;
constexpr int kRowThreads = 512;

struct CeRowParams {
  __nv_bfloat16* logits;   // [rows, V] logits in, dlogits out (when backward)
  const int32_t* targets;  // [rows] (this chunk's)
  bool backward;           // write dlogits over the logits
  double* loss;            // [rows] (this chunk's slots of loss [N])
  int64_t v;
  float grad_scale;
  bool vec;                // V % 8 == 0 and the buffer is 16-byte aligned
};

__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * __expf(m - x) + 1.0f;
    m = x;
  } else {
    s += __expf(x - m);
  }
}

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__global__ void __launch_bounds__(kRowThreads) ce_row_kernel(CeRowParams p) {
  __shared__ float sh_m[32], sh_s[32];
  __shared__ float sh_target;
  const int64_t r = blockIdx.x;
  __nv_bfloat16* l = p.logits + r * p.v;
  const int32_t t = p.targets[r];
  const bool ignored = t == -1, bad = t < -1 || t >= p.v;
  if (ignored || bad) {
    if (threadIdx.x == 0) p.loss[r] = bad ? NAN : 0.0;
    if (p.backward)
      for (int64_t j = threadIdx.x; j < p.v; j += blockDim.x) l[j] = __float2bfloat16_rn(0.0f);
    return;
  }
  if (threadIdx.x == 0) sh_target = __bfloat162float(l[t]);  // read before any thread overwrites the row
  float m = -INFINITY, s = 0;
  const uint4* l8 = reinterpret_cast<const uint4*>(l);
  if (p.vec) {
    for (int64_t j = threadIdx.x; j < p.v / 8; j += blockDim.x) {
      float f[8];
      unpack8(l8[j], f);
#pragma unroll
      for (int u = 0; u < 8; ++u) online_add(m, s, f[u]);
    }
  } else {
    for (int64_t j = threadIdx.x; j < p.v; j += blockDim.x) online_add(m, s, __bfloat162float(l[j]));
  }
  // Merge (m, s) pairs: warp by warp, then across warps.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const float mm = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.0f : s * __expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - mm));
    m = mm;
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    sh_m[wid] = m;
    sh_s[wid] = s;
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int k = 0; k < nw; ++k) mx = fmaxf(mx, sh_m[k]);
  float sum = 0;
  for (int k = 0; k < nw; ++k) sum += sh_m[k] == -INFINITY ? 0.0f : sh_s[k] * __expf(sh_m[k] - mx);
  if (threadIdx.x == 0) p.loss[r] = static_cast<double>(logf(sum)) + mx - sh_target;
  if (!p.backward) return;
  const float k = p.grad_scale / sum;
  if (p.vec) {
    uint4* o8 = reinterpret_cast<uint4*>(l);
    for (int64_t j = threadIdx.x; j < p.v / 8; j += blockDim.x) {
      float f[8];
      unpack8(o8[j], f);
      __nv_bfloat16 o[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float e = __expf(f[u] - mx) * k;
        o[u] = __float2bfloat16_rn(8 * j + u == t ? e - p.grad_scale : e);
      }
      o8[j] = *reinterpret_cast<const uint4*>(o);
    }
  } else {
    for (int64_t j = threadIdx.x; j < p.v; j += blockDim.x) {
      const float e = __expf(__bfloat162float(l[j]) - mx) * k;
      l[j] = __float2bfloat16_rn(j == t ? e - p.grad_scale : e);
    }
  }
}

// out[0] = sum of loss [N] (fixed order), out[1] = count of targets >= 0.
__global__ void ce_total_kernel(const double* loss /*[N]*/, const int32_t* targets /*[N]*/, int64_t n,
                                double* out /*[2]*/) {
  __shared__ double sh[32];
  double s = 0, c = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    s += loss[i];
    c += targets[i] >= 0 ? 1.0 : 0.0;
  }
  s = block_sum(s, sh);
  c = block_sum(c, sh);
  if (threadIdx.x == 0) {
    out[0] = s;
    out[1] = c;
  }
}

}  // namespace

ops::CrossEntropyResult lm_head_cross_entropy(const Tensor& x, const Tensor& w, const Tensor& targets,
                                              double grad_scale, Tensor* dx, Tensor* dw) {
  const char* op = "lm_head_cross_entropy";
  expect_dtype_cuda(op, "x", x, DType::BF16);
  expect_shape(op, "x", x, {-1, -1});
  expect_dtype_cuda(op, "w", w, DType::BF16);
  expect_shape(op, "w", w, {-1, x.size(1)});
  expect_dtype_cuda(op, "targets", targets, DType::I32);
  expect_shape(op, "targets", targets, {x.size(0)});
  const int64_t n = x.size(0), v = w.size(0);
  DSA_CHECK(v > 0, "[", op, "] empty vocabulary: w ", w.desc());
  const bool backward = dx || dw;
  Tensor* gx = dx ? &output_arg(op, "dx", dx, x.shape(), DType::BF16) : nullptr;
  Tensor* gw = dw ? &accum_arg(op, "dw", dw, w.shape(), DType::F32) : nullptr;
  ops::CrossEntropyResult res;
  if (n == 0) return res;
  const int64_t chunk = std::clamp<int64_t>(static_cast<int64_t>(kChunkBytes / (static_cast<size_t>(v) * 2)), 1, n);
  Tensor logits = Tensor::empty({chunk, v}, DType::BF16, Device::CUDA);  // [chunk, V] logits, then dlogits
  Tensor loss = Tensor::empty({n + 2}, DType::F64, Device::CUDA);       // [N] per-row losses, then [2] totals
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int64_t rows = std::min(chunk, n - c0);
    const Tensor xc = x.slice_rows(c0, c0 + rows);
    Tensor lg = logits.slice_rows(0, rows);
    gemm(xc, false, w, true, lg, 1.0, 0.0);
    CeRowParams p{static_cast<__nv_bfloat16*>(lg.raw()), targets.data<int32_t>() + c0, backward,
                  loss.data<double>() + c0, v, static_cast<float>(grad_scale), v % 8 == 0 && aligned16(lg.raw())};
    ce_row_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream()>>>(p);
    check_launch(op);
    if (!backward) continue;
    if (gx) {
      Tensor dxc = gx->slice_rows(c0, c0 + rows);
      gemm(lg, false, w, false, dxc, 1.0, 0.0);
    }
    if (gw) gemm(lg, true, xc, false, *gw, 1.0, 1.0);
  }
  ce_total_kernel<<<1, 1024, 0, stream()>>>(loss.data<double>(), targets.data<int32_t>(), n, loss.data<double>() + n);
  check_launch(op);
  const Tensor tot = loss.slice_rows(n, n + 2).to(Device::CPU);
  res.loss_sum = tot.data<double>()[0];
  res.count = static_cast<int64_t>(tot.data<double>()[1]);
  return res;
}

}  // namespace dsa::cuda
