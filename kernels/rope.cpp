// Rotary position embedding in place, both pairings, forward and backward (CPU reference).
//
// With h = R/2, c_i = cos[pos, i], s_i = sin[pos, i] and v = x[offset : offset+R]:
//   RotateHalf:  y[i] = v[i] c_i - v[i+h] s_i,      y[i+h] = v[i+h] c_i + v[i] s_i
//   Interleaved: y[i] = v[2i] c_i - v[2i+1] s_i,    y[i+h] = v[2i+1] c_i + v[2i] s_i
// (Interleaved = transformers' apply_rotary_pos_emb_interleave: de-interleave, then rotate-half.)
// Backward: dv = P^T R(-angle) dy, with P the de-interleaving permutation for Interleaved (identity
// for RotateHalf), so the gradient lands back in the interleaved input layout.
#include <vector>

#include "kernels/op_util.h"
#include "kernels/cuda/ops_layers.h"
#include "kernels/ops.h"

namespace dsa::ops {

using detail::dispatch_float;
using detail::expect_same_dtype;
using detail::on_cuda;

namespace {

template <class T>
void rope_rows(T* x /*[N, H, D]*/, const int32_t* pos /*[N]*/, const T* cs /*[P, h]*/, const T* sn /*[P, h]*/,
               int64_t n, int64_t heads, int64_t d, int64_t offset, int64_t h, RopeStyle style, bool backward) {
#pragma omp parallel
  {
    std::vector<T> tmp(static_cast<size_t>(2 * h));  // [R] one rotated slice
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      const T* c = cs + static_cast<int64_t>(pos[t]) * h;
      const T* s = sn + static_cast<int64_t>(pos[t]) * h;
      for (int64_t hd = 0; hd < heads; ++hd) {
        T* v = x + (t * heads + hd) * d + offset;
        if (style == RopeStyle::RotateHalf) {
          const T sign = backward ? T(-1) : T(1);
          for (int64_t i = 0; i < h; ++i) {
            const T a = v[i], b = v[i + h], si = sign * s[i];
            v[i] = a * c[i] - b * si;
            v[i + h] = b * c[i] + a * si;
          }
        } else if (!backward) {  // read interleaved pairs, write de-interleaved halves
          for (int64_t i = 0; i < h; ++i) {
            const T a = v[2 * i], b = v[2 * i + 1];
            tmp[i] = a * c[i] - b * s[i];
            tmp[i + h] = b * c[i] + a * s[i];
          }
          for (int64_t i = 0; i < 2 * h; ++i) v[i] = tmp[i];
        } else {  // read de-interleaved halves, rotate back, write interleaved pairs
          for (int64_t i = 0; i < h; ++i) {
            const T a = v[i], b = v[i + h];
            tmp[2 * i] = a * c[i] + b * s[i];
            tmp[2 * i + 1] = b * c[i] - a * s[i];
          }
          for (int64_t i = 0; i < 2 * h; ++i) v[i] = tmp[i];
        }
      }
    }
  }
}

void rope_apply(const char* op, Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin,
                int64_t offset, RopeStyle style, bool backward) {
  DSA_DISPATCH_CUDA(on_cuda(x), op, cuda::rope_apply_(x, positions, cos, sin, offset, style, backward));
  expect_float(op, "x", x);
  DSA_CHECK(x.ndim() == 2 || x.ndim() == 3, "[", op, "] x must be [N, H, D] or [N, D], got ", x.desc());
  expect_shape(op, "cos", cos, {-1, -1});
  expect_same_dtype(op, "cos", cos, x);
  expect_same_dtype(op, "sin", sin, x);
  expect_shape(op, "sin", sin, cos.shape());
  expect_dtype(op, "positions", positions, DType::I32);
  expect_shape(op, "positions", positions, {x.size(0)});
  for (const Tensor* t : {&positions, &cos, &sin}) expect_same_device(op, x, *t);
  const int64_t n = x.size(0), heads = x.ndim() == 3 ? x.size(1) : 1, d = x.size(-1);
  const int64_t p = cos.size(0), h = cos.size(1);
  DSA_CHECK(offset >= 0 && offset + 2 * h <= d, "[", op, "] rotating dims [", offset, ", ", offset + 2 * h,
            ") do not fit x ", x.desc());
  const int32_t* pos = positions.data<int32_t>();
  for (int64_t t = 0; t < n; ++t)
    DSA_CHECK(pos[t] >= 0 && pos[t] < p, "[", op, "] position ", pos[t], " at row ", t,
              " is out of range for a table of ", p, " positions");
  dispatch_float(op, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    rope_rows<T>(x.data<T>(), pos, cos.data<T>(), sin.data<T>(), n, heads, d, offset, h, style, backward);
  });
}

}  // namespace

void rope_forward_(Tensor& x, const Tensor& positions, const Tensor& cos, const Tensor& sin, int64_t offset,
                   RopeStyle style) {
  rope_apply("rope", x, positions, cos, sin, offset, style, false);
}

void rope_backward_(Tensor& dy, const Tensor& positions, const Tensor& cos, const Tensor& sin, int64_t offset,
                    RopeStyle style) {
  rope_apply("rope_backward", dy, positions, cos, sin, offset, style, true);
}

}  // namespace dsa::ops
