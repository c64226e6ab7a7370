// ZeRO over the data-parallel replicas (Rajbhandari et al., stages 1 and 2), for both backends.
//
// Layout. The non-buffer tensors of one gradient group (Model::grad_group: a layer, the head, the
// embedding) form a bucket per replica set: a flat space of the tensors held here, each starting at a
// multiple of kAlign elements, padded to n * c for the set's n ranks; rank r owns the chunk
// [r c, (r + 1) c). Under expert parallelism a MoE layer has two buckets: its expert slices (over the
// slice's replicas) and everything else (over every rank).
//
//   per bucket                ZeRO-1                          ZeRO-2
//   weights the ops read      [n c] (bf16 GPU, f32 CPU)       the same
//   fp32 master weights       [c] (GPU; CPU: the weights'     the same
//                             own chunk)
//   gradients                 [n c] f32, all-reduced          [n c] only while a backward fills it, then
//                                                             reduce-scattered into [c] and released
//   AdamW m, v                [c] f32 each                    the same
//
// After the reduction each rank runs AdamW on the trained tensors' pieces of its chunk, casts the
// chunk into the weights (GPU) and all-gathers the weights; bucket b's gather overlaps the update of
// bucket b + 1 (NCCL runs on its own stream).
//
// NOTES: ZeRO-1 all-reduces whole gradients (as plain data parallelism does) instead of reduce-
// scattering them: every rank then holds the same summed gradients, so the gradient norm, clipping and
// each element's AdamW update are the computations of plain data parallelism, and ZeRO-1 equals it bit
// for bit whenever the all-reduce sums in the same order (two ranks always: a + b = b + a). ZeRO-2
// forms the norm from the shards and sums micro-batches after the reduction: equal within rounding.
// Tensors the GPU ops read in master precision (Model::reads_master, the MoE router: E x D per layer)
// stay whole on every rank with whole moments ("replicated"), all-reduced like plain data parallelism.
// NOTES: buckets are per layer, not per trained set: the layout of the weights must not change between
// stages. In the indexer warm-up a layer's bucket is reduced whole although only its indexer trains (the
// rest are zeros): the bandwidth of a layer, for a layout that serves every stage.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "kernels/ops.h"
#include "model/params.h"
#include "trainer/checkpoint_sharded.h"
#include "trainer/replica_comm.h"

namespace dsa {

// ZeRO's buckets for a list of tensors (name, elements held here) in model order: one bucket per
// (gradient group, expert slice or not), members at multiples of ZeroState::kAlign. With split_experts
// the routed-expert slices get buckets of their own (reduced over their replicas).
struct ZeroBucketShape {
  int64_t group = 0;
  bool experts = false;
  std::vector<size_t> members;   // indices into the list
  std::vector<int64_t> offsets;  // [members] first element of each in the flat space
  int64_t total = 0;             // end of the last member
};
std::vector<ZeroBucketShape> zero_buckets(const std::vector<std::pair<std::string, int64_t>>& tensors,
                                          bool split_experts);
// Elements of a bucket of `total` elements each of n ranks owns (a multiple of ZeroState::kAlign).
int64_t zero_chunk(int64_t total, int64_t n);

class ZeroState {
 public:
  static constexpr int64_t kAlign = 128;  // elements: 256 B of bf16, the alignment of every tensor and chunk

  // ps was made with ParamLayout::external_storage: every non-buffer tensor gets its storage here.
  // all: every rank; experts: the replicas of this rank's expert slice (null without expert parallelism).
  ZeroState(int stage, ParamStore& ps, Device device, ReplicaComm& all, ReplicaComm* experts);
  ~ZeroState();
  ZeroState(const ZeroState&) = delete;
  ZeroState& operator=(const ZeroState&) = delete;

  int stage() const { return stage_; }
  // Sets the rows p holds ([p.shape] f32 host values): the weights the ops read and, where this rank
  // owns them, the master weights.
  void set_value(Param& p, const Tensor& host);

  // The tensors trained from now on get fresh AdamW state (zeros); moments with these names in `src`
  // (a resumed checkpoint; may be null) are read instead, this rank's pieces only.
  void begin_stage(const std::vector<Param*>& trained, const CheckpointSource* src);

  // Gradient reduction of group g's buckets, called as the backward finishes the group: ZeRO-2 at
  // every micro-batch, ZeRO-1 on the last one (earlier ones accumulate locally).
  void reduce_group(int64_t group, bool last_micro);
  // After a micro-batch's backward: reduces the trained buckets no hook reduced, waits for every
  // reduction and (ZeRO-2) adds this micro-batch's shards to the step's.
  void finish_micro_batch(bool last_micro);

  // ZeRO-2, over the tensors `of` (trained ones): the squared gradient norm of this rank's shards, and
  // of the replicated tensors (the same on every rank); the caller sums the first over the world.
  double shard_sum_squares(const std::vector<Param*>& of) const;
  double replicated_sum_squares(const std::vector<Param*>& of) const;
  // ZeRO-2: scales the gradients AdamW reads of the tensors `of` (their shards, replicated ones whole).
  void scale_grads(const std::vector<Param*>& of, double coef);

  // AdamW on this rank's pieces of the trained tensors, then the weights' all-gather.
  void step(const std::function<ops::AdamWConfig(const Param&)>& config, int64_t step);

  // What this rank writes of a checkpoint: its chunks of every tensor's master weights and of the
  // trained tensors' moments; rank 0 also writes the replicated tensors whole.
  std::vector<StatePiece> pieces(bool root) const;

  // Bytes this rank holds, by kind (for the memory plan's tests and the start-up report).
  struct Bytes {
    int64_t weights = 0, master = 0, grads = 0, moments = 0;
  };
  Bytes bytes() const;

 private:
  struct Member {
    Param* p;
    int64_t offset;  // first element in the bucket's flat space
    int64_t numel;
  };
  struct Bucket;
  Bucket& bucket_of(const Param& p);
  void allocate_grads(Bucket& b);
  void release_grads(Bucket& b);
  void launch(Bucket& b, bool first_micro);
  Tensor master_piece(const Bucket& b, int64_t a, int64_t e) const;
  Tensor grad_piece(const Bucket& b, int64_t a, int64_t e) const;
  bool is_trained(const Param* p) const { return trained_.count(p) > 0; }

  int stage_;
  Device device_;
  ParamStore& ps_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  std::unordered_map<const Param*, std::pair<Bucket*, size_t>> index_;  // bucket and member of each tensor
  std::vector<Param*> replicated_;  // GPU: tensors read in master precision, whole on every rank
  std::map<std::string, Tensor> replicated_moments_;
  ReplicaComm& all_;
  std::unordered_set<const Param*> trained_;
  std::unordered_set<const Param*> replicated_sent_;  // replicated gradients all-reduced in this step
  bool first_micro_ = true;  // no micro-batch of this step has been reduced yet
};

}  // namespace dsa
