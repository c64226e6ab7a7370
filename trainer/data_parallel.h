// Data and expert parallelism of the trainer: MPI on the CPU backend, NCCL on the GPU.
//
// Layout: every rank is a data-parallel rank (parallelism.dp is 0 or the world size) and reads its own
// slice of the global batch; expert-parallel groups of parallelism.ep consecutive ranks split the
// routed experts (model/expert_parallel.h). Ranks with the same place in their EP group (rank % ep)
// hold the same expert slice: the replicas of that slice. A rank allocates only its experts' tensors
// (E / ep per MoE layer: weights, gradients, moments); shared experts, attention and the indexer are
// held by every rank.
//
//   non-expert gradients   summed over every rank          (NCCL per layer as the backward finishes it;
//                                                           MPI in flat buckets of ~32 MiB)
//   expert gradients       summed over the slice's replicas
//   AdamW                  what the rank holds; under ZeRO (parallelism.zero, trainer/zero.h) only its
//                          shard of it, then an all-gather of the weights
//
// Checkpoints: plain data parallelism writes one file from rank 0 (every rank holds everything); runs
// with expert parallelism or ZeRO write a sharded checkpoint, every rank its part
// (trainer/checkpoint_sharded.h). Both load into any layout: a rank reads the ranges it holds.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "model/model.h"
#include "trainer/checkpoint.h"
#include "trainer/recipe.h"

namespace dsa {

class MpiExpertParallel;
class NcclComm;
class ReplicaComm;
class ZeroState;

class DataParallel {
 public:
  // How this rank holds the parameters under the recipe's layout: the model is made with it.
  static ParamLayout param_layout(const Recipe& recipe, Device device);

  // Collective over the world. Checks the layout, builds the groups, attaches expert parallelism and,
  // under ZeRO, gives the model's tensors their (sharded) storage.
  DataParallel(const Recipe& recipe, Model& model);
  ~DataParallel();

  int world() const { return world_; }
  int rank() const { return rank_; }
  int ep() const { return ep_; }
  int zero() const { return zero_level_; }

  // Every rank hashes the resolved recipe and its data directory listing (names and sizes); ranks that
  // differ from rank 0 end the job with a message naming them.
  void check_agreement(const Recipe& recipe) const;

  // Parameter values: the seeded initialization, or a checkpoint's (any layout, either format); each
  // rank reads the rows it holds. *state (may be null) gets the checkpoint's state.
  void init_params(uint64_t seed);
  void load_params(const std::string& checkpoint, TrainState* state);
  // Writes a checkpoint of the parameters and the moments into dir (collective); returns its path on
  // every rank. `moments` holds the trainer's moments when ZeRO is off.
  std::string save(const std::string& dir, const TrainState& state, const std::map<std::string, Tensor>& moments,
                   int keep_last);

  // AdamW state for the stage's trained tensors: zeros, or this rank's part of `resume_from`'s moments
  // (a checkpoint path; "" = fresh). Without ZeRO the moments go into `moments` (this rank's rows),
  // under ZeRO into the shards and `moments` stays empty.
  void begin_stage(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments,
                   const std::string& resume_from);

  // Before each micro-batch's backward: arms the per-layer hook that starts each layer's reduction as
  // soon as the backward has finished it (NCCL; ZeRO on both backends). `last`: the step's last one.
  void arm_overlap(const std::vector<Param*>& trained, bool last);
  // After the last micro-batch: finishes the gradient reduction (sums over the replicas).
  void allreduce_grads(const std::vector<Param*>& trained);
  // Global L2 norm of the summed gradients of `trained` (a subset of the stage's: each element counted once).
  double grad_norm(const std::vector<Param*>& trained) const;
  // Global-norm clipping of the gradients AdamW reads of `trained` (ops::clip_grads_'s rule).
  void clip_grads(const std::vector<Param*>& trained, double max_norm, double norm);
  // AdamW on what this rank owns; without ZeRO, moments["optim/m/<name>"], ["optim/v/<name>"] hold
  // this rank's rows of each trained tensor.
  void adamw_step(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments,
                  const std::function<ops::AdamWConfig(const Param&)>& config, int64_t step);

  // Test hook, called at the start of every step with the global step about to run: with
  // DSA_FAIL_AT_STEP=N and DSA_FAIL_RANK=R, rank R raises SIGKILL on itself (DSA_FAIL_MODE=kill, the
  // default) or throws (DSA_FAIL_MODE=throw) before step N+1.
  static void fail_hook(int64_t step);

  static constexpr int64_t kBucketBytes = 32ll << 20;

 private:
  struct Comms;
  void assign(Param& p, const Tensor& host);
  bool sharded_checkpoints() const { return zero_ != nullptr || ep_ > 1; }
  void on_grads_ready(int64_t group);
  void nccl_reduce(const std::vector<Param*>& params);

  Model& model_;
  std::unique_ptr<Comms> comms_;
  std::unique_ptr<ExpertParallel> expert_;
  std::unique_ptr<NcclComm> nccl_;           // GPU: every rank
  std::unique_ptr<NcclComm> nccl_replicas_;  // GPU: the replicas of this rank's expert slice (ep > 1)
  std::unique_ptr<ReplicaComm> mpi_all_, mpi_replicas_;  // CPU under ZeRO
  std::unique_ptr<ZeroState> zero_;
  bool armed_ = false, armed_last_ = false;
  bool overlap_ = true;  // parallelism.overlap: false leaves every reduction to allreduce_grads
  std::vector<Param*> armed_params_;
  std::vector<bool> reduced_;  // per armed param: reduction already launched (plain data parallelism)
  int world_ = 1, rank_ = 0, ep_ = 1, zero_level_ = 0;
  int64_t e0_ = 0, e1_ = 0;
};

// FNV-1a 64 of the names and sizes of the regular files under dir (sorted), as hex; "missing" when
// dir is absent.
std::string directory_fingerprint(const std::string& dir);

}  // namespace dsa
