// NCCL for the GPU collectives of data parallelism and ZeRO: the communicator is bootstrapped by
// broadcasting NCCL's unique id over MPI; gradients are all-reduced (or reduce-scattered) on a
// communication stream, bucket by bucket (one bucket per layer, launched as soon as the backward
// finishes that layer), so the transfers overlap the rest of the backward. A watchdog thread ends the job (MPI_Abort, with a message naming
// the rank) on an asynchronous NCCL error or when an all-reduce has not completed within the timeout
// (DSA_NCCL_TIMEOUT_S, default 300 s): a dead peer never leaves the job hanging.
#pragma once

#include <memory>
#include <vector>

#include "kernels/tensor.h"
#include "model/expert_parallel.h"
#include "trainer/replica_comm.h"

namespace dsa {

class NcclComm : public ReplicaComm {
 public:
  static bool available();  // built with NCCL and CUDA
  // Collective over MPI_COMM_WORLD: every rank calls it, with its GPU already selected.
  NcclComm();
  ~NcclComm() override;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // Sums the f32 device tensors over all ranks, in place, asynchronously: ordered after the work
  // queued so far on the compute stream, running on the communication stream.
  void allreduce_async(const std::vector<Tensor*>& tensors);
  // ReplicaComm, asynchronous in the same way; mark/wait_for order the compute stream after them.
  int size() const override;
  int rank() const override;
  void allreduce(Tensor& flat) override { allreduce_async({&flat}); }
  void reduce_scatter(const Tensor& full, Tensor& chunk) override;
  void allgather(Tensor& flat) override;
  int64_t mark() override;
  void wait_for(int64_t token) override;
  // A communicator over the ranks of this one with the same color (ncclCommSplit), e.g. the replicas
  // of one expert shard. Collective over this communicator.
  std::unique_ptr<NcclComm> split(int color, int key);
  // Expert parallelism over groups of `ep` consecutive ranks: token rows move by NCCL send/receive on
  // the compute stream; the per-rank row counts by MPI (they are needed on the host anyway).
  std::unique_ptr<ExpertParallel> make_expert_parallel(int ep);

  struct Impl;

 private:
  NcclComm(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsa
