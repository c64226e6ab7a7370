// The CUDA backend's per-process context: the stream every kernel runs on, the cuBLASLt handle and
// its workspace. One GPU per process (the trainer selects it from the MPI local rank).
#pragma once

#include <cstddef>

#include "kernels/tensor.h"

typedef struct CUstream_st* cudaStream_t;
typedef struct cublasLtContext* cublasLtHandle_t;

namespace dsa::cuda {

void set_device(int device);    // before any allocation
int current_device();
cudaStream_t stream();          // the stream all ops use (not the legacy default stream)
cublasLtHandle_t blaslt();      // created on first use
void* blaslt_workspace(size_t* bytes);
int sm_count();

// Host-visible check after a launch: turns a launch error into "[op] kernel launch failed: ...".
void check_launch(const char* op);

}  // namespace dsa::cuda
