// Corpus preparation (see corpus.h): enumerate documents, tokenize in parallel, write shards.
#include "data/corpus.h"

#include <dirent.h>
#include <fcntl.h>
#include <omp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "data/shards.h"

extern char** environ;

namespace dsa {

namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "[corpus] ";
  (os << ... << parts);
  throw std::runtime_error(os.str());
}

bool ends_with(const std::string& s, const char* suf) {
  size_t n = std::strlen(suf);
  return s.size() >= n && s.compare(s.size() - n, n, suf) == 0;
}

// Decompressor for a tarball name, "" for a plain .tar, nullptr if not a tarball.
const char* tar_filter(const std::string& p) {
  if (ends_with(p, ".tar")) return "";
  if (ends_with(p, ".tar.xz") || ends_with(p, ".txz")) return "xz";
  if (ends_with(p, ".tar.gz") || ends_with(p, ".tgz")) return "gzip";
  if (ends_with(p, ".tar.bz2") || ends_with(p, ".tbz2")) return "bzip2";
  if (ends_with(p, ".tar.zst")) return "zstd";
  return nullptr;
}

bool looks_binary(const std::string& s) { return std::memchr(s.data(), 0, std::min<size_t>(s.size(), 8192)) != nullptr; }

struct Doc {
  std::string name, text;
};

// Decompressor for a file name ("" for none) by its last extension.
const char* compression_filter(const std::string& p) {
  if (ends_with(p, ".xz") || ends_with(p, ".txz")) return "xz";
  if (ends_with(p, ".gz") || ends_with(p, ".tgz")) return "gzip";
  if (ends_with(p, ".bz2") || ends_with(p, ".tbz2")) return "bzip2";
  if (ends_with(p, ".zst")) return "zstd";
  return "";
}

bool is_jsonl(const std::string& p) {
  for (const char* ext : {".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.bz2", ".jsonl.zst"})
    if (ends_with(p, ext)) return true;
  return false;
}

// A file read through its decompressor (a child process reading the file through a descriptor we
// share, so lseek on it tells how far it has read), or directly when it is not compressed.
class FileStream {
 public:
  FileStream(const std::string& path, const char* filter) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY);
    if (fd_ < 0) fail(path, ": cannot open: ", std::strerror(errno));
    if (*filter == 0) {
      in_ = fd_;
      return;
    }
    int pipefd[2];
    if (::pipe(pipefd) != 0) fail(path, ": pipe failed: ", std::strerror(errno));
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fd_, 0);
    posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
    posix_spawn_file_actions_addclose(&fa, pipefd[0]);
    std::string prog = filter;
    char* argv[] = {prog.data(), const_cast<char*>("-dc"), nullptr};
    int rc = posix_spawnp(&child_, prog.c_str(), &fa, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(pipefd[1]);
    if (rc != 0) {
      ::close(pipefd[0]);
      fail(path, ": cannot run '", prog, " -dc' to decompress: ", std::strerror(rc), " (apt-get install ", prog, ")");
    }
    in_ = pipefd[0];
  }
  FileStream(const FileStream&) = delete;
  FileStream& operator=(const FileStream&) = delete;
  ~FileStream() {
    if (child_ > 0) {
      ::kill(child_, SIGTERM);  // our own decompressor, stopped early (--max-bytes)
      int st;
      ::waitpid(child_, &st, 0);
    }
    if (in_ >= 0 && in_ != fd_) ::close(in_);
    if (fd_ >= 0) ::close(fd_);
  }
  int64_t consumed() const { return static_cast<int64_t>(::lseek(fd_, 0, SEEK_CUR)); }
  const std::string& path() const { return path_; }

  size_t read_full(char* buf, size_t n) {
    size_t got = 0;
    while (got < n) {
      ssize_t r = ::read(in_, buf + got, n - got);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) fail(path_, ": read error: ", std::strerror(errno));
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    return got;
  }
  // One line without its '\n'; false at the end of the file.
  bool getline(std::string& line) {
    line.clear();
    for (;;) {
      if (pos_ == end_) {
        end_ = read_full(buf_, sizeof buf_);
        pos_ = 0;
        if (end_ == 0) return !line.empty();
      }
      const char* nl = static_cast<const char*>(std::memchr(buf_ + pos_, '\n', end_ - pos_));
      const size_t stop = nl ? static_cast<size_t>(nl - buf_) : end_;
      line.append(buf_ + pos_, stop - pos_);
      pos_ = nl ? stop + 1 : end_;
      if (nl) return true;
    }
  }
  // At the end of the input: waits for the decompressor and checks that it succeeded.
  void finish() {
    if (child_ <= 0) return;
    // Drain what the decompressor still writes (a tar's end-of-archive padding) before waiting for it:
    // closing the pipe early would kill it with SIGPIPE and read as a corrupt archive.
    char sink[65536];
    while (true) {
      const ssize_t n = ::read(in_, sink, sizeof sink);
      if (n > 0) continue;
      if (n < 0 && errno == EINTR) continue;
      break;
    }
    ::close(in_);
    in_ = -1;
    int st = 0;
    ::waitpid(child_, &st, 0);
    child_ = -1;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail(path_, ": decompressor failed (truncated or corrupt file?)");
  }

 private:
  std::string path_;
  int fd_ = -1, in_ = -1;
  pid_t child_ = -1;
  char buf_[1 << 16];
  size_t pos_ = 0, end_ = 0;
};

