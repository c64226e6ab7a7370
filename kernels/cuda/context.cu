#include <cublasLt.h>
#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"

namespace dsa::cuda {

namespace {
struct Context {
  std::once_flag once;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 64ull << 20;  // cuBLASLt's recommendation for Hopper is 32 MiB+
  int sms = 0;
};
Context& ctx() {
  static Context* c = new Context();
  return *c;
}
void init() {
  Context& c = ctx();
  std::call_once(c.once, [&c] {
    DSA_CUDA_CHECK(cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking));
    if (cublasLtCreate(&c.lt) != CUBLAS_STATUS_SUCCESS) fail("[cuda] cublasLtCreate failed");
    DSA_CUDA_CHECK(cudaMalloc(&c.workspace, c.workspace_bytes));
    int dev = 0;
    DSA_CUDA_CHECK(cudaGetDevice(&dev));
    DSA_CUDA_CHECK(cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, dev));
  });
}
}  // namespace

void set_device(int device) { DSA_CUDA_CHECK(cudaSetDevice(device)); }

int current_device() {
  int d = 0;
  DSA_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

cudaStream_t stream() {
  init();
  return ctx().stream;
}

cublasLtHandle_t blaslt() {
  init();
  return ctx().lt;
}

void* blaslt_workspace(size_t* bytes) {
  init();
  *bytes = ctx().workspace_bytes;
  return ctx().workspace;
}

int sm_count() {
  init();
  return ctx().sms;
}

void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(std::string("[") + op + "] kernel launch failed: " + cudaGetErrorString(err));
}

}  // namespace dsa::cuda
