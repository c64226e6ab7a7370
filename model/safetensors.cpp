#include "model/safetensors.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

namespace dsa {

namespace {

[[noreturn]] void st_fail(const std::string& source, const std::string& msg) {
  fail("[safetensors] " + source + ": " + msg);
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) out.push_back(e->d_name);
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// Reads exactly n bytes at offset or fails naming the file.
void pread_all(int fd, void* dst, size_t n, uint64_t offset, const std::string& source, const std::string& what) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) st_fail(source, what + ": file ends early or cannot be read (" + std::strerror(r < 0 ? errno : EIO) + ")");
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
}

void write_all(int fd, const void* src, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t r = ::write(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) st_fail(path, std::string("write failed: ") + std::strerror(errno));
    p += r;
    n -= static_cast<size_t>(r);
  }
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const int e = (h >> 10) & 0x1f;
  const uint32_t m = h & 0x3ffu;
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));  // inf / NaN
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);  // subnormal (or zero)
    return sign ? -v : v;
  }
  return bits_f32(sign | (static_cast<uint32_t>(e - 15 + 127) << 23) | (m << 13));
}

}  // namespace

bool st_to_native(StDType t, DType* out) {
  switch (t) {
    case StDType::F64: *out = DType::F64; return true;
    case StDType::F32: *out = DType::F32; return true;
    case StDType::BF16: *out = DType::BF16; return true;
    case StDType::F8_E4M3: *out = DType::F8E4M3; return true;
    case StDType::I64: *out = DType::I64; return true;
    case StDType::I32: *out = DType::I32; return true;
    case StDType::U8: *out = DType::U8; return true;
    default: return false;
  }
}

StDType native_to_st(DType t) {
  switch (t) {
    case DType::F32: return StDType::F32;
    case DType::F64: return StDType::F64;
    case DType::BF16: return StDType::BF16;
    case DType::F8E4M3: return StDType::F8_E4M3;
    case DType::I32: return StDType::I32;
    case DType::I64: return StDType::I64;
    case DType::U8: return StDType::U8;
  }
  return StDType::F32;
}

// ---------------------------------------------------------------------------------------------------
// One file.

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) st_fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd_);
    st_fail(path, "not a regular file");
  }
  file_size_ = static_cast<uint64_t>(st.st_size);
  try {
    std::vector<uint8_t> prefix(8, 0);
    if (file_size_ >= 8) pread_all(fd_, prefix.data(), 8, 0, path, "header length");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];
    // Read only what both the file and the format allow; the parser reports which limit was hit.
    const uint64_t avail = file_size_ >= 8 ? file_size_ - 8 : 0;
    const uint64_t take = std::min<uint64_t>({n, avail, 100ull << 20});
    prefix.resize(8 + take);
    if (take) pread_all(fd_, prefix.data() + 8, take, 8, path, "header");
    header_ = parse_safetensors_header(prefix.data(), prefix.size(), file_size_, path);
  } catch (...) {
    ::close(fd_);
    throw;
  }
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

const StTensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) st_fail(path_, "no tensor named '" + name + "'");
  return header_.tensors[it->second];
}

std::vector<uint8_t> SafetensorsFile::read_bytes(const std::string& name) const {
  const StTensorInfo& t = info(name);
  std::vector<uint8_t> buf(t.end - t.begin);
  if (!buf.empty()) pread_all(fd_, buf.data(), buf.size(), header_.data_offset() + t.begin, path_, "tensor '" + name + "'");
  return buf;
}

Tensor SafetensorsFile::read(const std::string& name) const {
  const StTensorInfo& t = info(name);
  DType nd;
  if (st_to_native(t.dtype, &nd)) {
    Tensor out = Tensor::empty(t.shape, nd);
    if (out.nbytes())
      pread_all(fd_, out.raw(), out.nbytes(), header_.data_offset() + t.begin, path_, "tensor '" + name + "'");
    return out;
  }
  const std::vector<uint8_t> b = read_bytes(name);
  const int64_t n = shape_numel(t.shape);
  if (t.dtype == StDType::F16) {
    Tensor out = Tensor::empty(t.shape, DType::F32);
    float* d = out.data<float>();
    for (int64_t i = 0; i < n; ++i) d[i] = f16_to_f32(static_cast<uint16_t>(b[2 * i] | (b[2 * i + 1] << 8)));
    return out;
  }
  Tensor out = Tensor::empty(t.shape, DType::I32);
  int32_t* d = out.data<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (t.dtype == StDType::I16) d[i] = static_cast<int16_t>(b[2 * i] | (b[2 * i + 1] << 8));
    else if (t.dtype == StDType::I8) d[i] = static_cast<int8_t>(b[i]);
    else d[i] = b[i] != 0;  // BOOL
  }
  return out;
}

