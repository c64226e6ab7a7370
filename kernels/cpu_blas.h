// Row-major BLAS products for the CPU reference ops (OpenBLAS cblas), and a guard that keeps OpenBLAS
// single-threaded while the caller parallelizes with OpenMP (the Debian build uses pthreads, which
// must not be nested inside OpenMP threads).
#pragma once

#include <cblas.h>

#include <cstdint>

namespace dsa::ops::detail {

// C [M, N] = alpha * op(A) op(B) + beta * C, row-major with explicit leading dimensions.
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, double beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
              (float)alpha, A, (int)lda, B, (int)ldb, (float)beta, C, (int)ldc);
}
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                    const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
              alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
}

// OpenBLAS single-threaded for the lifetime of the guard (the previous setting is restored).
struct BlasSerial {
  int prev;
  BlasSerial() : prev(openblas_get_num_threads()) { openblas_set_num_threads(1); }
  ~BlasSerial() { openblas_set_num_threads(prev); }
  BlasSerial(const BlasSerial&) = delete;
  BlasSerial& operator=(const BlasSerial&) = delete;
};

}  // namespace dsa::ops::detail
