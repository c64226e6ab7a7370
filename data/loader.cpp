// Training-sequence loader (packing and data-parallel layout described in loader.h).
#include "data/loader.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "data/shards.h"

namespace dsa {

namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  os << "[loader] ";
  (os << ... << parts);
  throw std::runtime_error(os.str());
}

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct DocRef {
  uint32_t shard;
  uint64_t begin, len;  // token range in the shard
};

// A run of one framed document inside a contiguous-mode window.
struct Piece {
  uint32_t doc;     // index into the epoch order
  uint64_t offset;  // into the framed document
  uint64_t len;
};

}  // namespace

struct Loader::Impl {
  LoaderConfig cfg;
  std::vector<ShardReader> shards;
  std::vector<DocRef> docs;
  int64_t vocab = 0, total_tokens = 0;
  int32_t bos = -1, eos = -1;
  // Epoch plan.
  int64_t epoch = -1;
  std::vector<uint32_t> order;    // [n_docs] document order for this epoch
  std::vector<int64_t> prefix;    // [n_docs + 1] framed stream offsets (stream mode)
  std::vector<Piece> pieces;      // contiguous mode: pieces of all windows
  std::vector<int64_t> win_first; // contiguous mode: [n_windows + 1] index into pieces
  int64_t n_windows = 0;
  int64_t window = 0;  // next global window of this epoch

  int64_t framed_len(uint32_t d) const { return static_cast<int64_t>(docs[d].len) + (bos >= 0) + (eos >= 0); }
  int64_t G() const { return static_cast<int64_t>(cfg.world) * cfg.batch_per_rank; }

  // Copies tokens [off, off+n) of framed document d (in file numbering) to dst.
  void framed_read(uint32_t d, int64_t off, int64_t n, int32_t* dst) const {
    const DocRef& r = docs[d];
    int64_t len = static_cast<int64_t>(r.len), head = bos >= 0 ? 1 : 0;
    while (n > 0) {
      if (head && off == 0) {
        *dst++ = bos, ++off, --n;
        continue;
      }
      int64_t body = off - head;
      if (body < len) {
        int64_t k = std::min(n, len - body);
        shards[r.shard].read(r.begin + body, k, dst);
        dst += k, off += k, n -= k;
        continue;
      }
      *dst++ = eos, ++off, --n;  // past the body only EOS remains (framed_len bounds n)
    }
  }

  void plan_epoch(int64_t e) {
    epoch = e;
    window = 0;
    const uint32_t n = static_cast<uint32_t>(docs.size());
    order.resize(n);
    for (uint32_t i = 0; i < n; ++i) order[i] = i;
    if (cfg.split == "train") {  // Fisher-Yates with a seeded splitmix64 (same on every platform)
      uint64_t s = cfg.seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(e) + 1;
      for (uint32_t i = n; i > 1; --i) std::swap(order[i - 1], order[splitmix64(s) % i]);
    }
    const int64_t T = cfg.seq_len, cap = T + 1;
    if (!cfg.keep_documents_contiguous) {
      prefix.assign(n + 1, 0);
      for (uint32_t k = 0; k < n; ++k) prefix[k + 1] = prefix[k] + framed_len(order[k]);
      n_windows = prefix[n] > 0 ? (prefix[n] - 1) / T : 0;
    } else {
      pieces.clear();
      win_first.assign(1, 0);
      int64_t fill = 0;
      auto close_window = [&] {
        win_first.push_back(static_cast<int64_t>(pieces.size()));
        fill = 0;
      };
      for (uint32_t k = 0; k < n; ++k) {
        int64_t L = framed_len(order[k]);
        if (L <= cap - fill) {
          pieces.push_back({k, 0, static_cast<uint64_t>(L)});
          fill += L;
          if (fill == cap) close_window();
          continue;
        }
        if (fill > 0) close_window();
        int64_t off = 0;
        while (L - off >= cap) {  // full windows; consecutive chunks share one token
          pieces.push_back({k, static_cast<uint64_t>(off), static_cast<uint64_t>(cap)});
          close_window();
          off += T;
        }
        if (L - off > 1) {  // the rest starts a window that later documents may share
          pieces.push_back({k, static_cast<uint64_t>(off), static_cast<uint64_t>(L - off)});
          fill = L - off;
        }
      }
      if (fill > 0) close_window();
      n_windows = static_cast<int64_t>(win_first.size()) - 1;
    }
    if (n_windows / G() == 0)
      fail(cfg.dir, ": split '", cfg.split, "' has ", total_tokens, " tokens in ", docs.size(),
           " documents: fewer than one step of world*batch_per_rank = ", G(), " windows of ", T, " tokens");
  }

  // Fills one window (global index g) into in[T], tg[T].
  void fill_window(int64_t g, int32_t* in, int32_t* tg) const {
    const int64_t T = cfg.seq_len;
    thread_local std::vector<int32_t> buf;
    buf.assign(T + 1, -1);
    int64_t used = 0;
    if (!cfg.keep_documents_contiguous) {
      int64_t p = g * T;
      size_t k = static_cast<size_t>(std::upper_bound(prefix.begin(), prefix.end(), p) - prefix.begin()) - 1;
      while (used < T + 1) {
        int64_t off = p + used - prefix[k];
        int64_t take = std::min(T + 1 - used, prefix[k + 1] - prefix[k] - off);
        framed_read(order[k], off, take, buf.data() + used);
        used += take;
        ++k;
      }
    } else {
      for (int64_t i = win_first[g]; i < win_first[g + 1]; ++i) {
        const Piece& pc = pieces[i];
        framed_read(order[pc.doc], static_cast<int64_t>(pc.offset), static_cast<int64_t>(pc.len), buf.data() + used);
        used += static_cast<int64_t>(pc.len);
      }
    }
    const int32_t pad = eos >= 0 ? eos : 0;
    for (int64_t i = 0; i < T; ++i) {
      in[i] = i < used ? buf[i] : pad;
      tg[i] = i + 1 < used ? buf[i + 1] : -1;
    }
  }
};

Loader::Loader(const LoaderConfig& cfg) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = cfg;
  if (cfg.seq_len < 1 || cfg.seq_len > (int64_t(1) << 20)) fail(cfg.dir, ": seq_len ", cfg.seq_len, " outside [1, 1048576]");
  if (cfg.batch_per_rank < 1) fail(cfg.dir, ": batch_per_rank must be >= 1, got ", cfg.batch_per_rank);
  if (cfg.world < 1 || cfg.rank < 0 || cfg.rank >= cfg.world)
    fail(cfg.dir, ": rank ", cfg.rank, " outside world ", cfg.world);
  auto files = list_shards(cfg.dir, cfg.split);
  if (files.empty()) fail(cfg.dir, ": no ", cfg.split, "_*.bin shards (run dsa-prep corpus)");
  for (const std::string& f : files) {
    m.shards.emplace_back(f);
    const ShardHeader& h = m.shards.back().header();
    if (m.shards.size() == 1) {
      m.vocab = static_cast<int64_t>(h.vocab_size);
      m.bos = h.bos_id;
      m.eos = h.eos_id;
    } else if (static_cast<int64_t>(h.vocab_size) != m.vocab || h.bos_id != m.bos || h.eos_id != m.eos) {
      fail(f, ": vocab/BOS/EOS (", h.vocab_size, "/", h.bos_id, "/", h.eos_id, ") differ from ", files[0], " (",
           m.vocab, "/", m.bos, "/", m.eos, ")");
    }
    if ((m.bos >= m.vocab) || (m.eos >= m.vocab)) fail(f, ": BOS/EOS id outside the vocab");
    const ShardReader& r = m.shards.back();
    for (uint64_t d = 0; d < r.n_docs(); ++d)
      if (r.doc_size(d) > 0)
        m.docs.push_back({static_cast<uint32_t>(m.shards.size() - 1), r.doc_begin(d), r.doc_size(d)});
    m.total_tokens += static_cast<int64_t>(r.n_tokens());
  }
  if (m.docs.empty()) fail(cfg.dir, ": split '", cfg.split, "' has no non-empty documents");
  if (m.docs.size() > UINT32_MAX) fail(cfg.dir, ": too many documents");
  m.plan_epoch(0);
}

