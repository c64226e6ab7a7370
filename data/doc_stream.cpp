// One corpus split as a stream of windows (framing, packing and positions described in doc_stream.h).
#include "data/doc_stream.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "data/data_util.h"
#include "data/shards.h"

namespace dsa {

namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  data_util::fail("[data]", parts...);
}

using data_util::splitmix64;

struct DocRef {
  uint32_t shard;
  uint64_t begin, len;  // token range in the shard
};

// A run of one framed document inside a window.
struct Piece {
  int64_t doc;     // index into the epoch order
  int64_t offset;  // into the framed document
  int64_t len;
};

}  // namespace

struct DocStream::Impl {
  std::string dir, split;
  uint64_t seed = 0;
  bool contiguous = false;
  std::vector<ShardReader> shards;
  std::vector<DocRef> docs;
  int64_t vocab = 0, total_tokens = 0;
  int32_t bos = -1, eos = -1;
  // The current epoch's plan and the position in it.
  int64_t epoch = -1;
  std::vector<uint32_t> order;  // [n_docs] document order of this epoch
  std::vector<int64_t> prefix;  // [n_docs + 1] framed stream offset of each document in that order
  int64_t doc = 0, offset = 0;

  int64_t n() const { return static_cast<int64_t>(docs.size()); }
  int64_t framed_len(uint32_t d) const { return static_cast<int64_t>(docs[d].len) + (bos >= 0) + (eos >= 0); }
  int64_t len_at(int64_t k) const { return prefix[k + 1] - prefix[k]; }

  // Copies tokens [off, off+n) of framed document d (file numbering) to dst.
  void framed_read(uint32_t d, int64_t off, int64_t n, int32_t* dst) const {
    const DocRef& r = docs[d];
    const int64_t len = static_cast<int64_t>(r.len), head = bos >= 0 ? 1 : 0;
    while (n > 0) {
      if (head && off == 0) {
        *dst++ = bos, ++off, --n;
        continue;
      }
      const int64_t body = off - head;
      if (body < len) {
        const int64_t k = std::min(n, len - body);
        shards[r.shard].read(r.begin + body, k, dst);
        dst += k, off += k, n -= k;
        continue;
      }
      *dst++ = eos, ++off, --n;  // past the body only EOS remains (framed_len bounds n)
    }
  }

  void plan_epoch(int64_t e) {
    epoch = e;
    doc = 0;
    offset = 0;
    const uint32_t count = static_cast<uint32_t>(docs.size());
    order.resize(count);
    for (uint32_t i = 0; i < count; ++i) order[i] = i;
    if (split == "train") {  // Fisher-Yates with a seeded splitmix64 (same on every platform)
      uint64_t s = seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(e) + 1;
      for (uint32_t i = count; i > 1; --i) std::swap(order[i - 1], order[splitmix64(s) % i]);
    }
    prefix.assign(count + 1, 0);
    for (uint32_t k = 0; k < count; ++k) prefix[k + 1] = prefix[k] + framed_len(order[k]);
  }

  // Packing: the T+1 stream tokens from the position (into buf when non-null), then T tokens on.
  void next_packed(int64_t T, int32_t* buf) {
    if (prefix[doc] + offset + T + 1 > prefix[n()]) {
      plan_epoch(epoch + 1);
      if (T + 1 > prefix[n()])
        fail(dir, ": split '", split, "' has ", prefix[n()], " framed tokens in ", n(), " documents: fewer than one window of ",
             T + 1);
    }
    const int64_t p = prefix[doc] + offset;
    if (buf) {
      int64_t used = 0, k = doc;
      while (used < T + 1) {
        const int64_t off = p + used - prefix[k];
        const int64_t take = std::min(T + 1 - used, len_at(k) - off);
        framed_read(order[k], off, take, buf + used);
        used += take;
        ++k;
      }
    }
    const int64_t q = p + T;  // < prefix[n()]: the window fitted
    while (prefix[doc + 1] <= q) ++doc;
    offset = q - prefix[doc];
  }

  // keep_documents_contiguous: one window's pieces from the position; returns the tokens used.
  int64_t plan_contiguous(int64_t T, std::vector<Piece>& pieces) {
    const int64_t cap = T + 1;
    for (int tries = 0;; ++tries) {
      if (doc >= n()) {
        if (tries > 1) fail(dir, ": split '", split, "' yields no window of ", T, " tokens");
        plan_epoch(epoch + 1);
      }
      pieces.clear();
      int64_t fill = 0;
      if (offset > 0) {  // the rest of a document cut at the previous window
        const int64_t rest = len_at(doc) - offset;
        if (rest >= cap) {
          pieces.push_back({doc, offset, cap});
          offset += T;  // consecutive chunks share one token
          return cap;
        }
        if (rest > 1) {
          pieces.push_back({doc, offset, rest});
          fill = rest;
        }
        ++doc;
        offset = 0;
      }
      while (doc < n()) {
        const int64_t L = len_at(doc);
        if (L <= cap - fill) {
          pieces.push_back({doc, 0, L});
          fill += L;
          ++doc;
          if (fill == cap) break;
          continue;
        }
        if (fill > 0) break;  // it starts the next window
        pieces.push_back({doc, 0, cap});  // longer than a window: the first chunk
        offset = T;
        return cap;
      }
      if (fill > 0) return fill;
    }
  }
};

