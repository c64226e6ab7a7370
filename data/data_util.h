// Helpers shared by data/'s sources (data/ stands alone: it includes nothing of kernels/ or model/).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>

namespace dsa::data_util {

// Throws std::runtime_error "<tag> <parts...>".
template <class... Parts>
[[noreturn]] void fail(const char* tag, const Parts&... parts) {
  std::ostringstream os;
  os << tag << ' ';
  (os << ... << parts);
  throw std::runtime_error(os.str());
}

// SplitMix64: the next value of the stream whose state is x (advanced).
inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace dsa::data_util
