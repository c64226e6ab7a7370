// Element types and their exact conversions.
//
// bf16: the top 16 bits of an IEEE f32, rounded to nearest even (NaN stays NaN).
// fp8 e4m3 (OCP "e4m3fn"): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; the only
// NaN encodings are S.1111.111; largest finite 448; subnormals down to 2^-9. Conversion from f32
// rounds to nearest even and saturates to +-448 like the hardware's __NV_SATFINITE mode.
#pragma once

#include <cstdint>
#include <cstring>

namespace dsa {

enum class DType : uint8_t { F32, F64, BF16, F8E4M3, I32, I64, U8 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::F8E4M3: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}
const char* dtype_name(DType t);  // "f32", "bf16", ...
inline bool is_float(DType t) { return t == DType::F32 || t == DType::F64; }

struct bf16 {
  uint16_t bits;
};
struct fp8e4m3 {
  uint8_t bits;
};

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }
template <> constexpr DType dtype_of<fp8e4m3>() { return DType::F8E4M3; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(bf16 h) { return bits_f32(static_cast<uint32_t>(h.bits) << 16); }
inline bf16 f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>((u + rounding) >> 16)};
}
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

float fp8e4m3_to_f32(fp8e4m3 v);
fp8e4m3 f32_to_fp8e4m3(float f);  // round to nearest even, saturate to +-448, NaN -> 0x7f
inline float round_fp8e4m3(float f) { return fp8e4m3_to_f32(f32_to_fp8e4m3(f)); }
constexpr float kFp8E4M3Max = 448.0f;

}  // namespace dsa