DocStream::DocStream(const std::string& dir, const std::string& split, uint64_t seed, bool contiguous)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.dir = dir;
  m.split = split;
  m.seed = seed;
  m.contiguous = contiguous;
  const auto files = list_shards(dir, split);
  if (files.empty()) fail(dir, ": no ", split, "_*.bin shards (run dsa-prep corpus)");
  for (const std::string& f : files) {
    m.shards.emplace_back(f);
    const ShardHeader& h = m.shards.back().header();
    if (m.shards.size() == 1) {
      m.vocab = static_cast<int64_t>(h.vocab_size);
      m.bos = h.bos_id;
      m.eos = h.eos_id;
    } else if (static_cast<int64_t>(h.vocab_size) != m.vocab || h.bos_id != m.bos || h.eos_id != m.eos) {
      fail(f, ": vocab/BOS/EOS (", h.vocab_size, "/", h.bos_id, "/", h.eos_id, ") differ from ", files[0], " (", m.vocab,
           "/", m.bos, "/", m.eos, ")");
    }
    if (m.bos >= m.vocab || m.eos >= m.vocab) fail(f, ": BOS/EOS id outside the vocab");
    const ShardReader& r = m.shards.back();
    for (uint64_t d = 0; d < r.n_docs(); ++d)
      if (r.doc_size(d) > 0) m.docs.push_back({static_cast<uint32_t>(m.shards.size() - 1), r.doc_begin(d), r.doc_size(d)});
    m.total_tokens += static_cast<int64_t>(r.n_tokens());
  }
  if (m.docs.empty()) fail(dir, ": split '", split, "' has no non-empty documents");
  if (m.docs.size() > UINT32_MAX) fail(dir, ": too many documents");
  m.plan_epoch(0);
}

DocStream::DocStream(DocStream&&) noexcept = default;
DocStream& DocStream::operator=(DocStream&&) noexcept = default;
DocStream::~DocStream() = default;

void DocStream::next(int64_t T, int32_t* in, int32_t* tg) {
  Impl& m = *impl_;
  if (T < 1 || T > (int64_t(1) << 20)) fail(m.dir, ": window length ", T, " outside [1, 1048576]");
  const bool read = in != nullptr;
  thread_local std::vector<int32_t> buf;
  thread_local std::vector<Piece> pieces;
  int64_t used = T + 1;
  if (read) buf.assign(static_cast<size_t>(T + 1), -1);
  if (!m.contiguous) {
    m.next_packed(T, read ? buf.data() : nullptr);
  } else {
    used = m.plan_contiguous(T, pieces);
    if (read) {
      int64_t at = 0;
      for (const Piece& pc : pieces) {
        m.framed_read(m.order[pc.doc], pc.offset, pc.len, buf.data() + at);
        at += pc.len;
      }
    }
  }
  if (!read) return;
  const int32_t pad = m.eos >= 0 ? m.eos : 0;
  for (int64_t i = 0; i < T; ++i) {
    in[i] = i < used ? buf[i] : pad;
    tg[i] = i + 1 < used ? buf[i + 1] : -1;
  }
}

StreamPosition DocStream::position() const { return {impl_->epoch, impl_->doc, impl_->offset}; }

void DocStream::seek(const StreamPosition& p) {
  Impl& m = *impl_;
  if (p.epoch < 0 || p.doc < 0 || p.offset < 0 || p.doc > m.n())
    fail(m.dir, ": position (epoch ", p.epoch, ", document ", p.doc, ", offset ", p.offset, ") outside the split '",
         m.split, "' of ", m.n(), " documents");
  if (p.epoch != m.epoch) m.plan_epoch(p.epoch);
  if ((p.doc == m.n() && p.offset != 0) || (p.doc < m.n() && p.offset >= m.len_at(p.doc)))
    fail(m.dir, ": position offset ", p.offset, " is past the end of document ", p.doc, " of epoch ", p.epoch);
  m.doc = p.doc;
  m.offset = p.offset;
}

const std::string& DocStream::dir() const { return impl_->dir; }
const std::string& DocStream::split() const { return impl_->split; }
bool DocStream::contiguous() const { return impl_->contiguous; }
int64_t DocStream::vocab_size() const { return impl_->vocab; }
int64_t DocStream::n_docs() const { return impl_->n(); }
int64_t DocStream::n_tokens() const { return impl_->total_tokens; }
int64_t DocStream::framed_tokens() const { return impl_->prefix.back(); }
int32_t DocStream::bos_id() const { return impl_->bos; }
int32_t DocStream::eos_id() const { return impl_->eos; }
const std::string& DocStream::first_shard() const { return impl_->shards.front().path(); }

void DocStream::check_vocab(int64_t model_vocab) const {
  if (impl_->vocab > model_vocab)
    fail(first_shard(), ": corpus vocab ", impl_->vocab, " > model vocab ", model_vocab,
         " (token ids would index past the embedding)");
}

std::vector<Batch> validation_batches(const std::string& dir, bool contiguous, int64_t seq_len, int64_t per_rank,
                                      int rank, int world, int64_t n) {
  if (per_rank < 1 || world < 1 || rank < 0 || rank >= world)
    fail(dir, ": validation batches need per_rank >= 1 and 0 <= rank < world, got ", per_rank, ", ", rank, ", ", world);
  DocStream s(dir, "val", 0, contiguous);
  std::vector<Batch> out(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (Batch& b : out) {
    b.inputs.resize(static_cast<size_t>(per_rank * seq_len));
    b.targets.resize(b.inputs.size());
    for (int64_t w = 0; w < world * per_rank; ++w) {
      const int64_t mine = w - rank * per_rank;
      const bool read = mine >= 0 && mine < per_rank;
      s.next(seq_len, read ? b.inputs.data() + mine * seq_len : nullptr, read ? b.targets.data() + mine * seq_len : nullptr);
    }
  }
  return out;
}

}  // namespace dsa
