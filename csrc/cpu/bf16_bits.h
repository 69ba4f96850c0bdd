// bfloat16 <-> float32 on raw bits, one value at a time: plain C++ for every CPU kernel and
// instruction set (the vector conversions stay in the kernels).
#pragma once

#include <cstdint>
#include <cstring>

namespace fastformer {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = (uint32_t)bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even (c10::BFloat16's bits for every non-NaN value); a NaN stays a quiet NaN
// with its sign and payload (c10 returns the canonical 0x7fc0).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace fastformer
