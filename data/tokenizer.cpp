// Byte-level BPE tokenizer (see tokenizer.h for the pipeline).
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

namespace dsa {

namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "[tokenizer] ";
  (os << ... << parts);
  throw std::runtime_error(os.str());
}

std::string read_whole_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, ": cannot open: ", std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail(path, ": read error");
  return ss.str();
}

// ---- PCRE2 regex (UTF + UCP + JIT; invalid UTF-8 never matches instead of erroring) ----
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    // NOTES: DOLLAR_ENDONLY makes `$` mean end-of-subject, as in Rust regex and JS without /m.
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | PCRE2_DOLLAR_ENDONLY,
                          &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail(where, ": cannot compile split regex at offset ", off, ": ", reinterpret_cast<char*>(msg),
           " (pattern ", pattern, ")");
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  // First match in s[from:], as [begin, end) offsets into s; false if none.
  bool find(std::string_view s, size_t from, size_t& begin, size_t& end) const {
    thread_local pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
    auto subj = reinterpret_cast<PCRE2_SPTR>(s.data());
    int rc = jit_ ? pcre2_jit_match(code_, subj, s.size(), from, 0, md, nullptr)
                  : pcre2_match(code_, subj, s.size(), from, 0, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      fail("regex match failed: ", reinterpret_cast<char*>(msg));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    begin = ov[0];
    end = ov[1];
    return true;
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

enum class Behavior { Isolated, Removed, MergedWithPrevious, MergedWithNext };

struct SplitStage {
  std::unique_ptr<Regex> re;
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
};

// A piece is a byte range [off, off+len) of the current segment.
struct Span {
  uint32_t off, len;
};

// GPT-2's reversible map between bytes and printable code points, as a code point -> byte table.
std::unordered_map<uint32_t, uint8_t> byte_level_decoder() {
  std::unordered_map<uint32_t, uint8_t> m;
  uint32_t extra = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    m[printable ? b : extra++] = static_cast<uint8_t>(b);
  }
  return m;
}

// Decodes one UTF-8 code point at s[i]; returns false on malformed input.
bool next_code_point(std::string_view s, size_t& i, uint32_t& cp) {
  auto c = static_cast<uint8_t>(s[i]);
  int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return false;
  cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
  for (int k = 1; k < n; ++k) {
    auto cc = static_cast<uint8_t>(s[i + k]);
    if ((cc & 0xc0) != 0x80) return false;
    cp = (cp << 6) | (cc & 0x3f);
  }
  i += n;
  return true;
}

std::string base64_decode(std::string_view in, const std::string& where) {
  auto val = [&](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    fail(where, ": invalid base64 character '", c, "'");
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=') break;
    acc = (acc << 6) | static_cast<uint32_t>(val(c));
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  return out;
}

std::atomic<uint64_t> g_serial{1};

// Direct-mapped per-thread cache of piece -> ids (no allocation on a hit).
struct PieceCache {
  static constexpr size_t kSlots = 1 << 16;
  struct Slot {
    uint64_t hash = 0;
    std::string key;
    std::vector<int32_t> ids;
  };
  std::vector<Slot> slots{kSlots};
};

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  uint64_t serial = g_serial.fetch_add(1);
  // Token id -> raw bytes ([vocab_size]; empty string for unused ids).
  std::vector<std::string> id_bytes;
  std::array<int32_t, 256> byte_id{};  // single-byte token ids
  bool tiktoken = false;
  bool ignore_merges = false;
  // HF: (left id << 32 | right id) -> (rank, merged id).
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  // Raw bytes -> id for every model token (views into id_bytes).
  std::unordered_map<std::string_view, int32_t> bytes_id;
  std::vector<SplitStage> stages;
  bool add_prefix_space = false;
  // Added tokens as a byte trie: node -> children (node << 8 | byte), terminal token per node.
  struct Added {
    int32_t id;
    bool special, lstrip, rstrip;
  };
  std::unordered_map<uint64_t, int32_t> trie_next;
  std::vector<int32_t> trie_token{-1};  // [nodes] index into added, -1 if none
  std::vector<Added> added;
  std::array<bool, 256> added_first{};
  std::unordered_map<std::string, int32_t> added_id;  // content -> id
  int32_t bos = -1, eos = -1;

  void add_token(const std::string& content, int32_t id, bool special, bool lstrip, bool rstrip) {
    if (content.empty()) return;
    int32_t node = 0;
    for (unsigned char c : content) {
      uint64_t key = (static_cast<uint64_t>(node) << 8) | c;
      auto it = trie_next.find(key);
      if (it == trie_next.end()) {
        trie_token.push_back(-1);
        it = trie_next.emplace(key, static_cast<int32_t>(trie_token.size() - 1)).first;
      }
      node = it->second;
    }
    trie_token[node] = static_cast<int32_t>(added.size());
    added.push_back({id, special, lstrip, rstrip});
    added_first[static_cast<unsigned char>(content[0])] = true;
    added_id[content] = id;
    if (static_cast<size_t>(id) >= id_bytes.size()) id_bytes.resize(id + 1);
    id_bytes[id] = content;
  }

  // Called once after every token is in id_bytes (bytes_id holds views into it).
  void finish() {
    std::vector<bool> is_added(id_bytes.size(), false);
    for (const Added& a : added) is_added[a.id] = true;
    // NOTES: added tokens stay out of bytes_id so BPE can never produce them from plain text.
    for (size_t i = 0; i < id_bytes.size(); ++i)
      if (!id_bytes[i].empty() && !is_added[i]) bytes_id.emplace(id_bytes[i], static_cast<int32_t>(i));
    for (int b = 0; b < 256; ++b) {
      char c = static_cast<char>(b);
      auto it = bytes_id.find(std::string_view(&c, 1));
      if (it == bytes_id.end()) fail(path, ": byte 0x", std::hex, b, " has no token (not a byte-level vocab)");
      byte_id[b] = it->second;
    }
  }

  // Longest allowed added token starting at text[i]; returns its index in `added` and its end.
  int32_t match_added(std::string_view text, size_t i, bool allow_special, size_t& end) const {
    int32_t node = 0, best = -1;
    for (size_t j = i; j < text.size(); ++j) {
      auto it = trie_next.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(text[j]));
      if (it == trie_next.end()) break;
      node = it->second;
      int32_t t = trie_token[node];
      if (t >= 0 && (allow_special || !added[t].special)) {
        best = t;
        end = j + 1;
      }
    }
    return best;
  }

  void bpe(std::string_view piece, std::vector<int32_t>& out) const;
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  void encode_segment(std::string_view seg, std::vector<int32_t>& out) const;
};

