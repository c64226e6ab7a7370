// libFuzzer target: parse_safetensors_header over arbitrary bytes. The only acceptable failure is the
// parser's own std::runtime_error; anything else (another exception, an ASan report) is a bug.
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    dsa::StHeader h = dsa::parse_safetensors_header(data, size, size, "fuzz");
    // Every accepted tensor must lie inside the input.
    for (const dsa::StTensorInfo& t : h.tensors)
      if (h.data_offset() + t.end > size || t.begin > t.end) __builtin_trap();
  } catch (const std::runtime_error&) {
  }
  return 0;
}
