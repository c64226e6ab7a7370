// Helpers for the GPU tests: skip without a device, move tensors, compare with the CPU reference.
#pragma once

#include <gtest/gtest.h>

#include <cmath>

#include "kernels/device_memory.h"
#include "kernels/tensor.h"

namespace dsa::testing {

#define DSA_REQUIRE_GPU()                                            \
  do {                                                               \
    if (!::dsa::cuda::available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// CPU tensor (f32/f64) -> GPU tensor of dtype (bf16 values are rounded on the host).
inline Tensor to_gpu(const Tensor& cpu, DType dtype) {
  Tensor host = cpu.dtype() == dtype ? cpu : cpu.to(dtype);
  return host.to(Device::CUDA);
}
// GPU tensor -> CPU f64 (for comparisons).
inline Tensor to_cpu64(const Tensor& gpu) { return gpu.to(Device::CPU).to(DType::F64); }
// A GPU tensor full of NaN (poisoned output buffer).
inline Tensor poisoned_gpu(const Shape& shape, DType dtype) {
  Tensor host = Tensor::full(shape, dtype, std::nan(""));
  return host.to(Device::CUDA);
}

// Norm-wise relative tolerance of a GPU result computed through r bf16 roundings against the CPU's f32/f64
// on the same (bf16-representable) inputs. Each bf16 rounding (round to nearest even, unit roundoff
// u = 2^-8) adds a relative error uniform in [-u, u], independent across elements (RMS u / sqrt 3), so
// after r roundings a tensor's norm-wise relative error has RMS u sqrt(r / 3): the bound is three RMS,
// u sqrt(3 r), times kappa where a difference of nearly equal quantities amplifies relative errors.
inline double bf16_tol(double r, double kappa = 1.0) { return kappa * std::ldexp(1.0, -8) * std::sqrt(3.0 * r); }

// ||a - b|| / ||b|| <= tol, with NaN/Inf never passing.
inline ::testing::AssertionResult rel_close(const Tensor& a, const Tensor& b, double tol) {
  Tensor x = a.is_cpu() ? a.to(DType::F64) : to_cpu64(a);
  Tensor y = b.is_cpu() ? b.to(DType::F64) : to_cpu64(b);
  if (x.shape() != y.shape()) return ::testing::AssertionFailure() << "shape " << x.desc() << " vs " << y.desc();
  double num = 0, den = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double u = x.item(i), v = y.item(i);
    if (!std::isfinite(u) || !std::isfinite(v))
      return ::testing::AssertionFailure() << "non-finite at " << i << ": " << u << " vs " << v;
    num += (u - v) * (u - v);
    den += v * v;
  }
  const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  if (rel <= tol) return ::testing::AssertionSuccess() << "rel " << rel;
  return ::testing::AssertionFailure() << "relative error " << rel << " > " << tol;
}

}  // namespace dsa::testing
