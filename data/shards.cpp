// Token shard writer and reader (format in shards.h).
#include "data/shards.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace dsa {

namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "[shards] ";
  (os << ... << parts);
  throw std::runtime_error(os.str());
}

}  // namespace

ShardWriter::ShardWriter(const std::string& path, int64_t vocab_size, int32_t bos_id, int32_t eos_id)
    : path_(path), tmp_(path + ".tmp") {
  if (vocab_size <= 0 || vocab_size > (int64_t(1) << 31)) fail(path, ": bad vocab_size ", vocab_size);
  std::memcpy(h_.magic, kShardMagic, 8);
  h_.version = kShardVersion;
  h_.token_bytes = vocab_size <= 65536 ? 2 : 4;
  h_.vocab_size = static_cast<uint64_t>(vocab_size);
  h_.bos_id = bos_id;
  h_.eos_id = eos_id;
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (!f_) fail(tmp_, ": cannot create: ", std::strerror(errno));
  if (std::fwrite(&h_, sizeof h_, 1, f_) != 1) fail(tmp_, ": write failed: ", std::strerror(errno));
}

ShardWriter::~ShardWriter() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void ShardWriter::add_document(const int32_t* ids, size_t n) {
  if (!f_) fail(path_, ": add_document after close");
  const uint32_t w = h_.token_bytes;
  buf_.resize(n * w);
  for (size_t i = 0; i < n; ++i) {
    int32_t t = ids[i];
    if (t < 0 || static_cast<uint64_t>(t) >= h_.vocab_size)
      fail(path_, ": token id ", t, " outside the vocab [0, ", h_.vocab_size, ")");
    h_.max_token = std::max(h_.max_token, static_cast<uint32_t>(t));
    if (w == 2) {
      uint16_t v = static_cast<uint16_t>(t);
      std::memcpy(&buf_[i * 2], &v, 2);
    } else {
      uint32_t v = static_cast<uint32_t>(t);
      std::memcpy(&buf_[i * 4], &v, 4);
    }
  }
  if (n && std::fwrite(buf_.data(), 1, buf_.size(), f_) != buf_.size())
    fail(tmp_, ": write failed: ", std::strerror(errno));
  offsets_.push_back(offsets_.back() + n);
}

void ShardWriter::close() {
  if (!f_) return;
  h_.n_docs = n_docs();
  h_.n_tokens = n_tokens();
  bool ok = std::fwrite(offsets_.data(), 8, offsets_.size(), f_) == offsets_.size() &&
            std::fseek(f_, 0, SEEK_SET) == 0 && std::fwrite(&h_, sizeof h_, 1, f_) == 1;
  ok = (std::fclose(f_) == 0) && ok;
  f_ = nullptr;
  if (!ok) {
    std::remove(tmp_.c_str());
    fail(tmp_, ": write failed: ", std::strerror(errno));
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) fail(path_, ": rename failed: ", std::strerror(errno));
}