// JSON Lines: one document per non-empty line, the text in a string field.
class JsonlReader {
 public:
  JsonlReader(const std::string& path, const std::string& field)
      : in_(path, compression_filter(path)), field_(field) {}
  int64_t consumed() const { return in_.consumed(); }
  bool next(Doc& d) {
    std::string line;
    while (in_.getline(line)) {
      ++line_no_;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail(in_.path(), ":", line_no_, ": not a JSON object (", e.what(), ")");
      }
      if (!j.is_object() || !j.contains(field_) || !j[field_].is_string())
        fail(in_.path(), ":", line_no_, ": no string field '", field_, "' (name the text field with --jsonl-field)");
      d.name = in_.path() + ":" + std::to_string(line_no_);
      d.text = j[field_].get<std::string>();
      return true;
    }
    in_.finish();
    return false;
  }

 private:
  FileStream in_;
  std::string field_;
  int64_t line_no_ = 0;
};

// Reads a (possibly compressed) tar archive member by member.
class TarReader {
 public:
  explicit TarReader(const std::string& path) : in_(path, tar_filter(path)), path_(path) {}
  int64_t consumed() const { return in_.consumed(); }

  // Next regular-file member; false at the end of the archive.
  bool next(Doc& d) {
    std::string long_name;
    for (;;) {
      char h[512];
      size_t got = read_full(h, 512);
      if (got == 0) return finish();
      if (got < 512) fail(path_, ": truncated tar header");
      if (std::all_of(h, h + 512, [](char c) { return c == 0; })) return finish();
      uint64_t size = parse_size(h + 124);
      char type = h[156];
      std::string data;
      bool regular = type == '0' || type == 0 || type == '7';
      if (regular || type == 'L' || type == 'x') {
        data.resize(size);
        if (read_full(data.data(), size) != size) fail(path_, ": truncated tar member");
      } else {
        skip(size);
      }
      skip((512 - size % 512) % 512);
      if (type == 'L') {
        long_name.assign(data.c_str());
        continue;
      }
      if (type == 'x') {  // pax extended header: "LEN key=value\n" records; take path=
        for (size_t p = 0; p < data.size();) {
          size_t sp = data.find(' ', p);
          if (sp == std::string::npos) break;
          size_t len = std::strtoul(data.c_str() + p, nullptr, 10);
          if (len == 0 || p + len > data.size()) break;
          std::string rec = data.substr(sp + 1, p + len - sp - 2);
          if (rec.compare(0, 5, "path=") == 0) long_name = rec.substr(5);
          p += len;
        }
        continue;
      }
      if (!regular) {
        long_name.clear();
        continue;
      }
      std::string name = long_name;
      if (name.empty()) {
        std::string prefix(h + 345, strnlen(h + 345, 155)), base(h, strnlen(h, 100));
        name = prefix.empty() ? base : prefix + "/" + base;
      }
      d.name = path_ + ":" + name;
      d.text = std::move(data);
      return true;
    }
  }

 private:
  size_t read_full(char* buf, size_t n) { return in_.read_full(buf, n); }
  void skip(uint64_t n) {
    char buf[65536];
    while (n > 0) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(n, sizeof buf));
      if (read_full(buf, k) != k) fail(path_, ": truncated tar member");
      n -= k;
    }
  }
  uint64_t parse_size(const char* f) {
    if (static_cast<unsigned char>(f[0]) & 0x80) {  // base-256
      uint64_t v = 0;
      for (int i = 1; i < 12; ++i) v = (v << 8) | static_cast<unsigned char>(f[i]);
      return v;
    }
    uint64_t v = 0;
    for (int i = 0; i < 12 && f[i]; ++i)
      if (f[i] >= '0' && f[i] <= '7') v = v * 8 + static_cast<uint64_t>(f[i] - '0');
    return v;
  }
  bool finish() {
    in_.finish();
    return false;
  }

  FileStream in_;
  std::string path_;
};

