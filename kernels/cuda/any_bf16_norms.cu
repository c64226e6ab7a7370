// RMSNorm and LayerNorm on the GPU: bf16 x / w / b / y / dx, f32 statistics and parameter gradients.
//
// NOTES: one block per row; the row is read once for its statistics and again (from L1/L2) for the
// output. Parameter gradients never use atomics: a first kernel writes per-row-block column sums
// part [RB, D] (RB a function of N only, rows summed in a fixed order inside each block), a second
// adds the RB partials in order to dw / db, so the result is bitwise reproducible.
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_layers.h"

namespace dsa::cuda {

namespace {

using bf = __nv_bfloat16;

int row_threads(int64_t d) { return d <= 256 ? 64 : (d <= 2048 ? 128 : 256); }

// Params of the row kernels (forward and backward of both norms).
struct NormParams {
  const bf* x;        // [N, D]
  const bf* w;        // [D]
  const bf* b;        // [D] (layernorm) or nullptr
  const bf* dy;       // [N, D] (backward)
  bf* y;              // [N, D] forward output or backward dx
  float* mean;        // [N] (layernorm)
  float* rstd;        // [N]
  int64_t n, d;
  float eps;
};

template <bool kLayer>
__global__ void norm_fwd_kernel(NormParams p) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const bf* x = p.x + row * p.d;
  float s = 0;
  for (int64_t j = threadIdx.x; j < p.d; j += blockDim.x) {
    const float v = __bfloat162float(x[j]);
    s += kLayer ? v : v * v;
  }
  s = block_sum(s, sh);
  float mu = 0, var;
  if (kLayer) {
    mu = s / static_cast<float>(p.d);
    float v2 = 0;
    for (int64_t j = threadIdx.x; j < p.d; j += blockDim.x) {
      const float c = __bfloat162float(x[j]) - mu;
      v2 += c * c;
    }
    var = block_sum(v2, sh) / static_cast<float>(p.d);
  } else {
    var = s / static_cast<float>(p.d);
  }
  const float r = 1.0f / sqrtf(var + p.eps);
  if (threadIdx.x == 0) {
    p.rstd[row] = r;
    if (kLayer) p.mean[row] = mu;
  }
  bf* y = p.y + row * p.d;
  for (int64_t j = threadIdx.x; j < p.d; j += blockDim.x) {
    const float v = __bfloat162float(x[j]), w = __bfloat162float(p.w[j]);
    y[j] = __float2bfloat16_rn(kLayer ? (v - mu) * r * w + __bfloat162float(p.b[j]) : w * (v * r));
  }
}

template <bool kLayer>
__global__ void norm_bwd_kernel(NormParams p) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const bf* x = p.x + row * p.d;
  const bf* g = p.dy + row * p.d;
  const float r = p.rstd[row], mu = kLayer ? p.mean[row] : 0.0f;
  float s1 = 0, s2 = 0;  // rms: sum g w x;  layer: sum g w, sum g w xhat
  for (int64_t j = threadIdx.x; j < p.d; j += blockDim.x) {
    const float gw = __bfloat162float(g[j]) * __bfloat162float(p.w[j]), v = __bfloat162float(x[j]);
    if (kLayer) {
      s1 += gw;
      s2 += gw * (v - mu) * r;
    } else {
      s1 += gw * v;
    }
  }
  s1 = block_sum(s1, sh);
  if (kLayer) s2 = block_sum(s2, sh);
  const float inv_d = 1.0f / static_cast<float>(p.d);
  const float c = kLayer ? 0.0f : s1 * r * r * r * inv_d;
  const float mg = s1 * inv_d, mgx = s2 * inv_d;
  bf* dx = p.y + row * p.d;
  for (int64_t j = threadIdx.x; j < p.d; j += blockDim.x) {
    const float gw = __bfloat162float(g[j]) * __bfloat162float(p.w[j]), v = __bfloat162float(x[j]);
    const float o = kLayer ? r * (gw - mg - (v - mu) * r * mgx) : r * gw - v * c;
    dx[j] = __float2bfloat16_rn(o);
  }
}