ShardReader::ShardReader(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(errno));
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < sizeof(ShardHeader)) {
    ::close(fd);
    fail(path, ": truncated (", map_size_, " bytes, smaller than the 64-byte header)");
  }
  void* p = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail(path, ": mmap failed: ", std::strerror(errno));
  map_ = static_cast<const uint8_t*>(p);
  auto bad = [&](auto... parts) {
    ::munmap(const_cast<uint8_t*>(map_), map_size_);
    map_ = nullptr;
    fail(path, ": ", parts...);
  };
  std::memcpy(&h_, map_, sizeof h_);
  if (std::memcmp(h_.magic, kShardMagic, 8) != 0) bad("wrong magic (not a dsa token shard)");
  if (h_.version != kShardVersion) bad("unsupported version ", h_.version, " (this build reads ", kShardVersion, ")");
  if (h_.token_bytes != 2 && h_.token_bytes != 4) bad("bad token_bytes ", h_.token_bytes);
  if (h_.vocab_size == 0 || h_.vocab_size > (uint64_t(1) << 31)) bad("bad vocab_size ", h_.vocab_size);
  if (h_.token_bytes == 2 && h_.vocab_size > 65536) bad("vocab_size ", h_.vocab_size, " does not fit u16 tokens");
  if (h_.n_tokens > (uint64_t(1) << 40) || h_.n_docs > (uint64_t(1) << 40)) bad("implausible counts");
  uint64_t want = sizeof(ShardHeader) + h_.n_tokens * h_.token_bytes + 8 * (h_.n_docs + 1);
  if (map_size_ < want) bad("truncated: ", map_size_, " bytes, header says ", want);
  if (map_size_ > want) bad("trailing bytes: ", map_size_, " bytes, header says ", want);
  if (h_.n_tokens && h_.max_token >= h_.vocab_size) bad("max_token ", h_.max_token, " >= vocab_size ", h_.vocab_size);
  tokens_ = map_ + sizeof(ShardHeader);
  const uint8_t* idx = tokens_ + h_.n_tokens * h_.token_bytes;
  if (reinterpret_cast<uintptr_t>(idx) % 8 == 0) {
    index_ = reinterpret_cast<const uint64_t*>(idx);
  } else {
    index_copy_.resize(h_.n_docs + 1);
    std::memcpy(index_copy_.data(), idx, 8 * (h_.n_docs + 1));
    index_ = index_copy_.data();
  }
  if (index_[0] != 0 || index_[h_.n_docs] != h_.n_tokens) bad("document index does not span the tokens");
  for (uint64_t i = 0; i < h_.n_docs; ++i)
    if (index_[i + 1] < index_[i]) bad("document index not monotonic at document ", i);
}

ShardReader::ShardReader(ShardReader&& o) noexcept { *this = std::move(o); }

ShardReader& ShardReader::operator=(ShardReader&& o) noexcept {
  if (this != &o) {
    if (map_) ::munmap(const_cast<uint8_t*>(map_), map_size_);
    path_ = std::move(o.path_);
    h_ = o.h_;
    map_ = o.map_;
    map_size_ = o.map_size_;
    tokens_ = o.tokens_;
    bool copied = o.index_ == o.index_copy_.data() && !o.index_copy_.empty();
    index_copy_ = std::move(o.index_copy_);
    index_ = copied ? index_copy_.data() : o.index_;
    o.map_ = nullptr;
    o.index_ = nullptr;
  }
  return *this;
}

ShardReader::~ShardReader() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

uint64_t ShardReader::doc_begin(uint64_t doc) const {
  if (doc > h_.n_docs) fail(path_, ": document ", doc, " out of range (", h_.n_docs, " documents)");
  return index_[doc];
}

uint64_t ShardReader::doc_size(uint64_t doc) const {
  if (doc >= h_.n_docs) fail(path_, ": document ", doc, " out of range (", h_.n_docs, " documents)");
  return index_[doc + 1] - index_[doc];
}

void ShardReader::read(uint64_t offset, uint64_t count, int32_t* dst) const {
  if (offset + count > h_.n_tokens || offset + count < offset)
    fail(path_, ": read [", offset, ", ", offset + count, ") past ", h_.n_tokens, " tokens");
  if (h_.token_bytes == 2) {
    const uint8_t* s = tokens_ + offset * 2;
    for (uint64_t i = 0; i < count; ++i) {
      uint16_t v;
      std::memcpy(&v, s + 2 * i, 2);
      dst[i] = v;
    }
  } else {
    const uint8_t* s = tokens_ + offset * 4;
    for (uint64_t i = 0; i < count; ++i) {
      uint32_t v;
      std::memcpy(&v, s + 4 * i, 4);
      dst[i] = static_cast<int32_t>(v);
    }
  }
}

std::vector<int32_t> ShardReader::document(uint64_t doc) const {
  std::vector<int32_t> out(doc_size(doc));
  read(doc_begin(doc), out.size(), out.data());
  return out;
}

std::vector<std::string> list_shards(const std::string& dir, const std::string& split) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) fail(dir, ": cannot open corpus directory: ", std::strerror(errno));
  std::vector<std::string> out;
  const std::string prefix = split + "_";
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > prefix.size() + 4 && n.compare(0, prefix.size(), prefix) == 0 &&
        n.compare(n.size() - 4, 4, ".bin") == 0)
      out.push_back(dir + "/" + n);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace dsa