Tensor SafetensorsFile::read_f32(const std::string& name) const {
  const StTensorInfo& t = info(name);
  switch (t.dtype) {
    case StDType::F64: case StDType::F32: case StDType::F16: case StDType::BF16: case StDType::F8_E4M3: break;
    default: st_fail(path_, "tensor '" + name + "': expected a floating type, got " + st_dtype_name(t.dtype));
  }
  Tensor raw = read(name);
  return raw.dtype() == DType::F32 ? raw : raw.to(DType::F32);
}

// ---------------------------------------------------------------------------------------------------
// A whole checkpoint.

SafetensorsSet::SafetensorsSet(const std::string& path) : source_(path) {
  auto add_file = [&](const std::string& file) -> size_t {
    files_.push_back(std::make_unique<SafetensorsFile>(file));
    return files_.size() - 1;
  };
  if (!is_dir(path)) {
    const size_t f = add_file(path);
    for (const StTensorInfo& t : files_[f]->header().tensors) where_[t.name] = f;
    return;
  }
  const std::string index_path = path + "/model.safetensors.index.json";
  if (file_exists(index_path)) {
    std::ifstream in(index_path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) st_fail(index_path, "not a JSON object");
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) st_fail(index_path, "missing object 'weight_map'");
    std::map<std::string, size_t> by_file;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) st_fail(index_path, "weight_map['" + it.key() + "'] must be a file name");
      const std::string f = it.value().get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
        st_fail(index_path, "weight_map['" + it.key() + "'] = '" + f + "' is not a plain file name");
      auto bf = by_file.find(f);
      const size_t idx = bf != by_file.end() ? bf->second : (by_file[f] = add_file(path + "/" + f));
      if (!files_[idx]->has(it.key()))
        st_fail(index_path, "weight_map names tensor '" + it.key() + "' in " + f + ", which does not contain it");
      where_[it.key()] = idx;
    }
    return;
  }
  for (const std::string& name : list_dir(path)) {
    if (!ends_with(name, ".safetensors")) continue;
    const size_t f = add_file(path + "/" + name);
    for (const StTensorInfo& t : files_[f]->header().tensors) {
      if (where_.count(t.name))
        st_fail(path, "tensor '" + t.name + "' appears in both " + files_[where_[t.name]]->path() + " and " + name);
      where_[t.name] = f;
    }
  }
  if (files_.empty()) st_fail(path, "no *.safetensors files in the directory");
}

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const SafetensorsFile& SafetensorsSet::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) st_fail(source_, "no tensor named '" + name + "'");
  return *files_[it->second];
}

Tensor SafetensorsSet::read_f32(const std::string& name) const {
  const SafetensorsFile& f = file_of(name);
  const StTensorInfo& t = f.info(name);
  const std::string sname = name + "_scale_inv";
  if (t.dtype == StDType::F8_E4M3 && has(sname)) {
    const SafetensorsFile& sf = file_of(sname);
    return dequant_fp8_blocks(f.read(name), sf.read_f32(sname), 128, f.path() + ": tensor '" + name + "'");
  }
  return f.read_f32(name);
}

// ---------------------------------------------------------------------------------------------------
// FP8 blocks.

Tensor dequant_fp8_blocks(const Tensor& q, const Tensor& s, int64_t B, const std::string& what) {
  const int nd = q.ndim();
  DSA_CHECK(q.dtype() == DType::F8E4M3 && nd >= 2, "[safetensors] ", what, ": FP8 weight must be f8e4m3 of rank >= 2, got ",
            q.desc());
  const int64_t R = q.size(-2), C = q.size(-1);
  Shape want(q.shape().begin(), q.shape().end() - 2);
  want.push_back((R + B - 1) / B);
  want.push_back((C + B - 1) / B);
  DSA_CHECK(s.dtype() == DType::F32 && s.shape() == want, "[safetensors] ", what, ": scale_inv must be f32", want,
            " for a weight of shape ", q.shape(), ", got ", s.desc());
  Tensor w = Tensor::empty(q.shape(), DType::F32);
  const fp8e4m3* qp = q.data<fp8e4m3>();
  const float* sp = s.data<float>();
  float* wp = w.data<float>();
  const int64_t lead = q.numel() / std::max<int64_t>(R * C, 1), SR = want[nd - 2], SC = want[nd - 1];
  for (int64_t b = 0; b < lead; ++b)
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j)
        wp[(b * R + i) * C + j] = fp8e4m3_to_f32(qp[(b * R + i) * C + j]) * sp[(b * SR + i / B) * SC + j / B];
  return w;
}