// ------------------------------------------------------------------ deterministic column reductions
constexpr int kColTile = 32, kRowLanes = 8;

struct ColParams {
  const bf* dy;       // [N, D]
  const bf* x;        // [N, D]
  const float* mean;  // [N] or nullptr (rmsnorm: xhat = x rstd)
  const float* rstd;  // [N]
  float* part_w;      // [RB, D] sum over the block's rows of dy * xhat
  float* part_b;      // [RB, D] sum of dy, or nullptr
  int64_t n, d, rb;
};

__global__ void col_partial_kernel(ColParams p) {
  __shared__ float sw[kRowLanes][kColTile], sb[kRowLanes][kColTile];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x, blk = blockIdx.y;
  const int64_t r0 = blk * p.n / p.rb, r1 = (blk + 1) * p.n / p.rb;
  float aw = 0, ab = 0;
  if (j < p.d) {
    for (int64_t i = r0 + threadIdx.y; i < r1; i += kRowLanes) {
      const float g = __bfloat162float(p.dy[i * p.d + j]), v = __bfloat162float(p.x[i * p.d + j]);
      aw += g * (p.mean ? v - p.mean[i] : v) * p.rstd[i];
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && j < p.d) {
    float tw = 0, tb = 0;
    for (int k = 0; k < kRowLanes; ++k) {
      tw += sw[k][threadIdx.x];
      tb += sb[k][threadIdx.x];
    }
    p.part_w[blk * p.d + j] = tw;
    if (p.part_b) p.part_b[blk * p.d + j] = tb;
  }
}

__global__ void col_final_kernel(const float* part /*[RB, D]*/, int64_t rb, int64_t d, float* out /*[D] +=*/) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0;
    for (int64_t b = 0; b < rb; ++b) s += part[b * d + j];
    out[j] += s;
  }
}

void param_grads(const char* op, const Tensor& dy, const Tensor& x, const float* mean, const Tensor& rstd,
                 Tensor* dw, Tensor* db) {
  const int64_t n = x.size(0), d = x.size(1);
  if (!dw && !db) return;
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(256, (n + 63) / 64));
  Tensor pw = Tensor::empty({rb, d}, DType::F32, Device::CUDA);
  Tensor pb = db ? Tensor::empty({rb, d}, DType::F32, Device::CUDA) : Tensor();
  Tensor* gw = dw ? &accum_arg(op, "dw", dw, {d}, DType::F32) : nullptr;
  Tensor* gb = db ? &accum_arg(op, "db", db, {d}, DType::F32) : nullptr;
  if (n == 0 || d == 0) return;
  ColParams p{static_cast<const bf*>(dy.raw()), static_cast<const bf*>(x.raw()), mean, rstd.data<float>(),
              pw.data<float>(), db ? pb.data<float>() : nullptr, n, d, rb};
  dim3 grid(static_cast<unsigned>((d + kColTile - 1) / kColTile), static_cast<unsigned>(rb));
  col_partial_kernel<<<grid, dim3(kColTile, kRowLanes), 0, stream()>>>(p);
  check_launch(op);
  if (gw) col_final_kernel<<<grid_for(d, 256), 256, 0, stream()>>>(pw.data<float>(), rb, d, gw->data<float>());
  if (gb) col_final_kernel<<<grid_for(d, 256), 256, 0, stream()>>>(pb.data<float>(), rb, d, gb->data<float>());
  check_launch(op);
}

void check_xw(const char* op, const Tensor& x, const Tensor& w) {
  expect_dtype_cuda(op, "x", x, DType::BF16);
  expect_shape(op, "x", x, {-1, -1});
  expect_dtype_cuda(op, "w", w, DType::BF16);
  expect_shape(op, "w", w, {x.size(1)});
}
void check_stat(const char* op, const char* name, const Tensor& s, const Tensor& x) {
  expect_dtype_cuda(op, name, s, DType::F32);
  expect_shape(op, name, s, {x.size(0)});
}
void check_dy(const char* op, const Tensor& dy, const Tensor& x) {
  expect_dtype_cuda(op, "dy", dy, DType::BF16);
  expect_shape(op, "dy", dy, x.shape());
}

}  // namespace

