// Row-major batched bf16 GEMM on cuBLASLt for the DSA kernels (see dsa_common.cuh), and a cast.
#include <cublasLt.h>

#include <string>

#include "kernels/cuda/dsa_common.cuh"

namespace dsa::cuda::dsa_detail {

namespace {
void lt_check(cublasStatus_t s, const char* op, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(std::string("[") + op + "] cuBLASLt " + what + " failed: status " + std::to_string((int)s));
}

__global__ void cast_kernel(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}
}  // namespace

// NOTES: a row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, so cuBLASLt sees
// (B, A) swapped; a row-major X [r, c] with leading dim ld is the column-major [c, r] with the same ld.
void row_gemm(const char* op, const RowGemm& g) {
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  const cudaDataType ct = g.c_type == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
  cublasLtMatmulDesc_t desc = nullptr;
  lt_check(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), op, "desc");
  // cuBLASLt "A" = our B, "B" = our A.
  cublasOperation_t opa = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)), op, "transa");
  lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)), op, "transb");
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  // our B: tb ? stored [N, K] -> col-major [K, N] : stored [K, N] -> col-major [N, K]
  lt_check(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, g.tb ? g.K : g.N, g.tb ? g.N : g.K, g.ldb), op, "layout");
  // our A: ta ? stored [K, M] -> col-major [M, K] : stored [M, K] -> col-major [K, M]
  lt_check(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, g.ta ? g.M : g.K, g.ta ? g.K : g.M, g.lda), op, "layout");
  lt_check(cublasLtMatrixLayoutCreate(&lc, ct, g.N, g.M, g.ldc), op, "layout");
  if (g.batch > 1) {
    const int32_t bc = static_cast<int32_t>(g.batch);
    const int64_t sa = g.strideB, sb = g.strideA, sc = g.strideC;
    for (auto [l, s] : {std::pair{la, sa}, std::pair{lb, sb}, std::pair{lc, sc}}) {
      lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof(bc)), op, "batch");
      lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &s, sizeof(s)), op,
               "stride");
    }
  }
  size_t ws_bytes = 0;
  void* ws = blaslt_workspace(&ws_bytes);
  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), op, "preference");
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                sizeof(ws_bytes)),
           op, "preference");
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  lt_check(cublasLtMatmulAlgoGetHeuristic(blaslt(), desc, la, lb, lc, lc, pref, 1, &heur, &found), op, "heuristic");
  DSA_CHECK(found > 0, "[", op, "] cuBLASLt found no algorithm for M=", g.M, " N=", g.N, " K=", g.K);
  lt_check(cublasLtMatmul(blaslt(), desc, &g.alpha, g.B, la, g.A, lb, &g.beta, g.C, lc, g.C, lc, &heur.algo, ws,
                          ws_bytes, stream()),
           op, "matmul");
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
}

void cast_f32_to_bf16(const float* src, __nv_bfloat16* dst, int64_t n, const char* op) {
  if (n == 0) return;
  cast_kernel<<<grid_1d(n, 256), 256, 0, stream()>>>(src, dst, n);
  check_launch(op);
}

}  // namespace dsa::cuda::dsa_detail