std::pair<Tensor, Tensor> quant_fp8_blocks(const Tensor& w, int64_t B) {
  DSA_CHECK(w.dtype() == DType::F32 && w.ndim() == 2, "[safetensors] quant_fp8_blocks: want f32 [R, C], got ", w.desc());
  const int64_t R = w.size(0), C = w.size(1), SR = (R + B - 1) / B, SC = (C + B - 1) / B;
  Tensor q = Tensor::empty({R, C}, DType::F8E4M3), s = Tensor::empty({SR, SC}, DType::F32);
  const float* wp = w.data<float>();
  for (int64_t bi = 0; bi < SR; ++bi)
    for (int64_t bj = 0; bj < SC; ++bj) {
      float amax = 0;
      for (int64_t i = bi * B; i < std::min(R, (bi + 1) * B); ++i)
        for (int64_t j = bj * B; j < std::min(C, (bj + 1) * B); ++j) amax = std::max(amax, std::fabs(wp[i * C + j]));
      const float scale = amax > 0 ? amax / kFp8E4M3Max : 1.0f;
      s.data<float>()[bi * SC + bj] = scale;
      for (int64_t i = bi * B; i < std::min(R, (bi + 1) * B); ++i)
        for (int64_t j = bj * B; j < std::min(C, (bj + 1) * B); ++j)
          q.data<fp8e4m3>()[i * C + j] = f32_to_fp8e4m3(wp[i * C + j] / scale);
    }
  return {q, s};
}

// ---------------------------------------------------------------------------------------------------
// Writing.

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json h = nlohmann::json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& [name, t] : tensors) {
    DSA_CHECK(t.is_cpu(), "[safetensors] ", path, ": tensor '", name, "' must be on the CPU, got ", t.desc());
    DSA_CHECK(name != "__metadata__" && !h.contains(name), "[safetensors] ", path, ": duplicate tensor name '", name, "'");
    h[name] = {{"dtype", st_dtype_name(native_to_st(t.dtype()))}, {"shape", t.shape()}, {"data_offsets", {off, off + t.nbytes()}}};
    off += t.nbytes();
  }
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data section 8-byte aligned, as the reference writer does
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) st_fail(tmp, std::string("cannot create: ") + std::strerror(errno));
  try {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    write_all(fd, len, 8, tmp);
    write_all(fd, text.data(), text.size(), tmp);
    for (const auto& kv : tensors) write_all(fd, kv.second.raw(), kv.second.nbytes(), tmp);
    if (::fsync(fd) != 0) st_fail(tmp, std::string("fsync failed: ") + std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) st_fail(path, std::string("rename failed: ") + std::strerror(errno));
}

std::vector<std::string> write_safetensors_sharded(const std::string& dir,
                                                   const std::vector<std::pair<std::string, Tensor>>& tensors,
                                                   uint64_t max_shard_bytes,
                                                   const std::map<std::string, std::string>& metadata) {
  DSA_CHECK(max_shard_bytes > 0, "[safetensors] ", dir, ": max shard size must be positive");
  // The directory and any missing parents (mkdir -p).
  for (size_t pos = dir.find('/', 1); !is_dir(dir); pos = dir.find('/', pos + 1)) {
    const std::string part = pos == std::string::npos ? dir : dir.substr(0, pos);
    if (!part.empty() && !is_dir(part) && ::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST)
      st_fail(dir, std::string("cannot create directory ") + part + ": " + std::strerror(errno));
    if (pos == std::string::npos) break;
  }
  // Remove the files of an earlier export so a different shard count leaves nothing stale behind.
  for (const std::string& f : list_dir(dir))
    if (f == "model.safetensors" || f == "model.safetensors.index.json" ||
        (f.rfind("model-", 0) == 0 && ends_with(f, ".safetensors") && f.find("-of-") != std::string::npos))
      ::unlink((dir + "/" + f).c_str());

  std::vector<std::vector<size_t>> shards(1);
  uint64_t cur = 0, total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const uint64_t b = tensors[i].second.nbytes();
    if (!shards.back().empty() && cur + b > max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += b;
    total += b;
  }
  std::vector<std::string> files;
  if (shards.size() == 1) {
    write_safetensors(dir + "/model.safetensors", tensors, metadata);
    files.push_back("model.safetensors");
    return files;
  }
  nlohmann::json wm = nlohmann::json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    std::vector<std::pair<std::string, Tensor>> part;
    for (size_t i : shards[s]) {
      part.push_back(tensors[i]);
      wm[tensors[i].first] = name;
    }
    write_safetensors(dir + "/" + name, part, metadata);
    files.push_back(name);
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", wm}};
  const std::string ipath = dir + "/model.safetensors.index.json";
  std::ofstream out(ipath + ".tmp");
  out << index.dump(2) << "\n";
  out.close();
  if (!out || ::rename((ipath + ".tmp").c_str(), ipath.c_str()) != 0) st_fail(ipath, "cannot write the index");
  files.push_back("model.safetensors.index.json");
  return files;
}

}  // namespace dsa
