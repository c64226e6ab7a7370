// Training checkpoints in HDF5, readable with h5dump and h5py.
//
// Layout of one file (format "dsa-checkpoint", version kCheckpointFormatVersion):
//   /                      attributes: format, format_version, step, stage, stage_step, rng_seed
//   /meta/recipe_yaml      scalar string: the resolved recipe
//   /meta/model_config_yaml scalar string: ModelConfig::to_yaml()
//   /meta/rank_data_states [n_ranks] strings: every rank's data position
//   /meta/rng_state        [k] u64
//   /params/<hf name>      the master weights, exactly as held (f32 stays f32, bit for bit);
//                          attributes dtype ("f32", "bf16", ...; bf16 and f8e4m3 are stored as u16/u8)
//                          and group ("main", "indexer", "buffer")
//   /<key>                 extra tensors, e.g. optim/m/<hf name>, optim/v/<hf name>, mtp/<hf name>
//
// Saving is atomic: <dir>/ckpt-<step>.h5.tmp is written, flushed, fsynced and renamed, then
// <dir>/latest (the file name, one line) is replaced the same way; the oldest files beyond keep_last
// are removed afterwards. A process killed at any point leaves the previous checkpoint loadable.
// Loading validates the format and version, every dataset's type and shape against the stored model
// config, and names the file and tensor on any failure (a truncated file included).
//
// Runs with sharded state write a directory <dir>/ckpt-<step>/ of per-rank files plus an index instead
// (trainer/checkpoint_sharded.h); `latest`, resolve_checkpoint, list_checkpoints and load_checkpoint
// take both forms.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kernels/tensor.h"
#include "model/config.h"
#include "model/params.h"

namespace dsa {

inline constexpr int64_t kCheckpointFormatVersion = 1;

struct TrainState {
  int64_t step = 0;                            // optimizer steps done over all stages
  std::string stage;                           // current stage name ("" for an imported model)
  int64_t stage_step = 0;                      // steps done within the stage
  std::vector<std::string> rank_data_states;   // one opaque string per data-parallel rank
  std::string recipe_yaml;                     // the resolved recipe
  std::string model_config_yaml;               // ModelConfig::to_yaml(); required for loading
  uint64_t rng_seed = 0;
  std::vector<uint64_t> rng_state;             // generator words, opaque here
};

struct Checkpoint {
  std::string path;  // the file read
  TrainState state;
  ModelConfig cfg;
  ParamStore params;                    // CPU, dtype as stored
  std::map<std::string, Tensor> extra;  // CPU
};

// Writes one checkpoint file atomically (path.tmp, fsync, rename). Params may live on any device.
// Extra keys are HDF5 paths below the root: no leading '/', no empty or "." / ".." parts, not under
// params/ or meta/.
void write_checkpoint_file(const std::string& path, const TrainState& state, const ParamStore& params,
                           const std::map<std::string, Tensor>& extra);

// <dir>/ckpt-<step, 8 digits>.h5 + the latest pointer; keeps the newest keep_last files (<= 0: all).
// Creates dir. Returns the path written.
std::string save_checkpoint(const std::string& dir, const TrainState& state, const ParamStore& params,
                            const std::map<std::string, Tensor>& extra, int keep_last = 3);

// A file (or a sharded checkpoint directory) is returned as is; a directory resolves through its
// `latest` file, or, without one, to its highest-step checkpoint.
std::string resolve_checkpoint(const std::string& path_or_dir);
// (step, name) of every finished checkpoint in dir (ckpt-<step>.h5 files and ckpt-<step> sharded
// directories), by step.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir);
// Points dir/latest at `name` (an entry of dir) atomically and keeps the newest keep_last checkpoints
// (<= 0: all); removes the leftovers of killed saves (*.tmp).
void commit_latest(const std::string& dir, const std::string& name, int keep_last);
// Makes `checkpoint` (a file or a sharded directory) also appear in dir, under its own name, by hard
// links (copies across file systems), and points dir/latest at it. Returns the new path.
std::string link_checkpoint(const std::string& checkpoint, const std::string& dir);

// Reads everything; the parameter set is rebuilt from the stored model config and must match it.
// optimizer_state = false skips the optim/ tensors (export, inspection of the weights).
Checkpoint load_checkpoint(const std::string& path_or_dir, bool optimizer_state = true);

// Reads into an existing parameter store (any device, any float dtype: values are converted when
// the stored dtype differs). Every parameter must be present with its shape; extra datasets not
// in the model are an error. extra may be null.
void load_checkpoint_into(const std::string& path_or_dir, TrainState* state, ParamStore& params,
                          std::map<std::string, Tensor>* extra);

// The state alone (cheap: no tensor data is read).
TrainState read_train_state(const std::string& path_or_dir);

// One checkpoint file opened for reading tensor by tensor (format and version checked on open).
class CheckpointFile {
 public:
  explicit CheckpointFile(const std::string& path);
  ~CheckpointFile();
  CheckpointFile(const CheckpointFile&) = delete;
  CheckpointFile& operator=(const CheckpointFile&) = delete;
  const std::string& path() const;
  TrainState state() const;
  std::vector<std::string> datasets() const;  // every dataset below the root but meta/: "params/x", ...
  bool has(const std::string& name) const;
  Shape shape(const std::string& name) const;
  Tensor read(const std::string& name) const;  // CPU, the stored dtype
  // Rows [r0, r1) of dim 0 (elements of a 1-D dataset), CPU, the stored dtype.
  Tensor read_rows(const std::string& name, int64_t r0, int64_t r1) const;

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace dsa
