// Device memory entry points used by Tensor. With the CUDA backend they go to a caching allocator
// (kernels/cuda/device_memory.cu); in a CPU-only build they fail with a clear message.
#pragma once

#include <cstddef>

namespace dsa::cuda {

bool available();  // built with CUDA and a device is present
int device_count();  // visible CUDA devices (0 without the CUDA backend)
void* device_alloc(size_t bytes);
void device_free(void* ptr, size_t bytes);
void memcpy(void* dst, bool dst_on_device, const void* src, bool src_on_device, size_t bytes);
void memset_zero(void* ptr, size_t bytes);
void synchronize();

struct AllocatorStats {
  size_t in_use = 0;       // bytes handed out
  size_t reserved = 0;     // bytes held from the driver
  size_t peak_in_use = 0;  // high-water mark of in_use
};
AllocatorStats allocator_stats();
// The current device's memory as cudaMemGetInfo reports it (0, 0 without a device).
struct DeviceMemory {
  size_t free = 0, total = 0;
};
DeviceMemory device_memory();
void reset_peak();
void empty_cache();

}  // namespace dsa::cuda
