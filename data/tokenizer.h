// Byte-level BPE tokenizer: Hugging Face tokenizer.json (DeepSeek-V3, GPT-2 style) and OpenAI
// .tiktoken rank files.
//
// Pipeline for encode(text):
//   1. added / special tokens are cut out first (leftmost-longest match; special ones only when
//      allow_special is true, non-special added tokens always);
//   2. each remaining span is split into pieces by the pre-tokenizer regexes (PCRE2, JIT, UTF+UCP,
//      invalid UTF-8 never matches, so stray bytes fall into their own pieces and stay bytes);
//   3. each piece is BPE-merged over its raw bytes (lowest merge rank first, leftmost on ties),
//      with a per-thread cache of recent pieces.
// decode(ids) concatenates the raw bytes of each id, so decode(encode(x)) == x for any bytes x.
//
// Token ids map to raw byte strings internally; the GPT-2 byte<->unicode map of tokenizer.json is
// undone at load time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dsa {

class Tokenizer {
 public:
  // tokenizer.json (by the ".json" extension) or a .tiktoken rank file. For .tiktoken the split
  // regex and special tokens are chosen by the file's base name (r50k_base, p50k_base, p50k_edit,
  // cl100k_base, o200k_base). BOS/EOS of a tokenizer.json come from a tokenizer_config.json next to
  // it when present, else from well-known special token names.
  static Tokenizer from_file(const std::string& path);
  // A .tiktoken rank file with an explicit encoding name (e.g. "p50k_edit" over p50k_base ranks).
  static Tokenizer from_tiktoken(const std::string& path, const std::string& encoding);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<int32_t> encode(std::string_view text, bool allow_special = true) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  // Raw bytes of one token id (throws on an id out of range).
  std::string token_bytes(int32_t id) const;

  int32_t vocab_size() const;  // max id + 1 over the model vocab and added tokens
  int32_t bos_id() const;      // -1 if none
  int32_t eos_id() const;      // -1 if none
  const std::string& path() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsa
