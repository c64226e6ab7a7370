// Data and expert parallelism of the trainer over MPI (CPU backend).
//
// Layout: every rank is a data-parallel rank (parallelism.dp is 0 or the world size) and reads its own
// slice of the global batch; expert-parallel groups of parallelism.ep consecutive ranks split the
// routed experts (model/expert_parallel.h). Ranks with the same place in their EP group (rank % ep)
// hold the same expert slice: the replicas of that shard.
//
//   non-expert gradients   summed over every rank          (flat buckets of ~32 MiB, MPI_Allreduce)
//   expert gradients       summed over the shard's replicas (only this rank's slice [e0, e1) is non-zero)
//   AdamW                  non-expert tensors everywhere; expert tensors on this rank's slice only
//
// NOTES: expert tensors keep their full [E, ...] shape on every rank (as do their AdamW moments); a
// rank reads, trains and owns rows [e0, e1) and leaves the other rows stale. Before a checkpoint,
// gather_to_root() copies the slices of ranks 1..ep-1 into rank 0's tensors, so checkpoints hold full
// tensors under their HF names and any EP layout loads any checkpoint unchanged (every rank reads the
// whole file). This trades memory for simplicity; fine on the CPU backend's model sizes.
//
// ZeRO-1 (parallelism.zero1, world > 1): the trained tensors of one replica set form a flat space
// (non-expert tensors over all ranks; expert slices over the shard's replicas), split in equal
// contiguous shards. A rank keeps AdamW m/v for its shard only, updates that part of the parameters and
// all-gathers the rest. The trainer's moments map then stays empty between checkpoints:
// gather_to_root() assembles the full moments on rank 0 for the file, release_moments() drops them,
// begin_stage() takes a resumed checkpoint's moments apart into shards. Bit-identical to zero1 off.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "model/model.h"
#include "trainer/recipe.h"

namespace dsa {

class MpiExpertParallel;
class NcclComm;

class DataParallel {
 public:
  // Collective over the world. Checks the layout, builds the groups and attaches expert parallelism to
  // the model when ep > 1.
  DataParallel(const Recipe& recipe, Model& model);
  ~DataParallel();

  int world() const { return world_; }
  int rank() const { return rank_; }
  int ep() const { return ep_; }

  // Every rank hashes the resolved recipe and its data directory listing (names and sizes); ranks that
  // differ from rank 0 end the job with a message naming them.
  void check_agreement(const Recipe& recipe) const;

  // A routed-expert tensor split over the EP group (mlp.experts.gate_up_proj / down_proj with ep > 1).
  bool sharded(const Param& p) const;
  int64_t expert_begin() const { return e0_; }  // this rank's experts [e0, e1)
  int64_t expert_end() const { return e1_; }

  // Sums the trained gradients over their replicas, in flat f32 buckets of bucket_bytes (CPU), or with
  // NCCL (GPU; buckets already launched during the backward by arm_overlap are not sent again).
  void allreduce_grads(const std::vector<Param*>& trained);
  // GPU data parallelism: before the last micro-batch's backward, arms the per-layer hook so each
  // layer's gradients start their NCCL all-reduce as soon as the backward has finished that layer.
  void arm_overlap(const std::vector<Param*>& trained);
  // Global L2 norm of the summed gradients (each expert slice counted once).
  double grad_norm(const std::vector<Param*>& trained) const;
  // AdamW on what this rank owns; moments["optim/m/<name>"], ["optim/v/<name>"] are full-sized.
  void adamw_step(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments,
                  const std::function<ops::AdamWConfig(const Param&)>& config, int64_t step);
  // Rank 0's parameters and moments become the full state (expert slices from ranks 1..ep-1, moment
  // shards under ZeRO-1).
  void gather_to_root(ParamStore& params, std::map<std::string, Tensor>& moments);

  // ZeRO-1 on: the trainer keeps no full moments (begin_stage builds the shards from what `moments`
  // holds, zeros otherwise, and empties it; release_moments empties it after a checkpoint).
  bool zero1() const { return zero1_; }
  void begin_stage(const std::vector<Param*>& trained, std::map<std::string, Tensor>& moments);
  void release_moments(std::map<std::string, Tensor>& moments) const;

  // Test hook, called at the start of every step with the global step about to run: with
  // DSA_FAIL_AT_STEP=N and DSA_FAIL_RANK=R, rank R raises SIGKILL on itself (DSA_FAIL_MODE=kill, the
  // default) or throws (DSA_FAIL_MODE=throw) before step N+1.
  static void fail_hook(int64_t step);

  static constexpr int64_t kBucketBytes = 32ll << 20;

 private:
  struct Comms;
  std::unique_ptr<Comms> comms_;
  std::unique_ptr<ExpertParallel> expert_;
  std::unique_ptr<NcclComm> nccl_;           // GPU data parallelism (world > 1)
  std::unique_ptr<NcclComm> nccl_replicas_;  // GPU: the replicas of this rank's expert shard (ep > 1)
  bool armed_ = false;
  std::vector<Param*> armed_params_;
  std::vector<bool> reduced_;            // per armed param: all-reduce already launched
  void on_grads_ready(int64_t group);
  void nccl_reduce(const std::vector<Param*>& params);
  int world_ = 1, rank_ = 0, ep_ = 1;
  int64_t e0_ = 0, e1_ = 0;
  bool zero1_ = false;
  struct ZeroGroup;
  std::vector<ZeroGroup> zero_;
};

// FNV-1a 64 of the names and sizes of the regular files under dir (sorted), as hex; "missing" when
// dir is absent.
std::string directory_fingerprint(const std::string& dir);

}  // namespace dsa