Tensor rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor* rstd_out) {
  const char* op = "rmsnorm";
  check_xw(op, x, w);
  const int64_t n = x.size(0), d = x.size(1);
  Tensor y = Tensor::empty(x.shape(), DType::BF16, Device::CUDA);
  Tensor rstd_local;
  Tensor& rstd = output_arg(op, "rstd_out", rstd_out ? rstd_out : &rstd_local, {n}, DType::F32);
  if (n == 0) return y;
  NormParams p{static_cast<const bf*>(x.raw()), static_cast<const bf*>(w.raw()), nullptr, nullptr,
               static_cast<bf*>(y.raw()), nullptr, rstd.data<float>(), n, d, static_cast<float>(eps)};
  norm_fwd_kernel<false><<<static_cast<unsigned>(n), row_threads(d), 0, stream()>>>(p);
  check_launch(op);
  return y;
}

Tensor rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor* dw) {
  const char* op = "rmsnorm_backward";
  check_xw(op, x, w);
  check_dy(op, dy, x);
  check_stat(op, "rstd", rstd, x);
  const int64_t n = x.size(0), d = x.size(1);
  Tensor dx = Tensor::empty(x.shape(), DType::BF16, Device::CUDA);
  if (n > 0) {
    NormParams p{static_cast<const bf*>(x.raw()), static_cast<const bf*>(w.raw()), nullptr,
                 static_cast<const bf*>(dy.raw()), static_cast<bf*>(dx.raw()), nullptr,
                 const_cast<float*>(rstd.data<float>()), n, d, 0.0f};
    norm_bwd_kernel<false><<<static_cast<unsigned>(n), row_threads(d), 0, stream()>>>(p);
    check_launch(op);
  }
  param_grads(op, dy, x, nullptr, rstd, dw, nullptr);
  return dx;
}

Tensor layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor* mean_out,
                         Tensor* rstd_out) {
  const char* op = "layernorm";
  check_xw(op, x, w);
  expect_dtype_cuda(op, "b", b, DType::BF16);
  expect_shape(op, "b", b, w.shape());
  const int64_t n = x.size(0), d = x.size(1);
  Tensor y = Tensor::empty(x.shape(), DType::BF16, Device::CUDA);
  Tensor mean_local, rstd_local;
  Tensor& mean = output_arg(op, "mean_out", mean_out ? mean_out : &mean_local, {n}, DType::F32);
  Tensor& rstd = output_arg(op, "rstd_out", rstd_out ? rstd_out : &rstd_local, {n}, DType::F32);
  if (n == 0) return y;
  NormParams p{static_cast<const bf*>(x.raw()), static_cast<const bf*>(w.raw()), static_cast<const bf*>(b.raw()),
               nullptr, static_cast<bf*>(y.raw()), mean.data<float>(), rstd.data<float>(), n, d,
               static_cast<float>(eps)};
  norm_fwd_kernel<true><<<static_cast<unsigned>(n), row_threads(d), 0, stream()>>>(p);
  check_launch(op);
  return y;
}

Tensor layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                          const Tensor& rstd, Tensor* dw, Tensor* db) {
  const char* op = "layernorm_backward";
  check_xw(op, x, w);
  check_dy(op, dy, x);
  check_stat(op, "mean", mean, x);
  check_stat(op, "rstd", rstd, x);
  const int64_t n = x.size(0), d = x.size(1);
  Tensor dx = Tensor::empty(x.shape(), DType::BF16, Device::CUDA);
  if (n > 0) {
    NormParams p{static_cast<const bf*>(x.raw()), static_cast<const bf*>(w.raw()), nullptr,
                 static_cast<const bf*>(dy.raw()), static_cast<bf*>(dx.raw()), const_cast<float*>(mean.data<float>()),
                 const_cast<float*>(rstd.data<float>()), n, d, 0.0f};
    norm_bwd_kernel<true><<<static_cast<unsigned>(n), row_threads(d), 0, stream()>>>(p);
    check_launch(op);
  }
  param_grads(op, dy, x, mean.data<float>(), rstd, dw, db);
  return dx;
}

}  // namespace dsa::cuda
