#include "kernels/tensor.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <stdexcept>

#include "kernels/device_memory.h"

namespace dsa {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::BF16: return "bf16";
    case DType::F8E4M3: return "f8e4m3";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
    case DType::U8: return "u8";
  }
  return "?";
}

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

float fp8e4m3_to_f32(fp8e4m3 v) {
  const uint32_t b = v.bits;
  const float sign = (b & 0x80u) ? -1.0f : 1.0f;
  const int e = (b >> 3) & 0xf, m = b & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -9);
  return sign * std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
}

fp8e4m3 f32_to_fp8e4m3(float f) {
  const uint8_t sign = (f32_bits(f) >> 24) & 0x80u;
  if (std::isnan(f)) return fp8e4m3{static_cast<uint8_t>(sign | 0x7f)};
  const float a = std::fabs(f);
  if (a >= kFp8E4M3Max) return fp8e4m3{static_cast<uint8_t>(sign | 0x7e)};  // satfinite
  if (a < 0.015625f) {  // below 2^-6: subnormal grid of 2^-9; q == 8 is the smallest normal (0x08)
    const int q = static_cast<int>(std::nearbyint(a * 512.0f));
    return fp8e4m3{static_cast<uint8_t>(sign | q)};
  }
  int e2;
  const float frac = std::frexp(a, &e2);  // a = frac * 2^e2, frac in [0.5, 1)
  int e = e2 - 1;                         // a = (2 frac) * 2^e, 2 frac in [1, 2)
  int q = static_cast<int>(std::nearbyint((2.0f * frac - 1.0f) * 8.0f));  // exact: 2frac has 24 bits
  if (q == 8) {
    q = 0;
    ++e;
  }
  int code = ((e + 7) << 3) | q;
  if (code > 0x7e) code = 0x7e;
  return fp8e4m3{static_cast<uint8_t>(sign | code)};
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) r += ", ";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

void fail(const std::string& msg) { throw std::runtime_error(msg); }

namespace {
std::atomic<size_t> g_host_in_use{0}, g_host_peak{0};
}

HostMemoryStats host_memory_stats() { return {g_host_in_use.load(), g_host_peak.load()}; }
void reset_host_peak() { g_host_peak.store(g_host_in_use.load()); }

Storage::Storage(size_t nbytes, Device dev) : bytes(nbytes), device(dev) {
  const size_t alloc = nbytes ? nbytes : 1;
  if (dev == Device::CPU) {
    // 64-byte alignment for vector loads; size rounded up as aligned_alloc requires.
    ptr = std::aligned_alloc(64, (alloc + 63) / 64 * 64);
    DSA_CHECK(ptr, "[tensor] out of host memory allocating ", nbytes, " bytes");
    const size_t now = g_host_in_use.fetch_add(nbytes) + nbytes;
    size_t peak = g_host_peak.load();
    while (now > peak && !g_host_peak.compare_exchange_weak(peak, now)) {
    }
  } else {
    ptr = cuda::device_alloc(alloc);
  }
}

Storage::~Storage() {
  if (device == Device::CPU) {
    std::free(ptr);
    g_host_in_use.fetch_sub(bytes);
  } else {
    cuda::device_free(ptr, bytes ? bytes : 1);
  }
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) DSA_CHECK(d >= 0, "[tensor] negative dimension in shape ", shape);
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype), device);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::full(const Shape& shape, DType dtype, double value) {
  Tensor t = empty(shape, dtype);
  t.fill_(value);
  return t;
}

Tensor Tensor::from_vector(const std::vector<float>& v, const Shape& shape) {
  DSA_CHECK(static_cast<int64_t>(v.size()) == shape_numel(shape), "[tensor] from_vector: ", v.size(),
            " values for shape ", shape);
  Tensor t = empty(shape, DType::F32);
  std::memcpy(t.raw(), v.data(), v.size() * 4);
  return t;
}

Tensor Tensor::from_vector(const std::vector<int32_t>& v, const Shape& shape) {
  DSA_CHECK(static_cast<int64_t>(v.size()) == shape_numel(shape), "[tensor] from_vector: ", v.size(),
            " values for shape ", shape);
  Tensor t = empty(shape, DType::I32);
  std::memcpy(t.raw(), v.data(), v.size() * 4);
  return t;
}

int64_t Tensor::size(int i) const {
  const int n = ndim();
  if (i < 0) i += n;
  DSA_CHECK(i >= 0 && i < n, "[tensor] dimension ", i, " out of range for ", desc());
  return shape_[i];
}

std::string Tensor::desc() const {
  if (!defined()) return "undefined";
  return std::string(dtype_name(dtype_)) + shape_str(shape_) + " " + device_name(device());
}

void Tensor::check_type(DType want) const {
  DSA_CHECK(defined(), "[tensor] access to an undefined tensor");
  DSA_CHECK(want == dtype_, "[tensor] typed access as ", dtype_name(want), " to ", desc());
}

