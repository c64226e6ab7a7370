// One split of a corpus directory (token shards, see shards.h) as an endless, deterministic stream of
// training windows, addressed by a position that does not depend on the window length.
//
// Documents are framed as [BOS] tokens [EOS] (whichever the shards' tokenizer has). Each epoch puts them
// in an order: a seeded shuffle for split "train", file order for other splits. A position is
// (epoch, doc, offset): the next window starts `offset` tokens into the framed document at index `doc`
// of that epoch's order.
//
// Packing (default): an epoch's framed documents form one token stream; a window is the T+1 stream
// tokens from the position (inputs: the first T, targets: the last T) and the next window starts T
// tokens later, so consecutive windows share one token and every token is a target once. An epoch ends
// when fewer than T+1 tokens remain (its tail is dropped).
// keep_documents_contiguous: a window takes whole documents from the position while they fit in T+1
// tokens; a document that does not fit starts the next window, and one longer than a window is cut into
// consecutive chunks (sharing one token, as above); unused space is padding (input EOS or 0, target -1).
// An epoch ends after its last document.
//
// Invariants: a position always points into a document (0 <= offset < its framed length) or at the
// epoch's end (doc == n_docs, offset 0); the windows after a position depend on nothing but the position
// and the window lengths asked for. So T may change between windows (a 4K stage, then a 16K stage,
// continue one stream) and a saved position restores exactly on any machine and any rank count.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsa {

struct StreamPosition {
  int64_t epoch = 0;
  int64_t doc = 0;     // index into the epoch's document order
  int64_t offset = 0;  // tokens into the framed document
  bool operator==(const StreamPosition& o) const { return epoch == o.epoch && doc == o.doc && offset == o.offset; }
};

class DocStream {
 public:
  // Reads every `split`_*.bin shard of `dir`; errors name the directory and the split.
  DocStream(const std::string& dir, const std::string& split, uint64_t seed, bool keep_documents_contiguous);
  DocStream(DocStream&&) noexcept;
  DocStream& operator=(DocStream&&) noexcept;
  ~DocStream();

  // The next window of T tokens: inputs in[T], targets tg[T] (target -1 = none). Both null: the
  // position advances exactly as if the window had been read (other ranks' windows, planning).
  void next(int64_t T, int32_t* in, int32_t* tg);

  StreamPosition position() const;
  // Moves to a position (validated against the corpus: errors name the directory).
  void seek(const StreamPosition& p);

  const std::string& dir() const;
  const std::string& split() const;
  bool contiguous() const;
  int64_t vocab_size() const;  // the shards' tokenizer vocab
  int64_t n_docs() const;
  int64_t n_tokens() const;    // stored tokens, without BOS/EOS
  int64_t framed_tokens() const;  // tokens of one epoch's framed documents (BOS/EOS included)
  int32_t bos_id() const;      // -1: none
  int32_t eos_id() const;      // -1: none
  const std::string& first_shard() const;
  // Throws "[data] DIR/SHARD: corpus vocab V > model vocab M" when the model is too small.
  void check_vocab(int64_t model_vocab) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

struct Batch {
  std::vector<int32_t> inputs, targets;  // [batch_per_rank * seq_len] each
};

// The first n batches of `dir`'s held-out split "val" (file order, from its start) for one rank of
// `world`: batch i holds windows [i*G + rank*per_rank, ... + per_rank) with G = world * per_rank. Always
// the same ones: the validation set.
std::vector<Batch> validation_batches(const std::string& dir, bool keep_documents_contiguous, int64_t seq_len,
                                      int64_t per_rank, int rank, int world, int64_t n);

}  // namespace dsa
