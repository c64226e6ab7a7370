// SwiGLU gate: y = silu(gate) * up, forward and backward (CPU reference).
//
// silu(g) = g * sigma(g);  d silu / dg = sigma(g) (1 + g (1 - sigma(g))).
#include <cmath>

#include "kernels/op_util.h"
#include "kernels/cuda/ops_layers.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::expect_same_dtype;
using detail::on_cuda;

namespace {

void check_gate_up(const char* op, const Tensor& gate, const Tensor& up) {
  expect_float(op, "gate", gate);
  expect_same_dtype(op, "up", up, gate);
  DSA_CHECK(gate.ndim() >= 1 && up.shape() == gate.shape(), "[", op, "] up must have gate's shape ",
            gate.shape(), ", got ", up.desc());
  expect_same_device(op, gate, up);
}

template <class T>
T sigmoid(T g) {
  return T(1) / (T(1) + std::exp(-g));
}

}  // namespace

// NOTES: any shape is accepted (elementwise); ops.h documents the usual [N, I].
Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu";
  DSA_DISPATCH_CUDA(on_cuda(gate), op, cuda::swiglu_forward(gate, up));
  check_gate_up(op, gate, up);
  Tensor y = Tensor::empty(gate.shape(), gate.dtype());
  dispatch_float(op, gate.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* g = gate.data<T>();
    const T* u = up.data<T>();
    T* o = y.data<T>();
    const int64_t n = gate.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) o[i] = g[i] * sigmoid(g[i]) * u[i];
  });
  return y;
}

// NOTES: dgate/dup are input gradients, so they are WRITTEN (not accumulated): a defined tensor of the
// right shape is overwritten in place, an undefined one is allocated; nullptr skips that gradient.
void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor* dgate, Tensor* dup) {
  const char* op = "swiglu_backward";
  DSA_DISPATCH_CUDA(on_cuda(gate), op, cuda::swiglu_backward(dy, gate, up, dgate, dup));
  check_gate_up(op, gate, up);
  expect_same_dtype(op, "dy", dy, gate);
  DSA_CHECK(dy.shape() == gate.shape(), "[", op, "] dy must have shape ", gate.shape(), ", got ", dy.desc());
  expect_same_device(op, dy, gate);
  Tensor* dg = dgate ? &detail::output_arg(op, "dgate", dgate, gate.shape(), gate.dtype()) : nullptr;
  Tensor* du = dup ? &detail::output_arg(op, "dup", dup, gate.shape(), gate.dtype()) : nullptr;
  dispatch_float(op, gate.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* g = gate.data<T>();
    const T* u = up.data<T>();
    const T* d = dy.data<T>();
    T* pg = dg ? dg->data<T>() : nullptr;
    T* pu = du ? du->data<T>() : nullptr;
    const int64_t n = gate.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) {
      const T s = sigmoid(g[i]);
      if (pg) pg[i] = d[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
      if (pu) pu[i] = d[i] * g[i] * s;
    }
  });
}

}  // namespace dsa::ops
