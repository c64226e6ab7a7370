// cast / copy_cast_ (CPU reference; the CUDA versions live with the CUDA elementwise kernels).
#include "kernels/ops.h"

namespace dsa::ops {

Tensor cast(const Tensor& x, DType dtype) {
  DSA_CHECK(x.defined(), "[cast] undefined input");
  if (x.dtype() == dtype) return x;
  DSA_CHECK(x.is_cpu(), "[cast] CUDA backend not implemented yet for ", x.desc());
  return x.to(dtype);
}

void copy_cast_(Tensor& dst, const Tensor& src) {
  DSA_CHECK(dst.defined() && src.defined() && dst.shape() == src.shape(), "[copy_cast_] ", src.desc(), " into ",
            dst.desc());
  if (dst.dtype() == src.dtype()) {
    dst.copy_from(src);
    return;
  }
  DSA_CHECK(dst.is_cpu() && src.is_cpu(), "[copy_cast_] CUDA backend not implemented yet for ", src.desc());
  dst.copy_from(src.to(dst.dtype()));
}

}  // namespace dsa::ops
