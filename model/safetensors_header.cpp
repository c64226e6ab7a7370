// safetensors header validation: the only code that reads untrusted header bytes. Kept free of the
// tensor library so tests/fuzz/ can build it alone under libFuzzer and AddressSanitizer.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "model/safetensors.h"

namespace dsa {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own limit (100 MB)
constexpr size_t kMaxDims = 16;

[[noreturn]] void bad(const std::string& source, const std::string& msg) {
  throw std::runtime_error("[safetensors] " + source + ": " + msg);
}

// A JSON integer >= 0 as u64; false for negatives, floats, and anything else.
bool as_u64(const nlohmann::json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

std::string shape_str_u(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

const char* st_dtype_name(StDType t) {
  switch (t) {
    case StDType::F64: return "F64";
    case StDType::F32: return "F32";
    case StDType::F16: return "F16";
    case StDType::BF16: return "BF16";
    case StDType::F8_E4M3: return "F8_E4M3";
    case StDType::I64: return "I64";
    case StDType::I32: return "I32";
    case StDType::I16: return "I16";
    case StDType::I8: return "I8";
    case StDType::U8: return "U8";
    case StDType::BOOL: return "BOOL";
  }
  return "?";
}

int st_dtype_size(StDType t) {
  switch (t) {
    case StDType::F64: case StDType::I64: return 8;
    case StDType::F32: case StDType::I32: return 4;
    case StDType::F16: case StDType::BF16: case StDType::I16: return 2;
    case StDType::F8_E4M3: case StDType::I8: case StDType::U8: case StDType::BOOL: return 1;
  }
  return 0;
}

bool st_dtype_from_name(const std::string& s, StDType* out) {
  static const StDType all[] = {StDType::F64, StDType::F32, StDType::F16, StDType::BF16, StDType::F8_E4M3, StDType::I64,
                                StDType::I32, StDType::I16, StDType::I8,  StDType::U8,   StDType::BOOL};
  for (StDType t : all)
    if (s == st_dtype_name(t)) {
      *out = t;
      return true;
    }
  return false;
}

StHeader parse_safetensors_header(const uint8_t* prefix, size_t prefix_len, uint64_t file_size,
                                  const std::string& source) {
  if (file_size < 8 || prefix_len < 8)
    bad(source, "file of " + std::to_string(file_size) + " bytes is too short for the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];  // little-endian
  if (n > kMaxHeaderBytes)
    bad(source, "header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > file_size - 8)
    bad(source, "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(file_size) +
                    " bytes)");
  if (prefix_len < 8 + n) bad(source, "header of " + std::to_string(n) + " bytes could not be read in full");
  StHeader h;
  h.header_len = n;
  const uint64_t data_size = file_size - 8 - n;

  const char* text = reinterpret_cast<const char*>(prefix + 8);
  nlohmann::json j = nlohmann::json::parse(text, text + n, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad(source, "header is not valid JSON");
  if (!j.is_object()) bad(source, "header must be a JSON object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) bad(source, "__metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) bad(source, "__metadata__['" + m.key() + "'] must be a string");
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "': ";
    if (!v.is_object()) bad(source, where + "entry must be an object");
    auto dt = v.find("dtype"), sh = v.find("shape"), off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) bad(source, where + "missing string 'dtype'");
    if (sh == v.end() || !sh->is_array()) bad(source, where + "missing array 'shape'");
    if (off == v.end() || !off->is_array() || off->size() != 2) bad(source, where + "'data_offsets' must be [begin, end]");
    StTensorInfo t;
    t.name = name;
    const std::string dname = dt->get<std::string>();
    if (!st_dtype_from_name(dname, &t.dtype)) bad(source, where + "unknown dtype '" + dname + "'");
    if (sh->size() > kMaxDims) bad(source, where + "shape has " + std::to_string(sh->size()) + " dimensions");
    uint64_t numel = 1;
    for (const auto& d : *sh) {
      uint64_t x;
      if (!as_u64(d, &x) || x > (1ull << 62)) bad(source, where + "shape entries must be integers in [0, 2^62]");
      if (__builtin_mul_overflow(numel, x, &numel)) bad(source, where + "shape's element count overflows");
      t.shape.push_back(static_cast<int64_t>(x));
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(st_dtype_size(t.dtype)), &nbytes) || nbytes > (1ull << 62))
      bad(source, where + "byte size overflows");
    if (!as_u64((*off)[0], &t.begin) || !as_u64((*off)[1], &t.end))
      bad(source, where + "data_offsets must be non-negative integers");
    if (t.begin > t.end) bad(source, where + "data_offsets begin " + std::to_string(t.begin) + " > end " + std::to_string(t.end));
    if (t.end > data_size)
      bad(source, where + "data_offsets end " + std::to_string(t.end) + " is past the data section of " +
                      std::to_string(data_size) + " bytes");
    if (t.end - t.begin != nbytes)
      bad(source, where + "data_offsets span " + std::to_string(t.end - t.begin) + " bytes but " + dname +
                      shape_str_u(t.shape) + " needs " + std::to_string(nbytes));
    h.tensors.push_back(std::move(t));
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const StTensorInfo& a, const StTensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const StTensorInfo* last = nullptr;  // the non-empty tensor reaching furthest so far
  for (const StTensorInfo& c : h.tensors) {
    if (c.begin == c.end) continue;
    if (last && c.begin < last->end)
      bad(source, "tensors '" + last->name + "' and '" + c.name + "' overlap in the data section");
    if (!last || c.end > last->end) last = &c;
  }
  return h;
}

}  // namespace dsa