// Enumerates documents over all inputs in a fixed order.
class Documents {
 public:
  Documents(const std::vector<std::string>& inputs, const std::string& jsonl_field, CorpusSummary& sum)
      : sum_(sum), field_(jsonl_field) {
    for (const std::string& in : inputs) {
      struct stat st{};
      if (::stat(in.c_str(), &st) != 0) fail(in, ": cannot read input: ", std::strerror(errno));
      if (S_ISDIR(st.st_mode)) {
        walk(in);
      } else {
        items_.push_back(in);
        total_ += st.st_size;
      }
    }
  }
  int64_t total_bytes() const { return total_; }
  int64_t done_bytes() const {
    return done_ + (tar_ ? tar_->consumed() : 0) + (jsonl_ ? jsonl_->consumed() : 0);
  }

  bool next(Doc& d) {
    for (;;) {
      if (tar_) {
        if (tar_->next(d)) return true;
        done_ += tar_->consumed();
        tar_.reset();
      }
      if (jsonl_) {
        if (jsonl_->next(d)) return true;
        done_ += jsonl_->consumed();
        jsonl_.reset();
      }
      if (pos_ >= items_.size()) return false;
      const std::string& p = items_[pos_++];
      if (tar_filter(p)) {
        tar_ = std::make_unique<TarReader>(p);
        continue;
      }
      if (is_jsonl(p)) {
        jsonl_ = std::make_unique<JsonlReader>(p, field_);
        continue;
      }
      std::ifstream f(p, std::ios::binary);
      std::ostringstream ss;
      if (f) ss << f.rdbuf();
      if (!f || f.bad()) {
        std::fprintf(stderr, "\n[corpus] warning: %s: cannot read (%s), skipped\n", p.c_str(), std::strerror(errno));
        ++sum_.skipped_unreadable;
        continue;
      }
      d.name = p;
      d.text = ss.str();
      done_ += static_cast<int64_t>(d.text.size());
      return true;
    }
  }

 private:
  void walk(const std::string& dir) {
    DIR* d = ::opendir(dir.c_str());
    if (!d) {
      std::fprintf(stderr, "[corpus] warning: %s: cannot open directory (%s), skipped\n", dir.c_str(), std::strerror(errno));
      ++sum_.skipped_unreadable;
      return;
    }
    std::vector<std::string> names;
    while (dirent* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) names.push_back(e->d_name);
    ::closedir(d);
    std::sort(names.begin(), names.end());
    for (const std::string& n : names) {
      std::string p = dir + "/" + n;
      struct stat st{};
      if (::lstat(p.c_str(), &st) != 0) continue;  // vanished
      if (S_ISDIR(st.st_mode)) walk(p);
      else if (S_ISREG(st.st_mode)) items_.push_back(p), total_ += st.st_size;
    }
  }

  CorpusSummary& sum_;
  std::string field_;
  std::vector<std::string> items_;
  size_t pos_ = 0;
  int64_t total_ = 0, done_ = 0;
  std::unique_ptr<TarReader> tar_;
  std::unique_ptr<JsonlReader> jsonl_;
};

// Uniform 64-bit hash of (seed, document name): decides the train/val split.
uint64_t splitmix_hash(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull ^ (seed * 0x9e3779b97f4a7c15ull);
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  h ^= h >> 33, h *= 0xff51afd7ed558ccdull, h ^= h >> 33, h *= 0xc4ceb9fe1a85ec53ull, h ^= h >> 33;
  return h;
}

std::string human(double v, const char* unit) {
  const char* pre[] = {"", "K", "M", "G", "T"};
  int i = 0;
  while (v >= 1000 && i < 4) v /= 1000, ++i;
  char b[64];
  std::snprintf(b, sizeof b, "%.1f %s%s", v, pre[i], unit);
  return b;
}

void remove_old_shards(const std::string& dir) {
  for (const char* split : {"train", "val"})
    for (const std::string& f : list_shards(dir, split)) std::remove(f.c_str());
}

}  // namespace

