// Helpers shared by the dsa-bench commands (tools/dsa_bench.cpp, tools/dsa_bench/*.cpp): the device, the
// one timer, random inputs and argument lists.
//
// NOTES: time_median times on the GPU with CUDA events recorded on the op stream around each run (a host
// synchronization inside the run is included), on the CPU with the steady clock; warm-up runs first and
// are not measured, the median of the measured runs is returned.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#ifdef DSA_HAVE_CUDA
#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"
#endif
#include "kernels/device_memory.h"
#include "kernels/tensor.h"

namespace dsa::bench {

// Sets an environment switch the kernels read at each call (DSA_INDEXER_WGMMA, DSA_SPARSE_ATTN_WGMMA, ...)
// for one scope and puts back what was there, also when the scope throws.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1);
    else unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

inline Device bench_device() { return cuda::available() ? Device::CUDA : Device::CPU; }

// Median seconds of `reps` runs of f after `warm` unmeasured runs.
inline double time_median(Device d, int warm, int reps, const std::function<void()>& f) {
  for (int i = 0; i < warm; ++i) f();
  if (d == Device::CUDA) cuda::synchronize();
  std::vector<double> t;
#ifdef DSA_HAVE_CUDA
  if (d == Device::CUDA) {
    cudaEvent_t a, b;
    DSA_CUDA_CHECK(cudaEventCreate(&a));
    DSA_CUDA_CHECK(cudaEventCreate(&b));
    for (int i = 0; i < reps; ++i) {
      DSA_CUDA_CHECK(cudaEventRecord(a, cuda::stream()));
      f();
      DSA_CUDA_CHECK(cudaEventRecord(b, cuda::stream()));
      DSA_CUDA_CHECK(cudaEventSynchronize(b));
      float ms = 0;
      DSA_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(1e-3 * ms);
    }
    DSA_CUDA_CHECK(cudaEventDestroy(a));
    DSA_CUDA_CHECK(cudaEventDestroy(b));
  }
#endif
  if (d == Device::CPU) {
    for (int i = 0; i < reps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  DSA_CHECK(!t.empty(), "[dsa-bench] no timed run on ", device_name(d));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

inline std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream ss(s);
  for (std::string tok; std::getline(ss, tok, ',');) v.push_back(std::stoll(tok));
  return v;
}

inline std::vector<std::string> parse_names(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string tok; std::getline(ss, tok, ',');) v.push_back(tok);
  return v;
}

// Normal(0, scale) values of dtype on dev.
inline Tensor random_tensor(const Shape& shape, DType dtype, Device dev, uint64_t seed, double scale = 1.0) {
  Tensor h = Tensor::empty(shape, DType::F32);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, static_cast<float>(scale));
  float* p = h.data<float>();
  for (int64_t i = 0; i < h.numel(); ++i) p[i] = nd(rng);
  Tensor c = dtype == DType::F32 ? h : h.to(dtype);
  return c.to(dev);
}

// Uniform(-a, a) values of dtype on dev from a xorshift generator: fast enough for 10^8-element inputs.
inline Tensor uniform_tensor(const Shape& shape, DType dtype, Device dev, uint64_t seed, float a) {
  Tensor h = Tensor::empty(shape, DType::F32);
  float* p = h.data<float>();
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < h.numel(); ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = a * (static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
  Tensor c = dtype == DType::F32 ? h : h.to(dtype);
  return c.to(dev);
}

}  // namespace dsa::bench