Loader::Loader(Loader&&) noexcept = default;
Loader::~Loader() = default;

void Loader::next(std::vector<int32_t>& inputs, std::vector<int32_t>& targets) {
  Impl& m = *impl_;
  const int64_t T = m.cfg.seq_len, B = m.cfg.batch_per_rank;
  if (m.window + m.G() > m.n_windows) m.plan_epoch(m.epoch + 1);
  inputs.resize(static_cast<size_t>(B * T));
  targets.resize(static_cast<size_t>(B * T));
  for (int64_t b = 0; b < B; ++b)
    m.fill_window(m.window + m.cfg.rank * B + b, inputs.data() + b * T, targets.data() + b * T);
  m.window += m.G();
}

std::string Loader::state() const {
  const Impl& m = *impl_;
  nlohmann::json j = {{"format", "dsa-loader-1"}, {"split", m.cfg.split}, {"seed", m.cfg.seed},
                      {"seq_len", m.cfg.seq_len}, {"contiguous", m.cfg.keep_documents_contiguous},
                      {"n_docs", m.docs.size()}, {"n_tokens", m.total_tokens},
                      {"epoch", m.epoch}, {"window", m.window}};
  return j.dump();
}

void Loader::restore(const std::string& state) {
  Impl& m = *impl_;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(state);
    if (j.at("format") != "dsa-loader-1") fail(m.cfg.dir, ": restore: unknown state format ", j.at("format").dump());
    auto expect = [&](const char* key, const nlohmann::json& have) {
      if (j.at(key) != have)
        fail(m.cfg.dir, ": restore: saved ", key, " ", j.at(key).dump(), " differs from this loader's ", have.dump());
    };
    expect("split", m.cfg.split);
    expect("seed", m.cfg.seed);
    expect("seq_len", m.cfg.seq_len);
    expect("contiguous", m.cfg.keep_documents_contiguous);
    expect("n_docs", m.docs.size());
    expect("n_tokens", m.total_tokens);
    int64_t e = j.at("epoch").get<int64_t>(), w = j.at("window").get<int64_t>();
    if (e < 0 || w < 0) fail(m.cfg.dir, ": restore: negative position");
    if (w % m.G() != 0) fail(m.cfg.dir, ": restore: window ", w, " is not a multiple of world*batch_per_rank = ", m.G());
    if (e != m.epoch) m.plan_epoch(e);
    if (w > m.n_windows) fail(m.cfg.dir, ": restore: window ", w, " past the epoch's ", m.n_windows);
    m.window = w;
  } catch (const nlohmann::json::exception& ex) {
    fail(m.cfg.dir, ": restore: bad state JSON: ", ex.what());
  }
}

void Loader::reset() {
  if (impl_->epoch != 0) impl_->plan_epoch(0);
  impl_->window = 0;
}

int64_t Loader::vocab_size() const { return impl_->vocab; }
void Loader::check_vocab(int64_t model_vocab) const {
  if (impl_->vocab > model_vocab)
    fail(impl_->shards[0].path(), ": corpus vocab ", impl_->vocab, " > model vocab ", model_vocab,
         " (token ids would index past the embedding)");
}
int64_t Loader::epoch() const { return impl_->epoch; }
int64_t Loader::steps_per_epoch() const { return impl_->n_windows / impl_->G(); }
int64_t Loader::step_in_epoch() const { return impl_->window / impl_->G(); }
int64_t Loader::n_docs() const { return static_cast<int64_t>(impl_->docs.size()); }
int64_t Loader::n_tokens() const { return impl_->total_tokens; }
int32_t Loader::bos_id() const { return impl_->bos; }
int32_t Loader::eos_id() const { return impl_->eos; }

std::vector<Batch> validation_batches(LoaderConfig cfg, int64_t n) {
  if (cfg.split == "train") cfg.split = "val";
  Loader l(cfg);
  std::vector<Batch> out(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (Batch& b : out) l.next(b.inputs, b.targets);
  return out;
}

}  // namespace dsa