std::string format_summary(const CorpusSummary& s) {
  std::ostringstream os;
  os << "documents: " << s.docs_train << " train, " << s.docs_val << " val\n"
     << "tokens:    " << s.tokens_train << " train, " << s.tokens_val << " val\n"
     << "bytes:     " << s.bytes << " (" << human(s.bytes / std::max(s.seconds, 1e-9), "B/s") << " over "
     << s.seconds << " s)\n"
     << "longest:   " << s.longest_tokens << " tokens (" << s.longest_name << ")\n"
     << "over 16K:  " << s.docs_over_16k << " documents\n"
     << "skipped:   " << s.skipped_binary << " binary, " << s.skipped_empty << " empty, " << s.skipped_unreadable
     << " unreadable, " << s.skipped_short << " shorter than --min-bytes, " << s.skipped_long
     << " longer than --max-doc-bytes, " << s.skipped_sampled
     << " outside --sample\n";
  return os.str();
}

CorpusSummary build_corpus(const CorpusOptions& opt, const Tokenizer& tok) {
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  if (opt.inputs.empty()) fail("no inputs given");
  if (!(opt.val_fraction >= 0 && opt.val_fraction < 1)) fail("--val-fraction must be in [0, 1), got ", opt.val_fraction);
  if (!(opt.sample > 0 && opt.sample <= 1)) fail("--sample must be in (0, 1], got ", opt.sample);
  if (opt.jsonl_field.empty()) fail("--jsonl-field must name a field");
  CorpusSummary sum;
  Documents docs(opt.inputs, opt.jsonl_field, sum);
  if (::mkdir(opt.out_dir.c_str(), 0755) != 0 && errno != EEXIST) fail(opt.out_dir, ": cannot create: ", std::strerror(errno));
  remove_old_shards(opt.out_dir);
  const int jobs = opt.jobs > 0 ? opt.jobs : omp_get_max_threads();
  const bool tty = ::isatty(2);
  const int64_t total = opt.max_bytes > 0 ? std::min<int64_t>(opt.max_bytes, docs.total_bytes()) : docs.total_bytes();

  std::unique_ptr<ShardWriter> w[2];
  int shard_no[2] = {0, 0};
  std::vector<std::string> shard_files[2];
  const char* split_name[2] = {"train", "val"};
  auto open_writer = [&](int s) {
    char name[64];
    std::snprintf(name, sizeof name, "/%s_%05d.bin", split_name[s], shard_no[s]++);
    w[s] = std::make_unique<ShardWriter>(opt.out_dir + name, tok.vocab_size(), tok.bos_id(), tok.eos_id());
    shard_files[s].push_back(name + 1);
  };
  open_writer(0);
  open_writer(1);
  const uint64_t threshold = static_cast<uint64_t>(opt.val_fraction * 18446744073709551616.0);
  // NOTES: the sample keeps a document by a hash of its name under another seed than the split's, so the
  // kept documents split train/val exactly as they would in the full corpus.
  const uint64_t sample_threshold =
      opt.sample >= 1 ? UINT64_MAX : static_cast<uint64_t>(opt.sample * 18446744073709551616.0);
  const uint64_t sample_seed = opt.seed + 0x51ed270b27aa1ae5ull;

  std::vector<Doc> batch;
  std::vector<std::vector<int32_t>> ids;
  int64_t files = 0;
  auto last_print = clock::now();
  auto print = [&](bool final) {
    if (!opt.progress) return;
    auto now = clock::now();
    if (!final && now - last_print < std::chrono::milliseconds(tty ? 250 : 10000)) return;
    last_print = now;
    double secs = std::chrono::duration<double>(now - t0).count();
    int64_t done = opt.max_bytes > 0 ? sum.bytes : docs.done_bytes();
    double rate = done / std::max(secs, 1e-9), frac = total > 0 ? std::min(1.0, double(done) / total) : 1.0;
    int eta = rate > 0 ? static_cast<int>(std::max<double>(0, total - done) / rate) : 0;
    char bar[31];
    int fill = static_cast<int>(frac * 30);
    for (int i = 0; i < 30; ++i) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    // Input bytes are compressed bytes for tarballs; text bytes are what the tokenizer saw.
    std::fprintf(stderr, "%s[corpus] [%s] %5.1f%% %s / %s in  ETA %d:%02d  text %s at %s  docs %lld  tokens %lld%s",
                 tty ? "\r" : "", bar, 100 * frac, human(done, "B").c_str(), human(total, "B").c_str(), eta / 60,
                 eta % 60, human(sum.bytes, "B").c_str(), human(sum.bytes / std::max(secs, 1e-9), "B/s").c_str(),
                 static_cast<long long>(sum.docs_train + sum.docs_val),
                 static_cast<long long>(sum.tokens_train + sum.tokens_val), tty && !final ? "" : "\n");
  };

  bool more = true;
  while (more) {
    batch.clear();
    size_t batch_bytes = 0;
    Doc d;
    while (batch_bytes < (size_t(32) << 20) && batch.size() < 4096) {
      if (opt.max_files > 0 && files >= opt.max_files) { more = false; break; }
      if (opt.max_bytes > 0 && sum.bytes >= opt.max_bytes) { more = false; break; }
      if (!docs.next(d)) { more = false; break; }
      if (sample_threshold != UINT64_MAX && splitmix_hash(sample_seed, d.name) >= sample_threshold) {
        ++sum.skipped_sampled;
        continue;
      }
      if (d.text.empty()) { ++sum.skipped_empty; continue; }
      if (static_cast<int64_t>(d.text.size()) < opt.min_bytes) { ++sum.skipped_short; continue; }
      if (opt.max_doc_bytes > 0 && static_cast<int64_t>(d.text.size()) > opt.max_doc_bytes) { ++sum.skipped_long; continue; }
      if (looks_binary(d.text)) { ++sum.skipped_binary; continue; }
      ++files;
      sum.bytes += static_cast<int64_t>(d.text.size());
      batch_bytes += d.text.size();
      batch.push_back(std::move(d));
    }
    ids.assign(batch.size(), {});
    std::string err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(jobs)
    for (size_t i = 0; i < batch.size(); ++i) {
      try {
        // NOTES: corpus text is data, so special-token strings inside it stay plain text.
        ids[i] = tok.encode(batch[i].text, /*allow_special=*/false);
      } catch (const std::exception& e) {
#pragma omp critical
        err = batch[i].name + ": " + e.what();
      }
    }
    if (!err.empty()) fail(err);
    for (size_t i = 0; i < batch.size(); ++i) {
      int s = (splitmix_hash(opt.seed, batch[i].name) < threshold) ? 1 : 0;
      if (w[s]->n_tokens() >= static_cast<uint64_t>(opt.shard_tokens)) {
        w[s]->close();
        open_writer(s);
      }
      w[s]->add_document(ids[i].data(), ids[i].size());
      int64_t n = static_cast<int64_t>(ids[i].size());
      (s ? sum.docs_val : sum.docs_train)++;
      (s ? sum.tokens_val : sum.tokens_train) += n;
      if (n > sum.longest_tokens) sum.longest_tokens = n, sum.longest_name = batch[i].name;
      if (n > 16384) ++sum.docs_over_16k;
    }
    print(false);
  }
  w[0]->close();
  w[1]->close();
  sum.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  print(true);
  if (sum.docs_train + sum.docs_val == 0) {
    remove_old_shards(opt.out_dir);
    fail("empty corpus: no text documents in the inputs (", sum.skipped_binary, " binary, ", sum.skipped_empty,
         " empty, ", sum.skipped_unreadable, " unreadable files skipped)");
  }
  nlohmann::json j = {{"format", "dsa-corpus-1"}, {"tokenizer", tok.path()}, {"vocab_size", tok.vocab_size()},
                      {"bos_id", tok.bos_id()}, {"eos_id", tok.eos_id()}, {"seed", opt.seed},
                      {"val_fraction", opt.val_fraction}, {"max_bytes", opt.max_bytes}, {"max_files", opt.max_files},
                      {"sample", opt.sample}, {"min_bytes", opt.min_bytes}, {"max_doc_bytes", opt.max_doc_bytes}, {"jsonl_field", opt.jsonl_field},
                      {"inputs", opt.inputs}, {"train_shards", shard_files[0]}, {"val_shards", shard_files[1]},
                      {"docs_train", sum.docs_train}, {"docs_val", sum.docs_val}, {"tokens_train", sum.tokens_train},
                      {"tokens_val", sum.tokens_val}, {"bytes", sum.bytes}, {"longest_tokens", sum.longest_tokens},
                      {"longest_name", sum.longest_name}, {"docs_over_16k", sum.docs_over_16k},
                      {"skipped_short", sum.skipped_short}, {"skipped_long", sum.skipped_long},
                      {"skipped_sampled", sum.skipped_sampled}};
  std::ofstream(opt.out_dir + "/corpus.json") << j.dump(2) << "\n";
  return sum;
}

}  // namespace dsa
