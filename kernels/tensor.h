// Tensor: a contiguous, reference-counted block of typed memory on one device.
//
// Invariants:
//  - always contiguous, row-major; shape[0] is the slowest dimension;
//  - a view shares storage with its parent (view(), slice_rows());
//  - the element type is checked on every typed access (data<T>()).
// The CPU backend computes in f32 (f64 in gradient checks); bf16 and fp8 are storage types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"

namespace dsa {

enum class Device : uint8_t { CPU, CUDA };
const char* device_name(Device d);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// Bytes of host memory held by tensors' storage (the CPU backend's counterpart of the device caching
// allocator's counts, cuda::allocator_stats()).
struct HostMemoryStats {
  size_t in_use = 0;       // bytes of live CPU storages
  size_t peak_in_use = 0;  // high-water mark of in_use since the last reset_host_peak()
};
HostMemoryStats host_memory_stats();
void reset_host_peak();

struct Storage {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device = Device::CPU;
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::CPU);
  static Tensor full(const Shape& shape, DType dtype, double value);  // CPU only
  static Tensor from_vector(const std::vector<float>& v, const Shape& shape);
  static Tensor from_vector(const std::vector<int32_t>& v, const Shape& shape);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::CPU; }
  bool is_cpu() const { return device() == Device::CPU; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t size(int i) const;  // negative i counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  std::string desc() const;  // "f32[2, 3] cpu"

  void* raw() { return static_cast<char*>(storage_->ptr) + offset_; }
  const void* raw() const { return static_cast<const char*>(storage_->ptr) + offset_; }
  template <class T> T* data() { check_type(dtype_of<T>()); return static_cast<T*>(raw()); }
  template <class T> const T* data() const { check_type(dtype_of<T>()); return static_cast<const T*>(raw()); }

  // Views share storage.
  Tensor view(const Shape& shape) const;                // same numel; one dim may be -1
  Tensor slice_rows(int64_t begin, int64_t end) const;  // along dim 0
  Tensor row(int64_t i) const { return slice_rows(i, i + 1).view(Shape(shape_.begin() + 1, shape_.end())); }

  // Copies.
  Tensor clone() const;
  Tensor to(Device device) const;  // copy to another device (no-op share when same)
  Tensor to(DType dtype) const;    // CPU conversion (round-to-nearest-even for bf16/fp8)
  void copy_from(const Tensor& src);  // same shape and dtype; any devices
  void zero_();
  void fill_(double value);  // CPU only

  // CPU element access for tests and small code paths (converts through double).
  double item(int64_t flat_index) const;
  void set_item(int64_t flat_index, double v);

  bool same_storage(const Tensor& o) const { return storage_ == o.storage_ && offset_ == o.offset_; }

 private:
  void check_type(DType want) const;
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes
  Shape shape_;
  DType dtype_ = DType::F32;
};

// Error with the op or file name first: "[rmsnorm] x must be f32 [N, D], got bf16[3] cpu".
[[noreturn]] void fail(const std::string& msg);
#define DSA_CHECK(cond, ...)                       \
  do {                                             \
    if (!(cond)) ::dsa::fail(::dsa::strcat_(__VA_ARGS__)); \
  } while (0)

inline std::string to_str_(const std::string& s) { return s; }
inline std::string to_str_(const char* s) { return s; }
inline std::string to_str_(char c) { return std::string(1, c); }
inline std::string to_str_(const Shape& s) { return shape_str(s); }
template <class T>
std::string to_str_(const T& v) { return std::to_string(v); }

template <class... A>
std::string strcat_(const A&... a) {
  std::string s;
  (s.append(to_str_(a)), ...);
  return s;
}
// Shape checks used by every public op entry.
void expect_shape(const char* op, const char* name, const Tensor& t, const Shape& want);
void expect_dtype(const char* op, const char* name, const Tensor& t, DType want);
void expect_float(const char* op, const char* name, const Tensor& t);  // f32 or f64
void expect_same_device(const char* op, const Tensor& a, const Tensor& b);

}  // namespace dsa
