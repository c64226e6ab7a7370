// Shared test helpers: seeded random tensors, comparisons, and central finite differences in f64.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>

#include "kernels/tensor.h"

namespace dsa::testing {

// Normal(0, stddev) values; dtype F32 or F64.
inline Tensor randn(const Shape& shape, uint64_t seed, double stddev = 1.0, DType dtype = DType::F64) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, stddev);
  Tensor t = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) t.set_item(i, nd(rng));
  return t;
}

inline Tensor randint(const Shape& shape, uint64_t seed, int lo, int hi_exclusive) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> ud(lo, hi_exclusive - 1);
  Tensor t = Tensor::empty(shape, DType::I32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = ud(rng);
  return t;
}

// Fill with NaN so a kernel that forgets to write an output element is caught.
inline void poison(Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i) t.set_item(i, std::nan(""));
}

// Same shape, dtype and bytes: for copies (a checkpoint or file round trip, a resumed run, the same
// computation twice) and results exact by construction (integers, a documented bit-exact kernel). Float
// results of code paths that may round differently are compared with a tolerance instead.
inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// max |a - b| / (atol + rtol |b|) <= 1 elementwise, NaN never passes.
inline ::testing::AssertionResult all_close(const Tensor& a, const Tensor& b, double rtol, double atol) {
  if (a.shape() != b.shape())
    return ::testing::AssertionFailure() << "shape " << a.desc() << " vs " << b.desc();
  double worst = 0;
  int64_t where = -1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.item(i), y = b.item(i);
    const double r = x == y ? 0.0 : std::fabs(x - y) / (atol + rtol * std::fabs(y));
    if (std::isnan(x) != std::isnan(y) || std::isnan(r) || r > worst) {
      if (std::isnan(x) || std::isnan(y) || std::isnan(r))
        return ::testing::AssertionFailure() << "NaN at " << i << ": " << x << " vs " << y;
      worst = r;
      where = i;
    }
  }
  if (worst <= 1.0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "mismatch at flat index " << where << ": " << a.item(where) << " vs "
                                       << b.item(where) << " (ratio to tolerance " << worst << ")";
}

// Central finite differences of a scalar function f with respect to every element of x (f64),
// compared with the analytic gradient. `loss` must read x's current contents on every call.
inline ::testing::AssertionResult grad_check(const std::string& name, Tensor& x, const Tensor& analytic,
                                             const std::function<double()>& loss, double h = 1e-6,
                                             double rtol = 1e-5, double atol = 1e-7, int64_t max_elems = 400) {
  if (x.dtype() != DType::F64) return ::testing::AssertionFailure() << name << ": grad_check needs f64";
  if (analytic.shape() != x.shape())
    return ::testing::AssertionFailure() << name << ": gradient shape " << analytic.desc() << " vs " << x.desc();
  const int64_t n = x.numel();
  const int64_t stride = n > max_elems ? n / max_elems + 1 : 1;  // sample large tensors evenly
  double* p = x.data<double>();
  for (int64_t i = 0; i < n; i += stride) {
    const double orig = p[i];
    p[i] = orig + h;
    const double lp = loss();
    p[i] = orig - h;
    const double lm = loss();
    p[i] = orig;
    const double fd = (lp - lm) / (2 * h);
    const double an = analytic.item(i);
    if (!(std::fabs(fd - an) <= atol + rtol * std::fabs(fd)))
      return ::testing::AssertionFailure() << name << "[" << i << "]: analytic " << an << " vs finite difference "
                                           << fd << " (diff " << an - fd << ")";
  }
  return ::testing::AssertionSuccess();
}

// A random "upstream gradient" projection: loss = sum(y * g) turns any op into a scalar function.
inline double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.item(i) * b.item(i);
  return s;
}

}  // namespace dsa::testing
