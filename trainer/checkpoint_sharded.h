// Sharded checkpoints: what runs with sharded state (ZeRO, expert parallelism) write, every rank its
// own part, in parallel.
//
// Layout: DIR/ckpt-<step, 8 digits>/ holding
//   shard-<rank, 5 digits>.h5  a dsa-checkpoint file (checkpoint.h) with the run's state and no params:
//                              each piece is a 1-D f32 dataset /piece/<key>/<begin> holding the
//                              elements [begin, end) of the row-major full tensor <key>
//   index.json                 {"format": "dsa-checkpoint-sharded", "format_version": 1, "step": S,
//                               "stage": "...", "stage_step": N, "state": {the TrainState: step, stage,
//                               stage_step, rank_data_states, recipe_yaml, model_config_yaml, rng_seed,
//                               rng_state}, "files": ["shard-00000.h5", ...],
//                               "tensors": {"<key>": {"shape": [...], "group": "main", "pieces":
//                                           [[file index, begin, end], ...]}, ...}}
//   keys are "params/<hf name>" (group main, indexer or buffer), "optim/m/<hf name>", "optim/v/<hf name>".
// The pieces of every tensor cover [0, numel) exactly once (checked on open), so a checkpoint does not
// depend on the rank count or the layout that wrote it: any layout reads the ranges it needs. The
// index's state is the checkpoint's (each shard file also carries the state it was written with;
// `dsa-convert reshard` changes only the index's, linking the shard files unchanged).
//
// Saving is collective and atomic: every rank writes its shard into DIR/ckpt-<step>.tmp/ (itself via
// a .tmp file and a rename), the piece tables are gathered, rank 0 writes index.json, renames the
// directory to DIR/ckpt-<step> and replaces DIR/latest. A rank killed at any point leaves the previous
// checkpoint and `latest` whole; the next save removes the leftovers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "trainer/checkpoint.h"

namespace dsa {

inline constexpr const char* kShardedIndexName = "index.json";
inline constexpr int64_t kShardedFormatVersion = 1;

// A contiguous range of one tensor of the training state.
struct StatePiece {
  std::string key;    // "params/<name>", "optim/m/<name>", "optim/v/<name>"
  Shape shape;        // the full tensor's shape
  std::string group;  // params: "main", "indexer", "buffer"; "" otherwise
  int64_t begin = 0;  // first element, in the row-major full tensor
  Tensor data;        // [n] f32, any device: elements [begin, begin + n)
};

// A directory written by save_sharded_checkpoint (it holds index.json).
bool is_sharded_checkpoint(const std::string& path);

// Collective over the world: writes this rank's pieces and (rank 0) the index; returns the checkpoint
// directory on every rank. Test hook: DSA_FAIL_IN_SAVE=S with DSA_FAIL_RANK=R kills rank R with
// SIGKILL after it has written its shard of the save at step S, before the checkpoint is committed.
std::string save_sharded_checkpoint(const std::string& dir, const TrainState& state,
                                    const std::vector<StatePiece>& mine, int keep_last);

// A copy of the sharded checkpoint src_dir in out_dir (ckpt-<step>, shard files hard-linked, latest
// updated) whose index carries `state` (new data positions for another rank count). Returns its path.
std::string relink_sharded_checkpoint(const std::string& src_dir, const std::string& out_dir, const TrainState& state);

// Reads element ranges of a checkpoint's tensors, whatever wrote it (one file or a sharded directory).
class CheckpointSource {
 public:
  explicit CheckpointSource(const std::string& path_or_dir);  // resolves a directory like resolve_checkpoint
  ~CheckpointSource();
  CheckpointSource(const CheckpointSource&) = delete;
  CheckpointSource& operator=(const CheckpointSource&) = delete;

  const std::string& path() const;
  bool sharded() const;
  int64_t files() const;  // shard files (1 for a single file)
  const TrainState& state() const;
  ModelConfig config() const;
  std::vector<std::string> keys() const;  // every tensor: params/..., optim/..., other extras
  bool has(const std::string& key) const;
  Shape shape(const std::string& key) const;
  // Elements [begin, end) of the row-major tensor `key`: f32 [end - begin] on the host.
  Tensor read(const std::string& key, int64_t begin, int64_t end) const;

 private:
  friend std::string relink_sharded_checkpoint(const std::string&, const std::string&, const TrainState&);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The whole checkpoint assembled in memory (what load_checkpoint returns for a sharded directory).
Checkpoint load_sharded_checkpoint(const std::string& dir, bool optimizer_state);

}  // namespace dsa