// NOTES: BPE over a linked list of symbols with a min-heap of candidate merges keyed by
// (rank, position): the lowest rank merges first and the leftmost wins ties, which is both
// Hugging Face's and tiktoken's order. Stale heap entries are detected by re-checking adjacency and
// ids. O(n log n) so long pieces (whitespace runs, base64 blobs) stay fast.
void Tokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  const size_t n = piece.size();
  if (n == 1) {
    out.push_back(byte_id[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (tiktoken || ignore_merges) {
    auto it = bytes_id.find(piece);
    if (it != bytes_id.end()) {
      out.push_back(it->second);
      return;
    }
  }
  thread_local std::vector<int32_t> id, prev, next;
  thread_local std::vector<uint32_t> start, stop;
  id.resize(n), prev.resize(n), next.resize(n), start.resize(n), stop.resize(n);
  for (size_t i = 0; i < n; ++i) {
    id[i] = byte_id[static_cast<unsigned char>(piece[i])];
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
    start[i] = static_cast<uint32_t>(i);
    stop[i] = static_cast<uint32_t>(i + 1);
  }
  struct Cand {
    int32_t rank, left, right, left_id, right_id, merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  auto candidate = [&](int32_t l, int32_t r, Cand& c) -> bool {
    if (tiktoken) {
      auto it = bytes_id.find(piece.substr(start[l], stop[r] - start[l]));
      if (it == bytes_id.end()) return false;
      c = {it->second, l, r, id[l], id[r], it->second};
    } else {
      auto it = merges.find((static_cast<uint64_t>(id[l]) << 32) | static_cast<uint32_t>(id[r]));
      if (it == merges.end()) return false;
      c = {it->second.first, l, r, id[l], id[r], it->second.second};
    }
    return true;
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  Cand c{};
  for (size_t i = 0; i + 1 < n; ++i)
    if (candidate(static_cast<int32_t>(i), static_cast<int32_t>(i + 1), c)) heap.push(c);
  while (!heap.empty()) {
    Cand t = heap.top();
    heap.pop();
    if (id[t.left] != t.left_id || next[t.left] != t.right || id[t.right] != t.right_id) continue;
    id[t.left] = t.merged;
    stop[t.left] = stop[t.right];
    id[t.right] = -1;  // dead
    next[t.left] = next[t.right];
    if (next[t.right] >= 0) prev[next[t.right]] = t.left;
    if (prev[t.left] >= 0 && candidate(prev[t.left], t.left, c)) heap.push(c);
    if (next[t.left] >= 0 && candidate(t.left, next[t.left], c)) heap.push(c);
  }
  for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(id[i]);
}

void Tokenizer::Impl::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (piece.size() > 256) {  // long pieces are rare and would evict many short ones
    bpe(piece, out);
    return;
  }
  thread_local std::unordered_map<uint64_t, std::unique_ptr<PieceCache>> caches;
  auto found = caches.find(serial);
  if (found == caches.end()) {
    if (caches.size() >= 8) caches.clear();  // tokenizers come and go (tests): bound the cost
    found = caches.emplace(serial, std::make_unique<PieceCache>()).first;
  }
  PieceCache* cache = found->second.get();
  uint64_t h = std::hash<std::string_view>{}(piece) | 1;
  auto& slot = cache->slots[h & (PieceCache::kSlots - 1)];
  if (slot.hash == h && slot.key == piece) {
    out.insert(out.end(), slot.ids.begin(), slot.ids.end());
    return;
  }
  size_t before = out.size();
  bpe(piece, out);
  slot.hash = h;
  slot.key.assign(piece);
  slot.ids.assign(out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
}

// Runs the split stages over one segment (text between added tokens) and BPE-encodes the pieces.
void Tokenizer::Impl::encode_segment(std::string_view seg_in, std::vector<int32_t>& out) const {
  if (seg_in.empty()) return;
  std::string prefixed;
  std::string_view seg = seg_in;
  if (add_prefix_space && seg[0] != ' ') {
    prefixed = " " + std::string(seg_in);
    seg = prefixed;
  }
  thread_local std::vector<Span> cur, nxt;
  thread_local std::vector<std::pair<Span, bool>> parts;
  cur.assign(1, Span{0, static_cast<uint32_t>(seg.size())});
  for (const SplitStage& st : stages) {
    nxt.clear();
    for (Span p : cur) {
      std::string_view s = seg.substr(p.off, p.len);
      parts.clear();
      size_t pos = 0, b = 0, e = 0, from = 0;
      while (from <= s.size() && st.re->find(s, from, b, e)) {
        if (e == b) {  // empty match: step over one byte so the scan always advances
          from = b + 1;
          continue;
        }
        if (b > pos) parts.push_back({Span{uint32_t(p.off + pos), uint32_t(b - pos)}, st.invert});
        parts.push_back({Span{uint32_t(p.off + b), uint32_t(e - b)}, !st.invert});
        pos = from = e;
      }
      if (pos < s.size()) parts.push_back({Span{uint32_t(p.off + pos), uint32_t(s.size() - pos)}, st.invert});
      switch (st.behavior) {
        case Behavior::Isolated:
          for (auto& [sp, m] : parts) nxt.push_back(sp);
          break;
        case Behavior::Removed:
          for (auto& [sp, m] : parts)
            if (!m) nxt.push_back(sp);
          break;
        case Behavior::MergedWithPrevious: {
          size_t first = nxt.size();
          for (auto& [sp, m] : parts) {
            if (m && nxt.size() > first) nxt.back().len += sp.len;
            else nxt.push_back(sp);
          }
          break;
        }
        case Behavior::MergedWithNext: {
          bool pending = false;
          for (auto& [sp, m] : parts) {
            if (pending) nxt.back().len += sp.len;
            else nxt.push_back(sp);
            pending = m;
          }
          break;
        }
      }
    }
    std::swap(cur, nxt);
  }
  for (Span p : cur) encode_piece(seg.substr(p.off, p.len), out);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  size_t seg_start = 0;
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
  if (!m.added.empty()) {
    for (size_t i = 0; i < text.size(); ++i) {
      if (!m.added_first[static_cast<unsigned char>(text[i])]) continue;
      size_t end = 0;
      int32_t t = m.match_added(text, i, allow_special, end);
      if (t < 0) continue;
      const Impl::Added& a = m.added[t];
      size_t b = i;
      if (a.lstrip)
        while (b > seg_start && is_space(text[b - 1])) --b;
      if (a.rstrip)
        while (end < text.size() && is_space(text[end])) ++end;
      m.encode_segment(text.substr(seg_start, b - seg_start), out);
      out.push_back(a.id);
      seg_start = end;
      i = end - 1;
    }
  }
  m.encode_segment(text.substr(seg_start), out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string s;
  s.reserve(ids.size() * 4);
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= impl_->id_bytes.size())
      fail("decode: id ", id, " out of range [0, ", impl_->id_bytes.size(), ") for ", impl_->path);
    s += impl_->id_bytes[id];
  }
  return s;
}

std::string Tokenizer::token_bytes(int32_t id) const { return decode({id}); }
int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_bytes.size()); }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
const std::string& Tokenizer::path() const { return impl_->path; }

// ---- Hugging Face tokenizer.json ----
namespace {

using nlohmann::json;

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

void add_pretokenizer(Tokenizer::Impl& m, const json& pt) {
  if (pt.is_null()) return;
  std::string type = pt.value("type", "");
  if (type == "Sequence") {
    for (const json& p : pt.at("pretokenizers")) add_pretokenizer(m, p);
  } else if (type == "Split") {
    SplitStage st;
    const json& pat = pt.at("pattern");
    std::string re;
    if (pat.contains("Regex")) {
      re = pat["Regex"].get<std::string>();
    } else {  // a literal string: quote it for PCRE2
      re = "\\Q" + pat.at("String").get<std::string>() + "\\E";
    }
    std::string beh = pt.value("behavior", "Isolated");
    if (beh == "Isolated") st.behavior = Behavior::Isolated;
    else if (beh == "Removed") st.behavior = Behavior::Removed;
    else if (beh == "MergedWithPrevious") st.behavior = Behavior::MergedWithPrevious;
    else if (beh == "MergedWithNext") st.behavior = Behavior::MergedWithNext;
    else fail(m.path, ": Split behavior '", beh, "' is not supported");
    st.invert = pt.value("invert", false);
    st.re = std::make_unique<Regex>(re, m.path);
    m.stages.push_back(std::move(st));
  } else if (type == "ByteLevel") {
    if (pt.value("add_prefix_space", false)) m.add_prefix_space = true;
    if (pt.value("use_regex", true)) {
      SplitStage st;
      st.re = std::make_unique<Regex>(kGpt2Pattern, m.path);
      m.stages.push_back(std::move(st));
    }
  } else {
    fail(m.path, ": pre_tokenizer type '", type, "' is not supported (byte-level BPE only)");
  }
}

void check_normalizer(const Tokenizer::Impl& m, const json& n) {
  if (n.is_null()) return;
  std::string type = n.value("type", "");
  if (type == "Sequence") {
    for (const json& x : n.at("normalizers")) check_normalizer(m, x);
    return;
  }
  fail(m.path, ": normalizer type '", type, "' is not supported (byte-level BPE without normalizer only)");
}

std::string token_name(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content")) return v["content"].get<std::string>();
  return {};
}

}  // namespace

static std::unique_ptr<Tokenizer::Impl> load_hf(const std::string& path) {
  auto m = std::make_unique<Tokenizer::Impl>();
  m->path = path;
  json j;
  try {
    j = json::parse(read_whole_file(path));
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON: ", e.what());
  }
  try {
    check_normalizer(*m, j.value("normalizer", json()));
    const json& model = j.at("model");
    if (model.value("type", "BPE") != "BPE") fail(path, ": model type '", model.value("type", ""), "' is not BPE");
    if (model.value("byte_fallback", false)) fail(path, ": byte_fallback BPE is not supported");
    if (!model.value("continuing_subword_prefix", json()).is_null() || !model.value("end_of_word_suffix", json()).is_null())
      fail(path, ": continuing_subword_prefix / end_of_word_suffix are not supported");
    m->ignore_merges = model.value("ignore_merges", false);
    auto decoder = byte_level_decoder();
    std::unordered_map<std::string, int32_t> str_id;  // byte-level vocab string -> id
    const json& vocab = model.at("vocab");
    str_id.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      int32_t id = it.value().get<int32_t>();
      if (id < 0) fail(path, ": negative id in vocab");
      const std::string& s = it.key();
      str_id.emplace(s, id);
      std::string raw;
      bool ok = true;
      for (size_t i = 0; i < s.size() && ok;) {
        uint32_t cp = 0;
        ok = next_code_point(s, i, cp);
        auto d = ok ? decoder.find(cp) : decoder.end();
        ok = ok && d != decoder.end();
        if (ok) raw.push_back(static_cast<char>(d->second));
      }
      // NOTES: a vocab entry outside the byte-level alphabet (e.g. "<｜begin▁of▁sentence｜>" in
      // the model vocab) is kept as its literal UTF-8; added_tokens below give those their bytes.
      if (static_cast<size_t>(id) >= m->id_bytes.size()) m->id_bytes.resize(id + 1);
      m->id_bytes[id] = ok ? raw : s;
    }
    int32_t rank = 0;
    for (const json& mg : model.at("merges")) {
      std::string a, b;
      if (mg.is_string()) {
        const std::string& s = mg.get_ref<const std::string&>();
        size_t sp = s.find(' ');
        if (sp == std::string::npos) fail(path, ": merge '", s, "' has no space");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        a = mg.at(0).get<std::string>();
        b = mg.at(1).get<std::string>();
      }
      auto ia = str_id.find(a), ib = str_id.find(b), ic = str_id.find(a + b);
      if (ia == str_id.end() || ib == str_id.end() || ic == str_id.end())
        fail(path, ": merge #", rank, " '", a, " ", b, "' names a token not in the vocab");
      uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
      m->merges.emplace(key, std::make_pair(rank, ic->second));  // first (lowest) rank wins
      ++rank;
    }
    add_pretokenizer(*m, j.value("pre_tokenizer", json()));
    for (const json& t : j.value("added_tokens", json::array()))
      m->add_token(t.at("content").get<std::string>(), t.at("id").get<int32_t>(), t.value("special", false),
                   t.value("lstrip", false), t.value("rstrip", false));
  } catch (const json::exception& e) {
    fail(path, ": unexpected tokenizer.json layout: ", e.what());
  }
  m->finish();
  // BOS/EOS: tokenizer_config.json beside the file, else well-known names.
  auto find_id = [&](const std::string& name) -> int32_t {
    if (name.empty()) return -1;
    auto ia = m->added_id.find(name);
    if (ia != m->added_id.end()) return ia->second;
    auto it = m->bytes_id.find(name);
    return it == m->bytes_id.end() ? -1 : it->second;
  };
  std::string dir = path.substr(0, path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/') + 1);
  std::ifstream cfg_file(dir + "tokenizer_config.json");
  if (cfg_file) {
    try {
      json cfg = json::parse(cfg_file);
      m->bos = find_id(token_name(cfg.value("bos_token", json())));
      m->eos = find_id(token_name(cfg.value("eos_token", json())));
    } catch (const json::exception& e) {
      fail(dir, "tokenizer_config.json: not valid JSON: ", e.what());
    }
  }
  for (const char* n : {"<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<|startoftext|>"})
    if (m->bos < 0) m->bos = find_id(n);
  for (const char* n : {"<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<|endoftext|>"})
    if (m->eos < 0) m->eos = find_id(n);
  return m;
}

// ---- OpenAI .tiktoken ----
static std::unique_ptr<Tokenizer::Impl> load_tiktoken(const std::string& path, const std::string& enc) {
  auto m = std::make_unique<Tokenizer::Impl>();
  m->path = path;
  m->tiktoken = true;
  const std::string r50k = R"('(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  const std::string cl100k =
      R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s)";
  const std::string o200k =
      R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
      R"(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
      R"(|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  std::string pattern;
  std::vector<std::pair<std::string, int32_t>> specials;
  if (enc == "r50k_base" || enc == "p50k_base") {
    pattern = r50k;
    specials = {{"<|endoftext|>", 50256}};
  } else if (enc == "p50k_edit") {
    pattern = r50k;
    specials = {{"<|endoftext|>", 50256}, {"<|fim_prefix|>", 50281}, {"<|fim_middle|>", 50282}, {"<|fim_suffix|>", 50283}};
  } else if (enc == "cl100k_base") {
    pattern = cl100k;
    specials = {{"<|endoftext|>", 100257}, {"<|fim_prefix|>", 100258}, {"<|fim_middle|>", 100259},
                {"<|fim_suffix|>", 100260}, {"<|im_start|>", 100264}, {"<|im_end|>", 100265},
                {"<|im_sep|>", 100266}, {"<|endofprompt|>", 100276}};
  } else if (enc == "o200k_base") {
    pattern = o200k;
    specials = {{"<|endoftext|>", 199999}, {"<|endofprompt|>", 200018}};
  } else {
    fail(path, ": unknown tiktoken encoding '", enc,
         "' (expected r50k_base, p50k_base, p50k_edit, cl100k_base or o200k_base)");
  }
  std::string text = read_whole_file(path);
  size_t line_no = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string_view line(text.data() + pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    if (sp == std::string::npos) fail(path, ":", line_no, ": expected '<base64> <rank>'");
    std::string bytes = base64_decode(line.substr(0, sp), path);
    long rank = std::strtol(std::string(line.substr(sp + 1)).c_str(), nullptr, 10);
    if (rank < 0 || rank > (1 << 30)) fail(path, ":", line_no, ": bad rank");
    if (static_cast<size_t>(rank) >= m->id_bytes.size()) m->id_bytes.resize(rank + 1);
    m->id_bytes[rank] = std::move(bytes);
  }
  if (m->id_bytes.empty()) fail(path, ": no ranks (empty file)");
  SplitStage st;
  st.re = std::make_unique<Regex>(pattern, path);
  m->stages.push_back(std::move(st));
  for (auto& [s, id] : specials) m->add_token(s, id, true, false, false);
  m->finish();
  m->eos = specials[0].second;
  return m;
}

Tokenizer Tokenizer::from_tiktoken(const std::string& path, const std::string& encoding) {
  return Tokenizer(load_tiktoken(path, encoding));
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  auto ends_with = [&](const std::string& suf) {
    return path.size() >= suf.size() && path.compare(path.size() - suf.size(), suf.size(), suf) == 0;
  };
  if (ends_with(".json")) return Tokenizer(load_hf(path));
  if (ends_with(".tiktoken")) {
    size_t slash = path.find_last_of('/');
    std::string base = path.substr(slash == std::string::npos ? 0 : slash + 1);
    return Tokenizer(load_tiktoken(path, base.substr(0, base.size() - 9)));
  }
  fail(path, ": expected a tokenizer.json (.json) or a .tiktoken rank file");
}

}  // namespace dsa
