// AdamW step on f32 master weights, elementwise, the CPU reference's math operation by operation:
//   p *= 1 - lr wd;  m = lerp(m, g, 1 - b1);  v = v b2 + (1 - b2) g g;
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps;  p += -(lr / (1 - b1^t)) m / denom.
// NOTES: the scalar coefficients are computed on the host in double and rounded to f32 exactly as the
// CPU reference does, and the kernel uses round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...) so
// nvcc cannot contract into FMAs: results match the CPU bit for bit.
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops_train.h"

namespace dsa::cuda {

namespace {

struct AdamWParams {
  float* p;        // [n] master weights
  const float* g;  // [n]
  float* m;        // [n]
  float* v;        // [n]
  int64_t n;
  float decay, w1, w1c, b2, one_b2, bc2_sqrt, neg_step, eps;
  bool do_decay, lerp_low, vec;
};

__device__ __forceinline__ void adamw_one(const AdamWParams& a, float& p, float g, float& m, float& v) {
  if (a.do_decay) p = __fmul_rn(p, a.decay);
  m = a.lerp_low ? __fadd_rn(m, __fmul_rn(a.w1, __fsub_rn(g, m))) : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m), a.w1c));
  v = __fadd_rn(__fmul_rn(v, a.b2), __fmul_rn(__fmul_rn(a.one_b2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), a.bc2_sqrt), a.eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(a.neg_step, m), denom));
}

__global__ void adamw_kernel(AdamWParams a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (a.vec) {
    const int64_t nv = a.n / 4;
    for (int64_t i = i0; i < nv; i += stride) {
      float4 p = reinterpret_cast<float4*>(a.p)[i], m = reinterpret_cast<float4*>(a.m)[i];
      float4 v = reinterpret_cast<float4*>(a.v)[i];
      const float4 g = reinterpret_cast<const float4*>(a.g)[i];
      adamw_one(a, p.x, g.x, m.x, v.x);
      adamw_one(a, p.y, g.y, m.y, v.y);
      adamw_one(a, p.z, g.z, m.z, v.z);
      adamw_one(a, p.w, g.w, m.w, v.w);
      reinterpret_cast<float4*>(a.p)[i] = p;
      reinterpret_cast<float4*>(a.m)[i] = m;
      reinterpret_cast<float4*>(a.v)[i] = v;
    }
    done = nv * 4;
  }
  for (int64_t i = done + i0; i < a.n; i += stride) adamw_one(a, a.p[i], a.g[i], a.m[i], a.v[i]);
}

}  // namespace

void adamw_step_(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const ops::AdamWConfig& cfg,
                 int64_t step) {
  const char* op = "adamw";
  expect_dtype_cuda(op, "param", param, DType::F32);
  expect_dtype_cuda(op, "grad", grad, DType::F32);
  expect_dtype_cuda(op, "m", m, DType::F32);
  expect_dtype_cuda(op, "v", v, DType::F32);
  for (const Tensor* t : {&grad, static_cast<const Tensor*>(&m), static_cast<const Tensor*>(&v)})
    DSA_CHECK(t->shape() == param.shape(), "[", op, "] ", t == &grad ? "grad" : t == &m ? "m" : "v",
              " must have param's shape ", param.shape(), ", got ", t->desc());
  DSA_CHECK(step >= 1, "[", op, "] step is 1-based, got ", step);
  const int64_t n = param.numel();
  if (n == 0) return;
  AdamWParams a{};
  a.p = param.data<float>();
  a.g = grad.data<float>();
  a.m = m.data<float>();
  a.v = v.data<float>();
  a.n = n;
  a.decay = static_cast<float>(1.0 - cfg.lr * cfg.weight_decay);
  const double w1d = 1.0 - cfg.beta1;
  a.w1 = static_cast<float>(w1d);
  a.w1c = static_cast<float>(1.0 - w1d);
  a.lerp_low = std::fabs(w1d) < 0.5;
  a.b2 = static_cast<float>(cfg.beta2);
  a.one_b2 = static_cast<float>(1.0 - cfg.beta2);
  const double bc1 = 1.0 - std::pow(cfg.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(cfg.beta2, static_cast<double>(step));
  a.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  a.neg_step = static_cast<float>(-(cfg.lr / bc1));
  a.eps = static_cast<float>(cfg.eps);
  a.do_decay = cfg.weight_decay != 0;
  a.vec = aligned16(a.p) && aligned16(a.g) && aligned16(a.m) && aligned16(a.v);
  adamw_kernel<<<grid_for(a.vec ? n / 4 + 1 : n, 256), 256, 0, stream()>>>(a);
  check_launch(op);
}

}  // namespace dsa::cuda
