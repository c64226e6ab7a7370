// AdamW step, global gradient norm and gradient clipping (CPU reference).
//
// NOTES: the step follows torch.optim.AdamW (single-tensor path) operation by operation, with the
// scalar coefficients computed in double and rounded to the element type as torch does:
//   p *= 1 - lr wd;  m = lerp(m, g, 1 - b1);  v = v b2 + (1 - b2) g g;
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps;  p += -(lr / (1 - b1^t)) m / denom.
// lerp(a, b, w) is torch's two-branch form (a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)).
#include <cmath>

#include "kernels/op_util.h"
#include "kernels/cuda/ops_train.h"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::expect_same_dtype;
using detail::on_cuda;

namespace {

template <class T>
void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, const AdamWConfig& cfg, int64_t step) {
  const T decay = static_cast<T>(1.0 - cfg.lr * cfg.weight_decay);
  const double w1d = 1.0 - cfg.beta1;
  const T w1 = static_cast<T>(w1d), w1c = static_cast<T>(1.0 - w1d);  // lerp weight and its complement
  const bool lerp_low = std::fabs(w1d) < 0.5;
  const T b2 = static_cast<T>(cfg.beta2), one_b2 = static_cast<T>(1.0 - cfg.beta2);
  const double bc1 = 1.0 - std::pow(cfg.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(cfg.beta2, static_cast<double>(step));
  const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
  const T neg_step = static_cast<T>(-(cfg.lr / bc1));
  const T eps = static_cast<T>(cfg.eps);
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    if (cfg.weight_decay != 0) p[i] *= decay;
    const T gi = g[i];
    m[i] = lerp_low ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * w1c;
    v[i] = v[i] * b2 + one_b2 * gi * gi;
    const T denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    p[i] = p[i] + neg_step * m[i] / denom;
  }
}

}  // namespace

void adamw_step_(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWConfig& cfg, int64_t step) {
  const char* op = "adamw";
  DSA_DISPATCH_CUDA(on_cuda(param), op, cuda::adamw_step_(param, grad, m, v, cfg, step));
  expect_float(op, "param", param);
  expect_same_dtype(op, "grad", grad, param);
  expect_same_dtype(op, "m", m, param);
  expect_same_dtype(op, "v", v, param);
  for (const Tensor* t : {&grad, static_cast<const Tensor*>(&m), static_cast<const Tensor*>(&v)}) {
    DSA_CHECK(t->shape() == param.shape(), "[", op, "] ", t == &grad ? "grad" : t == &m ? "m" : "v",
              " must have param's shape ", param.shape(), ", got ", t->desc());
    expect_same_device(op, param, *t);
  }
  DSA_CHECK(step >= 1, "[", op, "] step is 1-based, got ", step);
  dispatch_float(op, param.dtype(), [&](auto t) {
    using T = decltype(t);
    adamw_kernel<T>(param.data<T>(), grad.data<T>(), m.data<T>(), v.data<T>(), param.numel(), cfg, step);
  });
}

namespace {
// Sum of squares of the CUDA gradients: per-tensor f64 sums on the device, one host copy.
double gpu_sum_squares(const std::vector<const Tensor*>& gpu) {
  DSA_DISPATCH_CUDA(!gpu.empty(), "global_grad_norm", cuda::sum_squares_all(gpu));
  return 0;
}
}  // namespace

// NOTES: null or undefined entries are skipped (parameters without gradients); the sum of squares is
// accumulated in double, tensor by tensor in list order, then the CUDA gradients' sum is added.
double global_grad_norm(const std::vector<const Tensor*>& grads) {
  double ss = 0;
  std::vector<const Tensor*> gpu;
  for (const Tensor* g : grads) {
    if (!g || !g->defined()) continue;
    if (on_cuda(*g))
      gpu.push_back(g);
    else
      ss += sum_squares(*g);
  }
  return std::sqrt(ss + gpu_sum_squares(gpu));
}

// As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1. Like
// torch (error_if_nonfinite=False), an infinite norm zeroes the gradients and a NaN norm makes them
// NaN; the caller decides whether to skip such a step.
void clip_grads_(const std::vector<Tensor*>& grads, double max_norm, double norm) {
  const char* op = "clip_grads_";
  DSA_CHECK(max_norm > 0, "[", op, "] max_norm must be positive, got ", max_norm);
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return;
  for (Tensor* g : grads) {
    if (!g || !g->defined()) continue;
    scale_(*g, coef);  // dispatches to the GPU for CUDA gradients
  }
}

}  // namespace dsa::ops
