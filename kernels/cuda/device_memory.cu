// Caching device allocator: freed blocks are kept in per-size free lists and reused, so the
// training loop's steady state makes no cudaMalloc/cudaFree calls (they synchronize the device).
//
// NOTES: sizes are rounded up to 512 B below 1 MiB and to 2 MiB above, which keeps the number of
// distinct sizes small while wasting little. A failed cudaMalloc first returns every cached block to
// the driver and tries once more before reporting out-of-memory with the allocator's figures.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cuda/check.cuh"
#include "kernels/cuda/context.h"
#include "kernels/device_memory.h"
#include "kernels/tensor.h"

namespace dsa::cuda {

namespace {

struct Cache {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free_blocks;  // rounded size -> blocks
  AllocatorStats stats;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may be freed during static teardown
  return *c;
}

size_t round_size(size_t n) {
  if (n < (1u << 20)) return (n + 511) / 512 * 512;
  return (n + (2u << 20) - 1) / (2u << 20) * (2u << 20);
}

void release_all_locked(Cache& c) {
  for (auto& [size, blocks] : c.free_blocks) {
    for (void* p : blocks) {
      cudaFree(p);
      c.stats.reserved -= size;
    }
  }
  c.free_blocks.clear();
}

}  // namespace

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

bool available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

void* device_alloc(size_t bytes) {
  Cache& c = cache();
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.free_blocks.find(size);
  void* p = nullptr;
  if (it != c.free_blocks.end() && !it->second.empty()) {
    p = it->second.back();
    it->second.pop_back();
  } else {
    cudaError_t err = cudaMalloc(&p, size);
    if (err != cudaSuccess) {
      cudaGetLastError();
      release_all_locked(c);
      err = cudaMalloc(&p, size);
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      fail("[cuda] out of device memory allocating " + std::to_string(size >> 20) + " MiB (in use " +
           std::to_string(c.stats.in_use >> 20) + " MiB, device free " + std::to_string(free_b >> 20) + " of " +
           std::to_string(total_b >> 20) + " MiB)");
    }
    c.stats.reserved += size;
  }
  c.stats.in_use += size;
  if (c.stats.in_use > c.stats.peak_in_use) c.stats.peak_in_use = c.stats.in_use;
  return p;
}

void device_free(void* ptr, size_t bytes) {
  if (!ptr) return;
  Cache& c = cache();
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lock(c.mu);
  c.free_blocks[size].push_back(ptr);
  c.stats.in_use -= size;
}

void memcpy(void* dst, bool dst_dev, const void* src, bool src_dev, size_t bytes) {
  cudaMemcpyKind kind = dst_dev ? (src_dev ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                : (src_dev ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  // Ordered after the op stream's work; host transfers wait for completion.
  DSA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, stream()));
  if (!dst_dev || !src_dev) DSA_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void memset_zero(void* ptr, size_t bytes) { DSA_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream())); }

void synchronize() { DSA_CUDA_CHECK(cudaStreamSynchronize(stream())); }

AllocatorStats allocator_stats() {
  std::lock_guard<std::mutex> lock(cache().mu);
  return cache().stats;
}

DeviceMemory device_memory() {
  DeviceMemory m;
  if (cudaMemGetInfo(&m.free, &m.total) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  return m;
}

void reset_peak() {
  std::lock_guard<std::mutex> lock(cache().mu);
  cache().stats.peak_in_use = cache().stats.in_use;
}

void empty_cache() {
  std::lock_guard<std::mutex> lock(cache().mu);
  release_all_locked(cache());
}

}  // namespace dsa::cuda
