// Hugging Face safetensors: reader with full validation of untrusted files, writer, sharded index.
//
// File layout (SPEC.md §3): u64 little-endian header length N, N bytes of JSON
//   {name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end)}, "__metadata__": {str: str}}
// with offsets relative to the first byte after the header.
//
// Every file is untrusted. parse_safetensors_header() checks, and names file and tensor on failure:
// the header length against the file size and a 100 MB cap, the JSON itself, known dtypes, shapes of
// non-negative integers whose byte size does not overflow, begin <= end <= data size,
// end - begin == numel * dtype size, and no two tensors overlapping. Reads use pread and check the
// byte count, so a file truncated after opening gives an error, never a SIGBUS.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace dsa {

// Element types a safetensors file may carry (the subset of the format this project reads).
enum class StDType : uint8_t { F64, F32, F16, BF16, F8_E4M3, I64, I32, I16, I8, U8, BOOL };
const char* st_dtype_name(StDType t);  // "F32", "F8_E4M3", ...
int st_dtype_size(StDType t);
bool st_dtype_from_name(const std::string& s, StDType* out);
// Native storage type for a safetensors type where one exists (F16, I16, I8, BOOL have none).
bool st_to_native(StDType t, DType* out);
StDType native_to_st(DType t);

struct StTensorInfo {
  std::string name;
  StDType dtype = StDType::F32;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte range within the data section
};

struct StHeader {
  uint64_t header_len = 0;  // N
  std::vector<StTensorInfo> tensors;  // in file order of their data
  std::map<std::string, std::string> metadata;
  uint64_t data_offset() const { return 8 + header_len; }
};

// Validates the header of a file of `file_size` bytes whose first bytes are `prefix[0, prefix_len)`
// (prefix_len >= min(file_size, 8 + N) is needed for success). Throws std::runtime_error
// "[safetensors] <source>: ..." on any inconsistency. Depends on nothing but the C++ library and
// nlohmann-json, so the fuzzer links it alone.
StHeader parse_safetensors_header(const uint8_t* prefix, size_t prefix_len, uint64_t file_size,
                                  const std::string& source);

// One open safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const StHeader& header() const { return header_; }
  bool has(const std::string& name) const { return index_.count(name) > 0; }
  const StTensorInfo& info(const std::string& name) const;
  // Raw bytes of one tensor, exactly as stored.
  std::vector<uint8_t> read_bytes(const std::string& name) const;
  // The tensor in its native type when one exists (F16 widens to F32, I16/I8/BOOL to I32).
  Tensor read(const std::string& name) const;
  // Any floating type converted to f32 (no block dequantization: see SafetensorsSet::read_f32).
  Tensor read_f32(const std::string& name) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  StHeader header_;
  std::map<std::string, size_t> index_;
};

// All tensors of a checkpoint: one file, a directory with model.safetensors.index.json (sharded),
// or a directory of *.safetensors files without an index.
class SafetensorsSet {
 public:
  explicit SafetensorsSet(const std::string& path);
  std::vector<std::string> names() const;  // sorted
  bool has(const std::string& name) const { return where_.count(name) > 0; }
  const SafetensorsFile& file_of(const std::string& name) const;
  const StTensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  Tensor read(const std::string& name) const { return file_of(name).read(name); }
  // f32 values; an F8_E4M3 tensor with a sibling "<name>_scale_inv" is dequantized per 128x128 block:
  // w[.., i, j] = q[.., i, j] * scale_inv[.., i / 128, j / 128].
  Tensor read_f32(const std::string& name) const;
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> files_ index
};

// FP8 block dequantization, exposed for tests: q [.., R, C] f8e4m3, scale_inv [.., ceil(R/B), ceil(C/B)] f32.
Tensor dequant_fp8_blocks(const Tensor& q, const Tensor& scale_inv, int64_t block, const std::string& what);
// f32 -> FP8 with one scale per BxB block (amax / 448), for making test files. Returns {q, scale_inv}.
std::pair<Tensor, Tensor> quant_fp8_blocks(const Tensor& w, int64_t block);

// Writes one file; tensors keep their dtype (F32, F64, BF16, F8E4M3, I32, I64, U8). Written under
// "<path>.tmp", flushed and renamed, so a reader never sees half a file.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `dir`/model.safetensors, or, when the data exceed max_shard_bytes,
// model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json. Returns the file names.
std::vector<std::string> write_safetensors_sharded(const std::string& dir,
                                                   const std::vector<std::pair<std::string, Tensor>>& tensors,
                                                   uint64_t max_shard_bytes,
                                                   const std::map<std::string, std::string>& metadata = {});

}  // namespace dsa
