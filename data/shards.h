// Token shard files: the binary format written by `dsa-prep corpus` and read by the data streams
// (doc_stream.h).
//
// FORMAT (version 1, all integers little-endian):
//
//   offset  size  field
//   0       8     magic        "DSATOKS1"
//   8       4     version      u32 = 1
//   12      4     token_bytes  u32: 2 (tokens stored as u16) or 4 (u32); 2 iff vocab_size <= 65536
//   16      8     vocab_size   u64: tokenizer vocab (every stored id is < vocab_size)
//   24      8     n_docs       u64
//   32      8     n_tokens     u64
//   40      4     bos_id       i32 (-1: none)
//   44      4     eos_id       i32 (-1: none)
//   48      4     max_token    u32: largest id stored (0 when n_tokens == 0)
//   52      12    reserved     zero
//   64            tokens       [n_tokens] of token_bytes each: the documents back to back, raw
//                              (no BOS/EOS stored; the streams add them at document boundaries)
//   64 + n_tokens*token_bytes
//                 doc index    u64[n_docs + 1]: token offset of each document start, then n_tokens
//
// The file size must equal 64 + n_tokens*token_bytes + 8*(n_docs+1); a shorter file is reported as
// truncated. A corpus directory holds train_NNNNN.bin and val_NNNNN.bin shards plus corpus.json (a
// human-readable summary: tokenizer, seed, counts, longest document). The writer builds PATH.tmp
// and renames it at close(), so a shard that exists is complete.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace dsa {

struct ShardHeader {
  char magic[8];
  uint32_t version;
  uint32_t token_bytes;
  uint64_t vocab_size;
  uint64_t n_docs;
  uint64_t n_tokens;
  int32_t bos_id;
  int32_t eos_id;
  uint32_t max_token;
  uint8_t reserved[12];
};
static_assert(sizeof(ShardHeader) == 64, "shard header is 64 bytes");

constexpr char kShardMagic[8] = {'D', 'S', 'A', 'T', 'O', 'K', 'S', '1'};
constexpr uint32_t kShardVersion = 1;

class ShardWriter {
 public:
  ShardWriter(const std::string& path, int64_t vocab_size, int32_t bos_id, int32_t eos_id);
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  ~ShardWriter();  // an unclosed writer removes its .tmp file

  void add_document(const int32_t* ids, size_t n);  // ids must be in [0, vocab_size)
  void close();                                      // writes index + header, renames into place
  uint64_t n_docs() const { return offsets_.size() - 1; }
  uint64_t n_tokens() const { return offsets_.back(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_, tmp_;
  FILE* f_ = nullptr;
  ShardHeader h_{};
  std::vector<uint64_t> offsets_{0};  // [n_docs + 1]
  std::vector<uint8_t> buf_;
};

// Memory-maps a shard and validates it (magic, version, dtype, size, index monotonic,
// max_token < vocab_size). Errors name the file.
class ShardReader {
 public:
  explicit ShardReader(const std::string& path);
  ShardReader(ShardReader&&) noexcept;
  ShardReader& operator=(ShardReader&&) noexcept;
  ShardReader(const ShardReader&) = delete;
  ~ShardReader();

  const ShardHeader& header() const { return h_; }
  const std::string& path() const { return path_; }
  uint64_t n_docs() const { return h_.n_docs; }
  uint64_t n_tokens() const { return h_.n_tokens; }
  uint64_t doc_begin(uint64_t doc) const;  // token offset of a document
  uint64_t doc_size(uint64_t doc) const;   // tokens in a document
  // Copies tokens [offset, offset+count) of the shard into dst as int32.
  void read(uint64_t offset, uint64_t count, int32_t* dst) const;
  std::vector<int32_t> document(uint64_t doc) const;

 private:
  std::string path_;
  ShardHeader h_{};
  const uint8_t* map_ = nullptr;  // [file_size]
  size_t map_size_ = 0;
  const uint8_t* tokens_ = nullptr;   // [n_tokens * token_bytes]
  const uint64_t* index_ = nullptr;   // [n_docs + 1] (unaligned-safe copy below when needed)
  std::vector<uint64_t> index_copy_;  // used when the index is not 8-byte aligned
};

// Shard files of one split ("train" or "val") in a corpus directory, sorted by name.
std::vector<std::string> list_shards(const std::string& dir, const std::string& split);

}  // namespace dsa
