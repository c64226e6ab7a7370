// CPU-only build: every device entry point explains that the CUDA backend is absent.
#include "kernels/device_memory.h"
#include "kernels/tensor.h"

namespace dsa::cuda {

namespace {
[[noreturn]] void absent() {
  fail("[cuda] this build has no CUDA backend (nvcc was not found at configure time); use device: cpu");
}
}  // namespace

bool available() { return false; }
int device_count() { return 0; }
void* device_alloc(size_t) { absent(); }
void device_free(void*, size_t) {}
void memcpy(void*, bool, const void*, bool, size_t) { absent(); }
void memset_zero(void*, size_t) { absent(); }
void synchronize() {}
AllocatorStats allocator_stats() { return {}; }
DeviceMemory device_memory() { return {}; }
void reset_peak() {}
void empty_cache() {}

}  // namespace dsa::cuda
