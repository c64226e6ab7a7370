// Error checks for CUDA runtime calls: the message names the call, file and line.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "kernels/tensor.h"

#define DSA_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                \
    cudaError_t err_ = (expr);                                                                        \
    if (err_ != cudaSuccess)                                                                          \
      ::dsa::fail(std::string("[cuda] ") + #expr + " failed at " + __FILE__ + ":" +                   \
                  std::to_string(__LINE__) + ": " + cudaGetErrorString(err_));                        \
  } while (0)