Tensor Tensor::view(const Shape& shape) const {
  Shape s = shape;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      DSA_CHECK(infer < 0, "[tensor] view: more than one -1 in ", shape);
      infer = static_cast<int>(i);
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    DSA_CHECK(known > 0 && numel() % known == 0, "[tensor] view ", shape, " does not fit ", desc());
    s[infer] = numel() / known;
  }
  DSA_CHECK(shape_numel(s) == numel(), "[tensor] view ", shape, " does not fit ", desc());
  Tensor t = *this;
  t.shape_ = s;
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  DSA_CHECK(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0], "[tensor] slice_rows(", begin, ", ",
            end, ") of ", desc());
  const int64_t row = shape_[0] ? numel() / shape_[0] : 0;
  Tensor t = *this;
  t.offset_ += static_cast<size_t>(begin * row) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(Device dev) const {
  if (dev == device()) return *this;
  Tensor t = empty(shape_, dtype_, dev);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dt) const {
  DSA_CHECK(is_cpu(), "[tensor] dtype conversion is CPU-only, got ", desc());
  if (dt == dtype_) return clone();
  Tensor t = empty(shape_, dt);
  const int64_t n = numel();
  if (dtype_ == DType::F32 && dt == DType::BF16) {
    const float* s = data<float>();
    bf16* d = t.data<bf16>();
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
  } else if (dtype_ == DType::BF16 && dt == DType::F32) {
    const bf16* s = data<bf16>();
    float* d = t.data<float>();
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) t.set_item(i, item(i));
  }
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  DSA_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, "[tensor] copy_from ", src.desc(), " into ", desc());
  if (nbytes() == 0) return;
  if (is_cpu() && src.is_cpu())
    std::memcpy(raw(), src.raw(), nbytes());
  else
    cuda::memcpy(raw(), device() == Device::CUDA, src.raw(), src.device() == Device::CUDA, nbytes());
}

void Tensor::zero_() {
  if (nbytes() == 0) return;
  if (is_cpu())
    std::memset(raw(), 0, nbytes());
  else
    cuda::memset_zero(raw(), nbytes());
}

void Tensor::fill_(double v) {
  DSA_CHECK(is_cpu(), "[tensor] fill_ is CPU-only, got ", desc());
  const int64_t n = numel();
  if (dtype_ == DType::F32) {
    float* p = data<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(v);
  } else {
    for (int64_t i = 0; i < n; ++i) set_item(i, v);
  }
}

double Tensor::item(int64_t i) const {
  DSA_CHECK(is_cpu() && i >= 0 && i < numel(), "[tensor] item(", i, ") of ", desc());
  switch (dtype_) {
    case DType::F32: return static_cast<const float*>(raw())[i];
    case DType::F64: return static_cast<const double*>(raw())[i];
    case DType::BF16: return bf16_to_f32(static_cast<const bf16*>(raw())[i]);
    case DType::F8E4M3: return fp8e4m3_to_f32(static_cast<const fp8e4m3*>(raw())[i]);
    case DType::I32: return static_cast<const int32_t*>(raw())[i];
    case DType::I64: return static_cast<double>(static_cast<const int64_t*>(raw())[i]);
    case DType::U8: return static_cast<const uint8_t*>(raw())[i];
  }
  return 0;
}

void Tensor::set_item(int64_t i, double v) {
  DSA_CHECK(is_cpu() && i >= 0 && i < numel(), "[tensor] set_item(", i, ") of ", desc());
  switch (dtype_) {
    case DType::F32: static_cast<float*>(raw())[i] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(raw())[i] = v; break;
    case DType::BF16: static_cast<bf16*>(raw())[i] = f32_to_bf16(static_cast<float>(v)); break;
    case DType::F8E4M3: static_cast<fp8e4m3*>(raw())[i] = f32_to_fp8e4m3(static_cast<float>(v)); break;
    case DType::I32: static_cast<int32_t*>(raw())[i] = static_cast<int32_t>(v); break;
    case DType::I64: static_cast<int64_t*>(raw())[i] = static_cast<int64_t>(v); break;
    case DType::U8: static_cast<uint8_t*>(raw())[i] = static_cast<uint8_t>(v); break;
  }
}

void expect_shape(const char* op, const char* name, const Tensor& t, const Shape& want) {
  DSA_CHECK(t.defined(), "[", op, "] ", name, " is undefined, expected ", want);
  bool ok = t.ndim() == static_cast<int>(want.size());
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || want[i] == t.shape()[i];
  DSA_CHECK(ok, "[", op, "] ", name, " must have shape ", want, ", got ", t.desc());
}

void expect_dtype(const char* op, const char* name, const Tensor& t, DType want) {
  DSA_CHECK(t.defined() && t.dtype() == want, "[", op, "] ", name, " must be ", dtype_name(want), ", got ",
            t.desc());
}

void expect_float(const char* op, const char* name, const Tensor& t) {
  DSA_CHECK(t.defined() && is_float(t.dtype()), "[", op, "] ", name, " must be f32 or f64, got ", t.desc());
}

void expect_same_device(const char* op, const Tensor& a, const Tensor& b) {
  DSA_CHECK(a.device() == b.device(), "[", op, "] tensors on different devices: ", a.desc(), " and ", b.desc());
}

}  // namespace dsa
